"""Side-by-side comparison of runs (e.g. the C, E and G runs of one dataset): a table and plots.

    python tools/compare.py runs/cifar10-C runs/cifar10-E runs/cifar10-G [--out runs/cifar10-compare]

Inputs are only what runs already write, so runs trained on different machines compare alike:
config.yaml, metrics.jsonl (training rows; FID rows from sample.py --fid), checkpoints/*.probe.json
(probe.py) and ema_sweep_epoch_*.json (tools/ema_sweep.py).
"""

import argparse
import glob
import json
import os
import statistics
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

import yaml  # noqa: E402

from tools.cli import UserError, run_main  # noqa: E402


def read_jsonl(path):
    rows = []
    if os.path.exists(path):
        with open(path) as f:
            for line in f:
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError:  # a line cut short by a killed run
                    pass
    return rows


def read_probe_results(outdir):
    rows = []
    for path in glob.glob(os.path.join(outdir, "checkpoints", "epoch_*.probe.json")):
        with open(path) as f:
            rows += list(json.load(f).values())
    return rows


def summarize(outdir):
    """One table row: what the run is, how fast it trained, and its best numbers."""
    cfg_path = os.path.join(outdir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise UserError(f"{outdir} is not a run directory (no config.yaml)")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    from tools.config import build_network
    import torch
    with torch.device("meta"):
        params = sum(p.numel() for p in build_network(cfg).parameters())
    metrics = read_jsonl(os.path.join(outdir, "metrics.jsonl"))
    train_rows = [r for r in metrics if "img_per_s" in r]
    fids = [r for r in metrics if "fid" in r]
    probes = read_probe_results(outdir)
    sweeps = []
    for path in glob.glob(os.path.join(outdir, "ema_sweep_epoch_*.json")):
        with open(path) as f:
            sweeps += json.load(f)
    row = dict(run=os.path.basename(os.path.normpath(outdir)), outdir=outdir, config=cfg["unet"][4:-3],
               dataset=cfg["data"]["dataset"], params_M=params / 1e6,
               img_per_s=statistics.median(r["img_per_s"] for r in train_rows[1:] or train_rows) if train_rows else None,
               kimg=max((r["kimg"] for r in train_rows), default=0.0), fids=fids, probes=probes, sweeps=sweeps)
    if fids:
        best = min(fids, key=lambda r: r["fid"])
        row.update(best_fid=best["fid"], best_fid_at=f"epoch {best['epoch']}, {best['ema']}")
    if probes:
        best = max(probes, key=lambda r: r["test_accuracy_pct"])
        row.update(best_probe=best["test_accuracy_pct"], best_probe_at=f"epoch {best['epoch']}, {best['block']} @ sigma={best['sigma']:g}, {best['ema']}")
    by = "fid" if any("fid" in s for s in sweeps) else "probe_acc"
    scored = [s for s in sweeps if by in s]
    if scored:
        best = (min if by == "fid" else max)(scored, key=lambda s: s[by])
        row["best_sigma_rel"] = f"{best['sigma_rel']:g} (by {'FID' if by == 'fid' else 'probe'})"
    return row


def table(rows):
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    lines = ["| run | config | params | train img/s | kimg | best FID (where) | best probe % (where) | best sigma_rel |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['run']} | {r['config']} | {r['params_M']:.2f}M | {fmt(r['img_per_s'], '.0f')} | {r['kimg']:.1f} | "
                     f"{fmt(r.get('best_fid'), '.2f')}{' (' + r['best_fid_at'] + ')' if 'best_fid' in r else ''} | "
                     f"{fmt(r.get('best_probe'), '.2f')}{' (' + r['best_probe_at'] + ')' if 'best_probe' in r else ''} | "
                     f"{r.get('best_sigma_rel', '-')} |")
    return "\n".join(lines)


def plots(rows, out):
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    written = []

    def figure(name, series, xlabel, ylabel):
        if not any(pts for _, pts in series):
            return
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, pts in series:
            if pts:
                ax.plot(*zip(*sorted(pts)), "o-", label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        path = os.path.join(out, name)
        fig.savefig(path, dpi=100)
        plt.close(fig)
        written.append(path)

    label = lambda r: f"{r['run']} ({r['config']})"
    figure("fid_vs_epoch.png", [(label(r), [(f["epoch"], f["fid"]) for f in r["fids"] if f.get("ema") == "classic"]) for r in rows],
           "epoch", "FID (classic EMA)")
    figure("probe_vs_epoch.png", [(label(r), [(p["epoch"], p["test_accuracy_pct"]) for p in r["probes"] if p.get("ema") == "classic"])
                                  for r in rows], "epoch", "probe test accuracy % (classic EMA)")
    figure("fid_vs_sigma_rel.png", [(label(r), [(s["sigma_rel"], s["fid"]) for s in r["sweeps"] if "fid" in s]) for r in rows],
           "sigma_rel", "FID (post-hoc EMA)")
    figure("probe_vs_sigma_rel.png", [(label(r), [(s["sigma_rel"], s["probe_acc"]) for s in r["sweeps"] if "probe_acc" in s])
                                      for r in rows], "sigma_rel", "probe test accuracy % (post-hoc EMA)")
    return written


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="folder for compare.md and the plots (default: next to the first run, <parent>/compare)")
    args = p.parse_args()
    rows = [summarize(r) for r in args.runs]
    out = args.out or os.path.join(os.path.dirname(os.path.normpath(args.runs[0])) or ".", "compare")
    os.makedirs(out, exist_ok=True)
    text = table(rows)
    with open(os.path.join(out, "compare.md"), "w") as f:
        f.write(text + "\n")
    written = plots(rows, out)
    print(text)
    print(f"written: {os.path.join(out, 'compare.md')}" + "".join(f", {w}" for w in written))


if __name__ == "__main__":
    run_main(main)
