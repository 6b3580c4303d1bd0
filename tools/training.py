"""The loop of train.py: setup and resume, then optimizer steps with snapshots, logs, grids, evaluations and checkpoints between."""

import os
import signal
import time

from torch.nn.parallel import DistributedDataParallel

from tools import dist
from tools.batches import Batches
from tools.checkpoint import atomic_write, read_jsonl, remove_stale_temp, write_json
from tools.cli import Stopped
from tools.config import dump
from tools.evaluation import Evaluator, summarize_curves, summary_lines
from tools.generate import PREVIEW_IMAGES, training_grid
from tools.grid import save_picture
from tools.log import progress, to_run_log
from tools.runs import lock_for_training
from tools.schedule import learning_rate
from tools.precision import use_deterministic
from tools.stops import StopRequests
from tools.train_log import TrainingLog
from tools.train_state import TrainState


def claim_run_directory(outdir):
    """Rank 0, before anything is written: lock the run directory, remove killed writers' temp files, start log.txt."""
    lock_for_training(outdir)
    removed = remove_stale_temp(outdir)
    to_run_log(outdir)
    if removed:
        print(f"removed {len(removed)} temp file(s) of killed writers, e.g. {removed[0]}", flush=True)


class Run:
    def __init__(self, cfg, device):
        self.cfg, self.train, self.outdir = cfg, cfg["train"], cfg["train"]["outdir"]
        self.rank, self.world, self.device = dist.rank(), dist.world_size(), device
        use_deterministic(self.train["deterministic"])
        dist.on_rank0(claim_run_directory, self.outdir)
        self.data = Batches(cfg, self.rank, self.world, device)
        self.state = TrainState(cfg, device)
        self.state.track_noise_scale(self.data.micro, self.data.per_rank)
        if self.state.resume(self.outdir, self.data.epoch_img):
            dist.print0(f"resumed {self.outdir} at epoch {self.epoch:g} ({self.state.t_img / 1000:.1f} kimg)")
        if self.rank == 0:
            atomic_write(os.path.join(self.outdir, "config.yaml"), lambda f: f.write(dump(cfg).encode()))
        edm = self.state.edm
        self.model = DistributedDataParallel(edm, device_ids=[device] if device.type == "cuda" else None,
                                             broadcast_buffers=False) if self.world > 1 else edm
        if self.state.noise_scale is not None and self.world > 1:
            self.state.noise_scale.attach(self.model)
        if self.train["compile"]:  # the DDP wrapper first: compile then splits the graph at DDP's buckets, whose all-reduce
            self.model.compile()  # overlaps the rest of the backward pass (DDPOptimizer)
        self.step = self.state.t_img // self.data.batch_size
        self.total_steps = self.train["epochs"] * self.data.steps_per_epoch
        self.log = TrainingLog(cfg, self.outdir, self.rank, self.world, device, self.step, self.data.epoch_img)
        self.evaluator = Evaluator(cfg, self.data.images, self.data.labels, self.rank, self.world, device)
        self.snapshot_img = round(cfg["ema"]["snapshot_epochs"] * self.data.epoch_img)

    @property
    def epoch(self):
        return self.state.t_img / self.data.epoch_img

    def train_step(self):
        train, epoch_img = self.train, self.data.epoch_img
        lr = learning_rate(self.state.t_img, train["lr"], train["lr_rampup_epochs"] * epoch_img, train["lr_ref_epochs"] * epoch_img)
        self.state.step(self.model, self.data.batch(self.step), self.data.micro, lr, self.log)
        self.step += 1

    def snapshot_if_due(self):
        """The power EMAs every ema.snapshot_epochs (counted in images), for post-hoc reconstruction."""
        t_img, B, every = self.state.t_img, self.data.batch_size, self.snapshot_img
        if self.rank == 0 and every > 0 and t_img // every > (t_img - B) // every:
            self.state.emas.save_snapshot(self.outdir, t_img)

    def log_row(self, bar):
        row = self.log.log(self.step, self.state)
        bar.set_postfix(loss=f"{row['loss']:.4f}", img_s=f"{row['img_per_s']:.0f}", refresh=False)
        self.state.check_gradients(self.outdir)

    def end_epoch(self, epoch, last):
        """Grid, evaluation and checkpoint of an epoch, each at its cadence. Returns the checkpoint written, or None."""
        train, state = self.train, self.state
        if train["grid_epochs"] and (epoch % train["grid_epochs"] == 0 or last):
            if self.rank == 0:
                examples = self.data.augmented_examples(PREVIEW_IMAGES, epoch) if self.data.augment else None  # what training sees
                picture = training_grid(state.emas.classic.ema_model, self.cfg, self.device, examples=examples)
                self.log.add_image("samples/ema_classic", picture, state.t_img)
                save_picture(os.path.join(self.outdir, "grids", f"epoch_{epoch}.png"), picture)
            dist.barrier()  # the other ranks wait here, not in the next step's NCCL all-reduce (tools/dist.py)
        if self.evaluator.due(epoch, last):
            started = time.time()
            rows = self.evaluator(state.emas.classic.ema_model, state.edm.loss, state.t_img, epoch)
            if self.rank == 0:
                self.log.log_evaluation(rows)
            self.log.exclude_time(started)  # img_per_s measures training only
        if epoch % train["checkpoint_epochs"] and not last:
            return None
        return self.checkpoint(epoch, why=None)

    def checkpoint(self, epoch, why):
        """A per-epoch checkpoint (why=None) or one between epochs (why: signal or timer) by rank 0; every rank returns its path."""
        state = self.state
        state.check_weights(epoch)

        def save():
            path = state.save(self.outdir, epoch) if why is None else state.save_resume(self.outdir, epoch)
            self.log.write(dict(epoch=epoch, kimg=state.t_img / 1000, checkpoint=path, **({"reason": why} if why else {})))
            return path
        return dist.on_rank0(save)


