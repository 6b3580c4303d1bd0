"""Solvers of the EDM probability-flow ODE and reverse-time SDE (Karras et al. 2022, eqs. 1, 4, 6), registered in SAMPLERS."""

import functools
import math
from collections import namedtuple

import numpy as np
import torch


def seed_classes(seeds, label_dim, class_index=None):
    """Each image's class: `class_index`, or seed % label_dim (a balanced mix); None for an unconditional network."""
    if not label_dim:
        return None
    return [int(s) % label_dim if class_index is None else int(class_index) for s in seeds]


def one_hot(classes, label_dim, device=None):
    if classes is None:
        return None
    return torch.nn.functional.one_hot(torch.as_tensor(classes, dtype=torch.int64, device=device), label_dim).to(torch.float32)


class GuidedDenoiser(torch.nn.Module):
    """D_w = D_guide + w (D_main - D_guide) (Karras et al. 2024, eq. 2), guide labels same, dropped (CFG) or none; w = 1 is D_main bit for bit."""

    def __init__(self, main, guide, weight, guide_labels="same"):
        super().__init__()
        if guide_labels not in ("same", "dropped", "none"):
            raise ValueError("guide_labels must be one of same, dropped, none")
        self.main, self.guide, self.weight, self.guide_labels = main, guide, float(weight), guide_labels

    def forward(self, x, sigma, class_labels=None):
        d_main = self.main(x, sigma, class_labels=class_labels)
        if self.weight == 1:
            return d_main
        c = {"same": class_labels, "dropped": None if class_labels is None else torch.zeros_like(class_labels),
             "none": None}[self.guide_labels]
        d_guide = self.guide(x, sigma, class_labels=c)
        return d_guide + self.weight * (d_main - d_guide)


# run(D, x, sigmas, fresh, **params): x at sigmas[0] -> x at 0, D(x, sigma[, rows]) in float64, fresh(std) new noise; order: ODE error
# (eta = 0); weak_order: moments at eta = 1; nfe_per_step None = adaptive; params: sample.* keys read; tag: those in the folder name if not default.
Sampler = namedtuple("Sampler", "run order weak_order nfe_per_step stochastic params tag description")
SAMPLERS = {}  # name -> Sampler, in the order of `sample.py --sampler list`
# The sample.* keys samplers read: default, lowest value (or the key whose value is the lowest), bound open, meaning.
PARAMS = {
    "S_churn": (0.0, 0, False, "Stochasticity (EDM Alg. 2); 0 = deterministic."),
    "S_min": (0.0, 0, False, "Lowest noise level with churn."),
    "S_max": (math.inf, "S_min", False, "Highest noise level with churn (.inf = every level)."),
    "S_noise": (1.0, 0, False, "Noise inflation of every fresh noise after the first (churn, ancestral and SDE samplers)."),
    "eta": (1.0, 0, False, "Noise of the ancestral and SDE samplers: 1 = the reverse-time SDE, 0 = the ODE."),
    "rtol": (0.05, 0, True, "dpm_adaptive: relative error tolerance per step (Lu et al. 2022)."),
    "atol": (0.0078, 0, True, "dpm_adaptive: absolute error tolerance per step (about one 8-bit level)."),
    "h_init": (0.05, 0, True, "dpm_adaptive: first step in ln sigma."),
}
SCHEDULE = ("steps", "sigma_min", "sigma_max", "rho")  # the noise levels every sampler walks (edm_sigmas)
CHURN, ANCESTRAL = ("S_churn", "S_min", "S_max", "S_noise"), ("eta", "S_noise")  # the params of two sampler families


def register(name, order, weak_order, nfe_per_step, description, params=(), tag=None):
    """Add `run` to SAMPLERS: a new sampler is this decorator on one function (stochastic if it reads eta)."""
    def add(run):
        SAMPLERS[name] = Sampler(run, order, weak_order, nfe_per_step, "eta" in params, params, params if tag is None else tag, description)
        return run
    return add


def sampler_kwargs(section):
    return {k: section[k] for k in ("sampler", *SCHEDULE, *PARAMS)}


def sampler_nfe(sampler, steps):
    """Denoiser evaluations for `steps` noise levels (one on the last step, to sigma = 0); None when adaptive."""
    per_step = SAMPLERS[sampler].nfe_per_step
    return None if per_step is None else per_step * (steps - 1) + 1


