"""Generating images from a trained run: one PNG per seed, spread over ranks, then scored (sample.py, the sweeps).

Image k depends only on seed k and the weights (tools/sampler.py SeedNoise), not on the rank count or the
batch size; so does its class in a conditional run (seed_classes). PNGs are written in the background while
sampling goes on (tools/sample_writer.py); a folder continues where an interrupted run stopped, from the
completion records of its writers: the images they list are kept. Guidance wraps the denoiser:
classifier-free (the same conditional network with the label dropped) or autoguidance by a weaker model
(Karras et al. 2024, arXiv 2406.02507).
"""

import json
import math
import os
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tools import dist, fid, quality
from tools.checkpoint import append_text, write_json
from tools.cli import UserError
from tools.data import to_uint8
from tools.edm import Denoiser
from tools.grid import image_grid, save_picture
from tools.inception import find_inception_weights, inception_weights_or_none, weights_name
from tools.log import progress
from tools.precision import autocast
from tools.runs import load_net, resolve
from tools.sample_writer import SampleWriter, done_seeds, image_path
from tools.sampler import SAMPLER_INFO, GuidedDenoiser, SeedNoise, one_hot, sample, sampler_kwargs, sampler_nfe, seed_classes

PREVIEW_IMAGES = 64  # the first seeds' images in <out>.grid.png


# ----------------------------------------------------------------------------------------------------
# Sampling seeds.

def image_shape(cfg):
    n = cfg["network"]
    return n["img_channels"], n["img_resolution"], n["img_resolution"]


@torch.no_grad()
def sample_seeds(denoiser, cfg, seeds, device, classes=None, stats=None):
    """float32 images [len(seeds), C, H, W] in ~[-1, 1], image k from seed k, with the config's sampler in
    sample.precision; `classes` (one per seed) for a conditional network; `stats` as tools.sampler.sample fills it."""
    with autocast(device, cfg["sample"]["precision"]):
        return sample(denoiser, SeedNoise(seeds, device), image_shape(cfg), one_hot(classes, cfg["network"]["label_dim"], device),
                      **sampler_kwargs(cfg["sample"]), stats=stats)


def sampler_tag(S):
    """The sampler part of a sample folder's name: the sampler and what sets its path (steps, or dpm_adaptive's
    tolerance; churn and a non-default eta where they apply), so that different settings never share a folder."""
    info = SAMPLER_INFO[S["sampler"]]
    tag = S["sampler"] + (f"-rtol{S['rtol']:g}" if info.nfe_per_step is None else str(S["steps"]))
    if S["sampler"] in ("heun", "euler") and S["S_churn"] > 0:
        tag += f"-churn{S['S_churn']:g}"
    if info.stochastic and S["eta"] != 1:
        tag += f"-eta{S['eta']:g}"
    return tag


def grid_layout(label_dim, num=PREVIEW_IMAGES):
    """(class of each grid image or None, images per row) for at most `num` images. Unconditional: 8 per row.
    Conditional, one row per class where rows fit: 8 rows of 8 cycling through K <= 8 classes, K rows of
    num // K images for K <= num / 2 (digits, CIFAR-10: 10 rows of 6); more classes: image k is of class k % K."""
    if not label_dim:
        return None, 8
    if label_dim > num // 2:
        return [k % label_dim for k in range(num)], 8
    cols = 8 if label_dim <= 8 else num // label_dim
    rows = num // cols if label_dim <= 8 else label_dim
    return [r % label_dim for r in range(rows) for _ in range(cols)], cols


def training_grid(net, cfg, device, num=PREVIEW_IMAGES, examples=None):
    """The picture (uint8 [C, H, W]) of net's samples from seeds 0, 1, ...: a row per class for a conditional network;
    `examples` (uint8 images, e.g. augmented training images) are added as a last row."""
    was_training = net.training
    classes, cols = grid_layout(cfg["network"]["label_dim"], num)
    count = num if classes is None else len(classes)
    x = to_uint8(sample_seeds(Denoiser(net.eval(), cfg["diffusion"]["sigma_data"]), cfg, range(count), device, classes)).cpu()
    net.train(was_training)
    if examples is not None:
        x = torch.cat([x, examples[:cols].cpu()])
    return image_grid(x, nrow=cols)


# ----------------------------------------------------------------------------------------------------
# Sample folders.

def read_pngs(out, seeds):
    """uint8 [len(seeds), C, H, W] of the seeds' PNGs."""
    images = torch.from_numpy(np.stack([np.asarray(Image.open(image_path(out, s))) for s in seeds]))
    return images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)


