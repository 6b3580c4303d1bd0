"""Speed of a config on this machine as one JSON line: training, sampling and the sample writer (docs/PERFORMANCE.md)."""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.bench ...")

import argparse
import copy
import json
import os
import platform
import resource
import statistics
import tempfile
import time

import numpy as np
import torch
from PIL import Image

from tools import dist
from tools.batches import Batches
from tools.checkpoint import atomic_write
from tools.cli import UserError, run_main
from tools.config import load_config
from tools.edm import Denoiser
from tools.generate import generate, image_shape, sample_seeds
from tools.precision import autocast
from tools.sample_writer import SampleWriter
from tools.schedule import learning_rate
from tools.train_state import TrainState


class NoLog:
    """The training log's interface, recording nothing: the benchmark times the step."""

    def __getattr__(self, name):
        return lambda *args: None


def random_images(cfg, count, seed=0):
    """uint8 [count, C, H, W] random pixels of the config's shape, and random labels."""
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (count, *image_shape(cfg)), generator=g, dtype=torch.uint8)
    return images, torch.randint(0, max(cfg["network"]["label_dim"], 1), (count,), generator=g)


def timed(device, fn):
    sync = (lambda: torch.cuda.synchronize(device)) if device.type == "cuda" else (lambda: None)
    sync()
    started = time.perf_counter()
    fn()
    sync()
    return time.perf_counter() - started


def matmul_tflops(device, dtype, repeats=10):
    """TFLOP/s of a large square matmul: the device's practical peak."""
    n = 8192 if device.type == "cuda" else 1024
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    timed(device, lambda: [a @ b for _ in range(3)])  # warm-up
    return 2 * n ** 3 * repeats / timed(device, lambda: [a @ b for _ in range(repeats)]) / 1e12


def bench_training(cfg, device, steps, windows, warmup):
    train = cfg["train"]
    data = Batches(cfg, 0, 1, device, data=random_images(cfg, train["batch_size"] * 2))
    state = TrainState(cfg, device)
    state.track_noise_scale(data.micro, data.per_rank)  # as training does
    model, step = state.edm, 0
    if train["compile"]:
        model.compile()

    def run(n):
        nonlocal step
        for _ in range(n):
            lr = learning_rate(state.t_img, train["lr"], train["lr_rampup_epochs"] * data.epoch_img, train["lr_ref_epochs"] * data.epoch_img)
            state.step(model, data.batch(step), data.micro, lr, NoLog())
            step += 1

    warmup_s = timed(device, lambda: run(warmup))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = [steps * data.batch_size / timed(device, lambda: run(steps)) for _ in range(windows)]
    peak = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
            else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
    flops = None
    if not train["compile"]:  # counted eagerly: matmuls and convolutions
        from torch.utils.flop_counter import FlopCounterMode  # lazy: only the benchmark counts operations
        with FlopCounterMode(display=False) as counter:
            state.step(model, data.batch(step), data.micro, 0.0, NoLog())
        flops = counter.get_total_flops()
    rate = statistics.median(rates)
    return state, dict(train_img_per_s=rate, train_windows_img_per_s=rates, train_warmup_s=warmup_s, train_peak_mem_gib=peak,
                       train_step_flops=flops, train_tflops=None if flops is None else flops * rate / data.batch_size / 1e12)


def bench_sampling(cfg, device, state, sample_images, compile):
    """Network-only (a batch after a warm-up batch) and end-to-end sampling rates, classic-EMA weights."""
    sample, K = cfg["sample"], cfg["network"]["label_dim"]
    net = state.emas.classic.ema_model
    if compile:
        net.compile()
    denoiser, batch = Denoiser(net, cfg["diffusion"]["sigma_data"]), list(range(sample["batch"]))
    classes = [s % K for s in batch] if K else None
    with autocast(device, sample["precision"]):
        sample_seeds(denoiser, cfg, batch, device, classes)  # warm-up (and compilation)
        network = len(batch) / timed(device, lambda: sample_seeds(denoiser, cfg, batch, device, classes))
    with tempfile.TemporaryDirectory(prefix="bench-") as run:
        state.save(run, 0)
        seconds = timed(device, lambda: generate(cfg, run, list(range(sample_images)), device, epoch=0,
                                                 out=os.path.join(run, "samples"), compile=compile))
    return dict(sample_img_per_s_network=network, sample_img_per_s_end_to_end=sample_images / seconds, sample_images=sample_images,
                sample_batch=sample["batch"], sampler=sample["sampler"], sample_steps=sample["steps"])


