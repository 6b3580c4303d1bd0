"""tools/augment.py: exact index transforms, identity pass-through, anti-aliased resampling, vectors that
say what was done, batch independence, gate rates, and one-line UserErrors for bad settings."""

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from tools.augment import AUGMENT_DIM, DEFAULTS, DRAWS, NUM_DRAWS, SLOTS, STRENGTHS, TRANSFORMS, Augment
from tools.cli import UserError
from tools.rng import AUGMENT_DRAWS, generator

RESAMPLING = ("scale_iso", "rotate", "scale_aniso", "translate_frac")
RESAMPLING_SLOTS = slice(SLOTS["scale_iso"].start, SLOTS["translate_frac"].stop)


def manual_draws(n, **params):
    """Draws with every gate closed (u = 1 is never < p) except the transforms named, each given as
    (gate, *parameter uniforms) broadcast over the n images."""
    draws = torch.full([n, NUM_DRAWS], 0.5)
    draws[:, [DRAWS[t].start for t in TRANSFORMS]] = 1.0
    for name, values in params.items():
        draws[:, DRAWS[name]] = torch.as_tensor(values, dtype=torch.float32)
    return draws


def grid(H, W):
    y, x = np.meshgrid(np.arange(H, dtype=np.float64), np.arange(W, dtype=np.float64), indexing="ij")
    return x, y


def blobs(x, y, H, W):
    """A smooth, asymmetric test picture as a function of continuous pixel coordinates: two Gaussian blobs
    (sigma 3 and 2.5 px, well inside the image so its border is ~0 and reflection does not matter)."""
    cx, cy = (W - 1) / 2, (H - 1) / 2
    return (np.exp(-((x - cx - 3) ** 2 + (y - cy + 1) ** 2) / (2 * 3.0 ** 2))
            - 0.7 * np.exp(-((x - cx + 2) ** 2 + (y - cy - 4) ** 2) / (2 * 2.5 ** 2)))


def as_batch(picture):
    return torch.tensor(picture, dtype=torch.float32)[None, None]


def rot(angle):
    return np.array([[math.cos(angle), -math.sin(angle)], [math.sin(angle), math.cos(angle)]])


def expected_map(vector, H, W):
    """From one conditioning vector and the documented semantics alone, the forward map of the resampling
    transforms, q_out = t + 2^s M R(theta) q_in about the centre: returns (A, t) with t in pixels."""
    s = 2.0 ** vector[SLOTS["scale_iso"]][0]
    cm1, sin = vector[SLOTS["rotate"]]
    theta = math.atan2(sin, 1 + cm1)
    u, v = vector[SLOTS["scale_aniso"]]
    a, phi = math.hypot(u, v), math.atan2(v, u) / 2
    M = rot(phi) @ np.diag([2.0 ** a, 2.0 ** -a]) @ rot(-phi)
    t = vector[SLOTS["translate_frac"]] * np.array([W, H])
    return s * M @ rot(theta), t


def render_expected(picture_fn, vector, H, W):
    """The picture after the transforms of `vector`, rendered analytically: each output pixel evaluates the
    picture at q_in = A^-1 (q_out - c - t) + c."""
    A, t = expected_map(vector, H, W)
    x, y = grid(H, W)
    c = np.array([(W - 1) / 2, (H - 1) / 2])
    q = np.stack([x - c[0] - t[0], y - c[1] - t[1]])
    q_in = np.einsum("ij,jhw->ihw", np.linalg.inv(A), q)
    return picture_fn(reflect(q_in[0] + c[0], W), reflect(q_in[1] + c[1], H), H, W)


def reflect(x, n):
    """A coordinate folded into [0, n - 1] by mirroring about the border pixels' centres."""
    x = np.mod(x, 2 * (n - 1))
    return np.minimum(x, 2 * (n - 1) - x)


