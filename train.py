"""Train an EDM2 network (Config C, E or G).

    torchrun --nproc_per_node=N train.py --config config/cifar10/E.yaml [section.key=value ...]
    python train.py --config config/digits/E.yaml train.epochs=2

Re-running with the same outdir resumes from its newest valid checkpoint; raise train.epochs to continue.
Everything time-dependent (LR, EMAs, snapshots, checkpoints) is a function of the images seen.
"""

import argparse
import contextlib
import json
import os
import resource
import time

import torch
import torchvision
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter
from tqdm import tqdm

from tools import dist
from tools.checkpoint import atomic_save, checkpoint_path, list_checkpoints, load_newest
from tools.cli import UserError, run_main
from tools.config import build_edm, dump, load_config
from tools.data import load_dataset, to_float
from tools.edm import Denoiser
from tools.ema import EMAs
from tools.mp import force_weight_norm_
from tools.sampler import SeedNoise, sample
from tools.training import SIGMA_BUCKETS, epoch_order, learning_rate, step_draws

RESUME_KEYS = ("unet", "network", "diffusion")  # sections that must match to resume a run
RESUME_TRAIN_KEYS = ("seed", "batch_size")


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config, e.g. config/cifar10/E.yaml")
    p.add_argument("--outdir", help="run directory (default: train.outdir of the config)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter count, then exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=2 train.batch_size=64")
    return p.parse_args()


def autocast(device, precision):
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


def check_resumable(cfg, ckpt_cfg, outdir):
    for key in RESUME_KEYS:
        if cfg[key] != ckpt_cfg[key]:
            raise UserError(f"{outdir} holds a run with a different '{key}'; resume with its config ({outdir}/config.yaml) or use a new --outdir")
    for key in RESUME_TRAIN_KEYS:
        if cfg["train"][key] != ckpt_cfg["train"][key]:
            raise UserError(f"{outdir} was trained with train.{key}={ckpt_cfg['train'][key]}; keep it to resume, or use a new --outdir")


@torch.no_grad()
def sample_grid(net, cfg, device, num=64):
    """EMA samples for the TensorBoard grid, seeds 0..num-1, in [0, 1]."""
    was_training = net.training
    denoiser = Denoiser(net.eval(), cfg["diffusion"]["sigma_data"])
    n = cfg["network"]
    S = {k: cfg["sample"][k] for k in ("sampler", "steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise")}
    with autocast(device, cfg["train"]["precision"]):
        x = sample(denoiser, SeedNoise(range(num), device), (n["img_channels"], n["img_resolution"], n["img_resolution"]), **S)
    net.train(was_training)
    return (x * 0.5 + 0.5).clamp(0, 1).cpu()


def main():
    args = parse_args()
    cfg = load_config(args.config, args.overrides)
    if args.outdir:
        cfg["train"]["outdir"] = args.outdir
    if args.dry_run:
        print(dump(cfg), end="")
        with torch.device("meta"):
            count = sum(p.numel() for p in build_edm(cfg).net.parameters())
        print(f"parameters: {count:,} ({count / 1e6:.2f}M) in {cfg['unet']}")
        return
    rank, world, device = dist.init()
    try:
        train(cfg, rank, world, device)
    finally:
        dist.shutdown()


