"""Generate images from a trained run, one PNG per seed, spread over ranks; optionally score them.

    torchrun --nproc_per_node=N sample.py --outdir runs/cifar10-E --epoch 2000 [--fid auto|REF.npz]
    python sample.py --outdir runs/demo/E --seeds 0-999 --score
    python sample.py --outdir runs/digits-E-cond --guidance 2 [--class 3] [--guide runs/digits-E-cond:5]

--score measures the samples' quality against the dataset (FD, KID, precision, recall, class coverage,
memorisation; tools/quality.py) with the dataset classifier (no download; the default for digits) or
Inception (--metric-features inception; the default for CIFAR and Tiny-ImageNet). --fid is Inception
FID/KID against given reference statistics.

A class-conditional run (network.label_dim > 0) samples a balanced class mix, image k of class k mod
label_dim, or --class K; <out>.labels.json records the class of each seed, and --score adds the dataset
classifier's accuracy against it. --guidance W guides: classifier-free (the same network, label dropped),
or autoguidance with --guide (Karras et al. 2024, arXiv 2406.02507), which unconditional runs can use too.

Samplers (--sampler list shows each with its order and evaluations per step): the ODE solvers heun (the
default), euler, dpmpp2m, lms, dpm2 and dpm_adaptive, and the stochastic euler_ancestral, dpm2_ancestral,
dpmpp2s_ancestral, dpmpp2m_sde and dpmpp3m_sde (--eta: 1 the reverse-time SDE, 0 the ODE).

Image k depends only on seed k and the weights (counter-based noise per seed), not on the rank count or
batch size. Interrupted runs continue where they stopped: the images their completion records list are kept.
"""

import argparse

from tools import dist
from tools.cli import UserError, parse_seeds, run_main
from tools.config import check_ranges
from tools.generate import Scoring, generate, score
from tools.log import to_run_log
from tools.runs import resolve
from tools.sampler import SAMPLER_INFO, SAMPLERS

STOCHASTIC = ("S_churn", "S_min", "S_max", "S_noise", "eta", "rtol", "atol", "h_init")  # float flags of sample.* keys
SAMPLE_FLAGS = ("ema", "steps", "sampler", "batch", *STOCHASTIC)  # flags that replace sample.* keys


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--outdir", help="the run directory; its config.yaml is the config unless --config is given")
    p.add_argument("--config", help="a YAML config instead of the run's own (default: OUTDIR/config.yaml)")
    p.add_argument("--epoch", type=int, help="checkpoint epoch (default: the newest)")
    p.add_argument("--ema", help="classic | online | sigma_rel=X (default: sample.ema of the config)")
    p.add_argument("--seeds", help="e.g. 0-49999 (default: 0 .. sample.num_images - 1)")
    p.add_argument("--steps", type=int, help="noise levels (heun: 2*steps - 1 network evaluations)")
    p.add_argument("--sampler", metavar="NAME", help=f"{' | '.join(SAMPLERS)}; 'list' describes them")
    for k in STOCHASTIC:
        p.add_argument(f"--{k}", type=float)
    p.add_argument("--batch", type=int, help="images per rank per forward")
    p.add_argument("--out", help="output folder, PNGs only (default: OUTDIR/samples/epoch_<N>-<ema>-<sampler><steps>-<precision>); "
                   "the preview grid and the scores go beside it as <out>.grid.png, <out>.quality.json, <out>.fid.json")
    p.add_argument("--fid", metavar="REF.npz", help="Inception FID/KID against these reference statistics; 'auto' = the "
                   "config's training split, computed once (spread over the ranks) into DATA_CACHE/fid-refs/")
    p.add_argument("--score", action="store_true", help="quality metrics of the samples (tools/quality.py), mean +- std over seed blocks")
    p.add_argument("--metric-features", choices=("classifier", "inception"),
                   help="features for --score: the dataset classifier (no download) or Inception (default: per dataset)")
    p.add_argument("--score-blocks", type=int, default=4, help="disjoint seed blocks for the spread of --score (default 4)")
    p.add_argument("--inception-weights", help="local pt_inception-2015-12-05 weights (or set FID_INCEPTION_WEIGHTS)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--class", dest="class_index", type=int, metavar="K", help="a conditional run: every image of class K "
                   "(default: a balanced mix, image k of class k mod network.label_dim); classes go to <out>.labels.json")
    p.add_argument("--guidance", type=float, default=1.0, metavar="W", help="guidance weight, D = D_guide + W (D - D_guide); "
                   "1 = none. The guide is --guide, or else the same conditional network with the label dropped (classifier-free)")
    p.add_argument("--guide", metavar="RUN[:EPOCH]", help="autoguidance: a weaker model of the same task (a smaller config, "
                   "or an earlier checkpoint; default epoch: its newest), read with its own config.yaml")
    p.add_argument("--guide-ema", help="the guide's weights: classic | online | sigma_rel=X (default: sample.ema of its config)")
    p.add_argument("overrides", nargs="*", metavar="section.key=value")
    return p.parse_args(argv)


def sampler_table():
    """The samplers with their order, evaluations per step and what they do, as --sampler list prints them."""
    lines = [f"{'sampler':<18} {'order':>5} {'NFE/step':>8}  stochastic  description"]
    for name, info in SAMPLER_INFO.items():
        lines.append(f"{name:<18} {info.order:>5} {'adaptive' if info.nfe_per_step is None else info.nfe_per_step:>8}  "
                     f"{'yes' if info.stochastic else 'no':<10}  {info.description}")
    return "\n".join(lines + ["NFE of N steps: NFE/step x (N - 1) + 1 (the last step, to sigma = 0, is one evaluation)."])


def main(argv=None):
    args = parse_args(argv)
    if args.sampler == "list":
        print(sampler_table())
        return
    if args.epoch is not None and args.epoch < 0:
        raise UserError(f"--epoch must be >= 0, got {args.epoch}")
    seeds = parse_seeds(args.seeds) if args.seeds is not None else None
    cfg, outdir = resolve(args.config, args.outdir, args.overrides)
    flags = [k for k in SAMPLE_FLAGS if getattr(args, k) is not None]
    cfg["sample"].update({k: getattr(args, k) for k in flags})
    check_ranges("sample", cfg["sample"], names={k: f"--{k}" for k in flags})  # the flags replace sample.* keys: the same ranges
    seeds = seeds if seeds is not None else list(range(cfg["sample"]["num_images"]))
    scoring = Scoring(quality=args.score, blocks=args.score_blocks, features=args.metric_features, fid=args.fid,
                      inception_weights=args.inception_weights)
    scoring.check(cfg, seeds)
    with dist.session() as (rank, world, device):
        if rank == 0:
            to_run_log(outdir)
        out, run = generate(cfg, outdir, seeds, device, epoch=args.epoch, out=args.out, class_index=args.class_index,
                            guidance=args.guidance, guide=args.guide, guide_ema=args.guide_ema, compile=args.compile)
        score(cfg, outdir, out, seeds, run, device, scoring)


if __name__ == "__main__":
    run_main(main)