def write_preview(out, seeds):
    """<out>.grid.png beside the sample folder (inside it, scorers that search folders recursively would count it)."""
    shown = [s for s in seeds[:PREVIEW_IMAGES] if os.path.exists(image_path(out, s))]
    if not shown:
        return None
    return save_picture(f"{out}.grid.png", image_grid(read_pngs(out, shown)))


def labels_path(out):
    return f"{out}.labels.json"


def check_labels(out, seeds, classes, write=True):
    """<out>.labels.json, {seed: class} beside the sample folder, extended by these seeds (written when `write`).
    A seed already on disk with another class stops the run: its PNG would not show the class recorded."""
    path = labels_path(out)
    known = {}
    if os.path.exists(path):
        with open(path) as f:
            known = {int(k): v for k, v in json.load(f).items()}
    for seed, c in zip(seeds, classes):
        if known.get(seed, c) != c and os.path.exists(image_path(out, seed)):
            raise UserError(f"{out} holds seed {seed} sampled as class {known[seed]}, not {c}; pass another --out")
    known.update(zip(seeds, classes))
    if write:
        write_json(path, {str(k): known[k] for k in sorted(known)})


def read_labels(out, seeds):
    """The requested class of each seed from <out>.labels.json, in the order of `seeds`."""
    try:
        with open(labels_path(out)) as f:
            known = json.load(f)
        return [known[str(s)] for s in seeds]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{labels_path(out)} is missing or lacks some seeds: sample the seeds again into this --out") from None


# ----------------------------------------------------------------------------------------------------
# Generation.

def check_conditioning(cfg, class_index, guidance, guide, guide_ema):
    """One-line errors for --class and --guidance flags that do not fit the run."""
    K = cfg["network"]["label_dim"]
    if class_index is not None and not K:
        raise UserError("--class needs a class-conditional run (network.label_dim > 0); this run is unconditional")
    if class_index is not None and not 0 <= class_index < K:
        raise UserError(f"--class must be a class index in 0..{K - 1} (network.label_dim={K}), got {class_index}")
    if not math.isfinite(guidance):
        raise UserError(f"--guidance must be a finite number (1 = no guidance), got {guidance}")
    if guidance != 1 and not K and not guide:
        raise UserError("--guidance without --guide is classifier-free guidance, which needs a class-conditional run "
                        "(network.label_dim > 0); for this unconditional run pass --guide RUN[:EPOCH] (autoguidance)")
    if guide_ema and not guide:
        raise UserError("--guide-ema needs --guide RUN[:EPOCH]")


def split_run_spec(spec):
    """'RUN[:EPOCH]' -> (RUN, EPOCH or None)."""
    run_dir, _, epoch = spec.rpartition(":")
    if not run_dir or not epoch.isdigit():  # no :EPOCH suffix
        return spec, None
    return run_dir, int(epoch)


def load_guide(cfg, spec, ema, device):
    """The autoguidance guide RUN[:EPOCH] as a Denoiser, loaded like the main network with the guide run's own
    config.yaml. Returns (denoiser, the labels it takes: 'same' or 'none' for an unconditional guide, run fields)."""
    run_dir, epoch = split_run_spec(spec)
    try:
        guide_cfg, guide_dir = resolve(None, run_dir)
        ema = ema or guide_cfg["sample"]["ema"]
        net, info = load_net(guide_cfg, guide_dir, epoch, ema, device)
    except UserError as e:
        raise UserError(f"--guide {spec}: {e}") from None
    n, g = cfg["network"], guide_cfg["network"]
    if guide_cfg["data"]["dataset"] != cfg["data"]["dataset"] or (g["img_channels"], g["img_resolution"]) != (n["img_channels"], n["img_resolution"]):
        raise UserError(f"--guide {spec}: the guide must model the same data ({cfg['data']['dataset']}, {n['img_channels']}x"
                        f"{n['img_resolution']}x{n['img_resolution']}), not {guide_cfg['data']['dataset']} at {g['img_channels']}x"
                        f"{g['img_resolution']}x{g['img_resolution']}")
    if g["label_dim"] not in (0, n["label_dim"]):
        raise UserError(f"--guide {spec}: its network.label_dim={g['label_dim']} does not match this run's {n['label_dim']}; "
                        f"the guide must be unconditional or know the same classes")
    run = dict(guide=guide_dir, guide_epoch=info["epoch"], guide_ema=ema)
    return Denoiser(net, guide_cfg["diffusion"]["sigma_data"]), "same" if g["label_dim"] else "none", run


