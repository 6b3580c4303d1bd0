"""Every shipped config under the autocast precisions of a GPU run (bf16, fp16), on the CPU, through the code path a
GPU run takes (tools/precision.py honours the precision on every device): a training step and a sampling batch for
each; for a conditional, augmented config of each of C, E and G also a training grid, an evaluation pass and the
probe's features. Networks keep their config's blocks, embeddings, attention heads, resolution, channels, labels,
dropout and augmentation; only the channel counts shrink, all by one factor."""

import glob
import math
import os

import pytest
import torch

from conftest import ROOT
from real_formats import write_cifar10, write_cifar100, write_tinyimagenet
from tools.batches import Batches
from tools.bench import NoLog, random_images
from tools.config import load_config
from tools.data import load_dataset
from tools.edm import Denoiser
from tools.evaluation import Evaluator
from tools.generate import sample_seeds, training_grid
from tools.probe_features import extract_features
from tools.sampler import seed_classes
from tools.train_state import TrainState

CONFIGS = sorted(os.path.relpath(p, ROOT) for p in glob.glob(os.path.join(ROOT, "config", "*", "*.yaml")))
LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE = torch.device("cpu")


def small(path, precision, *extra):
    """The config at `path` with its channel counts divided so that the base is 8, in `precision` everywhere."""
    full = load_config(os.path.join(ROOT, path))["network"]
    f = full["model_channels"] // 8
    return load_config(os.path.join(ROOT, path), [
        "network.model_channels=8", f"network.emb_channels={(full['emb_channels'] or 4 * full['model_channels']) // f}",
        f"network.channels_per_head={full['channels_per_head'] // f}", "train.batch_size=2", "train.batch_gpu=1",
        "sample.steps=2", "sample.batch=4", *(f"{s}.precision={precision}" for s in ("train", "sample", "probe")), *extra])


def block_dtypes(net):
    """Records the dtype of every block's output while the returned list is alive (hooks removed by the caller)."""
    seen = []
    handles = [m.register_forward_hook(lambda m, i, o: seen.append(o.dtype)) for m in (*net.enc.values(), *net.dec.values())]
    return seen, handles


def test_every_shipped_config_is_covered():
    datasets = {p.split(os.sep)[1] for p in CONFIGS}
    assert datasets == {"cifar10", "cifar100", "digits", "tinyimagenet"} and len(CONFIGS) == 25


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("path", CONFIGS)
def test_a_training_step_and_a_sampling_batch(path, precision):
    cfg = small(path, precision)
    n = cfg["network"]
    assert n["img_resolution"] in (16, 32, 64) and n["channels_per_head"] >= 1
    data = Batches(cfg, 0, 1, DEVICE, data=random_images(cfg, 4))
    state = TrainState(cfg, DEVICE)
    state.track_noise_scale(data.micro, data.per_rank)
    before = [p.detach().clone() for p in state.params]
    seen, handles = block_dtypes(state.edm.net)
    for step in range(8):  # fp16: GradScaler skips the steps whose scaled gradients overflow, halving its scale each time
        state.step(state.edm, data.batch(step), data.micro, 1e-3, NoLog())
        if state.nonfinite_steps == step:
            break
    for h in handles:
        h.remove()
    assert seen and set(seen) == {LOW[precision]}  # every block ran in the low precision
    assert state.nonfinite_steps == (step if precision == "fp16" else 0) < 8
    assert all(torch.isfinite(p).all() for p in state.params) and any(not torch.equal(a, b) for a, b in zip(before, state.params))
    assert state.scaler.is_enabled() == (precision == "fp16")

    net = state.emas.classic.ema_model.eval()
    seen, handles = block_dtypes(net)
    seeds = list(range(2))
    x = sample_seeds(Denoiser(net), cfg, seeds, DEVICE, seed_classes(seeds, n["label_dim"]))
    for h in handles:
        h.remove()
    assert set(seen) == {LOW[precision]} and x.dtype == torch.float32 and x.shape == (2, n["img_channels"], *[n["img_resolution"]] * 2)
    assert torch.isfinite(x).all()


@pytest.fixture(scope="module")
def fake_root(tmp_path_factory):
    root = tmp_path_factory.mktemp("real-formats")
    write_cifar10(root, per_batch=8, test=16)
    write_cifar100(root, train=40, test=16)
    write_tinyimagenet(root, per_class=4, val=6)
    return str(root)


@pytest.mark.parametrize("precision", ["bf16", "fp16"])
@pytest.mark.parametrize("path", ["config/cifar10/C-cond.yaml", "config/cifar100/E-cond.yaml", "config/tinyimagenet/G-cond.yaml"])
def test_grid_evaluation_and_probe_features_of_conditional_augmented_configs(path, precision, fake_root, metric_cache):
    curve = "tinyimagenet" not in path  # its quality curve would need a dataset classifier of 200 classes: CIFAR's show it
    cfg = small(path, precision, f"data.root={fake_root}", f"data.cache={metric_cache}", "train.eval_epochs=1",
                f"train.eval_samples={40 * curve}", "train.eval_inception=false", "train.eval_images=8")
    assert cfg["data"]["use_labels"] and cfg["network"]["label_dim"] and cfg["network"]["augment_dim"]
    images, labels = load_dataset(cfg, "train")
    state = TrainState(cfg, DEVICE)
    data = Batches(cfg, 0, 1, DEVICE)
    state.step(state.edm, data.batch(0), data.micro, 1e-3, NoLog())
    net = state.emas.classic.ema_model
    seen, handles = block_dtypes(net)

    picture = training_grid(net, cfg, DEVICE, num=20, examples=data.augmented_examples(8, epoch=1))
    rows = Evaluator(cfg, images, labels, 0, 1, DEVICE)(net, state.edm.loss, state.t_img, 1)
    feats = extract_features(net, 0.5, images[:6], 0.06, ["dec.8x8_block1"], 0, 4, precision=precision)
    for h in handles:
        h.remove()
    assert set(seen) == {LOW[precision]}
    assert picture.dtype == torch.uint8 and picture.shape[0] == 3
    assert [r["kind"] for r in rows] == ["eval", "curve"][:1 + curve]
    assert torch.isfinite(torch.tensor(rows[0]["val_loss_by_sigma"])).all()
    assert not curve or rows[1]["count"] == 40 and math.isfinite(rows[1]["KID"])
    assert feats["dec.8x8_block1"].shape == (6, net.dec["8x8_block1"].out_channels)
    assert feats["dec.8x8_block1"].dtype == torch.float32 and torch.isfinite(feats["dec.8x8_block1"]).all()
