"""Samplers for D(x; sigma): EDM Heun (2nd order, Karras et al. 2022 Alg. 1/2), Euler, DPM-Solver++(2M).

Noise comes from one generator per image seed, so image k is the same whatever the batch or rank split;
so does the class of a conditional image (seed_classes). Guidance wraps the denoiser (GuidedDenoiser).
"""

import numpy as np
import torch

SAMPLERS = ("heun", "euler", "dpmpp2m")


def edm_sigmas(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho for i < N, then sigma_N = 0 (float64)."""
    i = torch.arange(steps, dtype=torch.float64, device=device)
    s = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64, device=device)])


class SeedNoise:
    """One torch.Generator per image seed; randn draws each image's slice from its own generator."""

    def __init__(self, seeds, device):
        self.device = device
        self.generators = [torch.Generator(device).manual_seed(int(s)) for s in seeds]

    def randn(self, shape):
        return torch.stack([torch.randn(shape, generator=g, device=self.device) for g in self.generators])


def seed_classes(seeds, label_dim, class_index=None):
    """The class of each image: `class_index` for all, or by default seed % label_dim, a balanced mix that
    depends on the seed only (not on the rank split). None for an unconditional network (label_dim 0)."""
    if not label_dim:
        return None
    return [int(s) % label_dim if class_index is None else int(class_index) for s in seeds]


def one_hot(classes, label_dim, device=None):
    """Class labels as the network takes them: one-hot float32 [N, label_dim]; None stays None (unconditional)."""
    if classes is None:
        return None
    return torch.nn.functional.one_hot(torch.as_tensor(classes, dtype=torch.int64, device=device), label_dim).to(torch.float32)


class GuidedDenoiser(torch.nn.Module):
    """D_w(x; sigma, c) = D_guide(x; sigma, c') + w (D_main(x; sigma, c) - D_guide(x; sigma, c')), with the call
    signature of tools.edm.Denoiser (Karras et al. 2024, arXiv 2406.02507, eq. 2).

    Classifier-free guidance: guide = main, c' = the dropped label, a zero vector (how training drops labels,
    tools/batches.py). Autoguidance: guide = a weaker model of the same task (smaller, or trained less),
    c' = c, or no label for an unconditional guide. w = 1 returns D_main itself, bit for bit, without
    evaluating the guide; w > 1 extrapolates away from the guide.
    """

    GUIDE_LABELS = ("same", "dropped", "none")

    def __init__(self, main, guide, weight, guide_labels="same"):
        super().__init__()
        if guide_labels not in self.GUIDE_LABELS:
            raise ValueError(f"guide_labels must be one of {self.GUIDE_LABELS}")
        self.main, self.guide, self.weight, self.guide_labels = main, guide, float(weight), guide_labels

    def forward(self, x, sigma, class_labels=None, dropout_keys=None):
        d_main = self.main(x, sigma, class_labels, dropout_keys)
        if self.weight == 1:
            return d_main
        c = {"same": class_labels, "dropped": None if class_labels is None else torch.zeros_like(class_labels),
             "none": None}[self.guide_labels]
        d_guide = self.guide(x, sigma, c, dropout_keys)
        return d_guide + self.weight * (d_main - d_guide)


def sample(denoiser, noise, shape, class_labels=None, sampler="heun", steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
           S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0):
    """Generate one image per generator in `noise` (a SeedNoise); shape = (C, H, W). Returns float32 in ~[-1, 1].

    `class_labels` (one-hot [N, label_dim] or None) go to every denoiser call; for guidance, pass a GuidedDenoiser.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}")
    device = noise.device
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho, device=device)

    def D(x, sigma):
        s = torch.full((x.shape[0],), float(sigma), device=device)
        return denoiser(x, s, class_labels).to(torch.float64)

    x = noise.randn(shape).to(torch.float64) * sigmas[0]
    sigmas = sigmas.tolist()  # one host transfer up front; the loop below never syncs on the schedule
    denoised_prev, h_prev = None, None
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        if sampler == "dpmpp2m":
            # Data-prediction multistep solver in lambda = -ln(sigma) (Lu et al. 2022, DPM-Solver++ 2M).
            denoised = D(x, t_cur)
            if t_next == 0:
                x = denoised
                break
            h = np.log(t_cur / t_next)
            d = denoised
            if denoised_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * denoised_prev
            x = (t_next / t_cur) * x - np.expm1(-h) * d
            denoised_prev, h_prev = denoised, h
            continue
        # Heun / Euler with optional churn (EDM Alg. 2).
        gamma = min(S_churn / steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = x + np.sqrt(t_hat ** 2 - t_cur ** 2) * S_noise * noise.randn(shape).to(torch.float64)
        d_cur = (x - D(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if sampler == "heun" and t_next > 0:
            d_next = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x.to(torch.float32)


SAMPLER_KEYS = ("sampler", "steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise")  # sample()'s keywords


def sampler_kwargs(section):
    """The sample() keywords of a config's sample section."""
    return {k: section[k] for k in SAMPLER_KEYS}
