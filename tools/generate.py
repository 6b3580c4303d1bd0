"""Sampling a run into a folder of PNGs, one per seed, spread over ranks (resumable), and scoring the folder."""

import json
import math
import os
from collections import namedtuple
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image

from tools import dist, fid, quality
from tools.checkpoint import append_text, read_json, write_json
from tools.cli import UserError
from tools.data import to_uint8
from tools.edm import Denoiser
from tools.grid import image_grid, save_picture
from tools.inception import find_inception_weights, inception_weights_or_none, weights_name
from tools.log import progress
from tools.precision import autocast
from tools.rng import SeedNoise
from tools.runs import load_net, resolve
from tools.sample_writer import SampleWriter, done_seeds, image_path
from tools.sampler import GuidedDenoiser, folder_tag, one_hot, sample, sampler_kwargs, sampler_nfe, seed_classes

PREVIEW_IMAGES = 64  # the first seeds' images in <out>.grid.png


def image_shape(cfg):
    n = cfg["network"]
    return n["img_channels"], n["img_resolution"], n["img_resolution"]


@torch.no_grad()
def sample_seeds(denoiser, cfg, seeds, device, classes=None, stats=None):
    """float32 images [len(seeds), C, H, W], image k from seed k, by the config's sampler in sample.precision."""
    with autocast(device, cfg["sample"]["precision"]):
        return sample(denoiser, SeedNoise(seeds, device), image_shape(cfg), one_hot(classes, cfg["network"]["label_dim"], device),
                      **sampler_kwargs(cfg["sample"]), stats=stats)


def grid_layout(label_dim, num=PREVIEW_IMAGES):
    """(class of each grid image or None, images per row): a row per class where rows fit (K <= num / 2), else class k % K."""
    if not label_dim:
        return None, 8
    if label_dim > num // 2:
        return [k % label_dim for k in range(num)], 8
    cols = 8 if label_dim <= 8 else num // label_dim
    rows = num // cols if label_dim <= 8 else label_dim
    return [r % label_dim for r in range(rows) for _ in range(cols)], cols


def training_grid(net, cfg, device, num=PREVIEW_IMAGES, examples=None):
    """uint8 [C, H, W] picture of net's samples from seeds 0, 1, ..., `examples` (e.g. augmented images) as a last row."""
    was_training = net.training
    classes, cols = grid_layout(cfg["network"]["label_dim"], num)
    count = num if classes is None else len(classes)
    x = to_uint8(sample_seeds(Denoiser(net.eval(), cfg["diffusion"]["sigma_data"]), cfg, range(count), device, classes)).cpu()
    net.train(was_training)
    if examples is not None:
        x = torch.cat([x, examples[:cols].cpu()])
    return image_grid(x, nrow=cols)


def read_pngs(out, seeds):
    """uint8 [len(seeds), C, H, W] of the seeds' PNGs."""
    images = torch.from_numpy(np.stack([np.asarray(Image.open(image_path(out, s))) for s in seeds]))
    return images[:, None] if images.ndim == 3 else images.permute(0, 3, 1, 2)


def check_labels(out, seeds, classes, write=True):
    """Extend <out>.labels.json ({seed: class}) by these seeds; a seed on disk with another class stops the run."""
    path, known = f"{out}.labels.json", {}
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
    try:
        with open(f"{out}.labels.json") as f:
            known = json.load(f)
        return [known[str(s)] for s in seeds]
    except (OSError, ValueError, KeyError):
        raise UserError(f"{out}.labels.json is missing or lacks some seeds: sample the seeds again into this --out") from None


def check_conditioning(cfg, class_index, guidance, guide, guide_ema):
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


