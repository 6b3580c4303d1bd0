"""Non-leaky geometric augmentation for diffusion training (EDM, Karras et al. 2022, section 5 and appendix C).

Each training image gets each enabled transform independently with probability p, and the x-flip with a
probability of its own, augment.xflip (a flip that is applied always flips; EDM and ADA gate a flip and then flip
half of the gated images). EDM flips every image in x with probability 1/2 (its train.py passes xflip=1e8, so the
gate is always open): augment.xflip = 0.5. Its y-flip at p flips p/2 of the images; here yflip at p flips p.
The denoiser is conditioned on a vector that says what was done, and sampling passes the zero vector, so
samples follow the un-augmented distribution however often the training images were transformed.

Transforms, applied in this order (the order of StyleGAN2-ADA's geometric pipeline, Karras et al. 2020,
appendix B), with x to the right (columns) and y down (rows):
  xflip, yflip      mirror the columns / the rows.
  translate_int     move the content by a whole number of pixels, round(U(-m, m) * size), m = translate_int_max.
  scale_iso         magnify by 2^(N(0, scale_iso_std^2)) about the image centre (> 1 zooms in).
  rotate            rotate by U(-pi, pi) * rotate_max about the centre; a positive angle turns +x towards +y,
                    i.e. clockwise on screen.
  scale_aniso       stretch by 2^a along an axis at angle phi and by 2^-a across it, a ~ N(0, scale_aniso_std^2),
                    phi ~ U(0, pi) (ADA stretches along x after its pre-rotation; a random axis is the same
                    distribution without needing a rotation).
  translate_frac    move the content by N(0, translate_frac_std^2) * size, per axis.
The default strengths are StyleGAN2-ADA's (appendix B: integer translation up to 0.125 of the size, log2
isotropic scale std 0.2, rotation over the full circle, log2 anisotropic scale std 0.2, fractional
translation std 0.125 of the size), which EDM's augmentation reuses; EDM's train.py enables yflip,
isotropic scale, rotation, anisotropic scale and fractional translation (no integer translation) at
augment probability 0.12 for CIFAR-10, and the x-flip at 1/2.

Borders: reflection about the centres of the border pixels (numpy's pad mode 'reflect': ... 2 1 | 0 1 2 ...)
for every transform. Flips and integer translation are exact index operations (gathers); an image whose
resampling slots are all zero keeps its pixels bit-exactly (its resampled copy is dropped by a `where`).

Resampling (scale_iso, rotate, scale_aniso, translate_frac, composed into one affine map per image) is
anti-aliased the way ADA does it: upsample 2x with a low-pass filter, sample bilinearly at the 2x grid
(one grid_sample call for all images that need it), low-pass and decimate 2x. Why: bilinear sampling at
the original resolution folds the parts of the spectrum that a rotation or minification pushes above
Nyquist back into the image (moire), and its own interpolation error is large near Nyquist. At 2x the
image is band-limited to a quarter of the sampling rate, where bilinear's error is small, and the
decimating low-pass removes what the transform pushed above the output's Nyquist before it can fold.
The filter is a half-band Kaiser-windowed sinc (23 taps, beta 4): gain within 0.17 % of 1 up to 0.3 and
of 0 from 0.7 cycles per original pixel, 0.97 at 0.4, 0.5 at Nyquist, 0.03 at 0.6. Half-band means every
other tap is zero, so the 2x upsampling keeps the original samples exactly and both stages cost 6
multiply-adds per output. Both are written as sums of shifted slices: elementwise multiplies and adds,
each correctly rounded, so a pixel's value does not depend on the shape of the batch (a conv2d may choose
another algorithm, with another summation order, for another batch size). With the per-image parameters
computed on a padded batch (Augment._parameters), image i's output is bit-identical in any batch. Reflection at the 2x grid is
grid_sample's padding_mode='reflection' with align_corners=True, which reflects about the border samples,
the original border pixels, so it agrees with the index operations. The limit: minification by more than
2x along some axis (2^-1, i.e. 5 standard deviations of scale_iso at the default) aliases anyway.
The resampled pixels can overshoot [-1, 1] slightly (filter ringing); they are not clipped.

The conditioning vector, AUGMENT_DIM = 11 slots whichever transforms are enabled (SLOTS names them);
zero means not applied (a transform whose parameters came out as the identity, e.g. an integer
translation that rounds to 0 px, counts as not applied), and an image whose vector is zero is returned
bit-exactly:
  0 xflip (1 = flipped)   1 yflip (1 = flipped)
  2, 3 translate_int (x, y) in pixels / (width, height)
  4 scale_iso log2 s
  5, 6 rotate (cos(theta) - 1, sin(theta))
  7, 8 scale_aniso (a cos(2 phi), a sin(2 phi)): the stretch matrix is exp2([[a cos 2phi, a sin 2phi],
       [a sin 2phi, -a cos 2phi]]), so the pair determines it and is zero only for the identity
  9, 10 translate_frac (x, y) as a fraction of (width, height)
The fraction of images with any transform applied is applied_fraction(vectors), i.e. the mean over the
batch of (vectors != 0).any(1); per transform, (vectors[:, SLOTS[name]] != 0).any(1).

Randomness: everything comes in as one tensor of uniforms per image, NUM_DRAWS = 15 in a fixed layout
(DRAWS), drawn by the caller for the whole global batch from step_generator(seed, step) and sliced by rank;
normal variates come from the uniforms by the inverse CDF, sqrt(2) erfinv(2u - 1).
"""

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
    """c_1..c_K, the odd taps (offsets +-1, +-3, ..., +-(2K-1)) of a half-band Kaiser-windowed sinc at
    2x rate, normalised to sum 1/2 so that the interpolated midpoints preserve a constant exactly."""
    n = np.arange(1, 2 * K, 2)
    taps = np.sinc(n / 2) * np.kaiser(4 * K - 1, beta)[2 * K - 1 + n]
    return tuple(float(c) for c in taps / (2 * taps.sum()))


