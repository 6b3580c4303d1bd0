"""tools/batches.py: the training set and this rank's share of each batch, with non-leaky augmentation: p = 0 is the
run without it bit for bit, augmented runs resume exactly and do not depend on the rank count, everything after
training tells the network that nothing was done; a config that cannot feed the network ends in one line."""

import contextlib
import json
import os
import shutil

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import COND, DIGITS, ROOT, assert_one_line_exit_2, one_line_error, run_script
from tools.augment import AUGMENT_DIM
from tools.batches import Batches
from tools.bench import NoLog
from tools.cli import UserError
from tools.config import build_edm, load_config
from tools.data import load_dataset, to_float
from tools.edm import Denoiser
from tools.evaluation import Evaluator
from tools.generate import sample_seeds
from tools.probe_features import extract_features
from tools.runs import load_net, resolve
from tools.train_state import TrainState


def test_each_epoch_is_a_permutation_fixed_by_seed_and_epoch():
    """Every image once per epoch, in an order that the seed and the epoch fix and nothing else."""
    def order(seed, epoch):
        batches = Batches(load_config(DIGITS, ["data.max_images=96", "train.batch_size=32", f"train.seed={seed}"]), 0, 1,
                          torch.device("cpu"))
        batches.batch(epoch * batches.steps_per_epoch + 1)
        return batches.perm.clone()
    a = order(0, 3)
    assert torch.equal(a, order(0, 3)) and torch.equal(a.sort().values, torch.arange(96))
    assert not torch.equal(a, order(0, 4)) and not torch.equal(a, order(1, 3))


def test_too_few_label_dims_for_the_classes_is_one_line(tmp_path):
    proc = run_script("train.py", "--config", COND, "--outdir", str(tmp_path), "network.label_dim=5", check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and "set network.label_dim=10" in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "checkpoints")


# ---------------------------------------------------------------------------------------------------- augmentation

# 5 steps per epoch, dropout on: augmentation draws and dropout masks must both follow the sample.
FAST = ["network.model_channels=8", "network.dropout=0.1", "train.batch_size=256", "train.eval_epochs=0", "train.log_steps=1",
        "ema.snapshot_epochs=1", "train.checkpoint_epochs=1", "train.grid_epochs=2"]
AUGMENTED = ["augment.p=0.5", "augment.xflip=0.5"]


def train(outdir, *overrides, check=True):
    return run_script("train.py", "--config", DIGITS, "--outdir", str(outdir), *FAST, *overrides, check=check)


@pytest.fixture(scope="module")
def augmented_run(tmp_path_factory):
    """Digits E trained 2 epochs in one go with augment.p = 0.5 (in this process). Its resume and its 2-rank twin are
    tested in tests/test_training.py and tests/test_multirank.py."""
    import train as entry
    outdir = tmp_path_factory.mktemp("augmented")
    entry.main(["--config", os.path.join(ROOT, DIGITS), "--outdir", str(outdir), *FAST, *AUGMENTED, "train.epochs=2"])
    return outdir


def test_p_zero_trains_the_same_bits_as_no_augment_section():
    """augment.p = 0 is off, whatever the other augment keys say: no draws, no extra layer, the same weights after
    three optimizer steps (in this process: the training loop around the step is the same code for both)."""
    device = torch.device("cpu")
    states = []
    for extra in ([], ["augment.p=0", "augment.transforms=[rotate]", "augment.rotate_max=0.5"]):
        cfg = load_config(os.path.join(ROOT, DIGITS), [*FAST, *extra])
        data, state = Batches(cfg, 0, 1, device), TrainState(cfg, device)
        for step in range(3):
            batch = data.batch(step)
            assert batch.conditioning["augment_labels"] is None
            state.step(state.edm, batch, data.micro, 0.01, NoLog())
        states.append(state.edm.state_dict())
    assert states[0].keys() == states[1].keys() and not any("augment" in k for k in states[0])
    for k in states[0]:
        assert torch.equal(states[0][k], states[1][k]), k