def load_guide(cfg, spec, ema, device):
    """(Denoiser of RUN[:EPOCH] with its own config, the labels it takes: 'same' | 'none', run fields)."""
    run_dir, _, epoch = spec.rpartition(":")
    run_dir, epoch = (run_dir, int(epoch)) if run_dir and epoch.isdigit() else (spec, None)
    try:
        guide_cfg, guide_dir = resolve(None, run_dir)
        ema = ema or guide_cfg["sample"]["ema"]
        net, info = load_net(guide_cfg, guide_dir, epoch, ema, device)
    except UserError as e:
        raise UserError(f"--guide {spec}: {e}") from None
    n, g = cfg["network"], guide_cfg["network"]
    data, guide_data = (f"{c['data']['dataset']} at {'x'.join(map(str, image_shape(c)))}" for c in (cfg, guide_cfg))
    if data != guide_data:
        raise UserError(f"--guide {spec}: the guide must model the same data ({data}), not {guide_data}")
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
        tag = f"-auto{guidance:g}-{os.path.basename(os.path.normpath(run['guide']))}-epoch_{run['guide_epoch']}-{run['guide_ema'].replace('=', '')}"
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
    """Mean evaluations per image of an adaptive sampler's folder, summed in <out>.nfe.json over every run into it."""
    path = f"{out}.nfe.json"
    total = read_json(path) or {"evaluations": 0.0, "images": 0}
    if images:
        total = {"evaluations": total["evaluations"] + evaluations, "images": total["images"] + int(images)}
        write_json(path, total)
    return total["evaluations"] / total["images"] if total["images"] else None


Guidance = namedtuple("Guidance", "weight guide guide_ema", defaults=(1.0, None, None))  # --guidance, --guide, --guide-ema


def generate(cfg, outdir, seeds, device, epoch=None, out=None, class_index=None, guidance=Guidance(), compile=False):
    """Sample the seeds not yet on disk (collective under torchrun). Returns (sample folder, its fields in result rows)."""
    check_conditioning(cfg, class_index, *guidance)
    net, info = load_net(cfg, outdir, epoch, cfg["sample"]["ema"], device)
    if compile:
        net.compile()
    denoiser, guide_tag, guide_run = guided(cfg, Denoiser(net, cfg["diffusion"]["sigma_data"]), *guidance, device, compile)
    sampling, K = cfg["sample"], cfg["network"]["label_dim"]
    tag = f"epoch_{info['epoch']}-{sampling['ema'].replace('=', '')}-{folder_tag(sampling)}-{sampling['precision']}"  # all that sets the pixels
    out = os.path.normpath(out or os.path.join(outdir, "samples", tag + ("" if class_index is None else f"-class{class_index}") + guide_tag))
    if K:
        check_labels(out, seeds, seed_classes(seeds, K, class_index), write=dist.rank() == 0)
    what = "" if not K else (f", class {class_index}" if class_index is not None else f", classes seed mod {K}")
    what += "" if guidance.weight == 1 else f", {'autoguidance' if guidance.guide else 'classifier-free guidance'} {guidance.weight:g}"
    evaluations = write_samples(denoiser, cfg, out, seeds, device, lambda batch: seed_classes(batch, K, class_index),
                                f"{sampling['sampler']}, {sampling['steps']} steps, {sampling['ema']} weights, epoch {info['epoch']}{what}")
    nfe = sampler_nfe(sampling["sampler"], sampling["steps"])
    if nfe is None:  # dpm_adaptive: the mean of what each image took, kept beside the folder across resumed runs
        nfe = dist.on_rank0(measured_nfe, out, *evaluations)
    run = dict(epoch=info["epoch"], kimg=info["t_img"] / 1000, ema=sampling["ema"], sampler=sampling["sampler"], steps=sampling["steps"], nfe=nfe,
               samples=out, guidance=guidance.weight, **guide_run)
    if K:
        run["classes"] = "mix" if class_index is None else class_index
    return out, run