def test_flips_and_integer_translation_equal_numpy_reflect_indexing():
    N, C, H, W = 64, 2, 12, 16
    images = torch.rand(N, C, H, W) * 2 - 1
    aug = Augment(0.6, ("yflip", "translate_int"), xflip=0.6, translate_int_max=0.5)
    out, vectors = aug(images, aug.draw(N, generator(1, 2, AUGMENT_DRAWS)))
    v = vectors.numpy()
    assert set(np.unique(v[:, :2])) == {0.0, 1.0} and np.abs(v[:, 4:]).max() == 0
    shifts = np.rint(v[:, 2:4] * [W, H]).astype(int)
    assert len({tuple(s) for s in shifts}) > 10 and np.all(np.abs(shifts) <= [8, 6]) and np.abs(shifts).max() >= 6
    for i in range(N):
        ref = images[i].numpy()
        if v[i, 0]:
            ref = ref[:, :, ::-1]
        if v[i, 1]:
            ref = ref[:, ::-1, :]
        P = 8
        padded = np.pad(ref, ((0, 0), (P, P), (P, P)), mode="reflect")
        tx, ty = shifts[i]
        ref = padded[:, P - ty:P - ty + H, P - tx:P - tx + W]  # content moves by +(tx, ty)
        np.testing.assert_array_equal(out[i].numpy(), ref)


@pytest.mark.parametrize("transforms,strengths", [
    (("rotate",), {"rotate_max": 0.0}),
    (("scale_iso",), {"scale_iso_std": 0.0}),
    (("scale_aniso",), {"scale_aniso_std": 0.0}),
    (("translate_frac",), {"translate_frac_std": 0.0}),
    (("translate_int",), {"translate_int_max": 0.0}),
    (TRANSFORMS[2:], {k: 0.0 for k in STRENGTHS}),
])
def test_zero_strength_is_the_identity_bit_exactly(transforms, strengths):
    images = torch.randn(32, 3, 16, 16)
    aug = Augment(1.0, transforms, **strengths)
    out, vectors = aug(images, aug.draw(32, generator(0, 0, AUGMENT_DRAWS)))
    assert torch.equal(out, images) and not vectors.any()


def test_p0_returns_the_input_itself_and_zero_vectors():
    images = torch.randn(16, 3, 8, 8)
    out, vectors = Augment(**DEFAULTS)(images, torch.rand(16, NUM_DRAWS))
    assert DEFAULTS["p"] == 0 and out is images and vectors.shape == (16, AUGMENT_DIM) and not vectors.any()


@pytest.mark.parametrize("size", [4, 16, 32])
def test_a_constant_image_stays_constant(size):
    """Every stage keeps a constant (filters of unit DC gain, reflection), also for images smaller than
    the filter's reach."""
    aug = Augment(1.0)
    out, vectors = aug(torch.full([8, 2, size, size], 0.37), aug.draw(8, generator(0, size, AUGMENT_DRAWS)))
    assert vectors[:, RESAMPLING_SLOTS].ne(0).all(1).all()
    assert (out - 0.37).abs().max() < 1e-5


def test_vector_is_zero_exactly_for_the_untouched_images():
    images = torch.randn(400, 1, 16, 16)
    aug = Augment(0.1)
    out, vectors = aug(images, aug.draw(400, generator(3, 4, AUGMENT_DRAWS)))
    untouched = ~vectors.ne(0).any(1)
    assert 100 < untouched.sum() < 300
    assert torch.equal(out[untouched], images[untouched])
    assert (out[~untouched] != images[~untouched]).flatten(1).any(1).all()
    assert vectors.ne(0).any(1).float().mean() == pytest.approx(1 - untouched.float().mean().item())


