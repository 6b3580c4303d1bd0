"""Samplers for D(x; sigma) on the EDM schedule: ODE solvers of the probability flow and solvers of the reverse-time
SDE of x = y + sigma n (Karras et al. 2022, eqs. 1, 4, 6), listed in SAMPLER_INFO and run by sample().

Noise comes from SeedNoise, a counter-based generator: image k's noise is a function of its seed alone, drawn for
the whole batch at once, so image k is the same whatever the batch or rank split; so does the class of a
conditional image (seed_classes). Guidance wraps the denoiser (GuidedDenoiser).
"""

import math
from collections import namedtuple

import numpy as np
import torch

# ----------------------------------------------------------------------------------------------------
# Noise.

_MASK32 = 0xFFFFFFFF
_LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B - (1 << 32)))
_KEY_SALT, _COUNTER_SALT = 0x9E3779B9, 0x6A09E667  # 2^32 frac((sqrt 5 - 1) / 2), 2^32 frac(sqrt 2): _mix32(0) = 0
_LN2 = 0.6931471805599453
_SQRT2 = 1.4142135623730951
_LOG_SERIES = tuple(2 / (2 * n + 1) for n in range(7))
_COS_SERIES = tuple((-1) ** n / math.factorial(2 * n) for n in range(9))
_SIN_SERIES = tuple((-1) ** n / math.factorial(2 * n + 1) for n in range(9))
_CPU_BLOCK = 1 << 16  # elements per block on a CPU: the temporaries stay in cache (twice as fast as one block)


def _mix32(x):
    """lowbias32 (C. Wellons, "Prospecting for hash functions", 2018), in place on int64 x in [0, 2^32): a bijection
    of 32-bit words whose output bits each flip with probability ~1/2 when one input bit flips. The multiplier
    >= 2^31 is used as its residue c - 2^32 (the same product mod 2^32), so every product stays below 2^63."""
    for shift, multiplier in _LOWBIAS32:
        x ^= x >> shift
        x *= multiplier
        x &= _MASK32
    x ^= x >> 16
    return x


def _horner(t, coeffs):
    """sum_n coeffs[n] t^n by Horner's rule, each multiply and add rounded on its own (no fused multiply-add)."""
    p = torch.full_like(t, coeffs[-1])
    for c in reversed(coeffs[:-1]):
        p.mul_(t).add_(c)
    return p


def _neg_log(u):
    """-ln u for u in (0, 1] to ~5e-13: u = m 2^e (frexp, exact), ln u = (e - 1/2) ln 2 + ln(m sqrt 2) with m sqrt 2 in
    [0.71, 1.42), ln v = 2 atanh s = 2 (s + s^3/3 + ...) for s = (v - 1) / (v + 1), |s| <= 0.172, 7 terms."""
    m, e = torch.frexp(u)
    m.mul_(_SQRT2)
    s = (m - 1).div_(m.add_(1))
    return e.to(u.dtype).sub_(0.5).mul_(-_LN2).sub_(_horner(s * s, _LOG_SERIES).mul_(s))


def _cos_sin(w):
    """(cos phi, sin phi) for phi = 2 pi (w + 1/2) / 2^32 - pi, uniform on the circle for a uniform 32-bit w, to ~1e-12:
    Taylor series of phi / 2 in [-pi/2, pi/2) (9 terms), then the double-angle formulas."""
    half = w.to(torch.float64).add_(0.5).mul_(math.pi / 2 ** 32).sub_(math.pi / 2)
    t2 = half * half
    c, s = _horner(t2, _COS_SERIES), _horner(t2, _SIN_SERIES).mul_(half)
    return (c - s).mul_(c + s), s.mul_(c).mul_(2)


