"""Post-hoc EMA sweep: reconstruct several sigma_rel from a run's snapshots, score each, plot metric vs sigma_rel.

    python tools/ema_sweep.py --outdir runs/demo/E --sigma-rels 0.03,0.05,0.075,0.1,0.15
    torchrun --nproc_per_node=8 tools/ema_sweep.py --outdir runs/cifar10-E --num-images 10000 sample.batch=512

Each sigma_rel is sampled and scored as sample.py --score does (FD, KID, precision and recall with the
dataset's default features, or --metric-features) and probed as probe.py does, with `--ema sigma_rel=X`,
in this process (under torchrun, on all its ranks); each reconstruction is built once by rank 0 into
OUTDIR/posthoc/ and read from there by sampling and probe alike. The rows land in the run's
metrics.jsonl and probe JSON files as usual, and this script gathers them into
OUTDIR/ema_sweep_epoch_<N>.{json,png}. The curve chooses nothing: the best point of N is for the
reader, and compare.py labels it "best of N". The run's own config.yaml is used unless --config is given;
section.key=value overrides apply to sampling and probing alike.
"""

import argparse
import json
import os
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[0] = ROOT  # import tools.* and the entry scripts from the repository root

import probe  # noqa: E402
import sample  # noqa: E402
from tools import dist  # noqa: E402
from tools.checkpoint import atomic_write, load_epoch  # noqa: E402
from tools.cli import UserError, parse_numbers, run_main  # noqa: E402
from tools.checkpoint import read_jsonl  # noqa: E402
from tools.compare import read_probe_results  # noqa: E402
from tools.config import check_ranges  # noqa: E402
from tools.runs import resolve  # noqa: E402


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", help="the run directory; its config.yaml is the config unless --config is given")
    p.add_argument("--config", help="a YAML config instead of the run's own")
    p.add_argument("--epoch", type=int, help="checkpoint whose time the reconstructions target (default: newest)")
    p.add_argument("--sigma-rels", default="0.03,0.05,0.075,0.10,0.15,0.20")
    p.add_argument("--num-images", type=int, default=1000, help="samples per sigma_rel for the quality metrics")
    p.add_argument("--metric-features", choices=("classifier", "inception"), help="features for the metrics (default: per dataset)")
    p.add_argument("--inception-weights")
    p.add_argument("--no-probe", action="store_true")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. sample.batch=512 sample.steps=32")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    sigma_rels = parse_numbers(args.sigma_rels, "--sigma-rels")
    check_ranges("ema", {"sigma_rels": sigma_rels}, names={"sigma_rels": "--sigma-rels"})  # the range of ema.sigma_rels
    if args.num_images < 40:  # sample.py --score: 4 seed blocks of at least 10 images (tools/quality.py score_samples)
        raise UserError(f"--num-images must be >= 40 (4 seed blocks of 10 for the metrics' spread), got {args.num_images}")
    epoch = load_epoch(outdir, args.epoch, required=("epoch",))["epoch"]
    common = ["--outdir", outdir, "--epoch", str(epoch), *(["--config", args.config] if args.config else [])]
    with dist.session():
        for s in sigma_rels:
            ema = f"sigma_rel={s:g}"
            dist.print0(f"--- {ema}")
            sample.main([*common, "--ema", ema, "--seeds", f"0-{args.num_images - 1}", "--score",
                         *(["--metric-features", args.metric_features] if args.metric_features else []),
                         *(["--inception-weights", args.inception_weights] if args.inception_weights else []), *args.overrides])
            if not args.no_probe:
                probe.main([*common, "--ema", ema, *args.overrides])
        if dist.rank() == 0:
            summarise(outdir, epoch, sigma_rels)


def summarise(outdir, epoch, sigma_rels):
    rows = []
    metrics = [r for r in read_jsonl(os.path.join(outdir, "metrics.jsonl")) if r.get("kind") == "quality" and r.get("epoch") == epoch]
    probes = [r for r in read_probe_results(outdir) if r.get("epoch") == epoch]
    for s in sigma_rels:
        ema = f"sigma_rel={s:g}"
        row = dict(sigma_rel=s, epoch=epoch)
        scored = [r for r in metrics if r.get("ema") == ema]  # the newest row: the one just written
        if scored:
            q = scored[-1]
            name = next(k for k in q if k.startswith("FD_") and not k.endswith("_std"))
            row.update(fd_name=name, fd=q[name], fd_std=q[name + "_std"], kid=q["KID"], kid_std=q["KID_std"],
                       precision=q["precision"], recall=q["recall"], count=q["count"])
        accs = [r for r in probes if r.get("ema") == ema]
        if accs:
            row["probe_acc"] = accs[-1]["test_accuracy_pct"]
        rows.append(row)
    base = os.path.join(outdir, f"ema_sweep_epoch_{epoch}")
    atomic_write(base + ".json", lambda f: f.write(json.dumps(rows, indent=1).encode()))
    plot(rows, base + ".png", os.path.basename(os.path.normpath(outdir)))
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print(f"written: {base}.json, {base}.png")


def plot(rows, path, title):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    keys = [k for k in ("fd", "kid", "probe_acc") if any(k in r for r in rows)]
    if not keys:
        return
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.2), squeeze=False)
    for ax, k in zip(axes[0], keys):
        pts = [(r["sigma_rel"], r[k], r.get(k + "_std", 0)) for r in rows if k in r]
        x, y, err = zip(*pts)
        ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3)
        ax.set_xlabel("sigma_rel")
        ax.set_ylabel({"fd": next((r["fd_name"] for r in rows if "fd_name" in r), "FD"), "kid": "KID",
                       "probe_acc": "probe accuracy (%)"}[k])
        ax.grid(alpha=0.3)
    fig.suptitle(f"post-hoc EMA sweep: {title}")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


if __name__ == "__main__":
    run_main(main)
