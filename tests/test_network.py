"""Properties of the C/E/G networks and the EDM wrapper: magnitudes, parameter counts, dropout, loss head."""

import ast
import importlib
import inspect

import pytest
import torch

from tools.augment import AUGMENT_DIM
from tools.config import build_edm, build_network, load_config
from tools.data import load_dataset, to_float
from tools.mp import force_weight_norm_, normalize

SMALL = dict(img_resolution=32, img_channels=3, model_channels=32, channel_mult=[1, 2, 2, 2], num_blocks=2,
             attn_resolutions=[16], channels_per_head=32, dropout=0)


def unet(cfg, **kwargs):
    return importlib.import_module(f"unet{cfg}").UNet(**{**SMALL, **kwargs})


def block_rms(net, x, c_noise):
    """(name, RMS entering, RMS leaving) for every encoder and decoder block."""
    rows, hooks = [], []
    for name, m in list(net.enc.items()) + list(net.dec.items()):
        hooks.append(m.register_forward_hook(lambda m, i, o, name=name: rows.append(
            (name, i[0].square().mean().sqrt().item(), o.square().mean().sqrt().item()))))
    with torch.no_grad():
        net.eval()(x, c_noise)
    for h in hooks:
        h.remove()
    return rows


# G's layers are all magnitude preserving, so every block sees and emits unit RMS up to what the test
# network averages over (32-256 channels, 16 samples) and the correlation of the residual branch with
# the main path at init: both move single blocks by at most ~25% (seen: 0.76 .. 1.08).
G_BAND = (0.7, 1.3)


def test_G_block_magnitudes_at_init():
    torch.manual_seed(0)
    rows = block_rms(unet("G"), torch.randn(16, 3, 32, 32), torch.randn(16))
    assert len(rows) == 29
    for name, rms_in, rms_out in rows:
        assert G_BAND[0] < rms_in < G_BAND[1] and G_BAND[0] < rms_out < G_BAND[1], (name, rms_in, rms_out)


# C and E keep ADM's plain residual sums x + y (no 1/sqrt(2), no mp_sum): the paper makes the sums
# magnitude preserving only in step G. So at init the main path's variance grows by the branch's
# variance in every block, and the RMS roughly doubles from the input to the bottleneck (seen:
# 0.95 -> 1.93 for both); group norms keep every branch's input at unit scale, so nothing explodes.
@pytest.mark.parametrize("cfg", ["C", "E"])
def test_C_E_residual_sums_add_variance(cfg):
    torch.manual_seed(0)
    net = unet(cfg).eval()
    branch = {}
    Block = importlib.import_module(f"block{cfg}").Block
    plain = [name for name, b in net.enc.items() if isinstance(b, Block) and b.conv_skip is None and b.num_heads == 0
             and b.resample_mode == "keep"]
    assert len(plain) == 6
    for name in plain:
        net.enc[name].conv_res1.register_forward_hook(lambda m, i, o, name=name: branch.__setitem__(name, o.square().mean().sqrt().item()))
    rows = block_rms(net, torch.randn(16, 3, 32, 32), torch.randn(16))
    enc = {name: (a, b) for name, a, b in rows[1:len(net.enc)]}  # the encoder's blocks (rows[0] is its input conv)
    for name in plain:  # identity shortcut: out^2 = in^2 + branch^2 for uncorrelated x and y (seen: within 4%)
        rms_in, rms_out = enc[name]
        assert rms_out == pytest.approx((rms_in ** 2 + branch[name] ** 2) ** 0.5, rel=0.08), name
    first_in, bottleneck_out = rows[1][1], rows[len(net.enc) + 1][2]  # entering enc.32x32_block0, leaving dec.4x4_in1
    assert 1.5 < bottleneck_out / first_in < 3, (first_in, bottleneck_out)


@pytest.mark.parametrize("cfg", ["C", "E"])
def test_learned_layer_magnitude(cfg):
    """Step D: E's learned layers map unit-RMS inputs to unit-RMS outputs whatever the weights' norm (the
    weight is normalised in the graph); C's He-initialised layers do so only at init and scale with the
    weights, which is how their activations drift during training."""
    torch.manual_seed(0)
    conv = importlib.import_module(f"block{cfg}").Conv(256, 128, kernel=(3, 3))
    x = torch.randn(8, 256, 16, 16)
    rms = lambda t: t.square().mean().sqrt().item()
    with torch.no_grad():
        at_init = rms(conv(x))
        conv.weight.mul_(7)
        grown = rms(conv(x))
    assert at_init == pytest.approx(1, abs=0.05)
    expected = at_init if cfg == "E" else 7 * at_init
    assert grown == pytest.approx(expected, rel=1e-3)  # E: up to the eps = 1e-4 of normalize()


