"""Non-leaky augmentation (EDM appendix C): each transform with probability p, the network told by an AUGMENT_DIM vector."""

import math

import numpy as np
import torch
import torch.nn.functional as F

from tools.cli import UserError

TRANSFORMS = ("xflip", "yflip", "translate_int", "scale_iso", "rotate", "scale_aniso", "translate_frac")
GATED = TRANSFORMS[1:]  # the transforms of augment.transforms, each with probability p; the x-flip has augment.xflip
EDM_XFLIP = 0.5  # EDM's x-flip probability (xflip=1e8 opens its gate; a coin flips half the images)
STRENGTHS = {"translate_int_max": 0.125, "scale_iso_std": 0.2, "rotate_max": 1.0, "scale_aniso_std": 0.2, "translate_frac_std": 0.125}
STRENGTH_RANGES = {"translate_int_max": (0.0, 0.5), "scale_iso_std": (0.0, 1.0), "rotate_max": (0.0, 1.0),
                   "scale_aniso_std": (0.0, 1.0), "translate_frac_std": (0.0, 0.5)}
SLOTS = {"xflip": slice(0, 1), "yflip": slice(1, 2), "translate_int": slice(2, 4), "scale_iso": slice(4, 5),
         "rotate": slice(5, 7), "scale_aniso": slice(7, 9), "translate_frac": slice(9, 11)}
AUGMENT_DIM = 11
RESAMPLED = slice(4, 11)  # the slots of the transforms that need resampling
# Per transform: its gate uniform first, then the uniforms of its parameters.
DRAWS = {"xflip": slice(0, 1), "yflip": slice(1, 2), "translate_int": slice(2, 5), "scale_iso": slice(5, 7),
         "rotate": slice(7, 9), "scale_aniso": slice(9, 12), "translate_frac": slice(12, 15)}
NUM_DRAWS = 15
DEFAULTS = {"p": 0.0, "xflip": 0.0, "transforms": list(GATED), **STRENGTHS}  # an `augment` config section, off by default


def _halfband_taps(K=6, beta=4.0):
    """The odd taps c_1..c_K of a half-band Kaiser-windowed sinc, summing to 1/2 (midpoints keep a constant exactly)."""
    n = np.arange(1, 2 * K, 2)
    taps = np.sinc(n / 2) * np.kaiser(4 * K - 1, beta)[2 * K - 1 + n]
    return tuple(float(c) for c in taps / (2 * taps.sum()))


_TAPS = _halfband_taps()
_MARGIN = 2 * len(_TAPS) - 1  # 2x-grid samples the decimating filter reaches beyond the output


def _normal(u):
    """Standard normal variates by the inverse CDF; u clamped off 0 and 1 so that |z| <= 5.5."""
    eps = 2.0 ** -25
    return math.sqrt(2) * torch.erfinv(2 * u.clamp(eps, 1 - eps) - 1)


def _reflect(i, n):
    """Index i folded into [0, n) by reflection about the border pixels (numpy 'reflect')."""
    if n == 1:
        return torch.zeros_like(i)
    i = i.remainder(2 * (n - 1))
    return torch.minimum(i, 2 * (n - 1) - i)


def _check_number(name, value, lo, hi):
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UserError(f"augment.{name} must be a number, got {value!r}")
    if not lo <= value <= hi:
        raise UserError(f"augment.{name} must be in [{lo:g}, {hi:g}], got {value!r}")
    return float(value)


def is_on(section):
    """Whether an `augment` config section transforms any image (network.augment_dim follows this)."""
    return section["xflip"] > 0 or (section["p"] > 0 and bool(section["transforms"]))


