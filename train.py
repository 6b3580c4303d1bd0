"""Train an EDM2 network (Config C, E or G); the same outdir resumes from its newest checkpoint (raise train.epochs to go on).

    torchrun --nproc_per_node=N train.py --config config/cifar10/E.yaml [section.key=value ...]
    python train.py --config config/digits/E.yaml train.epochs=2
"""

import argparse

from tools import dist
from tools.cli import run_main
from tools.config import dump, load_config, parameter_count
from tools.training import train


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config, e.g. config/cifar10/E.yaml")
    p.add_argument("--outdir", help="run directory (default: train.outdir of the config)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter count, then exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=2 train.batch_size=64")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    cfg = load_config(args.config, args.overrides)
    if args.outdir:
        cfg["train"]["outdir"] = args.outdir
    if args.dry_run:
        count = parameter_count(cfg)
        print(dump(cfg), end="")
        print(f"parameters: {count:,} ({count / 1e6:.2f}M) in {cfg['unet']}")
        return
    with dist.session() as (rank, world, device):
        train(cfg, device)


if __name__ == "__main__":
    run_main(main)
