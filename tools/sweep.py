"""The sweeps' skeleton: one checkpoint sampled and scored at each setting with the same seeds, then JSON, a table and a plot."""

import argparse
import json

from tools import dist
from tools.checkpoint import load_epoch
from tools.cli import UserError
from tools.generate import Guidance, Scoring, generate, score
from tools.plots import pyplot, save_figure
from tools.quality import fd_key
from tools.runs import open_run, run_flags, run_session

METRICS = ("KID", "precision", "recall", "class_accuracy")  # besides the FD, each with its spread over seed blocks
MIN_IMAGES = 40  # the metrics' 4 seed blocks of at least 10 images


def parser(module, doc):
    p = argparse.ArgumentParser(prog=f"python -m tools.{module}", description=doc, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_flags(p)
    p.add_argument("--num-images", type=int, default=1000, help="samples per setting (seeds 0 .. N-1, the same everywhere)")
    p.add_argument("--metric-features", choices=("classifier", "inception"), help="features for the metrics (default: per dataset)")
    p.add_argument("--inception-weights", help="local pt_inception-2015-12-05 weights (or set FID_INCEPTION_WEIGHTS)")
    return p


def parse(p, argv):
    """(args, cfg, outdir); a bad --num-images ends here, before anything is sampled."""
    args = p.parse_args(argv)
    if args.num_images < MIN_IMAGES:
        raise UserError(f"--num-images must be >= {MIN_IMAGES} (4 seed blocks of 10 for the metrics' spread), got {args.num_images}")
    return (args, *open_run(args))


def run_settings(outdir, settings, args, write, fid=None, after=None):
    """Sample, score each (label, config, guidance or None), then after(config, epoch, device); rank 0: write(epoch, [(config, out, run)])."""
    with run_session(outdir) as (rank, world, device):
        epoch = load_epoch(outdir, args.epoch, required=("epoch",))["epoch"]
        seeds = list(range(args.num_images))
        scoring = Scoring(quality=True, features=args.metric_features, fid=fid, inception_weights=args.inception_weights)
        results = []
        for label, c, guidance in settings:
            dist.print0(f"--- {label}")
            scoring.check(c, seeds)
            out, run = generate(c, outdir, seeds, device, epoch=epoch, guidance=guidance or Guidance())
            score(c, outdir, out, seeds, run, device, scoring)
            if after is not None:
                after(c, epoch, device)
            results.append((c, out, run))
        dist.on_rank0(write, epoch, results)


def quality_row(out, **row):
    """A setting's row from what score() wrote beside its sample folder: the FD, KID and the rest with their spreads."""
    with open(f"{out}.quality.json") as f:
        q = json.load(f)
    fd = fd_key(q)
    row.update(count=q["count"], nfe=q["nfe"], fd_name=fd, fd=q[fd], fd_std=q[fd + "_std"], samples=out)
    return row | {k: q[k] for m in METRICS if m in q for k in (m, m + "_std")}


def pm(row, key, spec=".3f", scale=1):
    return "-" if key not in row else f"{format(scale * row[key], spec)} +- {format(scale * row[key + '_std'], spec)}"


def table(title, rows, first, last=()):
    """Markdown: one line per row, the setting's columns `first` [(header, cell function)], the metrics, `last`."""
    columns = [*first, (rows[0]["fd_name"], lambda r: pm(r, "fd")), ("KID", lambda r: pm(r, "KID", ".4f")),
               ("precision", lambda r: pm(r, "precision")), ("recall", lambda r: pm(r, "recall")), *last]
    lines = [title, "", "| " + " | ".join(h for h, _ in columns) + " |", "|" + "---|" * len(columns)]
    lines += ["| " + " | ".join(cell(r) for _, cell in columns) + " |" for r in rows]
    return "\n".join(lines) + "\n"


def plot(path, title, panels, xlabel, log_x=False):
    """One axis per panel (ylabel, {line label: [(x, y, err)]}), error bars = std over seed blocks."""
    plt = pyplot()
    fig, axes = plt.subplots(1, len(panels), figsize=(4.5 * len(panels), 3.4), squeeze=False)
    for ax, (ylabel, lines) in zip(axes[0], panels):
        for label, pts in lines.items():
            if pts:
                x, y, err = zip(*sorted(pts))
                ax.errorbar(x, y, yerr=err, fmt="o-", capsize=3, markersize=4, label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel, xscale="log" if log_x else "linear")
        ax.grid(alpha=0.3, which="both")
        if len(lines) > 1:
            ax.legend(fontsize=7)
    fig.suptitle(title)
    fig.tight_layout()
    save_figure(fig, path)


def points(rows, x, key):
    return [(r[x], r[key], r.get(key + "_std", 0)) for r in rows if r.get(key) is not None]