def bench_writers(cfg, count):
    C, H, W = image_shape(cfg)
    images = np.random.default_rng(0).integers(0, 256, (count, H, W, C), dtype=np.uint8)
    cpu = torch.device("cpu")
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as folder:
        def pool():
            with SampleWriter(os.path.join(folder, "pool")) as writer:
                for seed, image in enumerate(images):
                    writer.write(seed, image)

        def atomic():
            for seed, image in enumerate(images):
                picture = Image.fromarray(image[:, :, 0] if C == 1 else image)
                atomic_write(os.path.join(folder, "atomic", f"{seed:06d}.png"), lambda f: picture.save(f, format="PNG"))
        return dict(writer_img_per_s=count / timed(cpu, pool), atomic_writer_img_per_s=count / timed(cpu, atomic), writer_images=count)


def bench(cfg, device, steps=10, windows=5, warmup=3, sample_images=None, writer_images=2000, sampling=True, gpus=8):
    train = cfg["train"]
    row = dict(unet=cfg["unet"], device=torch.cuda.get_device_name(device) if device.type == "cuda" else
               f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)", torch=torch.__version__,
               batch=train["batch_size"], batch_gpu=train["batch_gpu"] or train["batch_size"], precision=train["precision"],
               compile=train["compile"], gns=train["gns"], data="random pixels of the config's shape (no dataset read)")
    state, timing = bench_training(cfg, device, steps, windows, warmup)
    row["params_m"] = sum(p.numel() for p in state.edm.net.parameters()) / 1e6
    row.update(timing)
    if gpus > 1:  # the config as one GPU of `gpus` trains it: its share of the global batch in two micro-batches
        share = copy.deepcopy(cfg)
        share["train"]["batch_size"] = max(train["batch_size"] // gpus, 2)
        share["train"]["batch_gpu"] = share["train"]["batch_size"] // 2
        _, timing = bench_training(share, device, steps, windows, warmup)
        row.update(share_gpus=gpus, share_batch=share["train"]["batch_size"], share_batch_gpu=share["train"]["batch_gpu"],
                   **{f"share_{k}": timing[k] for k in ("train_img_per_s", "train_windows_img_per_s", "train_peak_mem_gib")})
    row["matmul_dtype"] = "bfloat16" if device.type == "cuda" else "float32"  # the precision a CPU trains in
    row["matmul_tflops"] = matmul_tflops(device, getattr(torch, row["matmul_dtype"]))
    if row["train_tflops"] is not None:
        row["train_matmul_fraction"] = row["train_tflops"] / row["matmul_tflops"]
    if sampling:
        row.update(bench_sampling(cfg, device, state, sample_images or 2 * cfg["sample"]["batch"], train["compile"]))
    row.update(bench_writers(cfg, writer_images))
    return row


def main(argv=None):
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--config", required=True, help="a YAML config (its network, training and sample sections are benchmarked)")
    ap.add_argument("--batch", type=int, help="train.batch_size (default: the config's)")
    ap.add_argument("--sample-batch", type=int, help="sample.batch (default: the config's)")
    ap.add_argument("--compile", action="store_true", help="torch.compile the network for training and sampling")
    ap.add_argument("--steps", type=int, default=10, help="optimizer steps per timed window")
    ap.add_argument("--windows", type=int, default=5, help="timed windows (the median is reported)")
    ap.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    ap.add_argument("--sample-images", type=int, help="images sampled end to end (default: two sample batches)")
    ap.add_argument("--writer-images", type=int, default=2000, help="images the writers write")
    ap.add_argument("--no-sampling", action="store_true", help="skip the sampling rows")
    ap.add_argument("--gpus", type=int, default=8, help="also time one GPU's share of the batch on this many GPUs (two micro-batches); 1 = not")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. sample.steps=32")
    args = ap.parse_args(argv)
    for flag in ("batch", "sample_batch", "steps", "windows", "writer_images", "gpus", "warmup"):
        value, least = getattr(args, flag), 0 if flag == "warmup" else 1
        if value is not None and value < least:
            raise UserError(f"--{flag.replace('_', '-')} must be >= {least}, got {value}")
    overrides = list(args.overrides) + [f"{key}={value}" for key, value in (("train.batch_size", args.batch), ("sample.batch", args.sample_batch),
                                                                            ("train.compile", "true" if args.compile else None)) if value is not None]
    cfg = load_config(args.config, overrides)
    with dist.session() as (rank, world, device):
        if world > 1:
            raise UserError("the benchmark runs on one device: python -m tools.bench, not torchrun")
        row = bench(cfg, device, args.steps, args.windows, args.warmup, args.sample_images, args.writer_images,
                    sampling=not args.no_sampling, gpus=args.gpus)
    print(json.dumps(dict(config=args.config, **row)), flush=True)


if __name__ == "__main__":
    run_main(main)