_TAPS = _halfband_taps()
_MARGIN = 2 * len(_TAPS) - 1  # 2x-grid samples the decimating filter reaches beyond the output


def step_generator(seed, step):
    """A CPU generator for one training step's draws, seeded from (seed, step) through numpy's SeedSequence,
    so that every (seed, step) pair gets an unrelated stream and no rank or device changes it."""
    state = np.random.SeedSequence([int(seed), int(step)]).generate_state(2, np.uint32)
    return torch.Generator().manual_seed(int(state[0]) | (int(state[1]) & 0x7FFFFFFF) << 32)


def applied_fraction(vectors):
    """Fraction of the batch with any transform applied, from the conditioning vectors (a tensor, on their device)."""
    return vectors.ne(0).any(1).float().mean()


def _normal(u):
    """Standard normal variates by the inverse CDF; u clamped off 0 and 1 so that |z| <= 5.5."""
    eps = 2.0 ** -25
    return math.sqrt(2) * torch.erfinv(2 * u.clamp(eps, 1 - eps) - 1)


def _reflect(i, n):
    """Index i folded into [0, n) by reflection about the border pixels (numpy 'reflect'), for any i."""
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


def _check_transforms(transforms):
    if not isinstance(transforms, (list, tuple)) or not all(isinstance(t, str) for t in transforms):
        raise UserError(f"augment.transforms must be a list of names from {', '.join(GATED)}; got {transforms!r}")
    if "xflip" in transforms:
        raise UserError(f"augment.transforms: the x-flip has a probability of its own, augment.xflip ({EDM_XFLIP:g} flips "
                        f"half the images, as EDM does); take xflip out of the list")
    unknown = [t for t in transforms if t not in GATED]
    if unknown:
        raise UserError(f"augment.transforms: unknown transform {unknown[0]!r}; known: {', '.join(GATED)}")
    return tuple(t for t in GATED if t in transforms)


def is_on(section):
    """Whether an `augment` config section transforms any image (network.augment_dim follows this)."""
    return section["xflip"] > 0 or (section["p"] > 0 and bool(section["transforms"]))