class Augment:
    """Augment(**cfg['augment'])(images, draws) -> (images, vectors); a bad value is a one-line UserError."""

    def __init__(self, p, transforms=GATED, xflip=0.0, **strengths):
        unknown = [k for k in strengths if k not in STRENGTHS]
        if unknown:
            raise UserError(f"augment.{unknown[0]}: unknown key; allowed: p, xflip, transforms, {', '.join(STRENGTHS)}")
        self.p = _check_number("p", p, 0.0, 1.0)
        self.xflip = _check_number("xflip", xflip, 0.0, 1.0)
        if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
            raise UserError(f"augment.transforms must be a list of names from {', '.join(GATED)}; got {transforms!r}")
        if "xflip" in transforms:
            raise UserError(f"augment.transforms: the x-flip has a probability of its own, augment.xflip ({EDM_XFLIP:g} flips "
                            f"half the images, as EDM does); take xflip out of the list")
        unknown = [t for t in transforms if t not in GATED]
        if unknown:
            raise UserError(f"augment.transforms: unknown transform {unknown[0]!r}; known: {', '.join(GATED)}")
        self.transforms = tuple(t for t in GATED if t in transforms)
        self.strengths = {k: _check_number(k, strengths.get(k, d), *STRENGTH_RANGES[k]) for k, d in STRENGTHS.items()}

    def draw(self, batch_size, generator=None):
        """float32 uniforms [batch_size, NUM_DRAWS] on the generator's device: draw for the global batch, slice by rank."""
        device = generator.device if generator is not None else "cpu"
        return torch.rand([batch_size, NUM_DRAWS], generator=generator, device=device, dtype=torch.float32)

    def vectors(self, draws, size):
        """float64 vectors [N, AUGMENT_DIM] for `draws` [N, NUM_DRAWS] and images of size (H, W)."""
        return self._parameters(draws, size)[0]

    def _parameters(self, draws, size):
        """(float64 vectors, float32 geometry [N, 6]); padded to 64 rows, as a CPU kernel's remainder rounds differently."""
        H, W = size
        N = draws.shape[0]
        draws = torch.cat([draws, draws.new_full([-N % 64, NUM_DRAWS], 0.5)]).to(torch.float64)
        u = {t: draws[:, s] for t, s in DRAWS.items()}
        probability = {t: self.p if t in self.transforms else 0.0 for t in GATED} | {"xflip": self.xflip}
        on = {t: u[t][:, 0] < probability[t] for t in TRANSFORMS}  # u >= 0: probability 0 is never on
        st = self.strengths
        m = st["translate_int_max"]
        shift = torch.stack([((2 * u["translate_int"][:, 1] - 1) * m * W).round() / W,
                             ((2 * u["translate_int"][:, 2] - 1) * m * H).round() / H], 1)
        theta = (2 * u["rotate"][:, 1] - 1) * math.pi * st["rotate_max"]
        a = st["scale_aniso_std"] * _normal(u["scale_aniso"][:, 1])
        phi = math.pi * u["scale_aniso"][:, 2]
        parts = {
            "xflip": torch.ones_like(u["xflip"]), "yflip": torch.ones_like(u["yflip"]),
            "translate_int": shift,
            "scale_iso": st["scale_iso_std"] * _normal(u["scale_iso"][:, 1:2]),
            # cos - 1 as -2 sin^2(theta / 2): no cancellation for small angles
            "rotate": torch.stack([-2 * (theta / 2).sin() ** 2, theta.sin()], 1),
            "scale_aniso": torch.stack([a * (2 * phi).cos(), a * (2 * phi).sin()], 1),
            "translate_frac": st["translate_frac_std"] * _normal(u["translate_frac"][:, 1:3]),
        }
        vec64 = torch.cat([torch.where(on[t][:, None], parts[t], 0.0) for t in TRANSFORMS], 1) + 0.0  # -0.0 -> 0.0
        return vec64[:N], _inverse_affine(vec64, size)[:N]

    def __call__(self, images, draws):
        """(images, float32 vectors) for images [N, C, H, W] and draws [N, NUM_DRAWS]; row i depends on row i alone."""
        N, C, H, W = images.shape
        if draws.shape != (N, NUM_DRAWS):
            raise ValueError(f"draws must have shape [{N}, {NUM_DRAWS}], got {list(draws.shape)}")
        if not is_on(dict(p=self.p, xflip=self.xflip, transforms=self.transforms)):
            return images, torch.zeros([N, AUGMENT_DIM], device=images.device)
        vec64, geometry = self._parameters(draws.to(images.device, non_blocking=True), (H, W))
        vectors = vec64.to(torch.float32)
        out = _index_ops(images, vec64)  # every image through every stage, `where` keeping the others: no host sync
        resampled = vectors[:, RESAMPLED].ne(0).any(1)
        return torch.where(resampled[:, None, None, None], _resample(out, geometry), out), vectors


def _index_ops(images, vec64):
    """Flips and integer translation as one exact gather, reflecting at the borders."""
    N, C, H, W = images.shape
    v, sources = vec64, []
    for flip, shift, n in ((v[:, 0:1], v[:, 2:3] * W, W), (v[:, 1:2], v[:, 3:4] * H, H)):
        # out[j] = in[reflect(j - shift)], mirrored afterwards: the mirror and the reflection commute
        source = _reflect(torch.arange(n, device=images.device)[None, :] - shift.round().long(), n)
        sources.append(torch.where(flip.ne(0), n - 1 - source, source))
    flat = (sources[1][:, :, None] * W + sources[0][:, None, :]).view(-1, 1, H * W)
    return images.reshape(N, C, H * W).gather(2, flat.expand(-1, C, -1)).view(N, C, H, W)


