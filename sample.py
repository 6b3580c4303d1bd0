"""Generate images from a trained run, one PNG per seed (any ranks or batch, resumable); optionally score them.

    torchrun --nproc_per_node=N sample.py --outdir runs/cifar10-E --epoch 2000 [--fid auto|REF.npz]
    python sample.py --outdir runs/demo/E --seeds 0-999 --score
    python sample.py --outdir runs/digits-E-cond --guidance 2 [--class 3] [--guide runs/digits-E-cond:5]
"""

import argparse

from tools.cli import parse_seeds, run_main
from tools.config import check_ranges
from tools.generate import Guidance, Scoring, generate, score
from tools.runs import open_run, run_flags, run_session
from tools.sampler import PARAMS, SAMPLERS


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    run_flags(p)
    p.add_argument("--ema", help="classic | online | sigma_rel=X (default: sample.ema of the config)")
    p.add_argument("--seeds", help="e.g. 0-49999 (default: 0 .. sample.num_images - 1)")
    p.add_argument("--steps", type=int, help="noise levels (heun: 2*steps - 1 network evaluations)")
    p.add_argument("--sampler", metavar="NAME", help=f"{' | '.join(SAMPLERS)}; 'list' describes them")
    for k, (_, _, _, meaning) in PARAMS.items():
        p.add_argument(f"--{k}", type=float, help=meaning)
    p.add_argument("--batch", type=int, help="images per rank per forward")
    p.add_argument("--out", help="folder of PNGs (default: OUTDIR/samples/epoch_<N>-<ema>-<sampler><steps>-<precision>); grid, scores beside")
    p.add_argument("--fid", metavar="REF.npz", help="Inception FID/KID against these statistics; 'auto' = the training split's (in DATA_CACHE)")
    p.add_argument("--score", action="store_true", help="quality metrics of the samples (tools/quality.py), mean +- std over seed blocks")
    p.add_argument("--metric-features", choices=("classifier", "inception"), help="features for --score (default: per dataset)")
    p.add_argument("--score-blocks", type=int, default=4, help="disjoint seed blocks for the spread of --score (default 4)")
    p.add_argument("--inception-weights", help="local pt_inception-2015-12-05 weights (or set FID_INCEPTION_WEIGHTS)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network")
    p.add_argument("--class", dest="class_index", type=int, metavar="K", help="every image of class K (default: image k of class k mod label_dim)")
    p.add_argument("--guidance", type=float, default=1.0, metavar="W", help="D_guide + W (D - D_guide), 1 = none; guide: --guide or label-dropped D")
    p.add_argument("--guide", metavar="RUN[:EPOCH]", help="autoguidance: a weaker model of the same task (smaller config or earlier checkpoint)")
    p.add_argument("--guide-ema", help="the guide's weights: classic | online | sigma_rel=X (default: sample.ema of its config)")
    return p.parse_args(argv)


def main(argv=None):
    args = parse_args(argv)
    if args.sampler == "list":
        print(f"{'sampler':<18} {'order':>5} {'NFE/step':>8}  stochastic  description")
        for name, info in SAMPLERS.items():
            print(f"{name:<18} {info.order:>5} {'adaptive' if info.nfe_per_step is None else info.nfe_per_step:>8}  "
                  f"{'yes' if info.stochastic else 'no':<10}  {info.description}")
        print("NFE of N steps: NFE/step x (N - 1) + 1 (the last step, to sigma = 0, is one evaluation).")
        return
    cfg, outdir = open_run(args)
    flags = [k for k in ("ema", "steps", "sampler", "batch", *PARAMS) if getattr(args, k) is not None]
    cfg["sample"].update({k: getattr(args, k) for k in flags})
    check_ranges("sample", cfg["sample"], names={k: f"--{k}" for k in flags})  # the ranges of the keys they replace
    seeds = parse_seeds(args.seeds) if args.seeds is not None else list(range(cfg["sample"]["num_images"]))
    scoring = Scoring(quality=args.score, blocks=args.score_blocks, features=args.metric_features, fid=args.fid,
                      inception_weights=args.inception_weights)
    scoring.check(cfg, seeds)
    with run_session(outdir) as (rank, world, device):
        out, run = generate(cfg, outdir, seeds, device, epoch=args.epoch, out=args.out, class_index=args.class_index,
                            guidance=Guidance(args.guidance, args.guide, args.guide_ema), compile=args.compile)
        score(cfg, outdir, out, seeds, run, device, scoring)


if __name__ == "__main__":
    run_main(main)
