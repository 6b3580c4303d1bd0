"""The training log: TensorBoard scalars and metrics.jsonl rows, from sums kept on the device until a logged step."""

import json
import os
import resource
import time

import torch
from torch.utils.tensorboard import SummaryWriter

from tools import dist
from tools.checkpoint import append_text, read_jsonl
from tools.evaluation import describe
from tools.schedule import SIGMA_BUCKETS

UNCERTAINTY_SIGMAS = (0.01, 0.1, 1.0, 10.0)  # noise levels at which u(sigma) is logged
QUALITY_CURVE_KEYS = ("KID", "FD_classifier", "precision", "recall", "memorised_fraction", "class_accuracy", "FID_inception", "KID_inception")
TRAIN_SCALARS = ("loss", "lr", "grad_norm", "img_per_s", "peak_mem_gib", "nonfinite_steps", "augmented_fraction",
                 "gns_b_simple", "gns_grad_sq", "gns_trace_sigma")


def row_key(row):
    """What a row of metrics.jsonl is a point of: (kind, step) of a training row, (kind, kimg) of an evaluation."""
    if "img_per_s" in row:
        return ("train", row["step"])
    if row.get("kind") in ("eval", "curve"):
        return (row["kind"], row["kimg"])
    return None


class TrainingLog:
    """TensorBoard and metrics.jsonl of a run (rank 0 writes; every rank keeps its sums for the all-reduce)."""

    def __init__(self, cfg, outdir, rank, world, device, step, epoch_img):
        self.cfg, self.outdir, self.rank, self.world, self.device, self.epoch_img = cfg, outdir, rank, world, device, epoch_img
        self.buckets = SIGMA_BUCKETS.to(device)
        self.acc = torch.zeros(3, device=device, dtype=torch.float64)  # loss sum, samples, grad-norm sum of finite steps
        self.acc_bucket = torch.zeros(2, len(self.buckets) + 1, device=device, dtype=torch.float64)  # loss sum, count per bucket
        self.acc_augment = torch.zeros(2, device=device, dtype=torch.float64)  # images augmented, images seen
        self.t_log, self.step_log = time.time(), step
        self.writer, self.path = None, os.path.join(outdir, "metrics.jsonl")
        self.written = set()  # row_key of rows a resumed run must not write twice
        if rank == 0:
            t_img = step * cfg["train"]["batch_size"]
            self.writer = SummaryWriter(os.path.join(outdir, "tensorboard"), purge_step=t_img + 1 if step else None)
            if os.path.exists(self.path) and os.path.getsize(self.path):
                with open(self.path, "rb") as f:
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        append_text(self.path, "\n")  # a line cut short by a kill stays alone
            if step:  # only the killed run's rows past the checkpoint are replayed
                self.written = {row_key(r) for r in read_jsonl(self.path) if round(r.get("kimg", 0) * 1000) > t_img} - {None}

    def add_losses(self, loss, sigma):
        loss = loss.detach().to(torch.float64)
        self.acc[0] += loss.sum()
        self.acc[1] += len(loss)
        b = torch.bucketize(sigma, self.buckets)
        self.acc_bucket[0].index_add_(0, b, loss)
        self.acc_bucket[1].index_add_(0, b, torch.ones_like(loss))

    def add_augmented(self, vectors):
        """The augmentation vectors of one step's images (zero: left as they were)."""
        self.acc_augment[0] += vectors.ne(0).any(1).sum()
        self.acc_augment[1] += len(vectors)

    def add_step(self, grad_norm, finite):
        self.acc[2] += torch.where(finite, grad_norm, 0)

    def log(self, step, state):
        """The sums since the last call over all ranks, as a row (returned) that rank 0 writes."""
        T, t_img, sums = self.cfg["train"], state.t_img, (self.acc, self.acc_bucket, self.acc_augment)
        a, by_bucket, aug = (dist.all_reduce_sum(s).tolist() for s in sums)
        n_steps = max(step - self.step_log, 1)
        row = dict(step=step, kimg=t_img / 1000, epoch=t_img / self.epoch_img, loss=a[0] / max(a[1], 1),
                   lr=state.opt.param_groups[0]["lr"], grad_norm=a[2] / self.world / n_steps, nonfinite_steps=state.nonfinite_steps,
                   img_per_s=(step - self.step_log) * T["batch_size"] / max(time.time() - self.t_log, 1e-9))
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
        if aug[1]:
            row["augmented_fraction"] = aug[0] / aug[1]
        if state.noise_scale is not None:
            row.update(state.noise_scale.estimate())
        if self.rank == 0:
            self._tensorboard(row, by_bucket, state)
            self.write(row)
        for s in sums:
            s.zero_()
        self.t_log, self.step_log = time.time(), step
        return row

    def _tensorboard(self, row, by_bucket, state):
        writer, t_img = self.writer, state.t_img
        for k in TRAIN_SCALARS:
            if row.get(k) is not None:
                writer.add_scalar(f"train/{k}", row[k], t_img)
        edges = [0.0, *self.buckets.tolist(), float("inf")]
        for i, (s, c) in enumerate(zip(*by_bucket)):
            if c > 0:
                writer.add_scalar(f"loss_by_sigma/{edges[i]:g}-{edges[i + 1]:g}", s / c, t_img)
        if self.cfg["diffusion"]["loss_weighting"] == "uncertainty":
            with torch.no_grad():
                u = state.edm.loss.uncertainty(torch.tensor(UNCERTAINTY_SIGMAS, device=self.device)).tolist()
            for s, v in zip(UNCERTAINTY_SIGMAS, u):
                writer.add_scalar(f"uncertainty/sigma={s:g}", v, t_img)

    def write(self, row):
        """One row of metrics.jsonl (rank 0), whole or not at all; not again if a resumed run replays it."""
        key = row_key(row)
        if key is None or key not in self.written:
            append_text(self.path, json.dumps(row) + "\n")
            self.written.add(key)

    def exclude_time(self, start):
        """Leave the time since `start` (an evaluation) out of the next row's img_per_s."""
        self.t_log += time.time() - start

    def log_evaluation(self, rows):
        """Rows of tools/evaluation.py (rank 0) to TensorBoard and metrics.jsonl, with a line each on the terminal."""
        for row in rows:
            t_img, add = round(row["kimg"] * 1000), self.writer.add_scalar
            if row["kind"] == "eval":
                for k in ("val_loss", "train_loss", "gap"):
                    add(f"eval/{k}", row[k], t_img)
                for s, v, t in zip(row["sigmas"], row["val_loss_by_sigma"], row["train_loss_by_sigma"]):
                    add(f"eval_val_loss/sigma={s:g}", v, t_img)
                    add(f"eval_train_loss/sigma={s:g}", t, t_img)
            else:
                for k in QUALITY_CURVE_KEYS:
                    if k in row:
                        add(f"quality_curve/{k}", row[k], t_img)
            self.write(row)
            print(f"evaluation at epoch {row['epoch']} ({row['kimg']:.1f} kimg): {describe(row)} [{row['eval_s']:.1f} s]", flush=True)

    def add_image(self, tag, image, t_img):
        """A picture (uint8 [C, H, W]) to TensorBoard (rank 0)."""
        if self.writer is not None:
            self.writer.add_image(tag, image, t_img)

    def close(self):
        if self.rank == 0:
            self.writer.close()
