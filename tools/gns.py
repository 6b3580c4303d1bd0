"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 during training (McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training", section 2.2 and appendix A.1), from gradients the step computes anyway.

G is the true gradient and Sigma the per-image gradient covariance; a batch of b images has E|G_b|^2 = |G|^2 +
tr(Sigma) / b. Two batch sizes give unbiased estimates of both:

    |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

Here b_big is the global batch (the all-reduced gradient the optimizer steps with) and b_small the smaller batch
whose own gradient the step already holds: on one rank each micro-batch (train.batch_gpu), whose gradient a hook on
each parameter hands over before it is accumulated (kept by reference; its squared norm is one foreach kernel per
micro-batch); on several ranks the per-rank batch, whose gradient DDP's communication hook sees bucket by bucket
before the all-reduce (one norm per bucket). Both estimates are summed on the device over the steps between two
logged steps, and each is smoothed by an exponential moving average over the logged steps (the noisy ratio of two
noisy estimates is taken only after smoothing, as McCandlish et al. advise); reading the sums (and one all-reduce
of them under torchrun) happens at the logged steps only. It needs a smaller batch than the global one
(train.batch_gpu < train.batch_size, or several ranks).
"""

import torch
from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

from tools import dist

SMOOTHING = 0.9  # EMA decay per logged step of the |G|^2 and tr(Sigma) estimates


class NoiseScale:
    """Squared gradient norms at the small and the global batch of each step, summed on the device; estimate() at a
    logged step turns them into |G|^2, tr(Sigma) and B_simple (smoothed)."""

    def __init__(self, params, micro, per_rank, batch_size, device, world=1):
        self.world = world
        self.b_small, self.b_big = (micro if world == 1 else per_rank), batch_size
        self.small_batches = per_rank // micro if world == 1 else 1  # per step and rank
        self.available = batch_size > self.b_small
        # The step differentiates loss.sum() / per_rank: a micro-batch's gradient is its mean gradient x micro / per_rank.
        self.unscale = (per_rank / micro) ** 2 if world == 1 else 1.0
        self.loss_scale = None  # fp16: GradScaler's scale (a tensor) of the gradients; set before each backward pass
        self.pending = []  # the micro-batch's gradients, by reference, until end_micro_batch
        self.step_sq = torch.zeros((), device=device, dtype=torch.float64)    # this step's small-batch |g|^2 so far
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)  # sum |G_small|^2, their count, sum |G_big|^2, steps
        self.smoothed = None  # EMAs of (|G|^2, tr Sigma), float64; None before the first logged step
        use_hooks = self.available and world == 1
        self.hooks = [p.register_hook(self.pending.append) for p in params if p.requires_grad] if use_hooks else []

    def attach(self, ddp_model):
        """Several ranks: read each rank's gradient in DDP's buckets before their all-reduce."""
        if self.available and self.world > 1:
            ddp_model.register_comm_hook(None, self._bucket_hook)

    def _bucket_hook(self, state, bucket):
        self._add(torch.linalg.vector_norm(bucket.buffer(), dtype=torch.float32).double().square())
        return allreduce_hook(None, bucket)

    def _add(self, sq):
        self.step_sq += sq if self.loss_scale is None else sq / self.loss_scale.double().square()

    def end_micro_batch(self):
        """A micro-batch's backward pass is done (its gradients carry `loss_scale`, fp16's GradScaler scale, if set)."""
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
        """At a logged step, on every rank (collective under torchrun): {gns_b_simple, gns_grad_sq,
        gns_trace_sigma} smoothed up to the steps since the last logged one; {} when unavailable or no finite
        step happened since."""
        if not self.available:
            return {}
        world = dist.world_size()
        sums = self.sums.clone()
        if world > 1:
            dist.all_reduce_sum(sums)
        small_sq, count, big_sq, steps = sums.tolist()
        big_sq, steps = big_sq / world, steps / world  # every rank holds the same global norms
        self.sums.zero_()
        if not steps:
            return {}
        small, big, bs, bb = small_sq / count, big_sq / steps, self.b_small, self.b_big
        current = torch.tensor([(bb * big - bs * small) / (bb - bs), (small - big) / (1 / bs - 1 / bb)], dtype=torch.float64)
        self.smoothed = current if self.smoothed is None else SMOOTHING * self.smoothed + (1 - SMOOTHING) * current
        grad_sq, trace = self.smoothed.tolist()
        return dict(gns_b_simple=trace / grad_sq if grad_sq > 0 else None, gns_grad_sq=grad_sq, gns_trace_sigma=trace)
