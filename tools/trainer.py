"""The stateful pieces of train.py's loop: the batches, the trained state and its checkpoints, one
optimizer step, the logged metrics and the sample grid. The schedules they follow are in tools/training.py.
"""

import contextlib
import glob
import json
import os
import re
import resource
import signal
import sys
import time

import torch
import torchvision
import yaml
from torch.nn.parallel import DistributedDataParallel
from torch.utils.tensorboard import SummaryWriter

from tools import dist
from tools.checkpoint import append_text, atomic_save, atomic_write, checkpoint_path, list_checkpoints, load, read_jsonl, remove
from tools.cli import UserError
from tools.config import build_edm, dump
from tools.data import load_dataset, to_float
from tools.edm import Denoiser
from tools.ema import EMAs
from tools.mp import force_weight_norm_
from tools.sampler import SeedNoise, one_hot, sample
from tools.training import SIGMA_BUCKETS, epoch_order, step_draws

RESUME_KEYS = ("unet", "network", "diffusion")  # sections that must match to resume a run
RESUME_TRAIN_KEYS = ("seed", "batch_size")


def autocast(device, precision):
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast("cuda", dtype=torch.bfloat16 if precision == "bf16" else torch.float16)


class Batches:
    """The training set, held whole on the training device, and this rank's share of each step's global batch.
    The order and every random draw are made for the global batch, then sliced by rank (tools/training.py)."""

    def __init__(self, cfg, rank, world, device):
        T = cfg["train"]
        self.cfg, self.device = cfg, device
        B = self.batch_size = T["batch_size"]
        self.seed = T["seed"]
        if B % world:
            raise UserError(f"train.batch_size={B} must be divisible by the number of ranks ({world})")
        self.per_rank = B // world
        self.micro = T["batch_gpu"] or self.per_rank  # images per forward and backward
        if self.per_rank % self.micro:
            raise UserError(f"the per-rank batch {self.per_rank} must be divisible by train.batch_gpu={self.micro}")
        self.mine = slice(rank * self.per_rank, (rank + 1) * self.per_rank)

        images, labels = load_dataset(cfg, "train")
        self.images, self.labels = images.to(device), labels.to(device)
        self.steps_per_epoch = len(self.images) // B
        if self.steps_per_epoch == 0:
            raise UserError(f"train.batch_size={B} exceeds the dataset ({len(self.images)} images)")
        self.label_dim = cfg["network"]["label_dim"]
        if cfg["data"]["use_labels"] and not self.label_dim:
            raise UserError("data.use_labels needs network.label_dim > 0 (the number of classes)")
        if cfg["data"]["use_labels"] and int(labels.max()) >= self.label_dim:
            raise UserError(f"network.label_dim={self.label_dim} but {cfg['data']['dataset']} has {int(labels.max()) + 1} classes: "
                            f"set network.label_dim={int(labels.max()) + 1}")
        self.epoch_img = self.steps_per_epoch * B
        self.perm, self.perm_epoch = None, -1

    def batch(self, step):
        """(images y, sigma, noise, class labels or None, dropout keys) of this rank at `step`."""
        B, D, data = self.batch_size, self.cfg["diffusion"], self.cfg["data"]
        epoch, pos = divmod(step, self.steps_per_epoch)
        if epoch != self.perm_epoch:
            self.perm, self.perm_epoch = epoch_order(self.seed, epoch, len(self.images), self.device), epoch
        idx = self.perm[pos * B:(pos + 1) * B]
        sigma, noise, flip, drop, keys = step_draws(self.seed, step, B, self.images.shape[1:], D["P_mean"], D["P_std"], self.device)
        mine = self.mine
        idx, sigma, noise, flip, drop, keys = idx[mine], sigma[mine], noise[mine], flip[mine], drop[mine], keys[mine]
        y = to_float(self.images[idx])
        if data["xflip"]:
            y = torch.where(flip[:, None, None, None], y.flip(3), y)
        class_labels = None
        if data["use_labels"]:
            keep = (drop >= self.cfg["train"]["label_dropout"]).to(torch.float32)[:, None]
            class_labels = torch.nn.functional.one_hot(self.labels[idx], self.label_dim).to(torch.float32) * keep
        return y, sigma, noise, class_labels, keys


