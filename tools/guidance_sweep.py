"""Guidance sweep: sample and score a run at several guidance weights W, then tabulate and plot quality vs W.

    python -m tools.guidance_sweep --outdir runs/digits-E-cond --weights 1,1.5,2,3              # classifier-free
    python -m tools.guidance_sweep --outdir runs/digits-E-cond --weights 1,1.5,2,3 --guide runs/digits-E-cond:5
    torchrun --nproc_per_node=8 -m tools.guidance_sweep --outdir runs/cifar10-E-cond --num-images 10000

Each W is sampled and scored as `sample.py --guidance W --score` does (FD, KID, precision, recall and, for a
conditional run, the dataset classifier's accuracy against the requested classes, each as mean +- std over seed
blocks), in this process (under torchrun, on all its ranks), with the same seeds at every W; W = 1 is the
unguided baseline. Without --guide the guidance is classifier-free (a conditional run trained with label dropout);
with --guide it is autoguidance by that weaker model (Karras et al. 2024, arXiv 2406.02507). The rows land in the
run's metrics.jsonl as usual; this script gathers them into OUTDIR/guidance_sweep_epoch_<N>-<guide>.json and draws
every sweep of that epoch found there (CFG and each guide, one line each) into OUTDIR/guidance_sweep_epoch_<N>.png.
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.guidance_sweep ...")

import argparse
import json
import os

from tools import dist
from tools.checkpoint import files_named, load_epoch, read_jsonl, write_json
from tools.cli import UserError, parse_numbers, run_main
from tools.generate import Scoring, generate, score, split_run_spec
from tools.log import to_run_log
from tools.plots import pyplot, save_figure
from tools.quality import fd_key
from tools.runs import resolve

METRICS = ("KID", "precision", "recall", "class_accuracy")  # besides the FD, each with its spread over seed blocks


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.guidance_sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", help="the run directory; its config.yaml is the config unless --config is given")
    p.add_argument("--config", help="a YAML config instead of the run's own")
    p.add_argument("--epoch", type=int, help="checkpoint to sample (default: the newest)")
    p.add_argument("--weights", default="1,1.5,2,3,4", help="guidance weights W, comma-separated (1 = unguided)")
    p.add_argument("--guide", metavar="RUN[:EPOCH]", help="autoguidance by this weaker model (default: classifier-free)")
    p.add_argument("--guide-ema", help="the guide's weights (default: sample.ema of its config)")
    p.add_argument("--num-images", type=int, default=1000, help="samples per W (seeds 0 .. N-1, the same at every W)")
    p.add_argument("--metric-features", choices=("classifier", "inception"), help="features for the metrics (default: per dataset)")
    p.add_argument("--inception-weights")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. sample.batch=512 sample.steps=32")
    return p.parse_args(argv)


def guidance_sweep(cfg, outdir, device, weights, num_images=1000, epoch=None, guide=None, guide_ema=None, features=None,
                   inception_weights=None):
    """Sample and score the run at each guidance weight, the same seeds at every W (collective under torchrun); rank 0
    then writes OUTDIR/guidance_sweep_epoch_<N>-<guide>.json and the plot of every sweep of that epoch, and returns
    the rows."""
    epoch = load_epoch(outdir, epoch, required=("epoch",))["epoch"]
    seeds = list(range(num_images))
    scoring = Scoring(quality=True, features=features, inception_weights=inception_weights)
    scoring.check(cfg, seeds)
    for w in weights:
        dist.print0(f"--- guidance {w:g}" + (f" (guide {guide})" if guide and w != 1 else ""))
        out, run = generate(cfg, outdir, seeds, device, epoch=epoch, guidance=w, guide=guide, guide_ema=guide_ema)
        score(cfg, outdir, out, seeds, run, device, scoring)
    return dist.on_rank0(write_sweep, outdir, epoch, cfg["sample"]["ema"], weights, guide)


def guide_name(rows):
    """'cfg', or 'auto-<guide run>-epoch_<N>' for autoguidance: the sweep's file name and plot label."""
    guided = [r for r in rows if "guide" in r]
    if not guided:
        return "cfg"
    g = guided[0]
    return f"auto-{os.path.basename(os.path.normpath(g['guide']))}-epoch_{g['guide_epoch']}"


