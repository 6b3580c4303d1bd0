"""The learning-rate schedule, a pure function of the images seen, and the noise-level buckets of the training log."""

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
