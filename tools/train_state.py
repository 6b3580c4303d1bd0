"""What training advances and a checkpoint holds (network, loss head, optimizer, EMAs, images seen): one step, resume, save."""

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


class TrainState:
    """The trained state of one run on one rank (every rank holds the same)."""

    def __init__(self, cfg, device):
        train = cfg["train"]
        self.cfg, self.device = cfg, device
        self.fp16 = train["precision"] == "fp16"
        torch.manual_seed(train["seed"])  # the network's initialisation
        self.edm = build_edm(cfg).to(device)
        force_weight_norm_(self.edm)
        # Fused Adam: one kernel over all parameters on CPU and CUDA alike (docs/PERFORMANCE.md compares the implementations).
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
        """The gradient noise scale (tools/gns.py) if train.gns is on; call before resume() so that its smoothing resumes too."""
        if self.cfg["train"]["gns"]:
            self.noise_scale = NoiseScale(self.params, micro, per_rank, self.cfg["train"]["batch_size"], self.device,
                                          dist.world_size())

    @property
    def nonfinite_steps(self):
        return int(self.nonfinite.item())

    def step(self, model, batch, micro, lr, log):
        """One optimizer step in micro-batches of `micro` images; non-finite gradients skip the update (counted). No device sync."""
        per_rank, precision = len(batch.images), self.cfg["train"]["precision"]
        with matmul_precision(precision):  # TF32 or not, the backward pass too
            for start in range(0, per_rank, micro):
                ms, last = slice(start, start + micro), start + micro == per_rank
                conditioning = {k: v[ms] for k, v in batch.conditioning.items() if v is not None}
                rows = batch.normals.rows(slice(batch.rows.start + start, batch.rows.start + start + micro))
                sync = model.no_sync() if isinstance(model, DistributedDataParallel) and not last else contextlib.nullcontext()
                with sync, autocast(self.device, precision):
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
        grad_norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm([p.grad for p in self.params if p.grad is not None])))
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
        bad = (~finite).to(torch.int64)
        self.nonfinite += bad
        self.streak = (self.streak + 1) * bad
        self.longest_streak = torch.maximum(self.longest_streak, self.streak)
        log.add_step(grad_norm, finite)

    def check_gradients(self, outdir):
        """Stop once the gradients were non-finite for train.max_nonfinite_steps consecutive steps (counted on the device)."""
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

    def resume(self, outdir, epoch_img):
        """Load the newest loadable checkpoint of outdir, per-epoch or mid-epoch; False if there is none."""
        candidates = sorted([(e * epoch_img, p) for e, p in list_checkpoints(outdir)] + list_resume_checkpoints(outdir), reverse=True)
        ckpt = load_newest(outdir, REQUIRED, [p for _, p in candidates])
        if ckpt is None and candidates:
            raise UserError(f"no checkpoint in {outdir}/checkpoints could be loaded; move them away to start afresh")
        if ckpt is None:
            return False
        saved = yaml.safe_load(ckpt["config"])
        try:
            saved = validate(saved)  # keys added since then filled with their defaults
        except UserError:
            pass  # no longer valid: it differs, and resuming is refused
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
        """OUTDIR/checkpoints/epoch_<epoch>.pt, removing the oldest beyond train.keep_checkpoints and older mid-epoch ones."""
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
        """OUTDIR/checkpoints/resume_<images>.pt, a checkpoint between epochs (timer or signal); only the newest is kept."""
        path = resume_path(outdir, self.t_img)
        atomic_save(self.contents(epoch), path)
        for t, old in list_resume_checkpoints(outdir):
            if t < self.t_img:
                remove(old)
        return path
