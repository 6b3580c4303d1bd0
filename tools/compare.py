"""Side-by-side comparison of runs (e.g. the C, E and G runs of one dataset): a table and plots (docs/METRICS.md).

    python -m tools.compare runs/cifar10-C runs/cifar10-E runs/cifar10-G [--out runs/cifar10-compare]
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.compare ...")

import argparse
import collections
import contextlib
import json
import math
import os
import statistics

import yaml

from tools.checkpoint import atomic_write, numbered_files, read_jsonl
from tools.cli import UserError, run_main
from tools.config import parameter_count, validate
from tools.evaluation import summarize_curves
from tools.linear_probe import read_probe_results
from tools.plots import pyplot, save_figure
from tools.quality import fd_key


def _own(quality, ema):  # the run's own EMA, unguided, balanced class mix (sample.py's default)
    return [q for q in quality if q["ema"] == ema and q.get("guidance", 1) == 1 and q.get("classes", "mix") == "mix"]


def read_run(outdir):
    cfg_path = os.path.join(outdir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise UserError(f"{outdir} is not a run directory (no config.yaml)")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    with contextlib.suppress(UserError):
        cfg = validate(cfg)  # keys the file lacks get their defaults, so that all runs compare alike
    metrics = read_jsonl(os.path.join(outdir, "metrics.jsonl"))
    train_rows = [r for r in metrics if "img_per_s" in r]
    quality = [r for r in metrics if r.get("kind") == "quality"]
    sweeps = []
    for _, path in numbered_files(outdir, "ema_sweep_epoch_", ".json"):
        with open(path) as f:
            sweeps += json.load(f)
    ema, nll = cfg["sample"]["ema"], [r for r in metrics if r.get("kind") == "likelihood"]
    row = dict(run=os.path.basename(os.path.normpath(outdir)), outdir=outdir, cfg=cfg, config=cfg["unet"][4:-3], dataset=cfg["data"]["dataset"],
               params_M=parameter_count(cfg) / 1e6, ema=ema, quality=quality, sweeps=sweeps, probes=read_probe_results(outdir),
               img_per_s=statistics.median(r["img_per_s"] for r in train_rows[1:] or train_rows) if train_rows else None,
               kimg=max((r["kimg"] for r in train_rows), default=0.0), evals=[r for r in metrics if r.get("kind") == "eval"],
               curve=[r for r in metrics if r.get("kind") == "curve"], eval_summary=summarize_curves(metrics),
               # bits/dim: the newest epoch with the run's own EMA, its largest image count, Hutchinson before exact
               likelihood=max([r for r in nll if r["ema"] == ema] or nll, default=None,
                              key=lambda r: (r["epoch"], r["num_images"], r["divergence"] != "exact")))
    if own := _own(quality, ema):
        row["final_quality"] = max(own, key=lambda q: (q["epoch"], q["count"]))
    row["probe"] = None
    if row["probes"]:  # chosen on held-out training data, with the binomial standard error of its test accuracy
        best = max(row["probes"], key=lambda r: (r.get("holdout_accuracy_pct", float("-inf")), r["epoch"]))
        p = best["test_accuracy_pct"] / 100
        row["probe"] = dict(best, std=100 * math.sqrt(p * (1 - p) / best["num_test"]), of=len(row["probes"]))
    if scored := [s for s in sweeps if "fd" in s]:
        best = min(scored, key=lambda s: s["fd"])
        row["best_sigma_rel"] = f"{best['sigma_rel']:g} (best of {len(scored)} by {best['fd_name']})"
    return row


def rank(values):
    """Ranks of (mean, std), lower first; within sqrt(std_a^2 + std_b^2) of a group's best is a tie: ['1=', '1=', '3']."""
    order = sorted(range(len(values)), key=lambda i: values[i][0])
    ranks, group_best, place = [None] * len(values), None, 0
    for pos, i in enumerate(order):
        m, s = values[i]
        if group_best is None or m - values[group_best][0] > math.hypot(s, values[group_best][1]):
            group_best, place = i, pos + 1
        ranks[i] = place
    return [f"{r}=" if ranks.count(r) > 1 else str(r) for r in ranks]