def test_resampling_vectors_encode_the_transform_applied():
    """Every resampling transform at once with random strengths; each output against the picture rendered
    analytically from its vector (blobs are band-limited, so the only error is the filters' passband ripple)."""
    N, H, W = 24, 32, 32
    picture = as_batch(blobs(*grid(H, W), H, W)).expand(N, 1, H, W)
    aug = Augment(1.0, RESAMPLING)
    out, vectors = aug(picture, aug.draw(N, generator(5, 6, AUGMENT_DRAWS)))
    assert vectors[:, SLOTS["rotate"]].ne(0).all() and vectors[:, SLOTS["scale_aniso"]].ne(0).all()
    errors = [np.abs(out[i, 0].numpy() - render_expected(blobs, vectors[i].double().numpy(), H, W)).max() for i in range(N)]
    assert max(errors) < 0.02, errors
    # a wrong convention (e.g. the rotation's sign) would be off by the size of the picture
    i = vectors[:, SLOTS["rotate"].stop - 1].abs().argmax()
    flipped = vectors[i].double().numpy().copy()
    flipped[SLOTS["rotate"].stop - 1] *= -1
    assert np.abs(out[i, 0].numpy() - render_expected(blobs, flipped, H, W)).max() > 0.2


def test_rotation_then_inverse_restores_the_interior():
    H = W = 32
    x, y = grid(H, W)
    picture = as_batch(np.sin(2 * np.pi * (0.07 * x + 0.04 * y)) * np.cos(2 * np.pi * 0.05 * y))
    aug = Augment(1.0, ("rotate",))
    u = 0.61  # theta = (2u - 1) pi; 1 - u gives -theta
    there, v1 = aug(picture, manual_draws(1, rotate=[0.0, u]))
    back, v2 = aug(there, manual_draws(1, rotate=[0.0, 1 - u]))
    assert v1[0, 6] == pytest.approx(math.sin(0.22 * math.pi)) and v2[0, 6] == pytest.approx(-v1[0, 6])
    interior = (x - 15.5) ** 2 + (y - 15.5) ** 2 < 10 ** 2  # never touched by the reflected border
    error = (back - picture)[0, 0].numpy()[interior]
    assert np.abs(error).max() < 0.03
    assert np.abs((there - picture)[0, 0].numpy()[interior]).max() > 0.5


def test_scale_then_inverse_scale_restores_the_interior():
    H = W = 32
    x, y = grid(H, W)
    picture = as_batch(np.cos(2 * np.pi * (0.06 * x - 0.05 * y)) + 0.5 * np.sin(2 * np.pi * 0.09 * x))
    aug = Augment(1.0, ("scale_iso",), scale_iso_std=0.5)
    u = 0.9  # z = Phi^-1(u); 1 - u gives -z, so 2^(0.5 z) and then its inverse
    there, v1 = aug(picture, manual_draws(1, scale_iso=[0.0, u]))
    back, v2 = aug(there, manual_draws(1, scale_iso=[0.0, 1 - u]))
    assert v1[0, 4] > 0.5 and v2[0, 4] == pytest.approx(-v1[0, 4])
    interior = (slice(8, 24), slice(8, 24))
    assert np.abs((back - picture)[0, 0].numpy()[interior]).max() < 0.03
    assert np.abs((there - picture)[0, 0].numpy()[interior]).max() > 0.5


def naive_rotate(images, theta):
    """Bilinear rotation at the image's own resolution, the aliasing baseline."""
    c, s = math.cos(theta), math.sin(theta)
    inverse = torch.tensor([[[c, s, 0.0], [-s, c, 0.0]]], dtype=torch.float32)
    g = F.affine_grid(inverse, list(images.shape), align_corners=False)
    return F.grid_sample(images, g, mode="bilinear", padding_mode="reflection", align_corners=False)