def train(cfg, device):
    """Train the config's network into train.outdir (resuming from its newest checkpoint) on this rank."""
    run = Run(cfg, device)
    train_cfg, state, data = run.train, run.state, run.data
    dist.print0(f"{cfg['unet']}: {sum(p.numel() for p in state.edm.net.parameters()) / 1e6:.2f}M parameters, "
                f"{len(data.images)} images, {run.world} rank(s) on {device.type}, {train_cfg['epochs']} epochs of "
                f"{data.steps_per_epoch} steps; run directory {run.outdir}")
    bar = progress(run.total_steps, initial=run.step, desc="training", unit="step", enabled=run.rank == 0)
    try:
        with StopRequests(train_cfg["checkpoint_minutes"], run.rank, run.world) as stops:
            while run.step < run.total_steps:
                run.train_step()
                bar.update(1)
                run.snapshot_if_due()
                epoch, into_epoch = divmod(run.step, data.steps_per_epoch)
                last = run.step == run.total_steps
                if into_epoch == 0 or run.step % train_cfg["log_steps"] == 0:
                    run.log_row(bar)
                checkpoint = run.end_epoch(epoch, last) if into_epoch == 0 else None
                signum, timer_due = stops.poll(run.step)
                if checkpoint is None and (signum or timer_due) and not last:
                    why = signal.Signals(signum).name if signum else f"{train_cfg['checkpoint_minutes']:g} minutes"
                    checkpoint = run.checkpoint(run.epoch, why)
                if checkpoint is not None:
                    stops.saved()
                if signum and not last:
                    raise Stopped(f"stopped by {signal.Signals(signum).name} at {state.t_img / 1000:.1f} kimg (epoch "
                                  f"{run.epoch:.2f}); checkpoint {checkpoint}. Run the same command to resume.", signum)
    finally:  # also when stopped: TensorBoard and metrics.jsonl flushed
        bar.close()
        run.log.close()
    dist.print0(f"done: {state.t_img / 1000:.1f} kimg. Checkpoints: {os.path.join(run.outdir, 'checkpoints')}\n"
                f"TensorBoard: tensorboard --logdir {os.path.join(run.outdir, 'tensorboard')}")
    s = summarize_curves(read_jsonl(os.path.join(run.outdir, "metrics.jsonl"))) if run.rank == 0 else None
    if s is not None:  # the evaluation curves of the whole run at a glance
        write_json(os.path.join(run.outdir, "eval_summary.json"), s)
        print("\n".join(summary_lines(s)), flush=True)