@pytest.mark.parametrize("cfg", ["E", "G"])
def test_forced_weight_norm_after_optimizer_step(cfg):
    net = unet(cfg)
    for name, p in net.named_parameters():  # open the zero-initialised gains so that every weight gets a gradient
        if name.endswith("gain"):
            p.data.fill_(1)
    force_weight_norm_(net)
    opt = torch.optim.Adam(net.parameters(), lr=0.5)
    net.train()(torch.randn(4, 3, 32, 32), torch.randn(4)).square().mean().backward()
    opt.step()
    weights = [m.weight for m in net.modules() if getattr(m, "forced_weight_norm", False)]
    assert len(weights) > 50
    row_rms = lambda w: w.flatten(1).square().mean(dim=1).sqrt()
    assert any((row_rms(w) - 1).abs().max() > 0.01 for w in weights), "the step should have moved the norms"
    expected = [normalize(w.detach().clone()) for w in weights]  # each weight on its own, as the paper writes it
    force_weight_norm_(net)
    for w, e in zip(weights, expected):
        torch.testing.assert_close(row_rms(w), torch.ones(w.shape[0]), atol=1e-3, rtol=0)
        torch.testing.assert_close(w.detach(), e, rtol=1e-6, atol=1e-7)  # batched by fan-in, the same numbers


def test_config_C_has_no_forced_normalisation():
    assert not any(getattr(m, "forced_weight_norm", False) for m in unet("C").modules())


def test_G_output_is_c_skip_x_at_init():
    edm = build_edm(load_config("config/digits/G.yaml"))
    x = torch.randn(8, 1, 16, 16)
    sigma = torch.tensor([0.002, 0.05, 0.3, 0.5, 1.0, 5.0, 20.0, 80.0])
    c_skip = 0.25 / (sigma ** 2 + 0.25)
    torch.testing.assert_close(edm.denoiser(x, sigma), c_skip.reshape(-1, 1, 1, 1) * x, rtol=0, atol=0)


# Reference parameter counts, each to be met within 0.01%: the paper's EDM2-S table for ImageNet-64 with
# 1000 classes (C, D, E 277.8M; F, G 280.2M) and the small-data reference networks (CIFAR C/E 39.51M,
# G 39.54M; Tiny-ImageNet C/E 62.41M, G 62.45M). A C or E network carrying step F's encoder blocks and
# one-layer embedding (39.54M at CIFAR, 280.2M at EDM2-S) misses its count by 0.08% / 0.86%.
EDM2_S = dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=[1, 2, 3, 4],
              emb_channels=768, num_blocks=3, attn_resolutions=[16, 8])
REFERENCE_COUNTS = [
    ("config/cifar10/C.yaml", 39.51e6), ("config/cifar10/E.yaml", 39.51e6), ("config/cifar10/G.yaml", 39.54e6),
    ("config/cifar100/C.yaml", 39.51e6), ("config/cifar100/E.yaml", 39.51e6), ("config/cifar100/G.yaml", 39.54e6),
    ("config/tinyimagenet/C.yaml", 62.41e6), ("config/tinyimagenet/E.yaml", 62.41e6), ("config/tinyimagenet/G.yaml", 62.45e6),
    ("EDM2-S/C", 277.8e6), ("EDM2-S/E", 277.8e6), ("EDM2-S/G", 280.2e6),
]


def count_parameters(path, *overrides):
    """The network's parameters; the shipped configs' augmentation layer is left out (augment.p=0, xflip=0) to compare with the
    references, which have none."""
    with torch.device("meta"):
        no_augment = ["augment.p=0", "augment.xflip=0"]
        net = unet(path[-1], **EDM2_S) if path.startswith("EDM2-S") else build_network(load_config(path, [*no_augment, *overrides]))
    return sum(p.numel() for p in net.parameters())


@pytest.mark.parametrize("path,reference", REFERENCE_COUNTS)
def test_parameter_counts(path, reference):
    count = count_parameters(path)
    assert abs(count / reference - 1) < 1e-4, count


def test_parameter_counts_exact():
    """The exact integers behind the rounded references: the small-data reference C/E network has
    39,509,888 parameters at CIFAR and 277,045,056 at EDM2-S without its 768 x 1000 class embedding."""
    assert count_parameters("config/cifar10/C.yaml") == count_parameters("config/cifar10/E.yaml") == 39_509_888
    assert count_parameters("EDM2-S/C") == count_parameters("EDM2-S/E") == 277_045_056 + 768 * 1000


