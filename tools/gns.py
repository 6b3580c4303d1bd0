"""The gradient noise scale B_simple = tr(Sigma) / |G|^2 during training (McCandlish et al. 2018, "An Empirical
Model of Large-Batch Training", section 2.2 and appendix A.1), from gradients the step computes anyway.

G is the true gradient and Sigma the per-image gradient covariance; a batch of b images has E|G_b|^2 = |G|^2 +
tr(Sigma) / b. Two batch sizes give unbiased estimates of both:

    |G|^2     ~ (b_big |G_big|^2 - b_small |G_small|^2) / (b_big - b_small)
    tr(Sigma) ~ (|G_small|^2 - |G_big|^2) / (1 / b_small - 1 / b_big)

Here b_big is the global batch (the all-reduced gradient the optimizer steps with) and b_small the micro-batch
(train.batch_gpu, or the per-rank batch): a hook on each parameter sees every micro-batch's own gradient before it
is accumulated or all-reduced, and adds its squared norm on the device. Both estimates are summed over the steps
between two logged steps, and each is smoothed by an exponential moving average over the logged steps (the
noisy ratio of two noisy estimates is taken only after smoothing, as McCandlish et al. advise); reading the
sums (and one all-reduce of them under torchrun) happens at the logged steps only. It needs at least two
micro-batches in the global batch (train.batch_gpu < train.batch_size, or several ranks).
"""

import torch

from tools import dist

SMOOTHING = 0.9  # EMA decay per logged step of the |G|^2 and tr(Sigma) estimates


class NoiseScale:
    """Squared gradient norms at the micro-batch and the global batch of each step, summed on the device;
    estimate() at a logged step turns them into |G|^2, tr(Sigma) and B_simple (smoothed)."""

    def __init__(self, params, micro, per_rank, batch_size, device):
        self.b_small, self.b_big, self.micro_batches = micro, batch_size, per_rank // micro
        self.available = batch_size > micro
        # The hooks see d(loss.sum() / per_rank) / dw: a micro-batch's mean gradient times micro / per_rank.
        self.unscale = (per_rank / micro) ** 2
        self.micro_sq = torch.zeros((), device=device, dtype=torch.float32)   # the micro-batch being back-propagated
        self.step_sq = torch.zeros((), device=device, dtype=torch.float64)    # this step's micro-batches so far
        self.sums = torch.zeros(4, device=device, dtype=torch.float64)  # sum |G_small|^2, their count, sum |G_big|^2, steps
        self.smoothed = None  # EMAs of (|G|^2, tr Sigma), float64; None before the first logged step
        self.hooks = [p.register_hook(self._add) for p in params if p.requires_grad] if self.available else []

    def _add(self, grad):
        self.micro_sq += grad.detach().float().square().sum()

    def end_micro_batch(self, loss_scale=None):
        """A micro-batch's backward pass is done; `loss_scale` is fp16's GradScaler scale (a tensor), if any."""
        if self.available:
            sq = self.micro_sq.double() * self.unscale
            self.step_sq += sq if loss_scale is None else sq / loss_scale.double().square()
            self.micro_sq.zero_()

    def end_step(self, grad_norm, finite):
        """The step's global (all-reduced, unscaled) gradient norm; a non-finite step counts for neither size."""
        if self.available:
            zero = torch.zeros((), device=self.sums.device, dtype=torch.float64)
            step = torch.stack([self.step_sq, zero + self.micro_batches, grad_norm.double().square(), zero + 1])
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