def test_augmentation_follows_the_sample_not_the_rank():
    """Two ranks' shares of a step, put side by side, are the one-rank batch bit for bit: the augmented images, their
    vectors and the dropout keys (a two-rank run then differs from one rank only by the gradient sum's order, which
    tests/test_multirank.py checks for the training loop)."""
    cfg = load_config(os.path.join(ROOT, DIGITS), [*FAST, *AUGMENTED])
    device = torch.device("cpu")
    one, two = Batches(cfg, 0, 1, device), [Batches(cfg, rank, 2, device) for rank in (0, 1)]
    for step in (0, 7):
        whole, halves = one.batch(step), [b.batch(step) for b in two]
        assert whole.conditioning["augment_labels"].any(1).float().mean() > 0.9
        assert torch.equal(torch.cat([h.images for h in halves]), whole.images)
        for k in ("augment_labels", "dropout_keys"):
            assert torch.equal(torch.cat([h.conditioning[k] for h in halves]), whole.conditioning[k]), k
        whole_rows, half_rows = whole.normals.rows(whole.rows), [h.normals.rows(h.rows) for h in halves]
        for shape in ((), (1, 16, 16)):  # the loss's two requests: noise levels, then noise
            assert torch.equal(torch.cat([r.randn(*shape) for r in half_rows]), whole_rows.randn(*shape))


def test_the_log_and_the_grid_show_the_augmentation(augmented_run):
    """Seven transforms at p = 0.5: 1 - 0.5^7 of the images are touched (a few lose an integer shift of 0 px);
    the grid adds a row of augmented training images under the 8 x 8 samples."""
    rows = [json.loads(line) for line in open(augmented_run / "metrics.jsonl") if '"img_per_s"' in line]
    touched = np.mean([r["augmented_fraction"] for r in rows])
    assert abs(touched - (1 - 0.5 ** 7)) < 0.02, touched
    grid = Image.open(augmented_run / "grids" / "epoch_2.png")
    assert grid.size == (8 * 66 + 2, 9 * 66 + 2)


def test_a_changed_augment_section_refuses_to_resume(augmented_run, tmp_path):
    import train as entry
    shutil.copytree(augmented_run, tmp_path / "run")
    args = ["--config", os.path.join(ROOT, DIGITS), "--outdir", str(tmp_path / "run"), *FAST, "augment.p=0.3", "train.epochs=3"]
    assert "holds a run with a different 'augment'" in one_line_error(entry.main, args)
    assert not (tmp_path / "run" / "checkpoints" / "epoch_3.pt").exists()


def test_sampling_evaluation_and_probe_tell_the_network_nothing_was_done(augmented_run, tmp_path):
    """Non-leaky by construction: a run trained with augmentation samples, is evaluated and is probed with the zero
    vector, seen at the network's augmentation input, with no flag anywhere."""
    cfg, outdir = resolve(None, str(augmented_run), ["sample.steps=3", "train.eval_epochs=1", "train.eval_images=16",
                                                      "train.eval_samples=0"])
    device = torch.device("cpu")
    net, _ = load_net(cfg, outdir, None, "classic", device)
    seen = []
    net.emb_augment.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].clone()))
    denoiser = Denoiser(net, cfg["diffusion"]["sigma_data"])
    sample_seeds(denoiser, cfg, [0, 1, 2], device)
    edm = build_edm(cfg)
    images, labels = load_dataset(cfg, "train")
    Evaluator(cfg, images, labels, 0, 1, device).losses(denoiser, edm.loss, 0, contextlib.nullcontext)
    extract_features(net, cfg["diffusion"]["sigma_data"], images[:4], 0.06, ["dec.8x8_block1"], 0, 4)
    assert len(seen) >= 5 + 6 + 1 and all(a.shape[1] == AUGMENT_DIM and not a.any() for a in seen)