def _inverse_affine(vec64, size):
    """[N, 6] float32 (B00, B10, B01, B11, tx, ty): q_in = B (q_out - t) inverts q_out = t + 2^s M(a, phi) R(theta) q_in."""
    H, W = size
    log2s, (cm1, sin), (u, v) = vec64[:, 4], vec64[:, 5:7].T, vec64[:, 7:9].T
    cos = 1 + cm1
    # M^-1 = exp2(-[[u, v], [v, -u]]) = cosh(r ln2) I - sinh(r ln2) / r [[u, v], [v, -u]], r = |(u, v)|
    r = torch.hypot(u, v)
    ch = torch.cosh(r * math.log(2))
    sh_r = torch.where(r > 0, torch.sinh(r * math.log(2)) / r.clamp_min(1e-300), math.log(2))
    m00, m01, m11 = ch - sh_r * u, -sh_r * v, ch + sh_r * u
    # B = R(-theta) M^-1 / 2^s, written out elementwise: a batched matmul may round differently per batch size
    inv_s = torch.exp2(-log2s)
    # grid_sample's coordinates with align_corners=True: -1 and 1 are the centres of the border pixels
    norm_x, norm_y = inv_s * (2 / max(W - 1, 1)), inv_s * (2 / max(H - 1, 1))
    B = torch.stack([(cos * m00 + sin * m01) * norm_x, (cos * m01 - sin * m00) * norm_y,
                     (cos * m01 + sin * m11) * norm_x, (cos * m11 - sin * m01) * norm_y], 1)
    return torch.cat([B, vec64[:, 9:10] * W, vec64[:, 10:11] * H], 1).to(torch.float32)


def _resample(images, geometry):
    """The affine maps of `geometry`: upsample 2x, bilinear at the 2x grid, decimate 2x; per pixel, batch-independent."""
    n, C, H, W = images.shape
    up = _upsample(images)
    column_x, column_y, t = (geometry[:, i:i + 2, None, None].transpose(1, 3) for i in (0, 2, 4))  # [n, 1, 1, 2]
    # 2x-grid output positions in original pixels, relative to the centre, with margins for the decimator
    arange = lambda size: torch.arange(-_MARGIN, 2 * size - 1 + _MARGIN, device=images.device, dtype=torch.float32) / 2 - (size - 1) / 2
    xo = arange(W)[None, None, :, None] - t[..., 0:1]
    yo = arange(H)[None, :, None, None] - t[..., 1:2]
    grid = column_x * xo + column_y * yo  # [n, 2H - 1 + 2 margins, 2W - 1 + 2 margins, (x, y)]
    high = F.grid_sample(up, grid.to(up.dtype), mode="bilinear", padding_mode="reflection", align_corners=True)
    return _decimate(_decimate(high, 3), 2)


def _upsample(x):
    """[H, W] -> [2H - 1, 2W - 1]: the original samples kept, midpoints from the half-band taps (reflect-padded)."""
    n, C, H, W = x.shape
    K = len(_TAPS)
    reflected = lambda size: _reflect(torch.arange(-K, size + K, device=x.device), size)  # F.pad cannot pad past the size
    padded = x.index_select(2, reflected(H)).index_select(3, reflected(W))
    mid_x = _midpoints(padded, 3)  # [n, C, H + 2K, W - 1], still padded along y
    out = x.new_empty(n, C, H, 2, W, 2)
    out[:, :, :, 0, :, 0] = x
    out[:, :, :, 0, :W - 1, 1] = mid_x[:, :, K:K + H]
    out[:, :, :H - 1, 1, :, 0] = _midpoints(padded[:, :, :, K:K + W], 2)
    out[:, :, :H - 1, 1, :W - 1, 1] = _midpoints(mid_x, 2)
    return out.view(n, C, 2 * H, 2 * W)[:, :, :2 * H - 1, :2 * W - 1]


def _midpoints(padded, dim):
    """The n - 1 midpoints along `dim` of a signal reflect-padded by K: c_k (x[i+1-k] + x[i+k]) between i and i+1."""
    K = len(_TAPS)
    n = padded.shape[dim] - 2 * K - 1
    pair = lambda k, out=None: torch.add(padded.narrow(dim, K + 1 - k, n), padded.narrow(dim, K + k, n), out=out)
    mid, term = pair(1).mul_(_TAPS[0]), None
    for k, c in enumerate(_TAPS[1:], 2):
        term = pair(k, term).mul_(c)  # `term` reused: fresh CPU allocations cost more than the additions
        mid.add_(term)
    return mid


def _decimate(y, dim):
    """Half-band low-pass keeping every other sample, 2n - 1 + 2 * _MARGIN -> n along `dim`; each tap a contiguous slice."""
    K = len(_TAPS)
    n = (y.shape[dim] - 2 * _MARGIN + 1) // 2
    phase = lambda start: y.narrow(dim, start, y.shape[dim] - start).unfold(dim, 1, 2).squeeze(-1).contiguous()
    even, odd = phase(0), phase(1)
    acc, term = odd.narrow(dim, K - 1, n) * 0.5, None
    for k, c in enumerate(_TAPS, 1):
        term = torch.add(even.narrow(dim, K - k, n), even.narrow(dim, K + k - 1, n), out=term).mul_(c / 2)
        acc.add_(term)
    return acc