class Augment:
    """The augmentation pipeline: Augment(p, transforms, **strengths)(images, draws) -> (images, vectors).

    p in [0, 1]: probability of each enabled transform, per image, independently. transforms: names from
    GATED. xflip in [0, 1]: probability of the x-flip. strengths (defaults in STRENGTHS, ranges in
    STRENGTH_RANGES; see the module docstring):
      translate_int_max [0, 0.5]   integer translation up to this fraction of the size
      scale_iso_std [0, 1]         std of log2 of the isotropic scale
      rotate_max [0, 1]            rotation angle uniform in +-rotate_max * pi (1: the full circle)
      scale_aniso_std [0, 1]       std of log2 of the anisotropic stretch
      translate_frac_std [0, 0.5]  std of the fractional translation as a fraction of the size
    Bad values raise a one-line UserError naming augment.<key>."""

    def __init__(self, p, transforms=GATED, xflip=0.0, **strengths):
        unknown = [k for k in strengths if k not in STRENGTHS]
        if unknown:
            raise UserError(f"augment.{unknown[0]}: unknown key; allowed: p, xflip, transforms, {', '.join(STRENGTHS)}")
        self.p = _check_number("p", p, 0.0, 1.0)
        self.xflip = _check_number("xflip", xflip, 0.0, 1.0)
        self.transforms = _check_transforms(transforms)
        self.strengths = {k: _check_number(k, strengths.get(k, d), *STRENGTH_RANGES[k]) for k, d in STRENGTHS.items()}

    num_draws = NUM_DRAWS

    def draw(self, batch_size, generator=None):
        """float32 uniforms [batch_size, NUM_DRAWS] from `generator` (on its own device, so the numbers do not
        depend on where training runs). Draw for the global batch, then slice by rank:
        draw(global_batch, step_generator(seed, step))[rank * local:(rank + 1) * local]."""
        gen_device = generator.device if generator is not None else "cpu"
        return torch.rand([batch_size, NUM_DRAWS], generator=generator, device=gen_device, dtype=torch.float32)

    def vectors(self, draws, size):
        """The conditioning vectors [N, AUGMENT_DIM] (float64) for `draws` [N, NUM_DRAWS] and images of size
        (H, W); a transform's slots are zero where its gate u >= p or it is not enabled."""
        return self._parameters(draws, size)[0]

    def _parameters(self, draws, size):
        """(vectors in float64, the resampling geometry [N, 6] in float32, see _inverse_affine). Computed on
        the draws padded to a multiple of 64 rows: a CPU kernel runs a remainder that does not fill its SIMD
        loop through scalar code, whose float64 exp2/sinh/cosh can differ in the last bit, so without the
        padding an image's parameters could depend on the size of its batch."""
        N = draws.shape[0]
        draws = torch.cat([draws, draws.new_full([-N % 64, NUM_DRAWS], 0.5)]).to(torch.float64)
        vec64 = self._vectors(draws, size)
        return vec64[:N], _inverse_affine(vec64, size)[:N]

    def _vectors(self, draws, size):
        """The vectors from float64 draws, by the distributions of the module docstring."""
        H, W = size
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
            "xflip": torch.ones_like(u["xflip"]),
            "yflip": torch.ones_like(u["yflip"]),
            "translate_int": shift,
            "scale_iso": st["scale_iso_std"] * _normal(u["scale_iso"][:, 1:2]),
            # cos - 1 as -2 sin^2(theta / 2): no cancellation for small angles
            "rotate": torch.stack([-2 * (theta / 2).sin() ** 2, theta.sin()], 1),
            "scale_aniso": torch.stack([a * (2 * phi).cos(), a * (2 * phi).sin()], 1),
            "translate_frac": st["translate_frac_std"] * _normal(u["translate_frac"][:, 1:3]),
        }
        return torch.cat([torch.where(on[t][:, None], parts[t], 0.0) for t in TRANSFORMS], 1) + 0.0  # -0.0 -> 0.0

    def __call__(self, images, draws):
        """(augmented images, float32 vectors [N, AUGMENT_DIM]) for images [N, C, H, W] in [-1, 1] and
        draws [N, NUM_DRAWS] (from draw(), sliced). Row i depends only on images[i] and draws[i]. Images
        left unchanged are bit-exact copies; with augmentation off (is_on) the input tensor itself is returned."""
        N, C, H, W = images.shape
        if draws.shape != (N, NUM_DRAWS):
            raise ValueError(f"draws must have shape [{N}, {NUM_DRAWS}], got {list(draws.shape)}")
        if not is_on(dict(p=self.p, xflip=self.xflip, transforms=self.transforms)):
            return images, torch.zeros([N, AUGMENT_DIM], device=images.device)
        vec64, geometry = self._parameters(draws if draws.device == images.device else draws.to(images.device), (H, W))
        vectors = vec64.to(torch.float32)
        # Every image goes through every stage and `where` keeps the untouched ones bit-exact: which images a draw
        # transforms never has to reach the host (no nonzero(), no host sync), as EDM's pipe applies identity
        # transforms to the images it leaves alone.
        out = _index_ops(images, vec64)
        resampled = vectors[:, RESAMPLED].ne(0).any(1)
        return torch.where(resampled[:, None, None, None], _resample(out, geometry), out), vectors