def train(cfg, rank, world, device):
    T, D, outdir = cfg["train"], cfg["diffusion"], cfg["train"]["outdir"]
    B, seed = T["batch_size"], T["seed"]
    if B % world:
        raise UserError(f"train.batch_size={B} must be divisible by the number of ranks ({world})")
    batch_rank = B // world
    micro = T["batch_gpu"] or batch_rank
    if batch_rank % micro:
        raise UserError(f"the per-rank batch {batch_rank} must be divisible by train.batch_gpu={micro}")
    fp16 = device.type == "cuda" and T["precision"] == "fp16"
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True

    # Data, held whole on the training device.
    images, labels = load_dataset(cfg, "train")
    images, labels = images.to(device), labels.to(device)
    N = len(images)
    steps_per_epoch = N // B
    if steps_per_epoch == 0:
        raise UserError(f"train.batch_size={B} exceeds the dataset ({N} images)")
    label_dim = cfg["network"]["label_dim"]
    if cfg["data"]["use_labels"] and not label_dim:
        raise UserError("data.use_labels needs network.label_dim > 0 (the number of classes)")
    epoch_img = steps_per_epoch * B
    total_steps = T["epochs"] * steps_per_epoch

    # Model, optimizer, EMAs.
    torch.manual_seed(seed)
    edm = build_edm(cfg).to(device)
    force_weight_norm_(edm)
    opt = torch.optim.Adam(edm.parameters(), lr=T["lr"], betas=tuple(T["betas"]), eps=T["eps"])
    scaler = torch.amp.GradScaler("cuda", enabled=fp16)
    emas = EMAs(edm.net, cfg["ema"])
    t_img, nonfinite_total = 0, 0

    # Resume.
    ckpt = load_newest(outdir, required=("net", "loss_head", "optimizer", "emas", "t_img", "config"))
    if ckpt is None and list_checkpoints(outdir):
        raise UserError(f"no checkpoint in {outdir}/checkpoints could be loaded; move them away to start afresh")
    if ckpt is not None:
        check_resumable(cfg, yaml.safe_load(ckpt["config"]), outdir)
        edm.net.load_state_dict(ckpt["net"])
        edm.loss.load_state_dict(ckpt["loss_head"])
        opt.load_state_dict(ckpt["optimizer"])
        scaler.load_state_dict(ckpt["scaler"])
        emas.load_state_dict(ckpt["emas"])
        t_img, nonfinite_total = ckpt["t_img"], ckpt["nonfinite_steps"]
        dist.print0(f"resumed {outdir} at epoch {t_img // epoch_img} ({t_img / 1000:.1f} kimg)")
        del ckpt
    step = t_img // B
    if rank == 0:
        os.makedirs(outdir, exist_ok=True)
        with open(os.path.join(outdir, "config.yaml"), "w") as f:
            f.write(dump(cfg))
    if T["compile"]:
        edm.net.compile()
    model = DistributedDataParallel(edm, device_ids=[device] if device.type == "cuda" else None,
                                    broadcast_buffers=False) if world > 1 else edm

    writer = metrics_file = None
    if rank == 0:
        writer = SummaryWriter(os.path.join(outdir, "tensorboard"))
        metrics_file = open(os.path.join(outdir, "metrics.jsonl"), "a")
    num_params = sum(p.numel() for p in edm.net.parameters())
    dist.print0(f"{cfg['unet']}: {num_params / 1e6:.2f}M parameters, {N} images, {world} rank(s) on {device.type}, "
                f"{T['epochs']} epochs of {steps_per_epoch} steps; run directory {outdir}")

    # Device-side accumulators, read on the host only every log_steps (no syncs in the hot loop).
    buckets = SIGMA_BUCKETS.to(device)
    acc = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, samples, grad-norm sum, non-finite steps
    acc_bucket = torch.zeros(2, len(buckets) + 1, device=device, dtype=torch.float64)  # loss sum, count per sigma bucket
    streak = torch.zeros((), device=device)  # consecutive steps with non-finite gradients
    params = list(edm.parameters())
    perm, perm_epoch = None, -1
    t_log, step_log = time.time(), step
    pbar = tqdm(total=total_steps, initial=step, disable=rank != 0, unit="step", dynamic_ncols=True)
    while step < total_steps:
        epoch, pos = divmod(step, steps_per_epoch)
        if epoch != perm_epoch:
            perm, perm_epoch = epoch_order(seed, epoch, N, device), epoch
        # The global batch of this step, then this rank's slice of it.
        idx = perm[pos * B:(pos + 1) * B]
        sigma, noise, flip, drop, keys = step_draws(seed, step, B, images.shape[1:], D["P_mean"], D["P_std"], device)
        mine = slice(rank * batch_rank, (rank + 1) * batch_rank)
        idx, sigma, noise, flip, drop, keys = idx[mine], sigma[mine], noise[mine], flip[mine], drop[mine], keys[mine]
        y = to_float(images[idx])
        if cfg["data"]["xflip"]:
            y = torch.where(flip[:, None, None, None], y.flip(3), y)
        class_labels = None
        if cfg["data"]["use_labels"]:
            keep = (drop >= T["label_dropout"]).to(torch.float32)[:, None]
            class_labels = torch.nn.functional.one_hot(labels[idx], label_dim).to(torch.float32) * keep

        # Forward and backward over micro-batches; DDP all-reduces on the last one.
        for m in range(batch_rank // micro):
            ms = slice(m * micro, (m + 1) * micro)
            last = (m + 1) * micro == batch_rank
            with (model.no_sync() if world > 1 and not last else contextlib.nullcontext()), autocast(device, T["precision"]):
                loss = model(y[ms], sigma[ms], noise[ms], None if class_labels is None else class_labels[ms], keys[ms])
            scaler.scale(loss.sum() / batch_rank).backward()
            loss = loss.detach().to(torch.float64)
            acc[0] += loss.sum()
            acc[1] += len(loss)
            b = torch.bucketize(sigma[ms], buckets)
            acc_bucket[0].index_add_(0, b, loss)
            acc_bucket[1].index_add_(0, b, torch.ones_like(loss))

        # Optimizer step. Non-finite gradients are zeroed (fp16: GradScaler skips the step instead).
        for group in opt.param_groups:
            group["lr"] = learning_rate(t_img, T["lr"], T["lr_rampup_epochs"] * epoch_img, T["lr_ref_epochs"] * epoch_img)
        scaler.unscale_(opt)
        grads = [p.grad for p in params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        finite = torch.isfinite(grad_norm)
        if not fp16:
            for g in grads:
                torch.nan_to_num_(g, nan=0, posinf=0, neginf=0)
            torch._foreach_mul_(grads, finite.to(grads[0].dtype))
        scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        force_weight_norm_(edm)
        t_img += B
        step += 1
        emas.update(edm.net, t_img, B)
        acc[2] += torch.where(finite, grad_norm, 0)
        acc[3] += (~finite).to(acc.dtype)
        streak = (streak + 1) * (~finite)
        pbar.update(1)

        snapshot_img = round(cfg["ema"]["snapshot_epochs"] * epoch_img)
        if rank == 0 and snapshot_img > 0 and t_img // snapshot_img > (t_img - B) // snapshot_img:
            emas.save_snapshot(outdir, t_img)

        end_of_epoch = step % steps_per_epoch == 0
        if step % T["log_steps"] == 0 or end_of_epoch:
            dist.all_reduce_sum(acc)
            dist.all_reduce_sum(acc_bucket)
            a, ab = acc.tolist(), acc_bucket.tolist()
            n_steps = max(step - step_log, 1)
            nonfinite_total += int(round(a[3] / world))
            row = dict(step=step, kimg=t_img / 1000, epoch=t_img / epoch_img, loss=a[0] / max(a[1], 1),
                       lr=opt.param_groups[0]["lr"], grad_norm=a[2] / world / n_steps, nonfinite_steps=nonfinite_total,
                       img_per_s=(step - step_log) * B / max(time.time() - t_log, 1e-9))
            row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(device) if device.type == "cuda"
                                   else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
            if rank == 0:
                for k in ("loss", "lr", "grad_norm", "img_per_s", "peak_mem_gib", "nonfinite_steps"):
                    writer.add_scalar(f"train/{k}", row[k], t_img)
                for i, (s, c) in enumerate(zip(*ab)):
                    if c > 0:
                        lo = 0 if i == 0 else buckets[i - 1].item()
                        writer.add_scalar(f"loss_by_sigma/{lo:g}-{buckets[i].item() if i < len(buckets) else float('inf'):g}", s / c, t_img)
                if D["loss_weighting"] == "uncertainty":
                    with torch.no_grad():
                        u = edm.loss.uncertainty(torch.tensor([0.01, 0.1, 1.0, 10.0], device=device)).tolist()
                    for s, v in zip((0.01, 0.1, 1.0, 10.0), u):
                        writer.add_scalar(f"uncertainty/sigma={s:g}", v, t_img)
                metrics_file.write(json.dumps(row) + "\n")
                metrics_file.flush()
                pbar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}", refresh=False)
            if streak.item() >= T["max_nonfinite_steps"]:
                good = list_checkpoints(outdir)
                raise UserError(f"gradients non-finite for {int(streak.item())} consecutive steps at {t_img / 1000:.1f} kimg; stopped. "
                                f"Last good checkpoint: {good[-1][1] if good else 'none'}")
            acc.zero_()
            acc_bucket.zero_()
            t_log, step_log = time.time(), step

        if end_of_epoch:
            epoch_done = step // steps_per_epoch
            last = step == total_steps
            if rank == 0 and T["grid_epochs"] and (epoch_done % T["grid_epochs"] == 0 or last):
                grid = sample_grid(emas.classic.ema_model, cfg, device)
                writer.add_image("samples/ema_classic", torchvision.utils.make_grid(grid, nrow=8), t_img)
                os.makedirs(os.path.join(outdir, "grids"), exist_ok=True)
                torchvision.utils.save_image(grid, os.path.join(outdir, "grids", f"epoch_{epoch_done}.png"), nrow=8)
            if epoch_done % T["checkpoint_epochs"] == 0 or last:
                if not all(torch.isfinite(p).all() for p in params):
                    raise UserError(f"weights became non-finite at epoch {epoch_done}; not checkpointed, earlier checkpoints are intact")
                if rank == 0:
                    save_checkpoint(cfg, outdir, epoch_done, t_img, nonfinite_total, edm, opt, scaler, emas, metrics_file)
    pbar.close()
    if rank == 0:
        writer.close()
        metrics_file.close()
        print(f"done: {t_img / 1000:.1f} kimg. Checkpoints: {os.path.join(outdir, 'checkpoints')}\n"
              f"TensorBoard: tensorboard --logdir {os.path.join(outdir, 'tensorboard')}", flush=True)


def save_checkpoint(cfg, outdir, epoch, t_img, nonfinite_steps, edm, opt, scaler, emas, metrics_file):
    path = checkpoint_path(outdir, epoch)
    atomic_save(dict(net=edm.net.state_dict(), loss_head=edm.loss.state_dict(), optimizer=opt.state_dict(),
                     scaler=scaler.state_dict(), emas=emas.state_dict(), t_img=t_img, epoch=epoch,
                     nonfinite_steps=nonfinite_steps, config=dump(cfg)), path)
    metrics_file.write(json.dumps(dict(epoch=epoch, kimg=t_img / 1000, checkpoint=path)) + "\n")
    metrics_file.flush()
    keep = cfg["train"]["keep_checkpoints"]
    if keep:
        for _, old in list_checkpoints(outdir)[:-keep]:
            os.remove(old)


if __name__ == "__main__":
    run_main(main)
