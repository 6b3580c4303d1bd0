"""Sampler sweep: sample and score one checkpoint with several samplers at several step counts, then tabulate and
plot quality against the number of network evaluations (NFE).

    python -m tools.sampler_sweep --outdir runs/demo/E                                   # every sampler, default steps
    python -m tools.sampler_sweep --outdir runs/demo/E --samplers heun,dpmpp2m,lms --steps 4,6,8,12,18
    torchrun --nproc_per_node=8 -m tools.sampler_sweep --outdir runs/cifar10-E --num-images 10000 --fid auto

Each (sampler, steps) is sampled and scored as `sample.py --sampler S --steps N --score` does (FD, KID, precision,
recall, each mean +- std over seed blocks; with --fid, Inception FID where its weights exist), with the same seeds
everywhere and every other sample.* key from the config (eta for the stochastic samplers). dpm_adaptive has no step
count: it is run at each of --rtols instead, and its NFE is the mean it measured per image. The NFE of a fixed-step
sampler is tools.sampler.sampler_nfe (heun at 18 steps: 35). The rows land in the run's metrics.jsonl as usual; this
script gathers them into OUTDIR/sampler_sweep_epoch_<N>.json, prints the table and, against a reference setting
(--reference, default heun at 18 steps), the fewest NFE at which each sampler's FD is within the combined spread of
the reference's, and draws OUTDIR/sampler_sweep_epoch_<N>.png (FD against NFE, one line per sampler).
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.sampler_sweep ...")

import argparse
import copy
import json
import math
import os

from tools import dist
from tools.checkpoint import load_epoch, write_json
from tools.cli import UserError, parse_numbers, run_main
from tools.generate import Scoring, generate, score
from tools.log import to_run_log
from tools.plots import pyplot, save_figure
from tools.quality import fd_key
from tools.runs import resolve
from tools.sampler import SAMPLER_INFO, SAMPLERS

DEFAULT_STEPS = "4,6,8,12,18,32"
DEFAULT_RTOLS = "0.2,0.1,0.05,0.02"
METRICS = ("KID", "precision", "recall")  # besides the FD, each with its spread over seed blocks


def parse_args(argv=None):
    p = argparse.ArgumentParser(prog="python -m tools.sampler_sweep", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", help="the run directory; its config.yaml is the config unless --config is given")
    p.add_argument("--config", help="a YAML config instead of the run's own")
    p.add_argument("--epoch", type=int, help="checkpoint to sample (default: the newest)")
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated (default: all; sample.py --sampler list)")
    p.add_argument("--steps", default=DEFAULT_STEPS, help="step counts of the fixed-step samplers, comma-separated")
    p.add_argument("--rtols", default=DEFAULT_RTOLS, help="dpm_adaptive's tolerances, comma-separated")
    p.add_argument("--reference", default="heun:18", metavar="SAMPLER:STEPS", help="the setting whose quality the others are "
                   "asked to reach (default heun:18, the EDM default)")
    p.add_argument("--num-images", type=int, default=1000, help="samples per setting (seeds 0 .. N-1, the same everywhere)")
    p.add_argument("--metric-features", choices=("classifier", "inception"), help="features for the metrics (default: per dataset)")
    p.add_argument("--fid", metavar="REF.npz", help="also Inception FID against these statistics ('auto' = the dataset's)")
    p.add_argument("--inception-weights")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. sample.batch=512 sample.eta=0.5")
    return p.parse_args(argv)


def settings(samplers, steps, rtols):
    """The (sampler, sample.* overrides) of the sweep, in order."""
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise UserError(f"--samplers: unknown {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}")
    if any(n < 2 or n != int(n) for n in steps):
        raise UserError(f"--steps must be integers >= 2, got {','.join(f'{n:g}' for n in steps)}")
    if any(not r > 0 for r in rtols):
        raise UserError("--rtols must be > 0")
    out = []
    for s in samplers:
        if SAMPLER_INFO[s].nfe_per_step is None:
            out += [(s, {"sampler": s, "rtol": r}) for r in rtols]
        else:
            out += [(s, {"sampler": s, "steps": int(n)}) for n in steps]
    return out


def sampler_sweep(cfg, outdir, device, samplers, steps, rtols, num_images=1000, epoch=None, reference=("heun", 18),
                  features=None, fid=None, inception_weights=None):
    """Sample and score the checkpoint at every setting, the same seeds everywhere (collective under torchrun); rank 0
    then writes OUTDIR/sampler_sweep_epoch_<N>.json and .png and returns the rows."""
    epoch = load_epoch(outdir, epoch, required=("epoch",))["epoch"]
    seeds = list(range(num_images))
    scoring = Scoring(quality=True, features=features, fid=fid, inception_weights=inception_weights)
    scoring.check(cfg, seeds)
    results = []
    for sampler, keys in settings(samplers, steps, rtols):
        c = copy.deepcopy(cfg)
        c["sample"].update(keys)
        dist.print0(f"--- {sampler} " + ", ".join(f"{k}={v}" for k, v in keys.items() if k != "sampler"))
        out, run = generate(c, outdir, seeds, device, epoch=epoch)
        score(c, outdir, out, seeds, run, device, scoring)
        results.append((c["sample"], out))
    return dist.on_rank0(write_sweep, outdir, epoch, results, reference)


def read_row(S, out):
    """One setting's row from the files score() wrote beside its sample folder."""
    with open(f"{out}.quality.json") as f:
        q = json.load(f)
    fd = fd_key(q)
    row = dict(sampler=S["sampler"], steps=None if SAMPLER_INFO[S["sampler"]].nfe_per_step is None else S["steps"],
               nfe=q["nfe"], count=q["count"], fd_name=fd, fd=q[fd], fd_std=q[fd + "_std"], samples=out)
    if SAMPLER_INFO[S["sampler"]].nfe_per_step is None:
        row["rtol"] = S["rtol"]
    if SAMPLER_INFO[S["sampler"]].stochastic:
        row["eta"] = S["eta"]
    row.update({k: q[k] for m in METRICS if m in q for k in (m, m + "_std")})
    if os.path.exists(f"{out}.fid.json"):
        with open(f"{out}.fid.json") as f:
            row["fid_inception"] = json.load(f)["fid"]
    return row