def _index_ops(images, vec64):
    """Flips and integer translation as one exact gather, reflection at the borders (the identity gather for an
    image that is neither flipped nor shifted)."""
    N, C, H, W = images.shape
    v = vec64
    sources = []
    for flip, shift, n in ((v[:, 0:1], v[:, 2:3] * W, W), (v[:, 1:2], v[:, 3:4] * H, H)):
        # out[j] = in[reflect(j - shift)], mirrored afterwards: the mirror and the reflection commute
        source = _reflect(torch.arange(n, device=images.device)[None, :] - shift.round().long(), n)
        sources.append(torch.where(flip.ne(0), n - 1 - source, source))
    flat = (sources[1][:, :, None] * W + sources[0][:, None, :]).view(-1, 1, H * W)
    return images.reshape(N, C, H * W).gather(2, flat.expand(-1, C, -1)).view(N, C, H, W)


def _inverse_affine(vec64, size):
    """The resampling transforms of the vectors as [N, 6] float32, (B00, B10, B01, B11, tx, ty): the forward
    map about the image centre is q_out = t + 2^s M(a, phi) R(theta) q_in (t in pixels), B its inverse
    linear part, so that q_in = B (q_out - t); B's rows are scaled to grid_sample's [-1, 1] coordinates."""
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
    """The affine maps of `geometry` ([n, 6], see _inverse_affine) applied to images: upsample 2x, bilinear
    at the 2x grid, decimate 2x. From here on only elementwise float32 arithmetic and grid_sample's per-pixel
    interpolation, so a pixel's value does not depend on the batch."""
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
    """2x in both axes ([H, W] -> [2H - 1, 2W - 1]): the original samples kept, the midpoints from the
    half-band taps, on the image reflect-padded by the filter's reach; the four phases are interleaved once."""
    n, C, H, W = x.shape
    K = len(_TAPS)
    if min(H, W) > K:
        padded = F.pad(x, (K, K, K, K), mode="reflect")
    else:  # F.pad cannot reflect by more than the size
        padded = x.index_select(2, _reflect(torch.arange(-K, H + K, device=x.device), H))
        padded = padded.index_select(3, _reflect(torch.arange(-K, W + K, device=x.device), W))
    mid_x = _midpoints(padded, 3)  # [n, C, H + 2K, W - 1], still padded along y
    out = x.new_empty(n, C, H, 2, W, 2)
    out[:, :, :, 0, :, 0] = x
    out[:, :, :, 0, :W - 1, 1] = mid_x[:, :, K:K + H]
    out[:, :, :H - 1, 1, :, 0] = _midpoints(padded[:, :, :, K:K + W], 2)
    out[:, :, :H - 1, 1, :W - 1, 1] = _midpoints(mid_x, 2)
    return out.view(n, C, 2 * H, 2 * W)[:, :, :2 * H - 1, :2 * W - 1]


def _midpoints(padded, dim):
    """The n - 1 midpoints along `dim` of a signal reflect-padded there by K = len(_TAPS) samples."""
    K = len(_TAPS)
    n = padded.shape[dim] - 2 * K
    mid, term = None, None
    for k, c in enumerate(_TAPS, 1):
        # the midpoint between samples i and i+1 takes i+1-k and i+k, at 2x offsets -(2k-1) and 2k-1;
        # `term` is reused because fresh CPU allocations cost more than the additions
        term = torch.add(padded.narrow(dim, K + 1 - k, n - 1), padded.narrow(dim, K + k, n - 1), out=term).mul_(c)
        if mid is None:
            mid, term = term, None
        else:
            mid.add_(term)
    return mid


def _decimate(y, dim):
    """Low-pass with the half-band filter (unit DC gain) and keep every other sample, dropping the margins:
    2n - 1 + 2 * _MARGIN -> n samples along `dim`. The kept samples (odd indices, as _MARGIN is odd) meet
    the nonzero taps on the even ones, so both phases are split off once and every tap is a contiguous slice."""
    K = len(_TAPS)
    n = (y.shape[dim] - 2 * _MARGIN + 1) // 2
    phase = lambda start: y.narrow(dim, start, y.shape[dim] - start).unfold(dim, 1, 2).squeeze(-1).contiguous()
    even, odd = phase(0), phase(1)
    acc, term = odd.narrow(dim, K - 1, n) * 0.5, None
    for k, c in enumerate(_TAPS, 1):
        term = torch.add(even.narrow(dim, K - k, n), even.narrow(dim, K + k - 1, n), out=term).mul_(c / 2)
        acc.add_(term)
    return acc
