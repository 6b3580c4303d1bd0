"""Side-by-side comparison of runs (e.g. the C, E and G runs of one dataset): a table and plots.

    python -m tools.compare runs/cifar10-C runs/cifar10-E runs/cifar10-G [--out runs/cifar10-compare]

Inputs are only what runs already write, so runs trained on different machines compare alike:
config.yaml, metrics.jsonl (training rows; evaluation rows of train.eval_epochs, plotted as curves over the
training images; quality rows from sample.py --score), checkpoints/*.probe.json (probe.py) and
ema_sweep_epoch_*.json (tools/ema_sweep.py).

Honest by construction: quality is taken at the newest scored epoch with each run's own EMA (nothing
selected), every figure carries its spread and sample count, a column never mixes sample counts or
extractors, runs within each other's spread share a rank, and the probe result is the one chosen on
held-out training data (its test accuracy is reported, never maximised).
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.compare ...")

import argparse
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


def probe_row(probes):
    """The probe result chosen on held-out training data (never on the test split), with its spread: the
    binomial standard error of a test accuracy on num_test images."""
    if not probes:
        return None
    best = max(probes, key=lambda r: (r.get("holdout_accuracy_pct", float("-inf")), r["epoch"]))
    p = best["test_accuracy_pct"] / 100
    return dict(best, std=100 * math.sqrt(p * (1 - p) / best["num_test"]), of=len(probes))


def likelihood_row(rows, ema):
    """The bits/dim of tools/likelihood.py to show: the newest epoch with the run's own EMA, its largest image count
    (the Hutchinson estimate before the exact one at equal count, as the cheaper default); None if there is none."""
    own = [r for r in rows if r["ema"] == ema] or rows
    return max(own, key=lambda r: (r["epoch"], r["num_images"], r["divergence"] != "exact"), default=None)


def read_run(outdir):
    """One table row: what the run is, how fast it trained, and its quality and probe figures."""
    cfg_path = os.path.join(outdir, "config.yaml")
    if not os.path.exists(cfg_path):
        raise UserError(f"{outdir} is not a run directory (no config.yaml)")
    with open(cfg_path) as f:
        cfg = yaml.safe_load(f)
    try:
        cfg = validate(cfg)  # keys added since the run filled with their defaults, so that old and new runs compare alike
    except UserError:
        pass
    params = parameter_count(cfg)
    metrics = read_jsonl(os.path.join(outdir, "metrics.jsonl"))
    train_rows = [r for r in metrics if "img_per_s" in r]
    quality = [r for r in metrics if r.get("kind") == "quality"]
    sweeps = []
    for _, path in numbered_files(outdir, "ema_sweep_epoch_", ".json"):
        with open(path) as f:
            sweeps += json.load(f)
    row = dict(run=os.path.basename(os.path.normpath(outdir)), outdir=outdir, cfg=cfg, config=cfg["unet"][4:-3],
               dataset=cfg["data"]["dataset"], params_M=params / 1e6, ema=cfg["sample"]["ema"],
               img_per_s=statistics.median(r["img_per_s"] for r in train_rows[1:] or train_rows) if train_rows else None,
               kimg=max((r["kimg"] for r in train_rows), default=0.0), quality=quality, sweeps=sweeps,
               fids=[r for r in metrics if "fid" in r], probes=read_probe_results(outdir),
               evals=[r for r in metrics if r.get("kind") == "eval"], curve=[r for r in metrics if r.get("kind") == "curve"],
               eval_summary=summarize_curves(metrics))
    # Quality at the newest scored epoch with the config's own EMA, unguided (a conditional run: its balanced
    # class mix, sample.py's default): nothing is selected. Guided rows are tools/guidance_sweep.py's business.
    own = [q for q in quality if q["ema"] == row["ema"] and q.get("guidance", 1) == 1 and q.get("classes", "mix") == "mix"]
    if own:
        row["final_quality"] = max(own, key=lambda q: (q["epoch"], q["count"]))
    row["probe"] = probe_row(row["probes"])
    row["likelihood"] = likelihood_row([r for r in metrics if r.get("kind") == "likelihood"], row["ema"])
    scored = [s for s in sweeps if "fd" in s]
    if scored:
        best = min(scored, key=lambda s: s["fd"])
        row["best_sigma_rel"] = f"{best['sigma_rel']:g} (best of {len(scored)} by {best['fd_name']})"
    return row


def rank(values):
    """Competition ranks by mean (lower is better) where a run within the combined spread
    sqrt(std_a^2 + std_b^2) of the best run of its group ties with it: ['1', '2=', '2='] and so on."""
    order = sorted(range(len(values)), key=lambda i: values[i][0])
    ranks, group_best, place = [None] * len(values), None, 0
    for pos, i in enumerate(order):
        m, s = values[i]
        if group_best is None or m - values[group_best][0] > math.hypot(s, values[group_best][1]):
            group_best, place = i, pos + 1
        ranks[i] = place
    return [f"{r}=" if ranks.count(r) > 1 else str(r) for r in ranks]


def table(rows):
    """Markdown table. Quality figures are mean +- std over seed blocks at the newest scored epoch with
    each run's own EMA; a column holds one extractor and one sample count only."""
    fmt = lambda v, spec: "-" if v is None else format(v, spec)
    pm = lambda q, k, spec: f"{format(q[k], spec)} +- {format(q[k + '_std'], spec)}"
    scored = [r for r in rows if "final_quality" in r]
    kinds = sorted({(fd_key(r["final_quality"]), r["final_quality"]["count"], r["final_quality"]["block_size"]) for r in scored},
                   key=lambda k: -sum((fd_key(r["final_quality"]), r["final_quality"]["count"], r["final_quality"]["block_size"]) == k
                                     for r in scored))
    lines = []
    for kind in kinds or [None]:
        same = [r for r in rows if "final_quality" in r and kind == (fd_key(r["final_quality"]), r["final_quality"]["count"],
                                                                        r["final_quality"]["block_size"])]
        if kind is None:
            lines.append("(no quality rows: run sample.py --score)")
            same = []
        else:
            name, count, block = kind
            lines.append(f"Quality: {count} samples per run, mean +- std over {count // block} seed blocks of {block}; "
                         f"rank by {name}, ties within the combined spread.")
        ranks = rank([(r["final_quality"][kind[0]], r["final_quality"][kind[0] + "_std"]) for r in same]) if same else []
        nll = any(r["likelihood"] for r in rows)  # a bits/dim column only where some run has one
        lines += ["", f"| rank | run | config | params | train img/s | kimg | {kind[0] if kind else 'FD'} | KID | precision | recall | "
                  f"memorised % | requested-class acc % | probe test % (chosen on held-out train, of N) | best sigma_rel |"
                  + (" bits/dim (held-out, +- se) |" if nll else ""),
                  "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|" + ("---|" if nll else "")]
        for r in sorted(rows, key=lambda r: int(ranks[same.index(r)].rstrip("=")) if r in same else 10 ** 9):
            q = r.get("final_quality") if r in same else None
            cells = ["-"] * 6 if q is None else [pm(q, kind[0], ".3f"), pm(q, "KID", ".4f"), pm(q, "precision", ".3f"),
                                                 pm(q, "recall", ".3f"), f"{100 * q['memorised_fraction']:.1f} +- {100 * q['memorised_fraction_std']:.1f}",
                                                 "-" if "class_accuracy" not in q else
                                                 f"{100 * q['class_accuracy']:.1f} +- {100 * q['class_accuracy_std']:.1f}"]
            pr = r["probe"]
            probe = "-" if pr is None else (f"{pr['test_accuracy_pct']:.2f} +- {pr['std']:.2f} (n={pr['num_test']}; "
                                            f"{pr['block']} @ sigma={pr['sigma']:g}, {pr['ema']}, epoch {pr['epoch']}; of {pr['of']})")
            lines.append(f"| {ranks[same.index(r)] if r in same else '-'} | {r['run']} | {r['config']} | {r['params_M']:.2f}M | "
                         f"{fmt(r['img_per_s'], '.0f')} | {r['kimg']:.1f} | " + " | ".join(cells) + f" | {probe} | {r.get('best_sigma_rel', '-')} |"
                         + (f" {bits_cell(r['likelihood'])} |" if nll else ""))
        lines.append("")
    lines += curves_table(rows)
    lines += replicates_table(rows)
    return "\n".join(lines).rstrip() + "\n"