def folder_tag(section):
    """The sampler part of a sample folder's name: sampler, steps and every tag parameter not at its default."""
    s = SAMPLERS[section["sampler"]]
    tag = section["sampler"] + ("" if s.nfe_per_step is None else str(section["steps"]))
    return tag + "".join(f"-{k}{section[k]:g}" for k in s.tag if section[k] != PARAMS[k][0])


def edm_sigmas(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho for i < N, then sigma_N = 0 (float64)."""
    i = torch.arange(steps, dtype=torch.float64, device=device)
    s = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64, device=device)])


class _Evaluations:
    """D(x; sigma) in float64, counting calls and per-image evaluations; sigma one float, or per row with `rows`."""

    def __init__(self, denoiser, class_labels, count, device):
        self.denoiser, self.class_labels = denoiser, class_labels
        self.calls, self.per_image = 0, torch.zeros(count, dtype=torch.int64, device=device)

    def __call__(self, x, sigma, rows=None):
        self.calls += 1
        if rows is None:
            self.per_image += 1
            s, labels = torch.full((x.shape[0],), float(sigma), device=x.device), self.class_labels
        else:
            self.per_image[rows] += 1
            s, labels = sigma.to(torch.float32), None if self.class_labels is None else self.class_labels[rows]
        return self.denoiser(x, s, class_labels=labels).to(torch.float64)


def sample(denoiser, noise, shape, class_labels=None, sampler="heun", steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0, stats=None, **params):
    """float32 images [seeds, *shape] from `noise` (a SeedNoise); a dict `stats` gets "nfe" (calls) and "image_nfe" (per image)."""
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {tuple(SAMPLERS)}")
    p = {k: params.get(k, default) for k, (default, *_) in PARAMS.items()}
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho, device=noise.device)
    x = noise.randn(shape).to(torch.float64) * sigmas[0]
    D = _Evaluations(denoiser, class_labels, len(x), x.device)

    def fresh(std):
        return std * p["S_noise"] * noise.randn(shape).to(torch.float64)

    run, known = SAMPLERS[sampler], dict(p, steps=steps, sigma_min=sigma_min, sigma_max=sigma_max, rho=rho)
    x = run.run(D, x, sigmas.tolist(), fresh, **{k: known[k] for k in run.params})  # the schedule on the host, once
    if stats is not None:
        stats.update(nfe=D.calls, image_nfe=D.per_image.cpu())
    return x.to(torch.float32)


@register("heun", 2, 2, 2, "EDM Heun in sigma (Karras et al. 2022, Alg. 1); S_churn > 0 adds Alg. 2's churn", CHURN, ("S_churn",))
def heun(D, x, sigmas, fresh, S_churn, S_min, S_max, S_noise, euler=False):
    """Heun (Euler if `euler`) in sigma; churn first raises sigma to t_cur (1 + gamma) with fresh noise (Karras et al. 2022, Alg. 2)."""
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(S_churn / (len(sigmas) - 1), np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = x + fresh(np.sqrt(t_hat ** 2 - t_cur ** 2))
        d_cur = (x - D(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if not euler and t_next > 0:
            d_next = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


register("euler", 1, 1, 1, "Euler in sigma; S_churn > 0 adds EDM Alg. 2's churn", CHURN, ("S_churn",))(functools.partial(heun, euler=True))


@register("dpmpp2m", 2, 2, 1, "DPM-Solver++(2M): data prediction, multistep in log sigma (Lu et al. 2022b)")
def dpmpp2m(D, x, sigmas, fresh):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in lambda = -ln sigma; the first step first order, the last D itself."""
    denoised_prev, h_prev = None, None
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = D(x, t_cur)
        if t_next == 0:
            return denoised
        h = np.log(t_cur / t_next)
        d = denoised
        if denoised_prev is not None:
            r = h_prev / h
            d = (1 + 1 / (2 * r)) * denoised - 1 / (2 * r) * denoised_prev
        x = (t_next / t_cur) * x - np.expm1(-h) * d
        denoised_prev, h_prev = denoised, h
    return x


def _adams_bashforth(nodes, t_next):
    """Integrals over [nodes[0], t_next] of the Lagrange basis of `nodes`, exact by Gauss-Legendre: the step's weights."""
    t_cur, h = nodes[0], t_next - nodes[0]
    points, weights = np.polynomial.legendre.leggauss(len(nodes))
    tau = t_cur + h * (points + 1) / 2
    basis = [np.prod([(tau - m) / (n - m) for k, m in enumerate(nodes) if k != j] + [np.ones_like(tau)], axis=0) for j, n in enumerate(nodes)]
    return [float(h / 2 * np.dot(weights, l)) for l in basis]


@register("lms", 4, 4, 1, "linear multistep in sigma, order 4 (variable-step Adams-Bashforth)")
def lms(D, x, sigmas, fresh, order=4):
    """Linear multistep in sigma on dx/dsigma = (x - D) / sigma (EDM eq. 4), from the last `order` slopes."""
    history = []
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        history = [(x - D(x, t_cur)) / t_cur] + history[:order - 1]
        coeffs = _adams_bashforth(sigmas[i::-1][:len(history)], t_next)
        x = x + sum(c * d for c, d in zip(coeffs, history))
    return x


def _euler_step(D, x, t_cur, t_next):
    return x + (t_next - t_cur) * (x - D(x, t_cur)) / t_cur


def _dpm2_step(D, x, t_cur, t_next):
    """DPM-Solver-2 (Lu et al. 2022a, Alg. 1, r1 = 1/2): the slope at the log-sigma midpoint; to t_next = 0, Euler."""
    if t_next == 0:
        return _euler_step(D, x, t_cur, t_next)
    t_mid = math.sqrt(t_cur * t_next)
    u = _euler_step(D, x, t_cur, t_mid)
    return x + (t_next - t_cur) * (u - D(u, t_mid)) / t_mid


def _dpmpp2s_step(D, x, t_cur, t_next):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2): data prediction at the log-sigma midpoint."""
    denoised = D(x, t_cur)
    if t_next == 0:
        return denoised
    t_mid = math.sqrt(t_cur * t_next)
    u = (t_mid / t_cur) * x + (1 - t_mid / t_cur) * denoised
    return (t_next / t_cur) * x + (1 - t_next / t_cur) * D(u, t_mid)


def _ancestral(D, x, sigmas, fresh, eta, step):
    """ODE `step` to sigma_down, then noise sigma_up: sigma_down^2 + sigma_up^2 = t_next^2, eta = 1 DDIM's posterior (Song et al. 2021, eq. 16)."""
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        sigma_down, sigma_up = t_next, 0.0
        if eta != 0 and t_next != 0:
            sigma_up = min(t_next, eta * t_next * math.sqrt(t_cur ** 2 - t_next ** 2) / t_cur)
            sigma_down = math.sqrt(t_next ** 2 - sigma_up ** 2)
        x = step(D, x, t_cur, sigma_down)
        if sigma_up > 0:
            x = x + fresh(sigma_up)
    return x


