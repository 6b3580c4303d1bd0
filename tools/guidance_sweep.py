"""Guidance sweep: sample and score a run at several guidance weights W, then tabulate and plot quality against W.

    python -m tools.guidance_sweep --outdir runs/digits-E-cond --weights 1,1.5,2,3 --guide runs/digits-E-cond:5
    torchrun --nproc_per_node=8 -m tools.guidance_sweep --outdir runs/cifar10-E-cond --num-images 10000
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.guidance_sweep ...")

import functools
import os

from tools import sweep
from tools.checkpoint import files_named, read_json, write_json
from tools.cli import parse_numbers, run_main
from tools.generate import Guidance


def write(outdir, epoch, results):
    rows = [sweep.quality_row(out, guidance=run["guidance"], epoch=epoch,
                              **{k: run[k] for k in ("guide", "guide_epoch", "guide_ema") if k in run}) for _, out, run in results]
    guided = [r for r in rows if "guide" in r]
    name = "cfg" if not guided else f"auto-{os.path.basename(os.path.normpath(guided[0]['guide']))}-epoch_{guided[0]['guide_epoch']}"
    base = os.path.join(outdir, f"guidance_sweep_epoch_{epoch}")
    write_json(f"{base}-{name}.json", rows)
    print(sweep.table(f"Guidance sweep ({name}): {rows[0]['count']} samples per W, mean +- std over seed blocks.", rows,
                      [("W", lambda r: f"{r['guidance']:g}")],
                      [("requested-class acc %", lambda r: sweep.pm(r, "class_accuracy", ".1f", 100))]), end="")
    sweeps = {path[len(base) + 1:-len(".json")]: read_json(path) for path in files_named(outdir, f"{os.path.basename(base)}-", ".json")}
    panels = [(rows[0]["fd_name"], {k: sweep.points(v, "guidance", "fd") for k, v in sweeps.items()})]
    if any("class_accuracy" in r for r in rows):
        panels.append(("requested-class accuracy", {k: sweep.points(v, "guidance", "class_accuracy") for k, v in sweeps.items()}))
    sweep.plot(f"{base}.png", f"guidance sweep: {os.path.basename(os.path.normpath(outdir))}, epoch {epoch}", panels, "guidance weight W")
    print(f"written: {base}-{name}.json, {base}.png")
    return rows


def main(argv=None):
    p = sweep.parser("guidance_sweep", __doc__)
    p.add_argument("--weights", default="1,1.5,2,3,4", help="guidance weights W, comma-separated (1 = unguided)")
    p.add_argument("--guide", metavar="RUN[:EPOCH]", help="autoguidance by this weaker model (default: classifier-free)")
    p.add_argument("--guide-ema", help="the guide's weights (default: sample.ema of its config)")
    args, cfg, outdir = sweep.parse(p, argv)
    settings = [(f"guidance {w:g}" + (f" (guide {args.guide})" if args.guide and w != 1 else ""), cfg,
                 Guidance(w, args.guide, args.guide_ema)) for w in parse_numbers(args.weights, "--weights")]
    sweep.run_settings(outdir, settings, args, functools.partial(write, outdir))


if __name__ == "__main__":
    run_main(main)