class SeedNoise:
    """Standard normal noise for a batch of images, image k a function of seeds[k] alone, drawn for all at once.

    Counter-based: image k has a stream of 32-bit words, word c = mix(key_k ^ mix(c ^ s1)), key_k = mix(mix(seed_k) ^ s2),
    mix the lowbias32 bijection (_mix32), s1 and s2 constants (mix(0) = 0). randn(shape) is the next draw of every
    image: n = prod(shape) values from the next 3 ceil(n / 2) words of each stream, a triple (a, b, c) giving a pair
    of normals by Box-Muller, radius sqrt(-2 ln u) from the 53-bit uniform u = (a 2^21 + b >> 11 + 1) / 2^53 and angle
    from c. Nothing depends on the batch, its size or order, or the rank count. Distinct seeds in [0, 2^32) never
    share a word at the same position; a stream holds 2^32 words (about 2.9e9 values per image).

    The same numbers on any device: the words are exact integer arithmetic in int64, and the transform uses only
    correctly rounded IEEE operations (+, -, *, /, sqrt, exact frexp and int-to-float conversions; ln and cos/sin
    as series), each a separate op, so a draw is bit for bit the same on a CPU and on CUDA (in eager mode;
    torch.compile could fuse a multiply and an add).
    """

    def __init__(self, seeds, device):
        seeds = torch.as_tensor(list(seeds), dtype=torch.int64).reshape(-1)
        if len(seeds) and (seeds.min() < 0 or seeds.max() > _MASK32):
            raise ValueError("seeds must be integers in [0, 2^32)")
        self.device = device
        self.keys = _mix32(_mix32(seeds) ^ _KEY_SALT).to(device)
        self.counter = 0

    def randn(self, shape):
        """float32 [len(seeds), *shape], each image's next draw from its own stream."""
        n = math.prod(shape)
        pairs = (n + 1) // 2
        if self.counter + 3 * pairs > 1 << 32:
            raise RuntimeError("SeedNoise: the 2^32 words of each image's stream are used up")
        out = torch.empty(len(self.keys), 2 * pairs, device=self.device)
        block = max(1, _CPU_BLOCK // max(len(self.keys), 1)) if torch.device(self.device).type == "cpu" else pairs
        for j in range(0, pairs, block):
            cols = torch.arange(j, min(j + block, pairs), dtype=torch.int64, device=self.device)
            out[:, j:j + len(cols)], out[:, pairs + j:pairs + j + len(cols)] = self._normal_pairs(cols, pairs)
        self.counter += 3 * pairs
        return out[:, :n].reshape(len(self.keys), *shape)

    def _normal_pairs(self, cols, pairs):
        """Box-Muller on the words (a, b, c) at counters counter + cols + (0, 1, 2) pairs: (r cos phi, r sin phi)."""
        counters = torch.stack([cols, cols + pairs, cols + 2 * pairs]) + self.counter
        a, b, c = _mix32(self.keys[:, None, None] ^ _mix32(counters ^ _COUNTER_SALT)).unbind(1)
        a <<= 21
        a |= b >> 11
        a += 1
        r = _neg_log(a.to(torch.float64).mul_(2.0 ** -53)).mul_(2).clamp_min_(0).sqrt_()
        cos, sin = _cos_sin(c)
        return cos.mul_(r), sin.mul_(r)


# ----------------------------------------------------------------------------------------------------
# Classes and guidance.

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
    tools/trainer.py). Autoguidance: guide = a weaker model of the same task (smaller, or trained less),
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


# ----------------------------------------------------------------------------------------------------
# The samplers.