def bits_cell(row):
    if row is None:
        return "-"
    return (f"{row['bits_per_dim']:.4f} +- {row['bits_per_dim_se']:.4f} (n={row['num_images']}, {row['divergence']}, "
            f"epoch {row['epoch']})")


def flat_config(cfg):
    """{'section.key': value} of a config, less what does not make the run another experiment (its seed, its place)
    and what follows from other keys (network.augment_dim from augment.p)."""
    out = {"unet": cfg["unet"]}
    for section, keys in cfg.items():
        if isinstance(keys, dict):
            out.update({f"{section}.{k}": v for k, v in keys.items()
                        if f"{section}.{k}" not in ("train.seed", "train.outdir", "network.augment_dim")})
    return out


def mean_std(values):
    """'mean +- std' (std over replicates, ddof = 1) of numbers; '-' if none."""
    values = [v for v in values if v is not None]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def replicate_stats(r):
    """The figures of one run that the replicates table averages."""
    q, s, name = r.get("final_quality"), r["eval_summary"] or {}, None
    out = {}
    if q is not None:
        name = fd_key(q)
        own = [x for x in r["quality"] if x["ema"] == r["ema"] and x.get("guidance", 1) == 1 and x.get("classes", "mix") == "mix"
               and x["count"] == q["count"]]
        best = min(own, key=lambda x: x[name])
        out.update(fd=q[name], kid=q["KID"], precision=q["precision"], recall=q["recall"], memorised=100 * q["memorised_fraction"],
                   best_fd=best[name], best_fd_epoch=best["epoch"], fd_name=name, count=q["count"], epoch=q["epoch"])
    if "final_gap" in s:
        lowest = min(r["evals"], key=lambda e: (e["val_loss"], e["kimg"]))
        out.update(gap=s["final_gap"], final_val=s["final_val_loss"], lowest_val=lowest["val_loss"], lowest_val_epoch=lowest["epoch"])
    return out