def test_rotated_fine_pattern_above_nyquist_is_removed_not_aliased():
    """A diagonal sinusoid at (0.45, 0.45) cycles/px is representable, but rotated by 45 degrees it lies
    along an axis at 0.64 cycles/px, above Nyquist (0.5): the correct image is flat. Naive bilinear
    rotation folds it to a visible 0.36 cycles/px pattern instead."""
    H = W = 32
    x, y = grid(H, W)
    picture = as_batch(np.cos(2 * np.pi * 0.45 * (x + y)))
    aug = Augment(1.0, ("rotate",))
    ours, _ = aug(picture, manual_draws(1, rotate=[0.0, 0.625]))  # theta = pi / 4
    interior = (slice(6, 26), slice(6, 26))
    rms = lambda img: float(np.sqrt((img[0, 0].numpy()[interior] ** 2).mean()))
    assert rms(picture) == pytest.approx(math.sqrt(0.5), rel=0.05)
    assert rms(ours) < 0.02
    assert rms(naive_rotate(picture, math.pi / 4)) > 0.15


def test_rotated_pattern_below_nyquist_keeps_its_contrast():
    """The anti-aliasing must not simply blur: a 0.25 cycles/px sinusoid rotated by 30 degrees matches its
    analytic rendering at the rotated angle."""
    H = W = 32
    x, y = grid(H, W)
    f = lambda x, y, H, W: np.cos(2 * np.pi * 0.25 * (0.8 * x + 0.6 * y) + 0.3)
    aug = Augment(1.0, ("rotate",))
    out, vectors = aug(as_batch(f(x, y, H, W)), manual_draws(1, rotate=[0.0, 7 / 12]))  # theta = pi / 6
    expected = render_expected(f, vectors[0].double().numpy(), H, W)
    interior = (slice(6, 26), slice(6, 26))
    assert np.abs(out[0, 0].numpy()[interior] - expected[interior]).max() < 0.15


def test_an_image_does_not_depend_on_its_batch():
    aug = Augment(0.7)
    images, draws = torch.rand(12, 3, 16, 16) * 2 - 1, aug.draw(12, generator(7, 8, AUGMENT_DRAWS))
    alone, alone_v = aug(images, draws)
    others, other_draws = torch.rand(5, 3, 16, 16) * 2 - 1, aug.draw(5, generator(9, 9, AUGMENT_DRAWS))
    picks = [3, 7, 11]
    mixed = torch.cat([others[:2], images[picks], others[2:]])
    mixed_draws = torch.cat([other_draws[:2], draws[picks], other_draws[2:]])
    together, together_v = aug(mixed, mixed_draws)
    assert alone_v[picks, RESAMPLING_SLOTS].ne(0).any(1).all()
    assert torch.equal(together[2:5], alone[picks]) and torch.equal(together_v[2:5], alone_v[picks])


def test_each_transform_is_applied_with_probability_p_and_the_xflip_with_its_own():
    N, p, q, size = 20000, 0.3, 0.5, 32
    aug = Augment(p, xflip=q)
    vectors = aug.vectors(aug.draw(N, generator(11, 12, AUGMENT_DRAWS)), (size, size))
    applied = {t: vectors[:, s].ne(0).any(1).double() for t, s in SLOTS.items()}
    # integer translation can round to (0, 0): P = (0.5 / (0.125 * 32))^2 = 1/64 for U(-4, 4) px per axis
    rate = {t: p * (1 - 1 / 64) if t == "translate_int" else q if t == "xflip" else p for t in TRANSFORMS}
    for t in TRANSFORMS:
        tolerance = 4 * math.sqrt(rate[t] * (1 - rate[t]) / N)
        assert abs(applied[t].mean().item() - rate[t]) < tolerance, t
    both = (applied["xflip"] * applied["rotate"]).mean().item()
    assert abs(both - q * p) < 4 * math.sqrt(q * p / N)
    none = np.prod([1 - r for r in rate.values()])
    assert abs(vectors.ne(0).any(1).float().mean() - (1 - none)) < 4 * math.sqrt(none * (1 - none) / N)