register("dpm2", 2, 2, 2, "DPM-Solver-2: noise prediction, midpoint in log sigma (Lu et al. 2022a)")(
    lambda D, x, sigmas, fresh: _ancestral(D, x, sigmas, fresh, 0, _dpm2_step))


def _dpm23(D, x, eps, s, h, rows, view):
    """(DPM-Solver-2, DPM-Solver-3) from lambda s over h, sharing u1 at s + h/3 (Lu et al. 2022a, Alg. 1 and 2)."""
    r1, r2 = 1 / 3, 2 / 3
    sigma_s, sigma_1, sigma_2, sigma_t = (torch.exp(-(s + r * h)).view(view) for r in (0, r1, r2, 1))
    hv = h.view(view)
    u1 = x - (sigma_s - sigma_1) * eps
    d1 = (u1 - D(u1, sigma_1.flatten(), rows)) / sigma_1 - eps
    x_low = x - (sigma_s - sigma_t) * (eps + d1 / (2 * r1))
    u2 = x - (sigma_s - sigma_2) * eps - sigma_2 * (torch.expm1(r2 * hv) - r2 * hv) / (r1 * hv) * d1
    d2 = (u2 - D(u2, sigma_2.flatten(), rows)) / sigma_2 - eps
    x_high = x - (sigma_s - sigma_t) * eps - sigma_t * (torch.expm1(hv) - hv) / (r2 * hv) * d2
    return x_low, x_high


@register("dpm_adaptive", 3, 3, None, "DPM-Solver-23, step size per image from the error (rtol, atol, h_init; steps and "
          "rho unused)", ("rtol", "atol", "h_init", "sigma_min", "sigma_max"), ("rtol", "atol", "h_init"))
