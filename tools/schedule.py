"""Pure functions of the step and the images seen that training is built from: LR schedule, data order, noise.

Every random draw of a step comes from a generator seeded by (seed, step), drawn for the whole global
batch and then sliced by rank, so a run is the same for any GPU count or accumulation.
"""

import numpy as np
import torch

SIGMA_BUCKETS = torch.tensor([0.002, 0.1, 0.3, 1.0, 3.0, 10.0, 80.0])  # edges for the per-sigma loss log


def learning_rate(t_img, ref_lr, rampup_img, ref_img):
    """EDM2 schedule: ref_lr / sqrt(max(t / t_ref, 1)) (none when t_ref = 0), times a linear ramp-up; t = images seen."""
    lr = ref_lr
    if ref_img > 0:
        lr /= np.sqrt(max(t_img / ref_img, 1))
    if rampup_img > 0:
        lr *= min(t_img / rampup_img, 1)
    return float(lr)


def seed_for(*values):
    """A 63-bit seed derived from integers (seed, step, rank, ...), stable across runs and machines."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def epoch_order(seed, epoch, num_images):
    """The permutation of the dataset used in `epoch` (on the CPU)."""
    g = torch.Generator().manual_seed(seed_for(seed, epoch, 0xDA7A))
    return torch.randperm(num_images, generator=g)


def step_draws(seed, step, batch_size, image_shape, P_mean, P_std, device):
    """(sigma [B], noise [B, C, H, W], flip [B] bool, label-dropout draw [B] in [0, 1), dropout key [B] int64)
    for the global batch of `step`; the key fixes each sample's dropout masks (tools.layers.sample_dropout)."""
    g = torch.Generator(device).manual_seed(seed_for(seed, step, 0x5EED))
    sigma = (torch.randn(batch_size, generator=g, device=device) * P_std + P_mean).exp()
    noise = torch.randn((batch_size, *image_shape), generator=g, device=device)
    flip = torch.rand(batch_size, generator=g, device=device) < 0.5
    drop = torch.rand(batch_size, generator=g, device=device)
    dropout_keys = torch.randint(2 ** 31, (batch_size,), generator=g, device=device)
    return sigma, noise, flip, drop, dropout_keys