def guided(cfg, denoiser, guidance, guide, guide_ema, device, compile=False):
    """(the denoiser to sample with, a tag for the folder name, run fields) for guidance weight `guidance`."""
    if guidance != 1 and guide:
        guide_denoiser, guide_labels, run = load_guide(cfg, guide, guide_ema, device)
        if compile:
            guide_denoiser.net.compile()
        tag = (f"-auto{guidance:g}-{os.path.basename(os.path.normpath(run['guide']))}-epoch_{run['guide_epoch']}-"
               f"{run['guide_ema'].replace('=', '')}")
        return GuidedDenoiser(denoiser, guide_denoiser, guidance, guide_labels), tag, run
    if guidance != 1:
        if not cfg["train"]["label_dropout"]:
            dist.print0("warning: this run was trained with train.label_dropout=0, so its unconditional denoiser (label dropped) "
                        "never trained: classifier-free guidance will not mean much")
        return GuidedDenoiser(denoiser, denoiser, guidance, guide_labels="dropped"), f"-cfg{guidance:g}", {}
    if guide:
        dist.print0(f"note: --guidance 1 is no guidance; --guide {guide} is not used")
    return denoiser, "", {}


def measured_nfe(out, evaluations, images):
    """The mean network evaluations per image of a folder whose sampler chooses its own steps: <out>.nfe.json holds
    the sums of every run that sampled into it, this one's added. None if no image was ever counted."""
    path = f"{out}.nfe.json"
    total = {"evaluations": 0.0, "images": 0}
    if os.path.exists(path):
        with open(path) as f:
            total = json.load(f)
    if images:
        total = {"evaluations": total["evaluations"] + evaluations, "images": total["images"] + int(images)}
        write_json(path, total)
    return total["evaluations"] / total["images"] if total["images"] else None


