"""Post-hoc EMA sweep: reconstruct several sigma_rel from a run's snapshots, score each, plot metric vs sigma_rel.

    python -m tools.ema_sweep --outdir runs/demo/E --sigma-rels 0.03,0.05,0.075,0.1,0.15
    torchrun --nproc_per_node=8 -m tools.ema_sweep --outdir runs/cifar10-E --num-images 10000 sample.batch=512

Each sigma_rel is sampled and scored as sample.py --score does (FD, KID, precision and recall with the
dataset's default features, or --metric-features) and probed as probe.py does, with `--ema sigma_rel=X`,
in this process (under torchrun, on all its ranks); each reconstruction is built once by rank 0 into
OUTDIR/posthoc/ and read from there by sampling and probe alike. The rows land in the run's
metrics.jsonl and probe JSON files as usual, and this script gathers them into
OUTDIR/ema_sweep_epoch_<N>.{json,png}. The curve chooses nothing: the best point of N is for the
reader, and compare.py labels it "best of N". The run's own config.yaml is used unless --config is given;
section.key=value overrides apply to sampling and probing alike.
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.ema_sweep ...")

import argparse
import copy
import os

from tools import dist
from tools.checkpoint import load_epoch, read_jsonl, write_json
from tools.cli import UserError, parse_numbers, run_main
from tools.config import check_ranges
from tools.generate import Scoring, generate, score
from tools.linear_probe import read_probe_results
from tools.log import to_run_log
from tools.plots import pyplot, save_figure
from tools.probing import probe, resolve_probe
from tools.quality import fd_key
from tools.runs import resolve

MIN_IMAGES = 40  # the metrics' 4 seed blocks of at least 10 images (tools/generate.py Scoring)


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.ema_sweep", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
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


def check_sweep(sigma_rels, num_images):
    check_ranges("ema", {"sigma_rels": sigma_rels}, names={"sigma_rels": "--sigma-rels"})  # the range of ema.sigma_rels
    if num_images < MIN_IMAGES:
        raise UserError(f"--num-images must be >= {MIN_IMAGES} (4 seed blocks of 10 for the metrics' spread), got {num_images}")


def ema_sweep(cfg, outdir, device, sigma_rels, num_images=1000, epoch=None, features=None, inception_weights=None,
              with_probe=True):
    """Sample, score and probe the run at each post-hoc sigma_rel (collective under torchrun); rank 0 then writes
    OUTDIR/ema_sweep_epoch_<N>.{json,png} and returns the table's rows."""
    check_sweep(sigma_rels, num_images)
    epoch = load_epoch(outdir, epoch, required=("epoch",))["epoch"]
    seeds = list(range(num_images))
    scoring = Scoring(quality=True, features=features, inception_weights=inception_weights)
    for s in sigma_rels:
        at = copy.deepcopy(cfg)
        at["sample"]["ema"] = at["probe"]["ema"] = f"sigma_rel={s:g}"
        dist.print0(f"--- sigma_rel={s:g}")
        scoring.check(at, seeds)
        out, run = generate(at, outdir, seeds, device, epoch=epoch)
        score(at, outdir, out, seeds, run, device, scoring)
        if with_probe:
            resolve_probe(at)
            probe(at, outdir, device, epoch=epoch)
    return dist.on_rank0(write_sweep, outdir, epoch, sigma_rels)


def write_sweep(outdir, epoch, sigma_rels):
    """The newest quality and probe rows of each sigma_rel (the ones just written) as a table, JSON and plot."""
    rows = []
    metrics = [r for r in read_jsonl(os.path.join(outdir, "metrics.jsonl")) if r.get("kind") == "quality" and r.get("epoch") == epoch]
    probes = [r for r in read_probe_results(outdir) if r.get("epoch") == epoch]
    for s in sigma_rels:
        ema = f"sigma_rel={s:g}"
        row = dict(sigma_rel=s, epoch=epoch)
        scored = [r for r in metrics if r.get("ema") == ema]
        if scored:
            q = scored[-1]
            name = fd_key(q)
            row.update(fd_name=name, fd=q[name], fd_std=q[name + "_std"], kid=q["KID"], kid_std=q["KID_std"],
                       precision=q["precision"], recall=q["recall"], count=q["count"])
        accs = [r for r in probes if r.get("ema") == ema]
        if accs:
            row["probe_acc"] = accs[-1]["test_accuracy_pct"]
        rows.append(row)
    base = os.path.join(outdir, f"ema_sweep_epoch_{epoch}")
    write_json(base + ".json", rows)
    plot(rows, base + ".png", os.path.basename(os.path.normpath(outdir)))
    for r in rows:
        print("  ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()))
    print(f"written: {base}.json, {base}.png")
    return rows


def plot(rows, path, title):
    keys = [k for k in ("fd", "kid", "probe_acc") if any(k in r for r in rows)]
    if not keys:
        return
    plt = pyplot()
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
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    sigma_rels = parse_numbers(args.sigma_rels, "--sigma-rels")
    check_sweep(sigma_rels, args.num_images)
    with dist.session() as (rank, world, device):
        if rank == 0:
            to_run_log(outdir)
        ema_sweep(cfg, outdir, device, sigma_rels, args.num_images, args.epoch, args.metric_features, args.inception_weights,
                  with_probe=not args.no_probe)


if __name__ == "__main__":
    run_main(main)