def replicates_table(rows):
    """Lines of the table of runs that differ only in train.seed: every figure as mean +- std over the seeds, the
    setting named by the keys in which the groups differ. [] when no setting has two runs."""
    groups = {}
    for r in rows:
        flat = flat_config(r["cfg"])
        groups.setdefault(json.dumps(flat, sort_keys=True, default=str), (flat, []))[1].append(r)
    groups = [g for g in groups.values() if len(g[1]) > 1]
    if not groups:
        return []
    keys = sorted({k for flat, _ in groups for k in flat if len({json.dumps(f.get(k), default=str) for f, _ in groups}) > 1})
    pm = lambda v, spec: "-" if v is None else f"{format(v[0], spec)} +- {format(v[1], spec.lstrip('+'))}"  # a signed mean, a bare std
    lines = ["Replicates: runs that differ only in train.seed, each figure mean +- std over the seeds (final: the newest "
             "scored epoch; best: the lowest FD of the run's scored epochs, at the same sample count).", "",
             "| setting | seeds | final FD | KID | precision | recall | memorised % | best FD (epoch) | final val loss | "
             "lowest val loss (epoch) | final gap (val - train loss) |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for flat, runs in groups:
        stats = [replicate_stats(r) for r in runs]
        col = lambda k: mean_std([x.get(k) for x in stats])
        label = ", ".join(f"{k}={flat.get(k)}" for k in keys) or runs[0]["run"]
        seeds = ", ".join(str(r["cfg"]["train"]["seed"]) for r in runs)
        best = col("best_fd")
        best_text = "-" if best is None else f"{pm(best, '.3f')} ({', '.join(str(x.get('best_fd_epoch')) for x in stats)})"
        lines.append(f"| {label} | {seeds} | {pm(col('fd'), '.3f')} | {pm(col('kid'), '.4f')} | {pm(col('precision'), '.3f')} | "
                     f"{pm(col('recall'), '.3f')} | {pm(col('memorised'), '.1f')} | {best_text} | {pm(col('final_val'), '.4f')} | "
                     f"{pm(col('lowest_val'), '.4f')} ({', '.join(str(x.get('lowest_val_epoch', '-')) for x in stats)}) | "
                     f"{pm(col('gap'), '+.4f')} |")
    return lines + [""]


def curves_table(rows):
    """Lines of the training-curve table (train.eval_epochs): where the quality curve was best, where the
    validation loss was lowest, and the final gap between validation and training-subset loss."""
    with_curves = [r for r in rows if r["eval_summary"]]
    if not with_curves:
        return []
    lines = ["Training curves (train.eval_epochs): quality-curve KID by the dataset classifier, mean +- std over 4 seed blocks; "
             "validation loss at fixed noise levels and noise, beside an equally large subset of the training images.", "",
             "| run | best KID (kimg) | curve samples | lowest val loss (kimg) | final val loss | final train-subset loss | gap |",
             "|---|---|---|---|---|---|---|"]
    for r in with_curves:
        s = r["eval_summary"]
        kid = f"{s['best_KID']:.4f} +- {s['best_KID_std']:.4f} ({s['best_KID_kimg']:.1f})" if "best_KID" in s else "-"
        count = str(r["curve"][-1]["count"]) if r["curve"] else "-"
        if "best_val_loss" in s:
            val = [f"{s['best_val_loss']:.4f} ({s['best_val_loss_kimg']:.1f})", f"{s['final_val_loss']:.4f}",
                   f"{s['final_train_loss']:.4f}", f"{s['final_gap']:+.4f} ({s['final_gap_pct']:+.1f}%)"]
        else:
            val = ["-"] * 4
        lines.append(f"| {r['run']} | {kid} | {count} | " + " | ".join(val) + " |")
    return lines + [""]


def plots(rows, out):
    plt = pyplot()
    written = []

    def figure(name, series, xlabel, ylabel):
        if not any(pts for _, pts, *_ in series):
            return
        fig, ax = plt.subplots(figsize=(5, 3.5))
        for label, pts, *style in series:  # style: (fmt, color), default ("o-", the next colour)
            if pts:
                x, y, err = zip(*sorted(pts))
                fmt, color = (*style, None)[:2] if style else ("o-", None)
                ax.errorbar(x, y, yerr=err, fmt=fmt, color=color, capsize=3, label=label)
        ax.set_xlabel(xlabel)
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        written.append(save_figure(fig, os.path.join(out, name)))

    label = lambda r: f"{r['run']} ({r['config']})"
    own = lambda r: [q for q in r["quality"] if q["ema"] == r["ema"] and q.get("guidance", 1) == 1 and q.get("classes", "mix") == "mix"]
    names = sorted({fd_key(q) for r in rows for q in r["quality"]})
    for name in names:
        figure(f"{name}_vs_kimg.png", [(label(r), [(q["kimg"], q[name], q[name + "_std"]) for q in own(r) if name in q]) for r in rows],
               "training images (k)", f"{name} (mean +- std over seed blocks)")
        figure(f"{name}_vs_sigma_rel.png", [(label(r), [(s["sigma_rel"], s["fd"], s["fd_std"]) for s in r["sweeps"]
                                                        if s.get("fd_name") == name]) for r in rows],
               "sigma_rel", f"{name} (post-hoc EMA)")
    figure("probe_vs_kimg.png", [(label(r), [(p["kimg"], p["test_accuracy_pct"], 0) for p in r["probes"] if p.get("ema") == r["ema"]])
                                 for r in rows], "training images (k)", "probe test accuracy %")
    figure("probe_vs_sigma_rel.png", [(label(r), [(s["sigma_rel"], s["probe_acc"], 0) for s in r["sweeps"] if "probe_acc" in s])
                                      for r in rows], "sigma_rel", "probe test accuracy % (post-hoc EMA)")
    # The curves of train.eval_epochs: validation loss (solid) beside the training-subset loss (dashed); the quality curve.
    figure("val_loss_vs_kimg.png", [series for i, r in enumerate(rows) for series in
                                    ((f"{label(r)} validation", [(e["kimg"], e["val_loss"], 0) for e in r["evals"]], "o-", f"C{i}"),
                                     (f"{label(r)} training subset", [(e["kimg"], e["train_loss"], 0) for e in r["evals"]], "x--", f"C{i}"))],
           "training images (k)", "loss at fixed sigmas and noise")
    for name in sorted({k for r in rows for c in r["curve"] for k in c if k in ("KID", "KID_inception", "FID_inception") or
                        k.startswith("FD_") and not k.endswith("_std")}):
        figure(f"curve_{name}_vs_kimg.png", [(label(r), [(c["kimg"], c[name], c.get(name + "_std", 0)) for c in r["curve"] if name in c])
                                             for r in rows], "training images (k)", f"{name} of the quality curve (mean +- std)")
    return written


def compare(run_dirs, out=None):
    """The table (out/compare.md, returned as text) and plots of several runs; out defaults to <parent of the first>/compare."""
    rows = [read_run(r) for r in run_dirs]
    out = out or os.path.join(os.path.dirname(os.path.normpath(run_dirs[0])) or ".", "compare")
    os.makedirs(out, exist_ok=True)
    text = table(rows)
    atomic_write(os.path.join(out, "compare.md"), lambda f: f.write(text.encode()))
    written = plots(rows, out)
    return text, [os.path.join(out, "compare.md"), *written]


def main():
    p = argparse.ArgumentParser(prog="python -m tools.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("runs", nargs="+", help="run directories")
    p.add_argument("--out", help="folder for compare.md and the plots (default: next to the first run, <parent>/compare)")
    args = p.parse_args()
    text, written = compare(args.runs, args.out)
    print(text, end="")
    print(f"written: {', '.join(written)}")


if __name__ == "__main__":
    run_main(main)