def generate(cfg, outdir, seeds, device, epoch=None, out=None, class_index=None, guidance=1.0, guide=None, guide_ema=None,
             compile=False):
    """Sample the seeds not yet on disk with the run's network (weights sample.ema, sampler and schedule of the
    sample section), spread over the ranks; rank 0 then writes the preview grid. Collective under torchrun.
    Returns (sample folder, description of the weights and sampler for the result rows)."""
    rank, world, S = dist.rank(), dist.world_size(), cfg["sample"]
    check_conditioning(cfg, class_index, guidance, guide, guide_ema)
    net, info = load_net(cfg, outdir, epoch, S["ema"], device)
    if compile:
        net.compile()
    denoiser, guide_tag, guide_run = guided(cfg, Denoiser(net, cfg["diffusion"]["sigma_data"]), guidance, guide, guide_ema,
                                            device, compile)
    K = cfg["network"]["label_dim"]
    tag = f"epoch_{info['epoch']}-{S['ema'].replace('=', '')}-{sampler_tag(S)}-{S['precision']}"  # all that sets the pixels
    tag += ("" if class_index is None else f"-class{class_index}") + guide_tag
    out = os.path.normpath(out or os.path.join(outdir, "samples", tag))
    if K:
        check_labels(out, seeds, seed_classes(seeds, K, class_index), write=rank == 0)
    done = done_seeds(out, seeds)
    todo = [s for s in seeds[rank::world] if s not in done]
    if rank == 0:
        what = "" if not K else (f", class {class_index}" if class_index is not None else f", classes seed mod {K}")
        what += "" if guidance == 1 else f", {'autoguidance' if guide else 'classifier-free guidance'} {guidance:g}"
        print(f"sampling {len(seeds)} images ({S['sampler']}, {S['steps']} steps, {S['ema']} weights, epoch {info['epoch']}{what}) "
              f"into {out}; {len(seeds) - len(done)} to go", flush=True)
    bar = progress(-(-len(todo) // S["batch"]), desc="sampling", unit="batch", enabled=rank == 0)
    evaluations = torch.zeros(2, dtype=torch.float64, device=device)  # network evaluations per image: sum, images
    with SampleWriter(out) as writer:
        for i in range(0, len(todo), S["batch"]):
            batch, stats = todo[i:i + S["batch"]], {}
            x = sample_seeds(denoiser, cfg, batch, device, seed_classes(batch, K, class_index), stats)
            for seed, img in zip(batch, to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()):
                writer.write(seed, img)
            evaluations += torch.stack([stats["image_nfe"].sum().to(evaluations), evaluations.new_tensor(len(batch))])
            bar.update(1)
    bar.close()
    dist.all_reduce_sum(evaluations)
    dist.barrier()
    if rank == 0:
        preview = write_preview(out, seeds)
        print(f"samples: {out}" + (f"\ngrid: {preview}" if preview else ""), flush=True)
    nfe = sampler_nfe(S["sampler"], S["steps"])
    if nfe is None:  # dpm_adaptive: the mean of what each image took, kept beside the folder across resumed runs
        nfe = dist.on_rank0(measured_nfe, out, *evaluations.tolist())
    run = dict(epoch=info["epoch"], kimg=info["t_img"] / 1000, ema=S["ema"], sampler=S["sampler"], steps=S["steps"], nfe=nfe,
               samples=out, guidance=guidance, **guide_run)
    if K:
        run["classes"] = "mix" if class_index is None else class_index
    return out, run


# ----------------------------------------------------------------------------------------------------
# Scoring.

@dataclass
class Scoring:
    """What to measure of a sample folder: --score (quality metrics, mean +- std over `blocks` seed blocks, with the
    dataset classifier's or Inception's features) and --fid (Inception FID/KID against REF.npz or 'auto')."""
    quality: bool = False
    blocks: int = 4
    features: str = None                # classifier | inception; None = the dataset's default
    fid: str = None                     # REF.npz | auto | None
    inception_weights: str = None       # a local weights file (else FID_INCEPTION_WEIGHTS or the hub cache)

    def extractor(self, cfg):
        return self.features or quality.default_extractor(cfg)

    def needs_inception(self, cfg):
        return bool(self.fid) or (self.quality and self.extractor(cfg) == "inception")

    def check(self, cfg, seeds):
        """One-line errors before any sampling: too few seeds for the blocks, a weights file that does not load, a
        missing reference."""
        if self.blocks < 2:
            raise UserError(f"--score-blocks must be >= 2 (the spread of a metric needs two blocks), got {self.blocks}")
        if self.features is not None and self.features not in quality.EXTRACTORS:
            raise UserError(f"--metric-features must be one of {', '.join(quality.EXTRACTORS)}, got {self.features!r}")
        if self.quality and len(seeds) < 10 * self.blocks:  # quality.Scorer.score: blocks of >= 10 images
            raise UserError(f"--score needs at least {10 * self.blocks} seeds ({self.blocks} blocks of 10), got {len(seeds)}")
        if self.needs_inception(cfg):
            local = find_inception_weights(self.inception_weights)  # a mistyped weights path stops here, before sampling,
            if local is not None:
                weights_name(local)  # and so does a file that does not load (none here: rank 0 downloads it later)
        if self.fid and self.fid != "auto" and not os.path.isfile(self.fid):
            raise UserError(f"--fid {self.fid}: no such statistics file (make one with: python -m tools.fid ref --config ... "
                            f"--out {self.fid})")


def append_metrics(outdir, row):
    """One JSON line in OUTDIR/metrics.jsonl; a full disk ends in one line and leaves no half line."""
    append_text(os.path.join(outdir, "metrics.jsonl"), json.dumps(row) + "\n")


def score(cfg, outdir, out, seeds, run, device, scoring):
    """Score the sample folder `out` as `scoring` asks; results beside it (<out>.quality.json, <out>.fid.json) and in
    OUTDIR/metrics.jsonl. Collective under torchrun: the Inception weights (found or downloaded by rank 0) and the
    training split's reference statistics (computed once, spread over the ranks); then rank 0 scores alone."""
    weights = ref = None
    extractor = scoring.extractor(cfg)
    if scoring.needs_inception(cfg):
        weights = dist.on_rank0(inception_weights_or_none, scoring.inception_weights)
        if weights is not None and (scoring.fid == "auto" or scoring.quality and extractor == "inception"):
            ref = fid.auto_reference(cfg, weights, device)
    if dist.rank() != 0:
        return
    if scoring.quality and (extractor == "classifier" or weights is not None):
        classes = read_labels(out, seeds) if cfg["network"]["label_dim"] else None  # a conditional run: the requested classes
        result = quality.score_samples(cfg, read_pngs(out, seeds), extractor, device, blocks=scoring.blocks,
                                       pairs_path=f"{out}.nearest_pairs.png", inception_weights=weights, inception_ref=ref,
                                       classes=classes)
        result.update(run, kind="quality")
        write_json(f"{out}.quality.json", result)
        append_metrics(outdir, result)
        print(f"quality ({extractor}): {quality.format_line(result)}", flush=True)
        if "classifier_test_accuracy" in result:
            print(f"  dataset classifier test accuracy {100 * result['classifier_test_accuracy']:.2f}%; "
                  f"nearest training images: {result['nearest_pairs']}", flush=True)
    if scoring.fid and weights is not None:
        result = fid.score_folder(out, ref if scoring.fid == "auto" else scoring.fid, weights_path=weights, device=device)
        result.update(run, reference=ref if scoring.fid == "auto" else scoring.fid)
        write_json(f"{out}.fid.json", result)
        append_metrics(outdir, result)
        print(f"fid: {result['fid']:.4f}  kid: {result['kid_mean']:.5f} +- {result['kid_std']:.5f}  ({result['count']} images)",
              flush=True)
