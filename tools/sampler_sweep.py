"""Sampler sweep: one checkpoint's quality by sampler and steps against NFE, and the fewest NFE that reach --reference.

    python -m tools.sampler_sweep --outdir runs/demo/E                                   # every sampler, default steps
    python -m tools.sampler_sweep --outdir runs/demo/E --samplers heun,dpmpp2m,lms --steps 4,6,8,12,18
    torchrun --nproc_per_node=8 -m tools.sampler_sweep --outdir runs/cifar10-E --num-images 10000 --fid auto
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.sampler_sweep ...")

import copy
import json
import math
import os

from tools import sweep
from tools.checkpoint import write_json
from tools.cli import UserError, parse_numbers, run_main
from tools.sampler import SAMPLERS


def settings(samplers, steps, rtols):
    unknown = [s for s in samplers if s not in SAMPLERS]
    if unknown:
        raise UserError(f"--samplers: unknown {', '.join(unknown)}; choose from {', '.join(SAMPLERS)}")
    if any(n < 2 or n != int(n) for n in steps):
        raise UserError(f"--steps must be integers >= 2, got {','.join(f'{n:g}' for n in steps)}")
    if any(not r > 0 for r in rtols):
        raise UserError("--rtols must be > 0")
    return [(s, keys) for s in samplers
            for keys in ([{"rtol": r} for r in rtols] if SAMPLERS[s].nfe_per_step is None else [{"steps": int(n)} for n in steps])]


def fewest_nfe(rows, reference):
    """({sampler: its fewest-NFE row with FD within the combined spread of the reference's, or None}, reference row)."""
    ref = next((r for r in rows if (r["sampler"], r["steps"]) == reference), None)
    if ref is None:
        return {}, None
    best = {}
    for r in sorted(rows, key=lambda r: r["nfe"]):
        if r["fd"] - ref["fd"] <= math.hypot(r["fd_std"], ref["fd_std"]):
            best.setdefault(r["sampler"], r)
    return {s: best.get(s) for s in dict.fromkeys(r["sampler"] for r in rows)}, ref


def write(outdir, epoch, results, reference):
    rows = []
    for c, out, _ in results:
        setting, info = c["sample"], SAMPLERS[c["sample"]["sampler"]]
        adaptive = info.nfe_per_step is None
        row = sweep.quality_row(out, sampler=setting["sampler"], steps=None if adaptive else setting["steps"], epoch=epoch,
                                **{k: setting[k] for k in ("rtol",) * adaptive + ("eta",) * info.stochastic})
        if os.path.exists(f"{out}.fid.json"):
            with open(f"{out}.fid.json") as f:
                row["fid_inception"] = json.load(f)["fid"]
        rows.append(row)
    base = os.path.join(outdir, f"sampler_sweep_epoch_{epoch}")
    write_json(f"{base}.json", rows)
    setting = lambda r: f"rtol {r['rtol']:g}" if r["steps"] is None else f"{r['steps']} steps"
    columns = [("sampler", lambda r: r["sampler"]), ("steps", lambda r: setting(r).removesuffix(" steps")), ("NFE", lambda r: f"{r['nfe']:.1f}")]
    if any("fid_inception" in r for r in rows):
        columns.append(("FID", lambda r: f"{r.get('fid_inception', math.nan):.3f}"))
    text = sweep.table(f"Sampler sweep: {rows[0]['count']} samples per setting, mean +- std over seed blocks.", rows, columns)
    best, ref = fewest_nfe(rows, reference)
    if ref is not None:
        text += (f"\nFewest NFE within the combined spread of {reference[0]} at {reference[1]} steps ({ref['fd_name']} "
                 f"{ref['fd']:.3f} +- {ref['fd_std']:.3f}, {ref['nfe']:.0f} NFE):\n\n")
        for s, r in sorted(best.items(), key=lambda kv: math.inf if kv[1] is None else kv[1]["nfe"]):
            text += f"- {s}: " + ("not reached at the settings swept\n" if r is None else
                                  f"{r['nfe']:.1f} NFE ({setting(r)}, {r['fd']:.3f} +- {r['fd_std']:.3f})\n")
    print(text, end="")
    lines = {s: sweep.points([r for r in rows if r["sampler"] == s], "nfe", "fd") for s in dict.fromkeys(r["sampler"] for r in rows)}
    sweep.plot(f"{base}.png", f"sampler sweep: {os.path.basename(os.path.normpath(outdir))}, epoch {epoch}",
               [(rows[0]["fd_name"], lines)], "network evaluations per image (NFE)", log_x=True)
    print(f"written: {base}.json, {base}.png")
    return rows


def parse_reference(text):
    sampler, _, steps = text.partition(":")
    if sampler not in SAMPLERS or not steps.isdigit():
        raise UserError(f"--reference must look like heun:18 (a sampler and its steps), got {text!r}")
    return sampler, int(steps)


def main(argv=None):
    p = sweep.parser("sampler_sweep", __doc__)
    p.add_argument("--samplers", default=",".join(SAMPLERS), help="comma-separated (default: all; sample.py --sampler list)")
    p.add_argument("--steps", default="4,6,8,12,18,32", help="step counts of the fixed-step samplers, comma-separated")
    p.add_argument("--rtols", default="0.2,0.1,0.05,0.02", help="dpm_adaptive's tolerances, comma-separated")
    p.add_argument("--reference", default="heun:18", metavar="SAMPLER:STEPS", help="the quality to reach (default: EDM's heun:18)")
    p.add_argument("--fid", metavar="REF.npz", help="also Inception FID against these statistics ('auto' = the dataset's)")
    args, cfg, outdir = sweep.parse(p, argv)
    samplers = [s.strip() for s in args.samplers.split(",") if s.strip()]
    todo = []
    for s, keys in settings(samplers, parse_numbers(args.steps, "--steps"), parse_numbers(args.rtols, "--rtols")):
        c = copy.deepcopy(cfg)
        c["sample"].update(sampler=s, **keys)
        todo.append((f"{s} " + ", ".join(f"{k}={v}" for k, v in keys.items()), c, None))
    reference = parse_reference(args.reference)  # bad flags end here, before anything is sampled
    sweep.run_settings(outdir, todo, args, lambda epoch, results: write(outdir, epoch, results, reference), fid=args.fid)


if __name__ == "__main__":
    run_main(main)