def write_sweep(outdir, epoch, ema, weights, guide):
    """The newest quality row of each W (the one just written) -> OUTDIR/guidance_sweep_epoch_<N>-<guide>.json, a table
    on stdout, and the plot of every sweep of this epoch."""
    quality = [r for r in read_jsonl(os.path.join(outdir, "metrics.jsonl"))
               if r.get("kind") == "quality" and r.get("epoch") == epoch and r.get("ema") == ema and r.get("classes", "mix") == "mix"]
    guide_dir = None if guide is None else split_run_spec(guide)[0]
    rows = []
    for w in weights:
        # W = 1 is unguided whatever the guide; otherwise the row of this guide (none for classifier-free guidance).
        match = [q for q in quality if q.get("guidance", 1) == w and (w == 1 and "guide" not in q or w != 1 and q.get("guide") == guide_dir)]
        if not match:
            continue
        q = match[-1]
        fd = fd_key(q)
        row = dict(guidance=w, epoch=epoch, count=q["count"], fd_name=fd, fd=q[fd], fd_std=q[fd + "_std"], samples=q["samples"])
        row.update({k: q[k] for m in METRICS if m in q for k in (m, m + "_std")})
        row.update({k: q[k] for k in ("guide", "guide_epoch", "guide_ema") if k in q})
        rows.append(row)
    if not rows:
        raise UserError(f"no quality rows for epoch {epoch} in {outdir}/metrics.jsonl")
    name = guide_name(rows)
    base = os.path.join(outdir, f"guidance_sweep_epoch_{epoch}")
    write_json(f"{base}-{name}.json", rows)
    print(table(rows, name), end="")
    sweeps = {}
    for path in files_named(outdir, f"{os.path.basename(base)}-", ".json"):
        with open(path) as f:
            sweeps[path[len(base) + 1:-len(".json")]] = json.load(f)
    plot(sweeps, f"{base}.png", f"{os.path.basename(os.path.normpath(outdir))}, epoch {epoch}")
    print(f"written: {base}-{name}.json, {base}.png")
    return rows


def table(rows, name):
    """Markdown: one line per W, every metric as mean +- std over the seed blocks."""
    pm = lambda r, k, scale=1, spec=".3f": "-" if k not in r else f"{format(scale * r[k], spec)} +- {format(scale * r[k + '_std'], spec)}"
    lines = [f"Guidance sweep ({name}): {rows[0]['count']} samples per W, mean +- std over seed blocks.", "",
             f"| W | {rows[0]['fd_name']} | KID | precision | recall | requested-class acc % |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['guidance']:g} | {pm(r, 'fd')} | {pm(r, 'KID', spec='.4f')} | {pm(r, 'precision')} | {pm(r, 'recall')} | "
                     f"{pm(r, 'class_accuracy', 100, '.1f')} |")
    return "\n".join(lines) + "\n"


def plot(sweeps, path, title):
    """FD and requested-class accuracy (where measured) against W, one line per sweep, error bars = std over blocks."""
    plt = pyplot()
    keys = [k for k in ("fd", "class_accuracy") if any(k in r for rows in sweeps.values() for r in rows)]
    fig, axes = plt.subplots(1, len(keys), figsize=(4.5 * len(keys), 3.4), squeeze=False)
    for ax, k in zip(axes[0], keys):
        for name, rows in sweeps.items():
            pts = sorted((r["guidance"], r[k], r[k + "_std"]) for r in rows if k in r)
            if pts:
                x, y, err = zip(*pts)
                ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, label=name)
        ax.set_xlabel("guidance weight W")
        ax.set_ylabel(next(r["fd_name"] for rows in sweeps.values() for r in rows) if k == "fd" else "requested-class accuracy")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.suptitle(f"guidance sweep: {title}")
    fig.tight_layout()
    save_figure(fig, path)


def main(argv=None):
    args = parse_args(argv)
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    weights = parse_numbers(args.weights, "--weights")
    with dist.session() as (rank, world, device):
        if rank == 0:
            to_run_log(outdir)
        guidance_sweep(cfg, outdir, device, weights, args.num_images, args.epoch, args.guide, args.guide_ema,
                       args.metric_features, args.inception_weights)


if __name__ == "__main__":
    run_main(main)