def table(rows):
    """Markdown: a quality table per extractor and sample count (commonest first), then curves and replicates."""
    pm = lambda q, k, spec, scale=1: f"{scale * q[k]:{spec}} +- {scale * q[k + '_std']:{spec}}"
    kind_of = lambda q: (fd_key(q), q["count"], q["block_size"])
    scored = [r for r in rows if "final_quality" in r]
    nll = any(r["likelihood"] for r in rows)  # a bits/dim column only where some run has one
    lines = []
    for kind in [k for k, _ in collections.Counter(kind_of(r["final_quality"]) for r in scored).most_common()] or [None]:
        same = [r for r in scored if kind_of(r["final_quality"]) == kind]
        fd = kind[0] if kind else "FD"
        lines.append("(no quality rows: run sample.py --score)" if kind is None else f"Quality: {kind[1]} samples per run, mean +- std over "
                     f"{kind[1] // kind[2]} seed blocks of {kind[2]}; rank by {fd}, ties within the combined spread.")
        ranks = dict(zip(map(id, same), rank([(r["final_quality"][fd], r["final_quality"][fd + "_std"]) for r in same])))
        lines += ["", f"| rank | run | config | params | train img/s | kimg | {fd} | KID | precision | recall | memorised % | "
                  "requested-class acc % | probe test % (chosen on held-out train, of N) | best sigma_rel |"
                  + (" bits/dim (held-out, +- se) |" if nll else ""), "|---" * (14 + nll) + "|"]
        for r in sorted(rows, key=lambda r: int(ranks[id(r)].rstrip("=")) if id(r) in ranks else 10 ** 9):
            q, pr = r["final_quality"] if id(r) in ranks else None, r["probe"]
            cells = ["-"] * 6 if q is None else [
                pm(q, fd, ".3f"), pm(q, "KID", ".4f"), pm(q, "precision", ".3f"), pm(q, "recall", ".3f"),
                pm(q, "memorised_fraction", ".1f", 100), pm(q, "class_accuracy", ".1f", 100) if "class_accuracy" in q else "-"]
            probe = "-" if pr is None else (f"{pr['test_accuracy_pct']:.2f} +- {pr['std']:.2f} (n={pr['num_test']}; "
                                            f"{pr['block']} @ sigma={pr['sigma']:g}, {pr['ema']}, epoch {pr['epoch']}; of {pr['of']})")
            cells = [ranks.get(id(r), "-"), r["run"], r["config"], f"{r['params_M']:.2f}M", "-" if r["img_per_s"] is None
                     else f"{r['img_per_s']:.0f}", f"{r['kimg']:.1f}", *cells, probe, r.get("best_sigma_rel", "-")]
            b = r["likelihood"]
            bits = "-" if b is None else (f"{b['bits_per_dim']:.4f} +- {b['bits_per_dim_se']:.4f} (n={b['num_images']}, "
                                          f"{b['divergence']}, epoch {b['epoch']})")
            lines.append("| " + " | ".join(cells + ([bits] if nll else [])) + " |")
        lines.append("")
    return "\n".join(lines + curves_table(rows) + replicates_table(rows)).rstrip() + "\n"


def replicate_stats(r):
    q, s, out = r.get("final_quality"), r["eval_summary"] or {}, {}
    if q is not None:
        name = fd_key(q)
        best = min((x for x in _own(r["quality"], r["ema"]) if x["count"] == q["count"]), key=lambda x: x[name])
        out.update(fd=q[name], kid=q["KID"], precision=q["precision"], recall=q["recall"], memorised=100 * q["memorised_fraction"],
                   best_fd=best[name], best_fd_epoch=best["epoch"], fd_name=name, count=q["count"], epoch=q["epoch"])
    if "final_gap" in s:
        lowest = min(r["evals"], key=lambda e: (e["val_loss"], e["kimg"]))
        out.update(gap=s["final_gap"], final_val=s["final_val_loss"], lowest_val=lowest["val_loss"], lowest_val_epoch=lowest["epoch"])
    return out


