"""Speed of a config on this machine, one JSON line: training, sampling and the sample writer, on random data.

    python -m tools.bench --config config/cifar10/E.yaml [--batch 512] [--compile] [--device cuda]

No dataset is read: the training images are random pixels of the config's shape (the speed of a step does not
depend on what the pixels show), and the network is the config's, freshly initialised. Reported:
- train_img_per_s: the median over `--windows` timed windows of `--steps` optimizer steps each (the real step of
  tools/train_state.py: precision, micro-batches, augmentation and labels as configured), after `--warmup` steps;
  train_peak_mem_gib: CUDA's peak allocated memory over the timed windows, or on a CPU the process's peak RSS.
- share_train_img_per_s (and its windows and peak memory): the same for one GPU's share of an 8-GPU run (`--gpus`):
  batch / 8 images per step in two micro-batches, the gradient noise scale's hooks on, as such a run's steps are.
- train_tflops and, on a GPU, train_matmul_fraction: the step's floating-point operations (counted once by
  torch.utils.flop_counter) per second, and that as a fraction of a large bf16 matmul's rate measured here
  (on a CPU the reference matmul is float32, the precision a CPU trains in).
- sample_img_per_s_network: sampling alone (the sample section's sampler and steps, one batch after a warm-up
  batch, no files); sample_img_per_s_end_to_end: tools.generate.generate from loading a checkpoint to the last
  PNG on disk, `--sample-images` images into a temporary folder.
- writer_img_per_s: the sample writer alone on `--writer-images` random images of the config's shape, and
  atomic_writer_img_per_s, one atomic file (temp file, fsync, rename) at a time, for comparison.
"""

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
    """The training log's interface, recording nothing: the benchmark times the step, not the bookkeeping."""

    def add_losses(self, loss, sigma):
        pass

    def add_augmented(self, augment_labels):
        pass

    def add_step(self, grad_norm, finite, *rest):
        pass


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def peak_memory_gib(device):
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2 ** 30
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 2 ** 30


def random_images(cfg, count, seed=0):
    """uint8 [count, C, H, W] random pixels of the config's shape, and random labels: data of the right shape."""
    g = torch.Generator().manual_seed(seed)
    C, H, W = image_shape(cfg)
    images = torch.randint(0, 256, (count, C, H, W), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, max(cfg["network"]["label_dim"], 1), (count,), generator=g)
    return images, labels


def matmul_tflops(device, dtype, n=None, repeats=10):
    """The rate of a large square matmul in `dtype` on `device`, in TFLOP/s: the device's practical peak."""
    n = n or (8192 if device.type == "cuda" else 1024)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    for _ in range(3):
        a @ b
    synchronize(device)
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - started) / 1e12


def step_flops(state, model, batch, micro):
    """Floating-point operations of one training step's forward and backward passes (FlopCounterMode counts
    matmuls and convolutions, which are nearly all of them)."""
    from torch.utils.flop_counter import FlopCounterMode  # lazy: only the benchmark counts operations
    with FlopCounterMode(display=False) as counter:
        state.step(model, batch, micro, 0.0, NoLog())
    return counter.get_total_flops()


def bench_training(cfg, device, steps, windows, warmup):
    T = cfg["train"]
    data = Batches(cfg, 0, 1, device, data=random_images(cfg, T["batch_size"] * 2))
    state = TrainState(cfg, device)
    state.track_noise_scale(data.micro, data.per_rank)  # the gradient noise scale's hooks, as training installs them
    model, log, step = state.edm, NoLog(), 0
    if T["compile"]:
        model.compile()  # as the training loop does

    def run(n):
        nonlocal step
        for _ in range(n):
            lr = learning_rate(state.t_img, T["lr"], T["lr_rampup_epochs"] * data.epoch_img, T["lr_ref_epochs"] * data.epoch_img)
            state.step(model, data.batch(step), data.micro, lr, log)
            step += 1
        synchronize(device)

    started = time.perf_counter()
    run(warmup)
    warmup_s = time.perf_counter() - started
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    rates = []
    for _ in range(windows):
        started = time.perf_counter()
        run(steps)
        rates.append(steps * data.batch_size / (time.perf_counter() - started))
    peak = peak_memory_gib(device)
    flops = None if T["compile"] else step_flops(state, model, data.batch(step), data.micro)  # counted eagerly
    return state, dict(train_img_per_s=statistics.median(rates), train_windows_img_per_s=rates, train_warmup_s=warmup_s,
                       train_peak_mem_gib=peak, train_step_flops=flops,
                       train_tflops=None if flops is None else flops * statistics.median(rates) / data.batch_size / 1e12)


def bench_sampling(cfg, device, state, sample_images, compile):
    """Network-only and end-to-end sampling rates with the freshly initialised classic-EMA weights."""
    S, K = cfg["sample"], cfg["network"]["label_dim"]
    net = state.emas.classic.ema_model
    if compile:
        net.compile()
    denoiser = Denoiser(net, cfg["diffusion"]["sigma_data"])
    classes = (lambda seeds: [s % K for s in seeds]) if K else (lambda seeds: None)
    batch = list(range(S["batch"]))
    with autocast(device, S["precision"]):
        sample_seeds(denoiser, cfg, batch, device, classes(batch))  # warm-up (and compilation)
        synchronize(device)
        started = time.perf_counter()
        sample_seeds(denoiser, cfg, batch, device, classes(batch))
        synchronize(device)
    network = len(batch) / (time.perf_counter() - started)

    with tempfile.TemporaryDirectory(prefix="bench-") as run:
        state.save(run, 0)
        seeds = list(range(sample_images))
        started = time.perf_counter()
        generate(cfg, run, seeds, device, epoch=0, out=os.path.join(run, "samples"), compile=compile)
        end_to_end = sample_images / (time.perf_counter() - started)
    return dict(sample_img_per_s_network=network, sample_img_per_s_end_to_end=end_to_end, sample_images=sample_images,
                sample_batch=S["batch"], sampler=S["sampler"], sample_steps=S["steps"])