def dpm_adaptive(D, x, sigmas, fresh, rtol, atol, h_init, sigma_min, sigma_max, safety=0.9, max_growth=5.0):
    """DPM-Solver-23 (Lu et al. 2022a), a step in lambda = -ln sigma per image from the 2nd-3rd order gap (docs/DESIGN.md, Samplers)."""
    view = (-1,) + (1,) * (x.ndim - 1)
    lam_end = -math.log(sigma_min)
    lam = torch.full((len(x),), -math.log(sigma_max), dtype=torch.float64, device=x.device)
    h = torch.full_like(lam, h_init)
    eps, stale = torch.empty_like(x), torch.ones(len(x), dtype=torch.bool, device=x.device)
    active = torch.ones_like(stale)
    while active.any():
        rows = active.nonzero().squeeze(1)
        need = rows[stale[rows]]
        if len(need):
            sigma = torch.exp(-lam[need])
            eps[need] = (x[need] - D(x[need], sigma, need)) / sigma.view(view)
        s, step = lam[rows], torch.minimum(h[rows], lam_end - lam[rows])
        x_low, x_high = _dpm23(D, x[rows], eps[rows], s, step, rows, view)
        alpha_s, alpha_t = (torch.exp(-2 * lam_).add_(1).rsqrt().view(view) for lam_ in (s, s + step))
        scale = torch.maximum(alpha_t * x_low.abs(), alpha_s * x[rows].abs()).mul_(rtol).clamp_min_(atol)
        error = (alpha_t * (x_high - x_low) / scale).square().flatten(1).mean(1).sqrt()
        if not torch.isfinite(error).all():
            raise FloatingPointError("dpm_adaptive: the error estimate is not finite")
        accept = error <= 1
        last = step >= lam_end - s
        x[rows[accept]] = x_high[accept]
        lam[rows[accept]] = torch.where(last, lam_end, s + step)[accept]
        active[rows[accept & last]] = False
        stale[rows] = accept
        h[rows] = step * (safety * error.clamp_min(1e-10) ** (-1 / 3)).clamp_max_(max_growth)
    return D(x, sigma_min)


for _name, _order, _nfe, _step, _what in (("euler_ancestral", 1, 1, _euler_step, "Euler"), ("dpm2_ancestral", 2, 2, _dpm2_step, "dpm2"),
                                          ("dpmpp2s_ancestral", 2, 2, _dpmpp2s_step, "DPM-Solver++(2S)")):
    register(_name, _order, _order, _nfe, f"{_what} to sigma_down, then fresh noise up to sigma_next (eta)", ANCESTRAL)(
        lambda D, x, sigmas, fresh, eta, S_noise, step=_step: _ancestral(D, x, sigmas, fresh, eta, step))


def _dpmpp_sde(D, x, sigmas, fresh, eta, order):
    """SDE-DPM-Solver++(2M / 3M) (Lu et al. 2022b) on EDM eq. 6: D the Newton polynomial of the last `order` evaluations, the rest exact."""
    history = []
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = D(x, t_cur)
        if t_next == 0:
            return denoised
        history = [(-math.log(t_cur), denoised)] + history[:order - 1]
        h = math.log(t_cur / t_next)
        c = 1 + eta  # I_k = integral_0^h c e^(-c (h - u)) u^k du: I_0 = 1 - e^(-c h), I_k = h^k - k I_(k-1) / c
        i0 = -math.expm1(-c * h)
        i1 = h - i0 / c
        i2 = h * h - 2 * i1 / c
        x = math.exp(-(1 + eta) * h) * x + i0 * denoised
        if len(history) > 1:
            (l0, d0), (l1, d1) = history[:2]
            slope = (d0 - d1) / (l0 - l1)
            x = x + i1 * slope
            if len(history) > 2:
                l2, d2 = history[2]
                curvature = (slope - (d1 - d2) / (l1 - l2)) / (l0 - l2)
                x = x + (i2 + (l0 - l1) * i1) * curvature
        if eta > 0:
            x = x + fresh(t_next * math.sqrt(-math.expm1(-2 * eta * h)))
    return x


for _name, _order, _weak, _what in (("dpmpp2m_sde", 2, 2, "D linear"), ("dpmpp3m_sde", 3, 2, "D quadratic")):
    register(_name, _order, _weak, 1, f"SDE-DPM-Solver++({_order}M): {_what} in log sigma, the rest exact (eta)", ANCESTRAL)(
        lambda D, x, sigmas, fresh, eta, S_noise, order=_order: _dpmpp_sde(D, x, sigmas, fresh, eta, order))
