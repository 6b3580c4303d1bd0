"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 (McCandlish et al. 2018, appendix A.1; docs/INSTRUMENTS.md)."""

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from tools import dist

SMOOTHING = 0.9  # EMA decay per logged step of the |G|^2 and tr(Sigma) estimates


class NoiseScale:
    """Squared gradient norms of a micro-batch (one rank) or a rank's batch (several) and of the global batch."""

    def __init__(self, params, micro, per_rank, batch_size, device, world=1):
        self.world = world
        self.b_small, self.b_big = (micro if world == 1 else per_rank), batch_size
        self.small_batches = per_rank // micro if world == 1 else 1  # per step and rank
        self.available = batch_size > self.b_small
        self.unscale = (per_rank / micro) ** 2 if world == 1 else 1.0  # the loss is divided by per_rank, not micro
        self.loss_scale = None  # fp16: GradScaler's scale, set before each backward
        self.pending = []  # the micro-batch's gradients, by reference, until end_micro_batch
        self.step_sq = torch.zeros((), device=device, dtype=torch.float64)  # this step's small-batch |g|^2 so far
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)  # sum |G_small|^2, their count, sum |G_big|^2, steps
        self.smoothed = None  # EMAs of (|G|^2, tr Sigma), float64
        use_hooks = self.available and world == 1
        self.hooks = [p.register_hook(self.pending.append) for p in params if p.requires_grad] if use_hooks else []

    def attach(self, ddp_model):
        if self.available and self.world > 1:
            ddp_model.register_comm_hook(None, self._bucket_hook)

    def _bucket_hook(self, state, bucket):
        self._add(torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).double().square())
        return allreduce_hook(None, bucket)

    def _add(self, sq):
        self.step_sq += sq if self.loss_scale is None else sq / self.loss_scale.double().square()

    def end_micro_batch(self):
        if self.pending:
            self._add(torch.stack(torch._foreach_norm(self.pending)).double().square().sum() * self.unscale)
            self.pending.clear()

    def end_step(self, grad_norm, finite):
        """The step's global (all-reduced, unscaled) gradient norm; a non-finite step counts for neither size."""
        if self.available:
            zero = torch.zeros((), device=self.sums.device, dtype=torch.float64)
            step = torch.stack([self.step_sq, zero + self.small_batches, grad_norm.double().square(), zero + 1])
            self.sums += torch.where(finite, step, zero)
            self.step_sq.zero_()

    def state_dict(self):
        return {"smoothed": None if self.smoothed is None else self.smoothed.tolist()}

    def load_state_dict(self, state):
        smoothed = (state or {}).get("smoothed")
        self.smoothed = None if smoothed is None else torch.tensor(smoothed, dtype=torch.float64)

    def estimate(self):
        """The smoothed gns_b_simple, gns_grad_sq and gns_trace_sigma of the steps since the last call (collective)."""
        if not self.available:
            return {}
        world = dist.world_size()
        small_sq, count, big_sq, steps = dist.all_reduce_sum(self.sums.clone()).tolist()
        big_sq, steps = big_sq / world, steps / world  # every rank holds the same global norms
        self.sums.zero_()
        if not steps:
            return {}
        small, big, bs, bb = small_sq / count, big_sq / steps, self.b_small, self.b_big
        # E|G_b|^2 = |G|^2 + tr(Sigma) / b at the two batch sizes, solved for both
        current = torch.tensor([(bb * big - bs * small) / (bb - bs), (small - big) / (1 / bs - 1 / bb)], dtype=torch.float64)
        self.smoothed = current if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * current
        grad_sq, trace = self.smoothed.tolist()
        return dict(gns_b_simple=trace / grad_sq if grad_sq > 0 else None, gns_grad_sq=grad_sq, gns_trace_sigma=trace)