def replicates_table(rows):
    """Lines of the table of runs that differ only in train.seed, mean +- std over the seeds; [] without any."""
    groups = {}
    for r in rows:  # {'section.key': value} less what does not make another experiment (seed, place) or follows from other keys
        flat = {"unet": r["cfg"]["unet"], **{f"{sec}.{k}": v for sec, keys in r["cfg"].items() if isinstance(keys, dict)
                                            for k, v in keys.items() if f"{sec}.{k}" not in ("train.seed", "train.outdir", "network.augment_dim")}}
        groups.setdefault(json.dumps(flat, sort_keys=True, default=str), (flat, []))[1].append(r)
    if not (groups := [g for g in groups.values() if len(g[1]) > 1]):
        return []
    keys = sorted({k for flat, _ in groups for k in flat if len({json.dumps(f.get(k), default=str) for f, _ in groups}) > 1})
    pm = lambda v, spec: "-" if v is None else f"{format(v[0], spec)} +- {format(v[1], spec.lstrip('+'))}"  # a signed mean, a bare std

    def mean_std(values):  # ddof = 1, of the numbers that are not None
        values = [v for v in values if v is not None]
        return (statistics.fmean(values), statistics.stdev(values) if len(values) > 1 else 0.0) if values else None

    lines = ["Replicates: runs that differ only in train.seed, each figure mean +- std over the seeds (final: the newest "
             "scored epoch; best: the lowest FD of the run's scored epochs, at the same sample count).", "",
             "| setting | seeds | final FD | KID | precision | recall | memorised % | best FD (epoch) | final val loss | "
             "lowest val loss (epoch) | final gap (val - train loss) |", "|---" * 11 + "|"]
    for flat, runs in groups:
        stats = [replicate_stats(r) for r in runs]
        col = lambda k, spec: pm(mean_std([x.get(k) for x in stats]), spec)
        epochs = lambda k: ", ".join(str(x.get(k, "-")) for x in stats)
        best = "-" if mean_std([x.get("best_fd") for x in stats]) is None else f"{col('best_fd', '.3f')} ({epochs('best_fd_epoch')})"
        cells = [", ".join(f"{k}={flat.get(k)}" for k in keys) or runs[0]["run"], ", ".join(str(r["cfg"]["train"]["seed"]) for r in runs),
                 col("fd", ".3f"), col("kid", ".4f"), col("precision", ".3f"), col("recall", ".3f"), col("memorised", ".1f"), best,
                 col("final_val", ".4f"), f"{col('lowest_val', '.4f')} ({epochs('lowest_val_epoch')})", col("gap", "+.4f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines + [""]


def curves_table(rows):
    if not (with_curves := [r for r in rows if r["eval_summary"]]):
        return []
    lines = ["Training curves (train.eval_epochs): quality-curve KID by the dataset classifier, mean +- std over 4 seed blocks; "
             "validation loss at fixed noise levels and noise, beside an equally large subset of the training images.", "",
             "| run | best KID (kimg) | curve samples | lowest val loss (kimg) | final val loss | final train-subset loss | gap |", "|---" * 7 + "|"]
    for r in with_curves:
        s = r["eval_summary"]
        kid = f"{s['best_KID']:.4f} +- {s['best_KID_std']:.4f} ({s['best_KID_kimg']:.1f})" if "best_KID" in s else "-"
        val = ["-"] * 4 if "best_val_loss" not in s else [f"{s['best_val_loss']:.4f} ({s['best_val_loss_kimg']:.1f})", f"{s['final_val_loss']:.4f}",
                                                          f"{s['final_train_loss']:.4f}", f"{s['final_gap']:+.4f} ({s['final_gap_pct']:+.1f}%)"]
        lines.append(f"| {r['run']} | {kid} | {str(r['curve'][-1]['count']) if r['curve'] else '-'} | " + " | ".join(val) + " |")
    return lines + [""]


def plots(rows, out):
    plt, written = pyplot(), []

    def figure(name, series, xlabel, ylabel):
        if not any(pts for _, pts, *_ in series):
            return
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, pts, *style in series:  # style: (fmt, color), default ("o-", the next colour)
            if pts:
                x, y, err = zip(*sorted(pts))
                fmt, color = style or ("o-", None)
                ax.errorbar(x, y, yerr=err, fmt=fmt, color=color, capsize=3, label=label)
        ax.set(xlabel=xlabel, ylabel=ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(save_figure(fig, os.path.join(out, name)))

    label, kimg = lambda r: f"{r['run']} ({r['config']})", "training images (k)"
    for name in sorted({fd_key(q) for r in rows for q in r["quality"]}):
        figure(f"{name}_vs_kimg.png", [(label(r), [(q["kimg"], q[name], q[name + "_std"]) for q in _own(r["quality"], r["ema"]) if name in q])
                                       for r in rows], kimg, f"{name} (mean +- std over seed blocks)")
        figure(f"{name}_vs_sigma_rel.png", [(label(r), [(s["sigma_rel"], s["fd"], s["fd_std"]) for s in r["sweeps"] if s.get("fd_name") == name])
                                            for r in rows], "sigma_rel", f"{name} (post-hoc EMA)")
    figure("probe_vs_kimg.png", [(label(r), [(p["kimg"], p["test_accuracy_pct"], 0) for p in r["probes"] if p.get("ema") == r["ema"]])
                                 for r in rows], kimg, "probe test accuracy %")
    figure("probe_vs_sigma_rel.png", [(label(r), [(s["sigma_rel"], s["probe_acc"], 0) for s in r["sweeps"] if "probe_acc" in s])
                                      for r in rows], "sigma_rel", "probe test accuracy % (post-hoc EMA)")
    figure("val_loss_vs_kimg.png", [series for i, r in enumerate(rows) for series in  # validation solid, training subset dashed
                                    ((f"{label(r)} validation", [(e["kimg"], e["val_loss"], 0) for e in r["evals"]], "o-", f"C{i}"),
                                     (f"{label(r)} training subset", [(e["kimg"], e["train_loss"], 0) for e in r["evals"]], "x--", f"C{i}"))],
           kimg, "loss at fixed sigmas and noise")
    for name in sorted({k for r in rows for c in r["curve"] for k in c
                        if k in ("KID", "KID_inception", "FID_inception") or k.startswith("FD_") and not k.endswith("_std")}):
        figure(f"curve_{name}_vs_kimg.png", [(label(r), [(c["kimg"], c[name], c.get(name + "_std", 0)) for c in r["curve"] if name in c])
                                             for r in rows], kimg, f"{name} of the quality curve (mean +- std)")
    return written


def compare(run_dirs, out=None):
    """(text of out/compare.md, paths written): the table and the plots."""
    rows = [read_run(r) for r in run_dirs]
    out = out or os.path.join(os.path.dirname(os.path.normpath(run_dirs[0])) or ".", "compare")
    text = table(rows)
    atomic_write(os.path.join(out, "compare.md"), lambda f: f.write(text.encode()))
    return text, [os.path.join(out, "compare.md"), *plots(rows, out)]


def main():
    p = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="folder for compare.md and the plots (default: <parent of the first run>/compare)")
    args = p.parse_args()
    text, written = compare(args.runs, args.out)
    print(text, end="")
    print(f"written: {', '.join(written)}")


if __name__ == "__main__":
    run_main(main)
