"""What training advances and a checkpoint holds (network, loss head, optimizer, grad scaler, EMAs, images seen,
non-finite step count): one optimizer step, resume and save."""

import contextlib

import torch
import yaml
from torch.nn.parallel import DistributedDataParallel

from tools import dist
from tools.checkpoint import atomic_save, checkpoint_path, list_checkpoints, list_resume_checkpoints, load_newest, remove, resume_path
from tools.cli import UserError
from tools.config import build_edm, dump, validate
from tools.ema import EMAs
from tools.gns import NoiseScale
from tools.mp import force_weight_norm_
from tools.precision import autocast, matmul_precision

RESUME_KEYS = ("unet", "network", "diffusion", "augment")  # sections that must match to resume a run
RESUME_TRAIN_KEYS = ("seed", "batch_size")
REQUIRED = ("net", "loss_head", "optimizer", "emas", "t_img", "config")  # what a checkpoint must hold to resume from


def resolved(saved):
    """A checkpoint's config as today's validation resolves it (keys added since filled with their defaults, so an
    older run resumes), or as written if it no longer validates (then it differs, and resuming is refused)."""
    try:
        return validate(saved)
    except UserError:
        return saved


class TrainState:
    """The trained state of one run on one rank (every rank holds the same)."""

    def __init__(self, cfg, device):
        train = cfg["train"]
        self.cfg, self.device = cfg, device
        self.fp16 = train["precision"] == "fp16"
        torch.manual_seed(train["seed"])  # the network's initialisation
        self.edm = build_edm(cfg).to(device)
        force_weight_norm_(self.edm)
        # Fused Adam: one kernel over all parameters on CPU and CUDA alike, instead of a loop over them
        # (docs/PERFORMANCE.md compares the implementations).
        self.opt = torch.optim.Adam(self.edm.parameters(), lr=train["lr"], betas=tuple(train["betas"]), eps=train["eps"], fused=True)
        self.scaler = torch.amp.GradScaler(device.type, enabled=self.fp16)
        self.emas = EMAs(self.edm.net, cfg["ema"])
        self.params = list(self.edm.parameters())
        self.t_img = 0
        # Non-finite gradient bookkeeping on the device, read only when logged or checkpointed (no sync per step):
        # all steps so far, the current run of consecutive ones, and the longest run since the last check.
        self.nonfinite = torch.zeros((), device=device, dtype=torch.int64)
        self.streak = torch.zeros((), device=device, dtype=torch.int64)
        self.longest_streak = torch.zeros((), device=device, dtype=torch.int64)
        self.noise_scale = None  # the gradient noise scale, once track_noise_scale knows the micro-batches

    def track_noise_scale(self, micro, per_rank):
        """Estimate the gradient noise scale from the micro-batches of `micro` images in this rank's `per_rank`
        (tools/gns.py), if train.gns is on; call before resume() so that its smoothing resumes too."""
        if self.cfg["train"]["gns"]:
            self.noise_scale = NoiseScale(self.params, micro, per_rank, self.cfg["train"]["batch_size"], self.device,
                                          dist.world_size())

    @property
    def nonfinite_steps(self):
        return int(self.nonfinite.item())

    # ------------------------------------------------------------------------------------------------
    # One optimizer step.

    def step(self, model, batch, micro, lr, log):
        """One optimizer step on this rank's share of the global batch, in micro-batches of `micro` images;
        `model` is edm, or its DistributedDataParallel wrapper, which all-reduces on the last micro-batch.
        A step with non-finite gradients leaves weights and Adam's moments as they were (fused Adam skips it, as
        under GradScaler in fp16); it is counted. Nothing here waits for the device."""
        with matmul_precision(self.cfg["train"]["precision"]):  # TF32 or not, the backward pass too
            self._step(model, batch, micro, lr, log)

    def _step(self, model, batch, micro, lr, log):
        per_rank = len(batch.images)
        for start in range(0, per_rank, micro):
            ms, last = slice(start, start + micro), start + micro == per_rank
            conditioning = {k: v[ms] for k, v in batch.conditioning.items() if v is not None}
            rows = batch.normals.rows(slice(batch.rows.start + start, batch.rows.start + start + micro))
            sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
            with sync, autocast(self.device, self.cfg["train"]["precision"]):
                loss, sigma = model(batch.images[ms], rows, **conditioning)
            scaled = self.scaler.scale(loss.sum() / per_rank)
            if self.noise_scale is not None:
                self.noise_scale.loss_scale = self.scaler._scale if self.fp16 else None  # the scale as a tensor (no sync)
            scaled.backward()
            if self.noise_scale is not None:
                self.noise_scale.end_micro_batch()
            log.add_losses(loss, sigma)
        if batch.conditioning.get("augment_labels") is not None:
            log.add_augmented(batch.conditioning["augment_labels"])

        for group in self.opt.param_groups:
            group["lr"] = lr
        self.scaler.unscale_(self.opt)
        grads = [p.grad for p in self.params if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        finite = torch.isfinite(grad_norm)
        if self.noise_scale is not None:
            self.noise_scale.end_step(grad_norm, finite)
        if not self.fp16:  # GradScaler's protocol for fused optimizers: found_inf = 1 makes the step a no-op
            self.opt.grad_scale, self.opt.found_inf = None, (~finite).to(torch.float32)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.opt.zero_grad(set_to_none=True)
        force_weight_norm_(self.edm)
        B = self.cfg["train"]["batch_size"]
        self.t_img += B
        self.emas.update(self.edm.net, self.t_img, B)
        self._count_nonfinite(finite)
        log.add_step(grad_norm, finite)

    def _count_nonfinite(self, finite):
        bad = (~finite).to(torch.int64)
        self.nonfinite += bad
        self.streak = (self.streak + 1) * bad
        self.longest_streak = torch.maximum(self.longest_streak, self.streak)

    def check_gradients(self, outdir):
        """Stop the run once the gradients were non-finite for train.max_nonfinite_steps consecutive steps, counted
        exactly at every step (on the device) and checked here, at the logged steps."""
        limit = self.cfg["train"]["max_nonfinite_steps"]
        longest = int(self.longest_streak.item())
        self.longest_streak = self.streak.clone()  # a run still going on carries over to the next check
        if longest >= limit:
            good = list_checkpoints(outdir)
            raise UserError(f"gradients non-finite for {longest} consecutive steps (train.max_nonfinite_steps={limit}) by "
                            f"{self.t_img / 1000:.1f} kimg; stopped. Last good checkpoint: {good[-1][1] if good else 'none'}")

    def check_weights(self, epoch):
        """Refuse to checkpoint non-finite weights, so that the earlier checkpoints stay the ones to resume from."""
        if not all(torch.isfinite(p).all() for p in self.params):
            raise UserError(f"weights became non-finite at epoch {epoch}; not checkpointed, earlier checkpoints are intact")

    # ------------------------------------------------------------------------------------------------
    # Checkpoints.

    def resume(self, outdir, epoch_img):
        """Load the newest valid checkpoint of outdir, per-epoch or mid-epoch (resume_<images>.pt); a corrupt one
        is reported and the next older one tried. False if there is none."""
        candidates = sorted([(e * epoch_img, p) for e, p in list_checkpoints(outdir)] + list_resume_checkpoints(outdir), reverse=True)
        ckpt = load_newest(outdir, REQUIRED, [p for _, p in candidates])
        if ckpt is None and candidates:
            raise UserError(f"no checkpoint in {outdir}/checkpoints could be loaded; move them away to start afresh")
        if ckpt is None:
            return False
        saved = resolved(yaml.safe_load(ckpt["config"]))
        for key in RESUME_KEYS:
            if self.cfg[key] != saved[key]:
                raise UserError(f"{outdir} holds a run with a different '{key}'; resume with its config ({outdir}/config.yaml) "
                                f"or use a new --outdir")
        for key in RESUME_TRAIN_KEYS:
            if self.cfg["train"][key] != saved["train"][key]:
                raise UserError(f"{outdir} was trained with train.{key}={saved['train'][key]}; keep it to resume, or use a new --outdir")
        self.edm.net.load_state_dict(ckpt["net"])
        self.edm.loss.load_state_dict(ckpt["loss_head"])
        self.opt.load_state_dict(ckpt["optimizer"])
        if saved["train"]["precision"] != self.cfg["train"]["precision"]:
            dist.print0(f"note: {outdir} trained in {saved['train']['precision']} until now and goes on in "
                        f"{self.cfg['train']['precision']} (not bit-exact across the change; fp16's loss scale starts afresh)")
        elif self.fp16:
            self.scaler.load_state_dict(ckpt["scaler"])
        self.emas.load_state_dict(ckpt["emas"])
        self.t_img = ckpt["t_img"]
        self.nonfinite.fill_(ckpt["nonfinite_steps"])
        if self.noise_scale is not None:
            self.noise_scale.load_state_dict(ckpt.get("gns"))
        return True

    def contents(self, epoch):
        return dict(net=self.edm.net.state_dict(), loss_head=self.edm.loss.state_dict(), optimizer=self.opt.state_dict(),
                    scaler=self.scaler.state_dict(), emas=self.emas.state_dict(), t_img=self.t_img, epoch=epoch,
                    nonfinite_steps=self.nonfinite_steps, config=dump(self.cfg),
                    gns=None if self.noise_scale is None else self.noise_scale.state_dict())

    def save(self, outdir, epoch):
        """OUTDIR/checkpoints/epoch_<epoch>.pt; the oldest beyond train.keep_checkpoints are removed, and so are the
        mid-epoch checkpoints it supersedes. Returns its path."""
        path = checkpoint_path(outdir, epoch)
        atomic_save(self.contents(epoch), path)
        keep = self.cfg["train"]["keep_checkpoints"]
        if keep:
            for _, old in list_checkpoints(outdir)[:-keep]:
                remove(old)
        for t, old in list_resume_checkpoints(outdir):
            if t <= self.t_img:
                remove(old)
        return path

    def save_resume(self, outdir, epoch):
        """OUTDIR/checkpoints/resume_<images>.pt, a checkpoint between epochs (time-based or on a signal); only the
        newest is kept. sample.py and probe.py use the per-epoch ones. Returns its path."""
        path = resume_path(outdir, self.t_img)
        atomic_save(self.contents(epoch), path)
        for t, old in list_resume_checkpoints(outdir):
            if t < self.t_img:
                remove(old)
        return path