def fewest_nfe(rows, reference):
    """{sampler: the row of fewest NFE whose FD is within the combined spread of the reference row's (or None)}, and
    the reference row; ({}, None) when the reference setting was not swept."""
    ref = next((r for r in rows if (r["sampler"], r["steps"]) == reference), None)
    if ref is None:
        return {}, None
    best = {}
    for r in sorted(rows, key=lambda r: r["nfe"]):
        if r["fd"] - ref["fd"] <= math.hypot(r["fd_std"], ref["fd_std"]):
            best.setdefault(r["sampler"], r)
    return {s: best.get(s) for s in dict.fromkeys(r["sampler"] for r in rows)}, ref


def write_sweep(outdir, epoch, results, reference):
    rows = [read_row(S, out) for S, out in results]
    base = os.path.join(outdir, f"sampler_sweep_epoch_{epoch}")
    write_json(f"{base}.json", rows)
    print(table(rows, reference), end="")
    plot(rows, f"{base}.png", f"{os.path.basename(os.path.normpath(outdir))}, epoch {epoch}")
    print(f"written: {base}.json, {base}.png")
    return rows


def table(rows, reference):
    """Markdown: one line per setting (mean +- std over seed blocks), then which sampler reaches the reference first."""
    pm = lambda r, k, spec=".3f": "-" if k not in r else f"{format(r[k], spec)} +- {format(r[k + '_std'], spec)}"
    fid = any("fid_inception" in r for r in rows)
    lines = [f"Sampler sweep: {rows[0]['count']} samples per setting, mean +- std over seed blocks.", "",
             f"| sampler | steps | NFE | {rows[0]['fd_name']} | KID | precision | recall |" + (" FID |" if fid else ""),
             "|---|---|---|---|---|---|---|" + ("---|" if fid else "")]
    for r in rows:
        steps = f"rtol {r['rtol']:g}" if r["steps"] is None else str(r["steps"])
        lines.append(f"| {r['sampler']} | {steps} | {r['nfe']:.1f} | {pm(r, 'fd')} | {pm(r, 'KID', '.4f')} | {pm(r, 'precision')} | "
                     f"{pm(r, 'recall')} |" + (f" {r.get('fid_inception', float('nan')):.3f} |" if fid else ""))
    best, ref = fewest_nfe(rows, reference)
    if ref is not None:
        lines += ["", f"Fewest NFE within the combined spread of {reference[0]} at {reference[1]} steps ({ref['fd_name']} "
                  f"{ref['fd']:.3f} +- {ref['fd_std']:.3f}, {ref['nfe']:.0f} NFE):", ""]
        for s, r in sorted(best.items(), key=lambda kv: math.inf if kv[1] is None else kv[1]["nfe"]):
            lines.append(f"- {s}: " + ("not reached at the settings swept" if r is None else
                                       f"{r['nfe']:.1f} NFE ({'rtol ' + format(r['rtol'], 'g') if r['steps'] is None else str(r['steps']) + ' steps'}, "
                                       f"{r['fd']:.3f} +- {r['fd_std']:.3f})"))
    return "\n".join(lines) + "\n"


def plot(rows, path, title):
    """FD against NFE (log scale), one line per sampler, error bars = std over seed blocks."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.2))
    for s in dict.fromkeys(r["sampler"] for r in rows):
        pts = sorted((r["nfe"], r["fd"], r["fd_std"]) for r in rows if r["sampler"] == s)
        x, y, err = zip(*pts)
        ax.errorbar(x, y, yerr=err, fmt="o-" if not SAMPLER_INFO[s].stochastic else "s--", capsize=3, label=s, markersize=4)
    ax.set_xscale("log")
    ax.set_xlabel("network evaluations per image (NFE)")
    ax.set_ylabel(rows[0]["fd_name"])
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=7, ncol=2)
    ax.set_title(f"sampler sweep: {title}")
    fig.tight_layout()
    save_figure(fig, path)


def parse_reference(text):
    sampler, _, steps = text.partition(":")
    if sampler not in SAMPLERS or not steps.isdigit():
        raise UserError(f"--reference must look like heun:18 (a sampler and its steps), got {text!r}")
    return sampler, int(steps)


def main(argv=None):
    args = parse_args(argv)
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    steps, rtols = parse_numbers(args.steps, "--steps"), parse_numbers(args.rtols, "--rtols")
    settings(samplers, steps, rtols)  # bad flags end here, before anything is sampled
    reference = parse_reference(args.reference)
    if args.num_images < 1:
        raise UserError("--num-images must be >= 1")
    with dist.session() as (rank, world, device):
        if rank == 0:
            to_run_log(outdir)
        sampler_sweep(cfg, outdir, device, samplers, steps, rtols, args.num_images, args.epoch, reference,
                      args.metric_features, args.fid, args.inception_weights)


if __name__ == "__main__":
    run_main(main)