def bench_writers(cfg, count):
    """The sample writer's rate, and one atomic file at a time's, on random images of the config's shape."""
    C, H, W = image_shape(cfg)
    images = np.random.default_rng(0).integers(0, 256, (count, H, W, C), dtype=np.uint8)
    from PIL import Image  # lazy: only the writer benchmark encodes here
    with tempfile.TemporaryDirectory(prefix="bench-writer-") as folder:
        started = time.perf_counter()
        with SampleWriter(os.path.join(folder, "pool")) as writer:
            for seed, image in enumerate(images):
                writer.write(seed, image)
        pool = count / (time.perf_counter() - started)
        os.makedirs(os.path.join(folder, "atomic"))
        started = time.perf_counter()
        for seed, image in enumerate(images):
            picture = Image.fromarray(image[:, :, 0] if C == 1 else image)
            atomic_write(os.path.join(folder, "atomic", f"{seed:06d}.png"), lambda f: picture.save(f, format="PNG"))
        atomic = count / (time.perf_counter() - started)
    return dict(writer_img_per_s=pool, atomic_writer_img_per_s=atomic, writer_images=count)


def share_config(cfg, gpus):
    """The config as one GPU of `gpus` trains it: its share of the global batch, in two micro-batches, so that the
    gradient noise scale's hooks run as they do on several GPUs."""
    share = copy.deepcopy(cfg)
    T = share["train"]
    T["batch_size"] = max(T["batch_size"] // gpus, 2)
    T["batch_gpu"] = T["batch_size"] // 2
    return share


def bench(cfg, device, steps=10, windows=5, warmup=3, sample_images=None, writer_images=2000, sampling=True, gpus=8):
    """The benchmark's row (see the module's docstring)."""
    T = cfg["train"]
    row = dict(unet=cfg["unet"], device=device_name(device), torch=torch.__version__,
               batch=T["batch_size"], batch_gpu=T["batch_gpu"] or T["batch_size"], precision=T["precision"],
               compile=T["compile"], gns=T["gns"], data="random pixels of the config's shape (no dataset read)")
    state, train = bench_training(cfg, device, steps, windows, warmup)
    row["params_m"] = sum(p.numel() for p in state.edm.net.parameters()) / 1e6
    row.update(train)
    if gpus > 1:
        share = share_config(cfg, gpus)["train"]
        _, train = bench_training(share_config(cfg, gpus), device, steps, windows, warmup)
        row.update(share_gpus=gpus, share_batch=share["batch_size"], share_batch_gpu=share["batch_gpu"],
                   **{f"share_{k}": v for k, v in train.items() if k in ("train_img_per_s", "train_windows_img_per_s",
                                                                        "train_peak_mem_gib")})
    reference = matmul_tflops(device, torch.bfloat16 if device.type == "cuda" else torch.float32)
    row["matmul_tflops"] = reference
    row["matmul_dtype"] = "bfloat16" if device.type == "cuda" else "float32"
    if row["train_tflops"] is not None:
        row["train_matmul_fraction"] = row["train_tflops"] / reference
    if sampling:
        row.update(bench_sampling(cfg, device, state, sample_images or 2 * cfg["sample"]["batch"], T["compile"]))
    row.update(bench_writers(cfg, writer_images))
    return row


def device_name(device):
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu ({platform.processor() or platform.machine()}, {torch.get_num_threads()} threads)"


def main(argv=None):
    """Parse the flags and print the benchmark's JSON line."""
    ap = argparse.ArgumentParser(prog="python -m tools.bench", description=__doc__.split("\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
                                 epilog=__doc__.split("\n", 1)[1])
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
    ap.add_argument("--gpus", type=int, default=8, help="also time one GPU's share of the batch on this many GPUs (its "
                    "batch / GPUS in two micro-batches, noise-scale hooks on); 1 = not")
    ap.add_argument("overrides", nargs="*", metavar="section.key=value", help="config overrides, e.g. sample.steps=32")
    args = ap.parse_args(argv)
    for flag in ("batch", "sample_batch", "steps", "windows", "writer_images", "gpus"):
        value = getattr(args, flag)
        if value is not None and value < 1:
            raise UserError(f"--{flag.replace('_', '-')} must be >= 1, got {value}")
    if args.warmup < 0:
        raise UserError(f"--warmup must be >= 0, got {args.warmup}")
    overrides = list(args.overrides)
    if args.batch is not None:
        overrides += [f"train.batch_size={args.batch}"]
    if args.sample_batch is not None:
        overrides += [f"sample.batch={args.sample_batch}"]
    if args.compile:
        overrides += ["train.compile=true"]
    cfg = load_config(args.config, overrides)
    with dist.session() as (rank, world, device):
        if world > 1:
            raise UserError("the benchmark runs on one device: python -m tools.bench, not torchrun")
        row = bench(cfg, device, args.steps, args.windows, args.warmup, args.sample_images, args.writer_images,
                    sampling=not args.no_sampling, gpus=args.gpus)
    print(json.dumps(dict(config=args.config, **row)), flush=True)


if __name__ == "__main__":
    run_main(main)