class TrainState:
    """What a checkpoint holds: the network and its loss head (edm), the optimizer, the grad scaler, the
    EMAs, the images seen and the number of steps with non-finite gradients."""

    def __init__(self, cfg, device):
        T = cfg["train"]
        self.cfg, self.device = cfg, device
        self.fp16 = device.type == "cuda" and T["precision"] == "fp16"
        torch.manual_seed(T["seed"])  # the network's initialisation
        self.edm = build_edm(cfg).to(device)
        force_weight_norm_(self.edm)
        self.opt = torch.optim.Adam(self.edm.parameters(), lr=T["lr"], betas=tuple(T["betas"]), eps=T["eps"])
        self.scaler = torch.amp.GradScaler("cuda", enabled=self.fp16)
        self.emas = EMAs(self.edm.net, cfg["ema"])
        self.t_img, self.nonfinite_steps = 0, 0
        self.params = list(self.edm.parameters())

    def resume(self, outdir, epoch_img):
        """Load the newest valid checkpoint of outdir, per-epoch or mid-epoch (resume_<images>.pt); a corrupt one
        is reported and the next older one tried. False if there is none."""
        required = ("net", "loss_head", "optimizer", "emas", "t_img", "config")
        candidates = sorted([(e * epoch_img, p) for e, p in list_checkpoints(outdir)] + list_resume_checkpoints(outdir), reverse=True)
        ckpt = None
        for _, path in candidates:
            try:
                ckpt = load(path)
            except UserError as e:
                print(f"warning: {e}", file=sys.stderr, flush=True)
                continue
            if isinstance(ckpt, dict) and all(k in ckpt for k in required):
                break
            print(f"warning: checkpoint {path} lacks {', '.join(required)}; skipped", file=sys.stderr, flush=True)
            ckpt = None
        if ckpt is None and candidates:
            raise UserError(f"no checkpoint in {outdir}/checkpoints could be loaded; move them away to start afresh")
        if ckpt is None:
            return False
        saved = yaml.safe_load(ckpt["config"])
        for key in RESUME_KEYS:
            if self.cfg[key] != saved[key]:
                raise UserError(f"{outdir} holds a run with a different '{key}'; resume with its config ({outdir}/config.yaml) or use a new --outdir")
        for key in RESUME_TRAIN_KEYS:
            if self.cfg["train"][key] != saved["train"][key]:
                raise UserError(f"{outdir} was trained with train.{key}={saved['train'][key]}; keep it to resume, or use a new --outdir")
        self.edm.net.load_state_dict(ckpt["net"])
        self.edm.loss.load_state_dict(ckpt["loss_head"])
        self.opt.load_state_dict(ckpt["optimizer"])
        self.scaler.load_state_dict(ckpt["scaler"])
        self.emas.load_state_dict(ckpt["emas"])
        self.t_img, self.nonfinite_steps = ckpt["t_img"], ckpt["nonfinite_steps"]
        return True

    def step(self, model, batch, micro, lr, metrics):
        """One optimizer step on this rank's share of the global batch, in micro-batches of `micro` images;
        `model` is edm, or its DistributedDataParallel wrapper, which all-reduces on the last micro-batch.
        Non-finite gradients are zeroed (fp16: GradScaler skips the step instead)."""
        y, sigma, noise, class_labels, keys = batch
        per_rank = len(y)
        for m in range(per_rank // micro):
            ms = slice(m * micro, (m + 1) * micro)
            last = (m + 1) * micro == per_rank
            sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
            with sync, autocast(self.device, self.cfg["train"]["precision"]):
                loss = model(y[ms], sigma[ms], noise[ms], None if class_labels is None else class_labels[ms], keys[ms])
            self.scaler.scale(loss.sum() / per_rank).backward()
            metrics.add_losses(loss, sigma[ms])

        for group in self.opt.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        finite = torch.isfinite(grad_norm)
        if not self.fp16:
            for g in grads:
                torch.nan_to_num_(g, nan=0, posinf=0, neginf=0)
            torch._foreach_mul_(grads, finite.to(grads[0].dtype))
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        force_weight_norm_(self.edm)
        B = self.cfg["train"]["batch_size"]
        self.t_img += B
        self.emas.update(self.edm.net, self.t_img, B)
        metrics.add_step(grad_norm, finite)

    def check_weights(self, epoch):
        """Refuse to checkpoint non-finite weights, so that the earlier checkpoints stay the ones to resume from."""
        if not all(torch.isfinite(p).all() for p in self.params):
            raise UserError(f"weights became non-finite at epoch {epoch}; not checkpointed, earlier checkpoints are intact")

    def contents(self, epoch):
        return dict(net=self.edm.net.state_dict(), loss_head=self.edm.loss.state_dict(), optimizer=self.opt.state_dict(),
                    scaler=self.scaler.state_dict(), emas=self.emas.state_dict(), t_img=self.t_img, epoch=epoch,
                    nonfinite_steps=self.nonfinite_steps, config=dump(self.cfg))

    def save(self, outdir, epoch, metrics):
        """OUTDIR/checkpoints/epoch_<epoch>.pt, noted in metrics.jsonl; the oldest beyond train.keep_checkpoints are
        removed, and so are the mid-epoch checkpoints it supersedes."""
        path = checkpoint_path(outdir, epoch)
        atomic_save(self.contents(epoch), path)
        metrics.write(dict(epoch=epoch, kimg=self.t_img / 1000, checkpoint=path))
        keep = self.cfg["train"]["keep_checkpoints"]
        if keep:
            for _, old in list_checkpoints(outdir)[:-keep]:
                remove(old)
        for t, old in list_resume_checkpoints(outdir):
            if t <= self.t_img:
                remove(old)
        return path

    def save_resume(self, outdir, epoch, metrics, why):
        """OUTDIR/checkpoints/resume_<images>.pt, a checkpoint between epochs (time-based or on a signal); only the
        newest is kept. sample.py and probe.py use the per-epoch ones."""
        path = os.path.join(outdir, "checkpoints", f"resume_{self.t_img:012d}.pt")
        atomic_save(self.contents(epoch), path)
        metrics.write(dict(epoch=epoch, kimg=self.t_img / 1000, checkpoint=path, reason=why))
        for t, old in list_resume_checkpoints(outdir):
            if t < self.t_img:
                remove(old)
        return path


def _row_key(row):
    """What a row of metrics.jsonl is a point of: (kind, step) of a training row, (kind, kimg) of an evaluation."""
    if "img_per_s" in row:
        return ("train", row["step"])
    if row.get("kind") in ("eval", "curve"):
        return (row["kind"], row["kimg"])
    return None


def _ends_with_newline(path):
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1) == b"\n"