SamplerInfo = namedtuple("SamplerInfo", "order weak_order nfe_per_step stochastic description")
# order: of the error against the exact ODE solution (a stochastic sampler: at eta = 0); weak_order: of the error in the
# output's mean and variance on Gaussian data at eta = 1 (tests/test_sampler.py); nfe_per_step: see sampler_nfe.
SAMPLER_INFO = {
    "heun": SamplerInfo(2, 2, 2, False, "EDM Heun in sigma (Karras et al. 2022, Alg. 1); S_churn > 0 adds Alg. 2's churn"),
    "euler": SamplerInfo(1, 1, 1, False, "Euler in sigma; S_churn > 0 adds EDM Alg. 2's churn"),
    "dpmpp2m": SamplerInfo(2, 2, 1, False, "DPM-Solver++(2M): data prediction, multistep in log sigma (Lu et al. 2022b)"),
    "lms": SamplerInfo(4, 4, 1, False, "linear multistep in sigma, order 4 (variable-step Adams-Bashforth)"),
    "dpm2": SamplerInfo(2, 2, 2, False, "DPM-Solver-2: noise prediction, midpoint in log sigma (Lu et al. 2022a)"),
    "dpm_adaptive": SamplerInfo(3, 3, None, False, "DPM-Solver-23, step size per image from the error (rtol, atol, "
                                                   "h_init; steps and rho unused)"),
    "euler_ancestral": SamplerInfo(1, 1, 1, True, "Euler to sigma_down, then fresh noise up to sigma_next (eta)"),
    "dpm2_ancestral": SamplerInfo(2, 2, 2, True, "dpm2 to sigma_down, then fresh noise up to sigma_next (eta)"),
    "dpmpp2s_ancestral": SamplerInfo(2, 2, 2, True, "DPM-Solver++(2S) to sigma_down, then fresh noise up to sigma_next (eta)"),
    "dpmpp2m_sde": SamplerInfo(2, 2, 1, True, "SDE-DPM-Solver++(2M): D linear in log sigma, the rest exact (eta)"),
    "dpmpp3m_sde": SamplerInfo(3, 2, 1, True, "SDE-DPM-Solver++(3M): D quadratic in log sigma, the rest exact (eta)"),
}
SAMPLERS = tuple(SAMPLER_INFO)
SAMPLER_KEYS = ("sampler", "steps", "sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise",
                "eta", "rtol", "atol", "h_init")  # sample() keywords


def sampler_kwargs(section):
    """The sample() keywords of a config's sample section; a key the section lacks (a config from before the key
    existed) takes sample()'s default."""
    return {k: section[k] for k in SAMPLER_KEYS if k in section}


def sampler_nfe(sampler, steps):
    """Denoiser evaluations of `sampler` for `steps` noise levels: nfe_per_step per step but one on the last (to
    sigma = 0: the denoised image), so heun 2 steps - 1; None for dpm_adaptive (sample(stats=) reports its count)."""
    per_step = SAMPLER_INFO[sampler].nfe_per_step
    return None if per_step is None else per_step * (steps - 1) + 1


def edm_sigmas(steps, sigma_min=0.002, sigma_max=80.0, rho=7.0, device=None):
    """sigma_i = (smax^(1/rho) + i/(N-1) (smin^(1/rho) - smax^(1/rho)))^rho for i < N, then sigma_N = 0 (float64)."""
    i = torch.arange(steps, dtype=torch.float64, device=device)
    s = (sigma_max ** (1 / rho) + i / max(steps - 1, 1) * (sigma_min ** (1 / rho) - sigma_max ** (1 / rho))) ** rho
    return torch.cat([s, torch.zeros(1, dtype=torch.float64, device=device)])


class _Evaluations:
    """D(x; sigma) in float64 for a sampler, counting the calls and each image's evaluations. sigma: one float for
    the batch, or a tensor with one value per row of x together with `rows`, the images they are."""

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
        return self.denoiser(x, s, labels).to(torch.float64)


def _edm(D, x, sigmas, fresh, steps, S_churn, S_min, S_max, heun):
    """Heun (or Euler) in sigma with EDM's churn: before step i, noise raises sigma to t_hat = t_cur (1 + gamma),
    gamma = min(S_churn / steps, sqrt 2 - 1) where S_min <= t_cur <= S_max (Karras et al. 2022, Alg. 2)."""
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        gamma = min(S_churn / steps, np.sqrt(2) - 1) if S_min <= t_cur <= S_max else 0.0
        t_hat = t_cur * (1 + gamma)
        if gamma > 0:
            x = x + fresh(np.sqrt(t_hat ** 2 - t_cur ** 2))
        d_cur = (x - D(x, t_hat)) / t_hat
        x_next = x + (t_next - t_hat) * d_cur
        if heun and t_next > 0:
            d_next = (x_next - D(x_next, t_next)) / t_next
            x_next = x + (t_next - t_hat) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


