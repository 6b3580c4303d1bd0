"""Train an EDM2 network (Config C, E or G).

    torchrun --nproc_per_node=N train.py --config config/cifar10/E.yaml [section.key=value ...]
    python train.py --config config/digits/E.yaml train.epochs=2

Re-running with the same outdir resumes from its newest valid checkpoint; raise train.epochs to continue.
Everything time-dependent (LR, EMAs, snapshots, checkpoints) is a function of the images seen.
"""

import argparse
import json
import os
import signal
import time

import torch
from torch.nn.parallel import DistributedDataParallel

from tools import dist
from tools.checkpoint import atomic_write, checkpoint_path, read_jsonl, remove_stale_temp
from tools.cli import Stopped, run_main
from tools.config import build_edm, dump, load_config
from tools.evaluation import Evaluator, summary, summary_lines
from tools.log import progress, to_run_log
from tools.runs import lock_for_training
from tools.trainer import Batches, Metrics, StopRequests, TrainState, save_grid
from tools.training import learning_rate


def parse_args():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", required=True, help="YAML config, e.g. config/cifar10/E.yaml")
    p.add_argument("--outdir", help="run directory (default: train.outdir of the config)")
    p.add_argument("--dry-run", action="store_true", help="print the resolved config and parameter count, then exit")
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="e.g. train.epochs=2 train.batch_size=64")
    return p.parse_args()


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
    with dist.session() as (rank, world, device):
        train(cfg, rank, world, device)


def claim_run_directory(outdir):
    """Rank 0, before anything is written: the run directory's lock (one training per directory), the temp
    files that killed writers left behind removed, and log.txt started."""
    lock_for_training(outdir)
    removed = remove_stale_temp(outdir)
    to_run_log(outdir)
    if removed:
        print(f"removed {len(removed)} temp file(s) of killed writers, e.g. {removed[0]}", flush=True)


def train(cfg, rank, world, device):
    T, outdir = cfg["train"], cfg["train"]["outdir"]
    dist.on_rank0(claim_run_directory, outdir)  # one writer per run directory, before anything is written
    data = Batches(cfg, rank, world, device)  # the training set on the device; this rank's share of each batch
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    B, epoch_img, steps_per_epoch = data.batch_size, data.epoch_img, data.steps_per_epoch
    total_steps = T["epochs"] * steps_per_epoch

    # Model, optimizer, EMAs; resumed from the newest valid checkpoint.
    state = TrainState(cfg, device)
    if state.resume(outdir, epoch_img):
        dist.print0(f"resumed {outdir} at epoch {state.t_img // epoch_img} ({state.t_img / 1000:.1f} kimg)")
    step = state.t_img // B
    if rank == 0:
        atomic_write(os.path.join(outdir, "config.yaml"), lambda f: f.write(dump(cfg).encode()))
    if T["compile"]:
        state.edm.net.compile()
    model = DistributedDataParallel(state.edm, device_ids=[device] if device.type == "cuda" else None,
                                    broadcast_buffers=False) if world > 1 else state.edm

    metrics = Metrics(cfg, outdir, rank, world, device, step, epoch_img)
    evaluator = Evaluator(cfg, data.images, data.labels, rank, world, device)  # validation loss and quality curve
    num_params = sum(p.numel() for p in state.edm.net.parameters())
    dist.print0(f"{cfg['unet']}: {num_params / 1e6:.2f}M parameters, {len(data.images)} images, {world} rank(s) on {device.type}, "
                f"{T['epochs']} epochs of {steps_per_epoch} steps; run directory {outdir}")

    snapshot_img = round(cfg["ema"]["snapshot_epochs"] * epoch_img)
    pbar = progress(total_steps, initial=step, desc="training", unit="step", enabled=rank == 0)
    try:
        with StopRequests(T["checkpoint_minutes"], rank, world, device) as stops:
            while step < total_steps:
                lr = learning_rate(state.t_img, T["lr"], T["lr_rampup_epochs"] * epoch_img, T["lr_ref_epochs"] * epoch_img)
                state.step(model, data.batch(step), data.micro, lr, metrics)
                step += 1
                pbar.update(1)

                t_img = state.t_img
                if rank == 0 and snapshot_img > 0 and t_img // snapshot_img > (t_img - B) // snapshot_img:
                    state.emas.save_snapshot(outdir, t_img)
                end_of_epoch = step % steps_per_epoch == 0
                logged = step % T["log_steps"] == 0 or end_of_epoch
                if logged:
                    row = metrics.log(step, state)
                    pbar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}", refresh=False)
                    metrics.check_gradients(t_img)
                saved = None
                if end_of_epoch:
                    epoch, last = step // steps_per_epoch, step == total_steps
                    if rank == 0 and T["grid_epochs"] and (epoch % T["grid_epochs"] == 0 or last):
                        save_grid(state.emas.classic.ema_model, cfg, outdir, epoch, t_img, metrics.writer, device)
                    if evaluator.due(epoch, last):
                        started = time.time()
                        rows = evaluator(state.emas.classic.ema_model, state.edm.loss, t_img, epoch)
                        if rank == 0:
                            metrics.log_evaluation(rows)
                        metrics.exclude_time(started)  # img_per_s measures training only
                    if epoch % T["checkpoint_epochs"] == 0 or last:
                        state.check_weights(epoch)
                        saved = state.save(outdir, epoch, metrics) if rank == 0 else checkpoint_path(outdir, epoch)
                        stops.saved()

                # Between epochs: a checkpoint every train.checkpoint_minutes, and on SIGTERM / SIGINT / SIGUSR1 one before stopping.
                signum, due = stops.poll(step)
                if (signum or due) and saved is None and step < total_steps:
                    if not logged:
                        metrics.log(step, state)  # the non-finite steps counted so far go into the checkpoint
                    state.check_weights(t_img / epoch_img)
                    why = signal.Signals(signum).name if signum else f"{T['checkpoint_minutes']:g} minutes"
                    saved = state.save_resume(outdir, t_img / epoch_img, metrics, why) if rank == 0 else None
                    stops.saved()
                if signum and step < total_steps:
                    raise Stopped(f"stopped by {signal.Signals(signum).name} at {t_img / 1000:.1f} kimg (epoch {t_img / epoch_img:.2f}); "
                                  f"checkpoint {saved or os.path.join(outdir, 'checkpoints')}. Run the same command to resume.", signum)
    finally:  # also when stopped: TensorBoard and metrics.jsonl flushed
        pbar.close()
        metrics.close()
    dist.print0(f"done: {state.t_img / 1000:.1f} kimg. Checkpoints: {os.path.join(outdir, 'checkpoints')}\n"
                f"TensorBoard: tensorboard --logdir {os.path.join(outdir, 'tensorboard')}")
    if rank == 0:
        write_summary(outdir)


def write_summary(outdir):
    """OUTDIR/eval_summary.json and its lines on the terminal: the evaluation curves of the whole run at a glance."""
    s = summary(read_jsonl(os.path.join(outdir, "metrics.jsonl")))
    if s is not None:
        atomic_write(os.path.join(outdir, "eval_summary.json"), lambda f: f.write(json.dumps(s, indent=1).encode()))
        print("\n".join(summary_lines(s)), flush=True)


if __name__ == "__main__":
    run_main(main)