def test_a_training_step_tells_the_network_what_was_applied():
    """During a real optimizer step (two micro-batches) the network's augmentation input is, image for image, the vector
    of what the step's augmentation did to that image."""
    cfg = load_config(os.path.join(ROOT, DIGITS), [*FAST, *AUGMENTED, "train.batch_gpu=128"])
    device = torch.device("cpu")
    data, state = Batches(cfg, 0, 1, device), TrainState(cfg, device)
    seen = []
    state.edm.net.emb_augment.register_forward_hook(lambda module, inputs, output: seen.append(inputs[0].detach().clone()))
    batch = data.batch(3)
    state.step(state.edm, batch, data.micro, 0.01, NoLog())
    applied = batch.conditioning["augment_labels"]
    assert len(seen) == 2 and applied.shape == (256, AUGMENT_DIM) and applied.any(1).float().mean() > 0.9
    assert torch.equal(torch.cat(seen), applied)


def test_leaky_xflip_flips_half_the_images_whatever_the_rank_count():
    """data.xflip (the leaky flip: no vector) mirrors each image with probability 1/2, drawn per sample of the global
    batch, so two ranks' shares side by side are the one-rank batch."""
    cfg = load_config(os.path.join(ROOT, DIGITS), ["network.model_channels=8", "train.batch_size=64", "data.xflip=true"])
    device, g = torch.device("cpu"), torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (256, 1, 16, 16), dtype=torch.uint8, generator=g)  # no image is its own mirror
    data = (images, torch.zeros(256, dtype=torch.int64))
    one, two = Batches(cfg, 0, 1, device, data=data), [Batches(cfg, rank, 2, device, data=data) for rank in (0, 1)]
    plain = {to_float(x).numpy().tobytes() for x in images}
    mirrored = {to_float(x).flip(2).numpy().tobytes() for x in images}
    flips = []
    for step in range(40):
        whole = one.batch(step)
        assert whole.conditioning["augment_labels"] is None
        assert torch.equal(torch.cat([b.batch(step).images for b in two]), whole.images)
        for y in whole.images:
            key = y.numpy().tobytes()
            assert (key in plain) != (key in mirrored)
            flips.append(key in mirrored)
    assert abs(np.mean(flips) - 0.5) < 4 * np.sqrt(0.25 / len(flips))  # 4 standard errors of 2,560 coin flips


@pytest.mark.parametrize("override,message", [
    ("augment.p=1.5", "augment.p must be in [0, 1], got 1.5"),
    ("augment.p=-0.1", "augment.p must be in [0, 1], got -0.1"),
    ("augment.transforms=[twirl]", "augment.transforms: unknown transform 'twirl'"),
    ("augment.transforms=[xflip]", "the x-flip has a probability of its own, augment.xflip"),
    ("augment.xflip=2", "augment.xflip must be in [0, 1], got 2"),
    ("augment.rotate_max=2", "augment.rotate_max must be in [0, 1], got 2.0"),
    ("augment.scale_iso_std=-1", "augment.scale_iso_std must be in [0, 1], got -1.0"),
    ("augment.translate_int_max=0.6", "augment.translate_int_max must be in [0, 0.5], got 0.6"),
    ("augment.translate_frac_std=-0.1", "augment.translate_frac_std must be in [0, 0.5], got -0.1"),
    ("augment.scale_aniso_std=nan", "augment.scale_aniso_std must be in [0, 1], got nan"),
    ("augment.scal_iso_std=0.1", "unknown key augment.scal_iso_std"),
    ("network.augment_dim=11", "network.augment_dim follows augment.p"),
])
def test_bad_augment_values_are_refused_with_one_message(override, message):
    with pytest.raises(UserError) as error:
        load_config(os.path.join(ROOT, DIGITS), [*FAST, override])
    assert message in str(error.value) and "\n" not in str(error.value)


def test_a_bad_augment_value_ends_train_py_in_one_line_before_any_work(tmp_path):
    proc = train(tmp_path, "augment.p=1.5", check=False)
    assert_one_line_exit_2(proc, "augment.p must be in [0, 1], got 1.5")
    assert not (tmp_path / "checkpoints").exists()