def _dpmpp2m(D, x, sigmas):
    """DPM-Solver++(2M) (Lu et al. 2022b, Alg. 2) in lambda = -ln sigma: x_next = (t_next / t_cur) x - expm1(-h) D',
    D' = (1 + 1/2r) D_i - 1/2r D_{i-1} with r = h_{i-1} / h_i; the first step first order, the last the denoised image."""
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
    """c_j = integral over [nodes[0], t_next] of the Lagrange basis polynomial l_j of `nodes` (the current and earlier
    noise levels), so x_next = x + sum_j c_j d_j integrates their interpolating polynomial of dx/dsigma exactly;
    Gauss-Legendre with len(nodes) points is exact for its degree len(nodes) - 1."""
    t_cur, h = nodes[0], t_next - nodes[0]
    points, weights = np.polynomial.legendre.leggauss(len(nodes))
    tau = t_cur + h * (points + 1) / 2
    basis = [np.prod([(tau - m) / (n - m) for k, m in enumerate(nodes) if k != j] + [np.ones_like(tau)], axis=0)
             for j, n in enumerate(nodes)]
    return [float(h / 2 * np.dot(weights, l)) for l in basis]


def _lms(D, x, sigmas, order=4):
    """Linear multistep in sigma: dx/dsigma = d = (x - D) / sigma (EDM eq. 4) from the last `order` values of d
    (fewer on the first steps), with coefficients from integrating their Lagrange polynomial over each step."""
    history = []
    for i, (t_cur, t_next) in enumerate(zip(sigmas[:-1], sigmas[1:])):
        history = [(x - D(x, t_cur)) / t_cur] + history[:order - 1]
        coeffs = _adams_bashforth(sigmas[i::-1][:len(history)], t_next)
        x = x + sum(c * d for c, d in zip(coeffs, history))
    return x


def _euler_step(D, x, t_cur, t_next):
    """x + (t_next - t_cur) d, d = (x - D) / t_cur: first order; to t_next = 0, the denoised image."""
    return x + (t_next - t_cur) * (x - D(x, t_cur)) / t_cur


def _dpm2_step(D, x, t_cur, t_next):
    """DPM-Solver-2 (Lu et al. 2022a, Alg. 1, r1 = 1/2) with noise prediction d = (x - D) / sigma: for this process
    x_next = x + (t_next - t_cur) d(u, t_mid), u the Euler step to t_mid = sqrt(t_cur t_next), the midpoint in
    log sigma. Second order; to t_next = 0, the Euler step (the denoised image)."""
    if t_next == 0:
        return _euler_step(D, x, t_cur, t_next)
    t_mid = math.sqrt(t_cur * t_next)
    u = _euler_step(D, x, t_cur, t_mid)
    return x + (t_next - t_cur) * (u - D(u, t_mid)) / t_mid


def _dpmpp2s_step(D, x, t_cur, t_next):
    """DPM-Solver++(2S) (Lu et al. 2022b, Alg. 1, r = 1/2): data prediction, x_next = (t_next / t_cur) x +
    (1 - t_next / t_cur) D(u, t_mid), u the first-order step to t_mid = sqrt(t_cur t_next). Second order."""
    denoised = D(x, t_cur)
    if t_next == 0:
        return denoised
    t_mid = math.sqrt(t_cur * t_next)
    u = (t_mid / t_cur) * x + (1 - t_mid / t_cur) * denoised
    return (t_next / t_cur) * x + (1 - t_next / t_cur) * D(u, t_mid)


_STEPS = {"euler_ancestral": _euler_step, "dpm2": _dpm2_step, "dpm2_ancestral": _dpm2_step,
          "dpmpp2s_ancestral": _dpmpp2s_step}