@pytest.mark.parametrize("path", ["config/cifar10/C.yaml", "config/cifar10/E.yaml", "config/cifar10/G.yaml"])
def test_augmentation_adds_one_bias_free_layer_into_the_noise_features(path):
    """augment.p > 0 adds exactly the augmentation embedding: AUGMENT_DIM x noise channels (128) weights."""
    assert count_parameters(path, "augment.p=0.12") - count_parameters(path) == AUGMENT_DIM * 128


def test_parallel_files_share_names_and_signatures():
    """The C/E/G files differ in the paper's steps only: same classes, same constructor arguments in order."""
    def classes(path):
        return [n.name for n in ast.parse(open(path).read()).body if isinstance(n, ast.ClassDef)]
    assert classes("blockC.py") == classes("blockE.py") == classes("blockG.py") == ["Fourier", "Conv", "Block"]
    sigs = [list(inspect.signature(importlib.import_module(f"unet{c}").UNet.__init__).parameters) for c in "CEG"]
    assert sigs[0] == sigs[1] == sigs[2]
    blocks = [list(inspect.signature(importlib.import_module(f"block{c}").Block.__init__).parameters) for c in "CEG"]
    assert blocks[0] == blocks[1] == blocks[2]


@pytest.mark.parametrize("cfg", ["C", "E", "G"])
def test_loss_finite_and_decreasing_on_digits(cfg):
    config = load_config(f"config/digits/{cfg}.yaml")
    images, _ = load_dataset(config)
    edm = build_edm(config)
    force_weight_norm_(edm)
    opt = torch.optim.Adam(edm.parameters(), lr={"C": 2e-3, "E": 1e-2, "G": 1e-2}[cfg], betas=(0.9, 0.99))
    g = torch.Generator().manual_seed(1)
    y = to_float(images[:128])
    sigma, noise = edm.loss.sigma(torch.randn(128, generator=g)), torch.randn(y.shape, generator=g)

    def fixed_loss():  # same images, noise levels and noise before and after training
        with torch.no_grad():
            return edm.eval().loss.at(edm.denoiser, y, sigma, noise).mean().item()

    before = fixed_loss()
    for _ in range(15):
        idx = torch.randint(len(images), (64,), generator=g)
        batch = to_float(images[idx])
        sigma_batch = edm.loss.sigma(torch.randn(64, generator=g))
        loss = edm.train().loss.at(edm.denoiser, batch, sigma_batch, torch.randn(batch.shape, generator=g)).mean()
        assert torch.isfinite(loss)
        opt.zero_grad()
        loss.backward()
        opt.step()
        force_weight_norm_(edm)
    after = fixed_loss()
    assert after < 0.8 * before, (before, after)


@pytest.mark.parametrize("cfg", ["C", "E", "G"])
def test_network_dropout_independent_of_batch_split(cfg):
    torch.manual_seed(0)
    net = unet(cfg, dropout=0.2).train()
    for name, p in net.named_parameters():
        if name.endswith("gain"):
            p.data.fill_(1)
    g = torch.Generator().manual_seed(1)
    x, c, keys = torch.randn(4, 3, 32, 32, generator=g), torch.randn(4, generator=g), torch.randint(2 ** 31, (4,), generator=g)
    with torch.no_grad():
        full = net(x, c, dropout_keys=keys)
        halves = torch.cat([net(x[:2], c[:2], dropout_keys=keys[:2]), net(x[2:], c[2:], dropout_keys=keys[2:])])
        other = net(x, c, dropout_keys=keys + 1)
    # Equal up to float32 summation order (convolutions pick other kernels per batch size); a changed mask moves outputs by O(1).
    torch.testing.assert_close(halves, full, rtol=1e-4, atol=1e-4)
    assert (other - full).abs().max() > 100 * (halves - full).abs().max() + 1e-3  # the keys do set the masks


@pytest.mark.parametrize("cfg", ["C", "E", "G"])
def test_every_block_built_from_a_config_has_its_own_dropout_mask(cfg):
    """tools.config.build_network numbers the dropout layers of any UNet: no two blocks share a mask."""
    net = build_network(load_config(f"config/digits/{cfg}.yaml"))
    salts = [m.dropout_salt for m in net.modules() if hasattr(m, "dropout_salt")]
    assert len(salts) > 5 and sorted(salts) == list(range(len(salts)))
