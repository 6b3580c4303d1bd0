"""Every random number of the repository, derived from integers that say what it is for (docs/DESIGN.md)."""

import math

import numpy as np
import torch

# Purposes: the last value of a seed_for() key.
DATA_ORDER, STEP_NORMALS, BATCH_DRAWS, AUGMENT_DRAWS = 0xDA7A, 0x5EED, 0xBA7C, 0xA06
EVALUATION, PROBE, LIKELIHOOD = 0xE7A1, 0x9B0E, 0x11CE


def seed_for(*values):
    """A 63-bit seed derived from integers (seed, step, purpose, ...), stable across runs and machines."""
    return int(np.random.SeedSequence([int(v) for v in values]).generate_state(2, dtype=np.uint32).view(np.uint64)[0] >> 1)


def generator(*values, device="cpu"):
    return torch.Generator(device).manual_seed(seed_for(*values))


def image_normals(key, ids, shape, device="cpu"):
    """Standard normals [len(ids), *shape] for images `ids` of a purpose `key` (a tuple of integers), each its own stream."""
    base = seed_for(*key)
    return SeedNoise([(base + int(i) * 0x9E3779B9) & 0xFFFFFFFF for i in ids], device).randn(shape)


class StepNormals:
    """One step's normals: each request drawn for the global batch and answered with a micro-batch's rows (split-invariant)."""

    def __init__(self, seed, step, batch_size, device):
        self.generator = generator(seed, step, STEP_NORMALS, device=device)
        self.batch_size, self.device, self.made = batch_size, device, []

    def rows(self, rows):
        return _Rows(self, rows)


class _Rows:
    def __init__(self, step, rows):
        self.step, self.rows, self.count = step, rows, 0

    def randn(self, *shape):
        """[len(rows), *shape] standard normals of these rows (the next request of the step)."""
        s = self.step
        if self.count == len(s.made):
            s.made.append(torch.randn((s.batch_size, *shape), generator=s.generator, device=s.device))
        self.count += 1
        return s.made[self.count - 1][self.rows]


_MASK32 = 0xFFFFFFFF
_LOWBIAS32 = ((16, 0x7FEB352D), (15, 0x846CA68B - (1 << 32)))
_KEY_SALT, _COUNTER_SALT = 0x9E3779B9, 0x6A09E667  # 2^32 frac((sqrt 5 - 1) / 2), 2^32 frac(sqrt 2): mix32(0) = 0
_LN2 = 0.6931471805599453
_SQRT2 = 1.4142135623730951
_LOG_SERIES = tuple(2 / (2 * n + 1) for n in range(7))
_COS_SERIES = tuple((-1) ** n / math.factorial(2 * n) for n in range(9))
_SIN_SERIES = tuple((-1) ** n / math.factorial(2 * n + 1) for n in range(9))
_CPU_BLOCK = 1 << 16  # elements per block on a CPU: the temporaries stay in cache (twice as fast as one block)


def mix32(x):
    """lowbias32 (C. Wellons, 2018) in place on int64 x in [0, 2^32); a multiplier c >= 2^31 is used as c - 2^32 (no overflow)."""
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
    """-ln u for u in (0, 1] to ~5e-13: (1/2 - e) ln 2 - 2 atanh s, s = (v - 1) / (v + 1), v = m sqrt 2, u = m 2^e (frexp)."""
    m, e = torch.frexp(u)
    m.mul_(_SQRT2)
    s = (m - 1).div_(m.add_(1))
    return e.to(u.dtype).sub_(0.5).mul_(-_LN2).sub_(_horner(s * s, _LOG_SERIES).mul_(s))


def _cos_sin(w):
    """(cos phi, sin phi), phi = 2 pi (w + 1/2) / 2^32 - pi, to ~1e-12: Taylor series of phi / 2, then double angles."""
    half = w.to(torch.float64).add_(0.5).mul_(math.pi / 2 ** 32).sub_(math.pi / 2)
    t2 = half * half
    c, s = _horner(t2, _COS_SERIES), _horner(t2, _SIN_SERIES).mul_(half)
    return (c - s).mul_(c + s), s.mul_(c).mul_(2)


class SeedNoise:
    """Normals for a batch of images, image k's from seeds[k] alone: a counter-based mix32 stream per seed, Box-Muller."""

    def __init__(self, seeds, device):
        seeds = torch.as_tensor(list(seeds), dtype=torch.int64).reshape(-1)
        if len(seeds) and (seeds.min() < 0 or seeds.max() > _MASK32):
            raise ValueError("seeds must be integers in [0, 2^32)")
        self.device = device
        self.keys = mix32(mix32(seeds) ^ _KEY_SALT).to(device)
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
        a, b, c = mix32(self.keys[:, None, None] ^ mix32(counters ^ _COUNTER_SALT)).unbind(1)
        a <<= 21
        a |= b >> 11
        a += 1
        r = _neg_log(a.to(torch.float64).mul_(2.0 ** -53)).mul_(2).clamp_min_(0).sqrt_()
        cos, sin = _cos_sin(c)
        return cos.mul_(r), sin.mul_(r)