def _ancestral_split(t_cur, t_next, eta):
    """(sigma_down, sigma_up) with sigma_down^2 + sigma_up^2 = t_next^2, sigma_up = min(t_next, eta t_next
    sqrt(t_cur^2 - t_next^2) / t_cur): at eta = 1 the posterior of x_next given x and the clean image (DDPM; DDIM's
    sigma(eta), Song et al. 2021, eq. 16, for this process), the mean and variance of an exact reverse-SDE step with
    D held fixed; eta = 0 the ODE step."""
    if eta == 0 or t_next == 0:
        return t_next, 0.0
    sigma_up = min(t_next, eta * t_next * math.sqrt(t_cur ** 2 - t_next ** 2) / t_cur)
    return math.sqrt(t_next ** 2 - sigma_up ** 2), sigma_up


def _ancestral(D, x, sigmas, fresh, eta, step):
    """Each step: the ODE `step` from t_cur to sigma_down, then fresh noise of std sigma_up (_ancestral_split)."""
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        sigma_down, sigma_up = _ancestral_split(t_cur, t_next, eta)
        x = step(D, x, t_cur, sigma_down)
        if sigma_up > 0:
            x = x + fresh(sigma_up)
    return x


def _exponential_integrals(h, c):
    """I_k = integral_0^h c e^(-c (h - u)) u^k du for k = 0, 1, 2: I_0 = 1 - e^(-c h), I_k = h^k - k I_(k-1) / c."""
    i0 = -math.expm1(-c * h)
    i1 = h - i0 / c
    return i0, i1, h * h - 2 * i1 / c


def _dpmpp_sde(D, x, sigmas, fresh, eta, order):
    """DPM-Solver++(2M / 3M) for the reverse SDE (data prediction, Lu et al. 2022b) with Langevin rate eta: EDM eq. 6
    with beta(t) = eta d(ln sigma)/dt, i.e. in lambda = -ln sigma, dx = (1 + eta)(D - x) dlambda + sqrt(2 eta) sigma dW.
    D is the polynomial in lambda through the last `order` evaluations (Newton form D_i + u d1 + u (u + h1) d2);
    the linear drift, that polynomial's integral and the noise are exact over each step:
    x_next = e^(-(1 + eta) h) x + I_0 D_i + I_1 d1 + (I_2 + h1 I_1) d2 + t_next sqrt(1 - e^(-2 eta h)) z.
    eta = 0 is an ODE solver of that order; eta = 1 the reverse-time SDE. The last step gives the denoised image."""
    history = []
    for t_cur, t_next in zip(sigmas[:-1], sigmas[1:]):
        denoised = D(x, t_cur)
        if t_next == 0:
            return denoised
        history = [(-math.log(t_cur), denoised)] + history[:order - 1]
        h = math.log(t_cur / t_next)
        i0, i1, i2 = _exponential_integrals(h, 1 + eta)
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


def _dpm_adaptive(D, x, sigma_min, sigma_max, rtol, atol, h_init, safety=0.9, max_growth=5.0):
    """DPM-Solver-23 with adaptive step size (Lu et al. 2022a, the adaptive step size schedule), noise prediction
    eps = (x - D) / sigma, from lambda = -ln sigma_max to -ln sigma_min, then the denoised image. An attempt of step h
    (_dpm23) gives x_low (2nd order) and x_high (3rd); E = RMS(a_t (x_high - x_low) / max(atol, rtol max(a_t |x_low|,
    a_s |x|))) accepts x_high when E <= 1, and the next h = 0.9 h E^(-1/3), at most max_growth h. The tolerances are
    the paper's, for x in the variance-preserving scale a = 1 / sqrt(1 + sigma^2) (here |x| grows like sigma, which
    would loosen rtol at high noise); the growth limit is the usual safeguard of step controllers (Hairer et al.,
    Solving ODEs I, II.4), without which a step across sigma ~ sigma_data passes an error estimate that misses its
    error. Each image has its own lambda and h, so its path does not depend on the batch; a rejection keeps eps at s."""
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


