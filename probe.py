"""Linear probe of a trained network's features (the DDAE protocol, Xiang et al. 2023; docs/PROBE.md).

    python probe.py --outdir runs/cifar10-E --t 4 --ema sigma_rel=0.075
    python probe.py --outdir runs/cifar10-E --grid              # every block x probe.grid_sigmas
    python probe.py --config config/cifar10/E.yaml --list-blocks
"""

import argparse

from tools.cli import run_main
from tools.linear_probe import CLASSIFIERS
from tools.probe_features import sigma_of_t
from tools.probing import probe, resolve_probe
from tools.runs import open_run, run_flags, run_session

PROBE_FLAGS = ("block", "ema", "classifier", "xflip", "batch", "sigma")  # flags that replace probe.* keys


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_flags(p)
    p.add_argument("--ema", help="classic | online | sigma_rel=X (default: probe.ema of the config)")
    p.add_argument("--block", help="block whose pooled activations are the features, e.g. dec.8x8_block1 (default: probe.block)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--sigma", type=float, help="noise level of the features (default: probe.sigma)")
    level.add_argument("--t", type=int, help="noise level as an index into the reversed sampling schedule (18 steps: --t 4 is sigma 0.0599)")
    p.add_argument("--classifier", choices=CLASSIFIERS, help="sklearn (CPU) | torch (L-BFGS on the probe device) (default: probe.classifier)")
    p.add_argument("--xflip", action=argparse.BooleanOptionalAction, help="add x-flipped training images' features (default: probe.xflip)")
    p.add_argument("--batch", type=int, help="images per rank per forward (default: probe.batch)")
    p.add_argument("--grid", action="store_true", help="sweep every block x probe.grid_sigmas; JSON table and heat map")
    p.add_argument("--list-blocks", action="store_true", help="print the block names of the config's network and exit")
    args = p.parse_args(argv)
    cfg, outdir = open_run(args)
    flags = [k for k in PROBE_FLAGS if getattr(args, k) is not None]
    cfg["probe"].update({k: getattr(args, k) for k in flags})
    if args.t is not None:
        cfg["probe"]["sigma"] = sigma_of_t(cfg, args.t)
    blocks = resolve_probe(cfg, names={k: f"--{k}" for k in flags})
    if args.list_blocks:
        print(f"{'block':<20} {'channels':>8}  resolution")
        for name, channels, res in blocks:
            print(f"{name:<20} {channels:>8}  {res}x{res}{'   <- probe.block' if name == cfg['probe']['block'] else ''}")
        return
    with run_session(outdir) as (rank, world, device):
        probe(cfg, outdir, device, epoch=args.epoch, grid=args.grid)


if __name__ == "__main__":
    run_main(main)