def test_parameters_follow_the_documented_distributions():
    N = 20000
    aug = Augment(1.0)
    v = aug.vectors(aug.draw(N, generator(13, 14, AUGMENT_DRAWS)), (32, 32)).numpy()
    assert np.std(v[:, 4]) == pytest.approx(0.2, rel=0.03) and abs(np.mean(v[:, 4])) < 0.01
    theta = np.arctan2(v[:, 6], 1 + v[:, 5])
    assert np.histogram(theta, bins=8, range=(-np.pi, np.pi))[0] == pytest.approx(np.full(8, N / 8), rel=0.08)
    assert np.mean(v[:, 7] ** 2 + v[:, 8] ** 2) == pytest.approx(0.2 ** 2, rel=0.05)  # E a^2
    axis = np.arctan2(v[:, 8], v[:, 7])  # 2 phi, uniform over the circle
    assert np.histogram(axis, bins=8, range=(-np.pi, np.pi))[0] == pytest.approx(np.full(8, N / 8), rel=0.08)
    assert np.std(v[:, 9:11], axis=0) == pytest.approx([0.125, 0.125], rel=0.03)
    pixels = np.rint(v[:, 2:4] * 32)
    assert pixels.min() == -4 and pixels.max() == 4 and np.all(pixels == v[:, 2:4] * 32)


def test_draws_depend_on_seed_and_step_only():
    aug = Augment(0.5)
    a, b = aug.draw(8, generator(1, 5, AUGMENT_DRAWS)), aug.draw(8, generator(1, 5, AUGMENT_DRAWS))
    assert a.dtype == torch.float32 and a.shape == (8, NUM_DRAWS) and torch.equal(a, b)
    assert not torch.equal(a, aug.draw(8, generator(1, 6, AUGMENT_DRAWS))) and not torch.equal(a, aug.draw(8, generator(2, 5, AUGMENT_DRAWS)))


@pytest.mark.parametrize("kwargs,message", [
    ({"p": -0.1}, "augment.p must be in [0, 1], got -0.1"),
    ({"p": 1.5}, "augment.p must be in [0, 1], got 1.5"),
    ({"p": float("nan")}, "augment.p must be in [0, 1], got nan"),
    ({"p": "0.1"}, "augment.p must be a number"),
    ({"p": 0.1, "transforms": ["yflip", "spin"]}, "augment.transforms: unknown transform 'spin'"),
    ({"p": 0.1, "transforms": ["xflip", "yflip"]}, "the x-flip has a probability of its own, augment.xflip"),
    ({"p": 0.1, "xflip": 1.5}, "augment.xflip must be in [0, 1], got 1.5"),
    ({"p": 0.1, "transforms": "xflip"}, "augment.transforms must be a list of names"),
    ({"p": 0.1, "rotate_max": -1}, "augment.rotate_max must be in [0, 1], got -1"),
    ({"p": 0.1, "scale_iso_std": -0.2}, "augment.scale_iso_std must be in [0, 1], got -0.2"),
    ({"p": 0.1, "translate_int_max": 0.6}, "augment.translate_int_max must be in [0, 0.5], got 0.6"),
    ({"p": 0.1, "scale_aniso_std": float("inf")}, "augment.scale_aniso_std must be in [0, 1], got inf"),
    ({"p": 0.1, "translate_frac_std": -0.01}, "augment.translate_frac_std must be in [0, 0.5], got -0.01"),
    ({"p": 0.1, "rotation": 1}, "augment.rotation: unknown key"),
])
def test_bad_settings_raise_a_one_line_user_error(kwargs, message):
    with pytest.raises(UserError) as e:
        Augment(**kwargs)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_matches_cpu():
    aug = Augment(1.0, xflip=0.5)
    images, draws = torch.rand(64, 3, 32, 32) * 2 - 1, aug.draw(64, generator(0, 1, AUGMENT_DRAWS))
    cpu, cpu_v = aug(images, draws)
    gpu, gpu_v = aug(images.cuda(), draws)
    assert gpu.device.type == "cuda" and gpu_v.device.type == "cuda"
    assert torch.allclose(gpu_v.cpu(), cpu_v, atol=1e-6) and torch.allclose(gpu.cpu(), cpu, atol=1e-4)
