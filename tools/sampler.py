"""Samplers for D(x; sigma): EDM Heun (2nd order, Karras et al. 2022 Alg. 1/2), Euler, DPM-Solver++(2M).

Noise comes from one generator per image seed, so image k is the same whatever the batch or rank split.
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


def sample(denoiser, noise, shape, class_labels=None, sampler="heun", steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
           S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, guidance=None):
    """Generate one image per generator in `noise` (a SeedNoise); shape = (C, H, W). Returns float32 in ~[-1, 1].

    `guidance`, when given, is (guide_denoiser, weight): D = D_guide + w (D_main - D_guide), for
    classifier-free guidance or autoguidance.
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}")
    device = noise.device
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho, device=device)

    def D(x, sigma):
        s = torch.full((x.shape[0],), float(sigma), device=device)
        out = denoiser(x, s, class_labels)
        if guidance is not None:
            guide, w = guidance
            out = guide(x, s, class_labels).lerp(out, w)
        return out.to(torch.float64)

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
