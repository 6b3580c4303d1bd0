"""Linear probe of a trained network's features (the DDAE protocol, Xiang et al. 2023).

    python probe.py --outdir runs/cifar10-E --epoch 1000
    python probe.py --outdir runs/cifar10-E --t 4 --ema sigma_rel=0.075
    python probe.py --outdir runs/cifar10-E --grid              # every block x probe.grid_sigmas
    python probe.py --config config/cifar10/E.yaml --list-blocks
    torchrun --nproc_per_node=8 probe.py --outdir runs/cifar10-E  # extraction spread over the GPUs

Features: the global-average-pooled activations of one block of the frozen network, run as the full
EDM denoiser on image + sigma * noise; image i of a split draws its noise from its own seed, so the
features do not depend on the batch size or the number of ranks. They are extracted once per
(checkpoint, weights, block, sigma, split, flip) and cached under OUTDIR/probe/features/.
Classifier: multinomial logistic regression on standardised features; the L2 strength is chosen on a
held-out part of the training split, then the classifier is refitted on the whole training split and
scored once on the test split. Results: stdout (`test accuracy: ...` first), the JSON file
OUTDIR/checkpoints/epoch_<N>.probe.json and the TensorBoard scalar probe/<block>@sigma=<s>/<ema>.
See docs/PROBE.md.
"""

import argparse

from tools import dist
from tools.cli import UserError, run_main
from tools.linear_probe import CLASSIFIERS
from tools.log import to_run_log
from tools.probe_features import sigma_of_t
from tools.probing import block_table, probe, resolve_probe
from tools.runs import resolve

PROBE_FLAGS = ("block", "ema", "classifier", "xflip", "batch", "sigma")  # flags that replace probe.* keys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", help="the run directory; its config.yaml is the config unless --config is given")
    p.add_argument("--config", help="a YAML config instead of the run's own (default: OUTDIR/config.yaml)")
    p.add_argument("--epoch", type=int, help="checkpoint epoch (default: the newest)")
    p.add_argument("--ema", help="classic | online | sigma_rel=X (default: probe.ema of the config)")
    p.add_argument("--block", help="block whose pooled activations are the features, e.g. dec.8x8_block1 (default: probe.block)")
    level = p.add_mutually_exclusive_group()
    level.add_argument("--sigma", type=float, help="noise level of the features (default: probe.sigma)")
    level.add_argument("--t", type=int, help="noise level as an index into the reversed sampling schedule "
                                             "(index 0 = sigma 0; with 18 steps --t 4 is sigma 0.0599)")
    p.add_argument("--classifier", choices=CLASSIFIERS, help="sklearn (CPU) | torch (same objective, L-BFGS on the probe "
                                                             "device, for large sets) (default: probe.classifier)")
    p.add_argument("--xflip", action=argparse.BooleanOptionalAction, help="add x-flipped training images' features "
                                                                          "(default: probe.xflip)")
    p.add_argument("--batch", type=int, help="images per rank per forward (default: probe.batch)")
    p.add_argument("--grid", action="store_true", help="sweep every block x probe.grid_sigmas; JSON table and heat map")
    p.add_argument("--list-blocks", action="store_true", help="print the block names of the config's network and exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. probe.grid_sigmas=[0.03,0.06,0.15]")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.epoch is not None and args.epoch < 0:
        raise UserError(f"--epoch must be >= 0, got {args.epoch}")
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    flags = [k for k in PROBE_FLAGS if getattr(args, k) is not None]
    cfg["probe"].update({k: getattr(args, k) for k in flags})
    if args.t is not None:
        cfg["probe"]["sigma"] = sigma_of_t(cfg, args.t)
    blocks = resolve_probe(cfg, names={k: f"--{k}" for k in flags})  # the flags replace probe.* keys: the same ranges
    if args.list_blocks:
        print("\n".join(block_table(cfg, blocks)))
        return
    with dist.session() as (rank, world, device):
        if rank == 0:
            to_run_log(outdir)
        probe(cfg, outdir, device, epoch=args.epoch, grid=args.grid)


if __name__ == "__main__":
    run_main(main)