def _dpm23(D, x, eps, s, h, rows, view):
    """(DPM-Solver-2, DPM-Solver-3) from lambda s over h, both with u1 at s + h/3 (Lu et al. 2022a, Alg. 1 and 2):
    x_t = x - sigma_t [(e^h - 1) eps + (e^h - 1) d1 / (2 r1)] and x - sigma_t [(e^h - 1) eps + (e^h - 1 - h) d2 / (r2 h)],
    d_k = eps(u_k) - eps; u2 = x - sigma_2 [(e^(r2 h) - 1) eps + (e^(r2 h) - 1 - r2 h) d1 / (r1 h)]."""
    r1, r2 = 1 / 3, 2 / 3
    sigma_s, sigma_1, sigma_2, sigma_t = (torch.exp(-(s + r * h)).view(view) for r in (0, r1, r2, 1))
    hv = h.view(view)

    def eps_at(u, sigma):
        return (u - D(u, sigma.flatten(), rows)) / sigma

    u1 = x - (sigma_s - sigma_1) * eps
    d1 = eps_at(u1, sigma_1) - eps
    x_low = x - (sigma_s - sigma_t) * (eps + d1 / (2 * r1))
    u2 = x - (sigma_s - sigma_2) * eps - sigma_2 * (torch.expm1(r2 * hv) - r2 * hv) / (r1 * hv) * d1
    d2 = eps_at(u2, sigma_2) - eps
    x_high = x - (sigma_s - sigma_t) * eps - sigma_t * (torch.expm1(hv) - hv) / (r2 * hv) * d2
    return x_low, x_high


def sample(denoiser, noise, shape, class_labels=None, sampler="heun", steps=18, sigma_min=0.002, sigma_max=80.0, rho=7.0,
           S_churn=0.0, S_min=0.0, S_max=float("inf"), S_noise=1.0, eta=1.0, rtol=0.05, atol=0.0078, h_init=0.05, stats=None):
    """Generate one image per seed of `noise` (a SeedNoise); shape = (C, H, W). Returns float32 in ~[-1, 1].

    `class_labels` (one-hot [N, label_dim] or None) go to every denoiser call; for guidance, pass a GuidedDenoiser.
    sampler: one of SAMPLERS (SAMPLER_INFO). eta: the noise of the ancestral samplers (DDIM's eta: 1 the reverse SDE,
    0 the ODE) and of the SDE samplers (Langevin rate per unit ln sigma: 1 the reverse SDE, 0 the ODE). S_noise scales
    every fresh noise after the first (churn, ancestral, SDE); S_churn, S_min, S_max: churn of heun and euler.
    rtol, atol, h_init: dpm_adaptive's tolerances and first step in ln sigma. All noise comes from `noise`, so image k
    depends on its seed and the weights only. stats (a dict): filled with "nfe", the denoiser calls made, and
    "image_nfe", each image's evaluations (they differ with dpm_adaptive).
    """
    if sampler not in SAMPLERS:
        raise ValueError(f"sampler must be one of {SAMPLERS}")
    sigmas = edm_sigmas(steps, sigma_min, sigma_max, rho, device=noise.device)
    x = noise.randn(shape).to(torch.float64) * sigmas[0]
    D = _Evaluations(denoiser, class_labels, len(x), x.device)

    def fresh(std):
        return std * S_noise * noise.randn(shape).to(torch.float64)

    sigmas = sigmas.tolist()  # one host transfer up front; the loops never sync on the schedule
    if sampler in ("heun", "euler"):
        x = _edm(D, x, sigmas, fresh, steps, S_churn, S_min, S_max, heun=sampler == "heun")
    elif sampler == "dpmpp2m":
        x = _dpmpp2m(D, x, sigmas)
    elif sampler == "lms":
        x = _lms(D, x, sigmas)
    elif sampler in _STEPS:
        x = _ancestral(D, x, sigmas, fresh, eta if sampler.endswith("ancestral") else 0, _STEPS[sampler])
    elif sampler in ("dpmpp2m_sde", "dpmpp3m_sde"):
        x = _dpmpp_sde(D, x, sigmas, fresh, eta, order=int(sampler[5]))
    else:
        x = _dpm_adaptive(D, x, sigma_min, sigma_max, rtol, atol, h_init)
    if stats is not None:
        stats.update(nfe=D.calls, image_nfe=D.per_image.cpu())
    return x.to(torch.float32)