def write_samples(denoiser, cfg, out, seeds, device, classes_of, what):
    """The PNGs of the seeds not yet in `out`, seed k on rank k mod world. Returns (evaluations, images) over all ranks."""
    rank, world, batch_size = dist.rank(), dist.world_size(), cfg["sample"]["batch"]
    done = done_seeds(out, seeds)
    todo = [s for s in seeds[rank::world] if s not in done]
    dist.print0(f"sampling {len(seeds)} images ({what}) into {out}; {len(seeds) - len(done)} to go")
    bar = progress(-(-len(todo) // batch_size), desc="sampling", unit="batch", enabled=rank == 0)
    evaluations = torch.zeros(2, dtype=torch.float64, device=device)  # network evaluations per image: sum, images
    with SampleWriter(out) as writer:
        for i in range(0, len(todo), batch_size):
            batch, stats = todo[i:i + batch_size], {}
            x = sample_seeds(denoiser, cfg, batch, device, classes_of(batch), stats)
            for seed, img in zip(batch, to_uint8(x).permute(0, 2, 3, 1).cpu().numpy()):
                writer.write(seed, img)
            evaluations += torch.stack([stats["image_nfe"].sum().to(evaluations), evaluations.new_tensor(len(batch))])
            bar.update(1)
    bar.close()
    dist.all_reduce_sum(evaluations)
    dist.barrier()
    if rank == 0:  # the preview goes beside the folder: inside, a recursive scorer would count it
        shown = [s for s in seeds[:PREVIEW_IMAGES] if os.path.exists(image_path(out, s))]
        preview = shown and save_picture(f"{out}.grid.png", image_grid(read_pngs(out, shown)))
        print(f"samples: {out}" + (f"\ngrid: {preview}" if preview else ""), flush=True)
    return evaluations.tolist()


@dataclass
class Scoring:
    """--score (quality metrics over `blocks` seed blocks) and --fid (Inception FID/KID against REF.npz or 'auto')."""
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
        if self.blocks < 2:
            raise UserError(f"--score-blocks must be >= 2 (the spread of a metric needs two blocks), got {self.blocks}")
        if self.quality and len(seeds) < 10 * self.blocks:  # quality.Scorer.score: blocks of >= 10 images
            raise UserError(f"--score needs at least {10 * self.blocks} seeds ({self.blocks} blocks of 10), got {len(seeds)}")
        if self.needs_inception(cfg):
            local = find_inception_weights(self.inception_weights)  # a mistyped weights path stops here, before sampling,
            if local is not None:
                weights_name(local)  # and so does a file that does not load (none here: rank 0 downloads it later)
        if self.fid and self.fid != "auto" and not os.path.isfile(self.fid):
            raise UserError(f"--fid {self.fid}: no such statistics file (make one: python -m tools.fid ref --config ... --out {self.fid})")


def score(cfg, outdir, out, seeds, run, device, scoring):
    """Score `out` into <out>.quality.json, <out>.fid.json and metrics.jsonl; collective, then rank 0 scores alone."""
    weights = ref = None
    extractor = scoring.extractor(cfg)
    if scoring.needs_inception(cfg):
        weights = dist.on_rank0(inception_weights_or_none, scoring.inception_weights)
        if weights is not None and (scoring.fid == "auto" or scoring.quality and extractor == "inception"):
            ref = fid.auto_reference(cfg, weights, device)
    if dist.rank() != 0:
        return
    if scoring.quality and (extractor == "classifier" or weights is not None):
        result = quality.score_samples(cfg, read_pngs(out, seeds), extractor, device, blocks=scoring.blocks,
                                       pairs_path=f"{out}.nearest_pairs.png", inception_weights=weights, inception_ref=ref,
                                       classes=read_labels(out, seeds) if cfg["network"]["label_dim"] else None)
        result.update(run, kind="quality")
        write_json(f"{out}.quality.json", result)
        append_text(os.path.join(outdir, "metrics.jsonl"), json.dumps(result) + "\n")
        print(f"quality ({extractor}): {quality.format_line(result)}", flush=True)
        if "classifier_test_accuracy" in result:
            print(f"  dataset classifier test accuracy {100 * result['classifier_test_accuracy']:.2f}%; "
                  f"nearest training images: {result['nearest_pairs']}", flush=True)
    if scoring.fid and weights is not None:
        reference = ref if scoring.fid == "auto" else scoring.fid
        result = fid.score_folder(out, reference, weights_path=weights, device=device)
        result.update(run, reference=reference)
        write_json(f"{out}.fid.json", result)
        append_text(os.path.join(outdir, "metrics.jsonl"), json.dumps(result) + "\n")
        print(f"fid: {result['fid']:.4f}  kid: {result['kid_mean']:.5f} +- {result['kid_std']:.5f}  ({result['count']} images)", flush=True)