def list_resume_checkpoints(outdir):
    """[(t_img, path)] of the mid-epoch checkpoints, oldest first."""
    found = []
    for p in glob.glob(os.path.join(glob.escape(outdir), "checkpoints", "resume_*.pt")):
        m = re.fullmatch(r"resume_(\d+)\.pt", os.path.basename(p))
        if m:
            found.append((int(m.group(1)), p))
    return sorted(found)


class StopRequests:
    """When to write a checkpoint between epochs and when to stop: on SIGTERM (preemption), SIGINT (Ctrl-C) and
    SIGUSR1 (what SLURM sends before the time limit with --signal=USR1@<seconds>), the current step finishes,
    a checkpoint is written and training stops; every train.checkpoint_minutes a checkpoint is written
    anyway. Under torchrun the ranks agree on the step (one tiny all-reduce every SYNC_STEPS steps)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGUSR1)
    SYNC_STEPS = 10

    def __init__(self, minutes, rank, world, device):
        self.every_s, self.rank, self.world, self.device = 60 * minutes, rank, world, device
        self.signum, self.previous = None, {}
        self.last_save = time.time()

    def __enter__(self):
        for s in self.SIGNALS:
            self.previous[s] = signal.signal(s, self._request)
        return self

    def __exit__(self, *exc):
        for s, handler in self.previous.items():
            signal.signal(s, handler)

    def _request(self, signum, frame):
        if self.signum == signal.SIGINT and signum == signal.SIGINT:
            raise KeyboardInterrupt  # a second Ctrl-C: stop now, without a checkpoint
        self.signum = signum

    def poll(self, step):
        """(signal number or None, whether a time-based checkpoint is due), the same on every rank."""
        due = self.every_s > 0 and time.time() - self.last_save >= self.every_s and self.rank == 0
        if self.world == 1:
            return self.signum, due
        if step % self.SYNC_STEPS:
            return None, False
        flags = torch.tensor([float(self.signum or 0), float(due)], device=self.device)
        torch.distributed.all_reduce(flags, op=torch.distributed.ReduceOp.MAX)
        signum, due = flags.tolist()
        return (int(signum) or None), bool(due)

    def saved(self):
        self.last_save = time.time()


class Metrics:
    """Sums kept on the device and read on the host only every log_steps (no syncs in the hot loop): loss
    overall and per sigma bucket, gradient norm, non-finite steps. Rank 0 writes TensorBoard and metrics.jsonl."""

    def __init__(self, cfg, outdir, rank, world, device, step, epoch_img):
        self.cfg, self.outdir, self.rank, self.world, self.device, self.epoch_img = cfg, outdir, rank, world, device, epoch_img
        self.buckets = SIGMA_BUCKETS.to(device)
        self.acc = torch.zeros(4, device=device, dtype=torch.float64)  # loss sum, samples, grad-norm sum, non-finite steps
        self.acc_bucket = torch.zeros(2, len(self.buckets) + 1, device=device, dtype=torch.float64)  # loss sum, count per sigma bucket
        self.streak = torch.zeros((), device=device)  # consecutive steps with non-finite gradients
        self.t_log, self.step_log = time.time(), step
        self.writer, self.path = None, os.path.join(outdir, "metrics.jsonl")
        self.written = set()  # (kind, step or kimg) of the rows in metrics.jsonl that a resumed run must not write twice
        if rank == 0:
            # A resumed run replays (bit-exactly) what the killed one did after its checkpoint: TensorBoard hides the
            # killed run's points from there on, and metrics.jsonl keeps its rows instead of repeating them.
            t_img = step * cfg["train"]["batch_size"]
            self.writer = SummaryWriter(os.path.join(outdir, "tensorboard"), purge_step=t_img + 1 if step else None)
            if os.path.exists(self.path) and os.path.getsize(self.path) and not _ends_with_newline(self.path):
                append_text(self.path, "\n")  # a line cut short by a killed run stays a line of its own
            if step:  # only the killed run's rows past the checkpoint are replayed; a fresh start writes all of its own
                self.written = {_row_key(r) for r in read_jsonl(self.path) if round(r.get("kimg", 0) * 1000) > t_img} - {None}

    def add_losses(self, loss, sigma):
        """Per-sample losses of one micro-batch, at their noise levels."""
        loss = loss.detach().to(torch.float64)
        self.acc[0] += loss.sum()
        self.acc[1] += len(loss)
        b = torch.bucketize(sigma, self.buckets)
        self.acc_bucket[0].index_add_(0, b, loss)
        self.acc_bucket[1].index_add_(0, b, torch.ones_like(loss))

    def add_step(self, grad_norm, finite):
        self.acc[2] += torch.where(finite, grad_norm, 0)
        self.acc[3] += (~finite).to(self.acc.dtype)
        self.streak = (self.streak + 1) * (~finite)

    def log(self, step, state):
        """The sums since the last call, over all ranks, as a row (returned) that rank 0 writes to TensorBoard and
        metrics.jsonl; the non-finite steps among them are added to state.nonfinite_steps (checkpointed)."""
        T, writer, buckets, t_img = self.cfg["train"], self.writer, self.buckets, state.t_img
        dist.all_reduce_sum(self.acc)
        dist.all_reduce_sum(self.acc_bucket)
        a, ab = self.acc.tolist(), self.acc_bucket.tolist()
        n_steps = max(step - self.step_log, 1)
        state.nonfinite_steps += int(round(a[3] / self.world))
        row = dict(step=step, kimg=t_img / 1000, epoch=t_img / self.epoch_img, loss=a[0] / max(a[1], 1),
                   lr=state.opt.param_groups[0]["lr"], grad_norm=a[2] / self.world / n_steps, nonfinite_steps=state.nonfinite_steps,
                   img_per_s=(step - self.step_log) * T["batch_size"] / max(time.time() - self.t_log, 1e-9))
        row["peak_mem_gib"] = (torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda"
                               else resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024) / 2 ** 30
        if self.rank == 0:
            for k in ("loss", "lr", "grad_norm", "img_per_s", "peak_mem_gib", "nonfinite_steps"):
                writer.add_scalar(f"train/{k}", row[k], t_img)
            for i, (s, c) in enumerate(zip(*ab)):
                if c > 0:
                    lo = 0 if i == 0 else buckets[i - 1].item()
                    writer.add_scalar(f"loss_by_sigma/{lo:g}-{buckets[i].item() if i < len(buckets) else float('inf'):g}", s / c, t_img)
            if self.cfg["diffusion"]["loss_weighting"] == "uncertainty":
                with torch.no_grad():
                    u = state.edm.loss.uncertainty(torch.tensor([0.01, 0.1, 1.0, 10.0], device=self.device)).tolist()
                for s, v in zip((0.01, 0.1, 1.0, 10.0), u):
                    writer.add_scalar(f"uncertainty/sigma={s:g}", v, t_img)
            self.write(row, _row_key(row))
        self.acc.zero_()
        self.acc_bucket.zero_()
        self.t_log, self.step_log = time.time(), step
        return row

    def check_gradients(self, t_img):
        """Stop the run after train.max_nonfinite_steps consecutive steps with non-finite gradients."""
        if self.streak.item() >= self.cfg["train"]["max_nonfinite_steps"]:
            good = list_checkpoints(self.outdir)
            raise UserError(f"gradients non-finite for {int(self.streak.item())} consecutive steps at {t_img / 1000:.1f} kimg; stopped. "
                            f"Last good checkpoint: {good[-1][1] if good else 'none'}")

    def write(self, row, key=None):
        """One row of metrics.jsonl (rank 0), written whole or not at all; not again if a row of this key is there."""
        if key is not None and key in self.written:
            return
        append_text(self.path, json.dumps(row) + "\n")
        self.written.add(key)

    def exclude_time(self, start):
        """Leave the time since `start` (an evaluation) out of the next row's img_per_s."""
        self.t_log += time.time() - start

    def log_evaluation(self, rows):
        """Rows of tools/evaluation.py (rank 0) to TensorBoard and metrics.jsonl, with a line each on the terminal."""
        from tools.evaluation import describe
        for row in rows:
            t_img = round(row["kimg"] * 1000)
            if row["kind"] == "eval":
                for k in ("val_loss", "train_loss", "gap"):
                    self.writer.add_scalar(f"eval/{k}", row[k], t_img)
                for s, v, t in zip(row["sigmas"], row["val_loss_by_sigma"], row["train_loss_by_sigma"]):
                    self.writer.add_scalar(f"eval_val_loss/sigma={s:g}", v, t_img)
                    self.writer.add_scalar(f"eval_train_loss/sigma={s:g}", t, t_img)
            else:
                for k in ("KID", "FD_classifier", "precision", "recall", "memorised_fraction", "class_accuracy", "FID_inception",
                          "KID_inception"):
                    if k in row:
                        self.writer.add_scalar(f"quality_curve/{k}", row[k], t_img)
            self.write(row, _row_key(row))
            print(f"evaluation at epoch {row['epoch']} ({row['kimg']:.1f} kimg): {describe(row)} [{row['eval_s']:.1f} s]", flush=True)

    def close(self):
        if self.rank == 0:
            self.writer.close()



def grid_layout(label_dim, num=64):
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


@torch.no_grad()
def sample_grid(net, cfg, device, num=64):
    """EMA samples for the TensorBoard grid in [0, 1], seeds 0, 1, ..., with class labels for a conditional
    network (grid_layout); returns (images, images per row)."""
    was_training = net.training
    denoiser = Denoiser(net.eval(), cfg["diffusion"]["sigma_data"])
    n = cfg["network"]
    classes, cols = grid_layout(n["label_dim"], num)
    count = num if classes is None else len(classes)
    S = {k: cfg["sample"][k] for k in ("sampler", "steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise")}
    with autocast(device, cfg["train"]["precision"]):
        x = sample(denoiser, SeedNoise(range(count), device), (n["img_channels"], n["img_resolution"], n["img_resolution"]),
                   one_hot(classes, n["label_dim"], device), **S)
    net.train(was_training)
    return (x * 0.5 + 0.5).clamp(0, 1).cpu(), cols


def save_grid(net, cfg, outdir, epoch, t_img, writer, device):
    """sample_grid() of net to TensorBoard and OUTDIR/grids/epoch_<epoch>.png (a conditional run: a row per class)."""
    grid, cols = sample_grid(net, cfg, device)
    writer.add_image("samples/ema_classic", torchvision.utils.make_grid(grid, nrow=cols), t_img)
    path = os.path.join(outdir, "grids", f"epoch_{epoch}.png")
    atomic_write(path, lambda f: torchvision.utils.save_image(grid, f, format="png", nrow=cols))  # a full disk: one line, no 0-byte file
