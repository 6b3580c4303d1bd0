"""probe.py: deterministic features and accuracy, a cache that spares the network, block names that match
the network, selection that never sees the test split, and a digits model that probes far above chance."""

import json
import os
import re
import shutil
import subprocess
import sys

import pytest
import torch

import probe
from conftest import ROOT, run_script
from tools import probe_features
from tools.runs import load_net
from tools.cli import UserError
from tools.config import build_network, load_config
from tools.data import load_dataset

CONFIG = "config/digits/E.yaml"
BLOCK = "dec.8x8_block1"  # the digits default: second 8x8 decoder block, as for CIFAR


def copy_run(src, dst, epoch=4):
    """A private copy of the shared run (checkpoint mtimes kept), so the probe's files stay out of it."""
    os.makedirs(os.path.join(dst, "checkpoints"))
    shutil.copy2(os.path.join(src, "checkpoints", f"epoch_{epoch}.pt"), os.path.join(dst, "checkpoints"))
    shutil.copy2(os.path.join(src, "config.yaml"), dst)
    return str(dst)


def run_probe(capsys, outdir, *args):
    """probe.py in this process (so tests can patch it); returns (stdout, stderr)."""
    capsys.readouterr()
    probe.main(["--config", os.path.join(ROOT, CONFIG), "--outdir", outdir, *args])
    return capsys.readouterr()


def accuracy_of(stdout):
    """The number on the first line, `test accuracy: 93.46% (...)`."""
    m = re.match(r"test accuracy: ([\d.]+)%", stdout)
    assert m, stdout
    return float(m.group(1))


def cached_features(outdir, split="train", block=BLOCK, sigma="0.06", epoch=4):
    path = os.path.join(outdir, "probe", "features", f"epoch_{epoch}", "classic", block, f"sigma={sigma}", f"{split}.pt")
    return torch.load(path, weights_only=True)["features"]


def test_block_listing_matches_the_network(capsys, tmp_path):
    rows = [line.split() for line in run_probe(capsys, str(tmp_path / "no-run"), "--list-blocks").out.splitlines()[1:]]
    net = build_network(load_config(os.path.join(ROOT, CONFIG))).eval()
    shapes = {}
    for name, m in probe_features.named_blocks(net):
        m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    with torch.no_grad():
        net(torch.zeros(1, 1, 16, 16), torch.zeros(1))
    expected = [f"enc.{k}" for k in net.enc] + [f"dec.{k}" for k in net.dec]
    assert [r[0] for r in rows] == expected
    assert [(int(r[1]), r[2]) for r in rows] == [(shapes[n][1], f"{shapes[n][2]}x{shapes[n][3]}") for n in expected]
    assert [r[0] for r in rows if "<-" in r] == [BLOCK]
    # An empty probe.block means the DDAE reference position: block1 of the decoder's second-lowest resolution.
    for config, block in (("cifar10/E.yaml", "dec.8x8_block1"), ("tinyimagenet/G.yaml", "dec.16x16_block1")):
        assert probe.default_block(probe.list_blocks(load_config(os.path.join(ROOT, "config", config)))) == block


def test_t_indexes_the_reversed_sampling_schedule():
    cfg = load_config(os.path.join(ROOT, CONFIG))
    assert probe.sigma_of_t(cfg, 4) == pytest.approx(0.0599, abs=1e-4)  # DDAE's reference noise level
    with pytest.raises(UserError):
        probe.sigma_of_t(cfg, 0)  # sigma = 0: no noise level to condition on


def test_cli_on_digits_beats_chance_by_a_wide_margin(trained_digits_run, tmp_path):
    run = copy_run(trained_digits_run, tmp_path / "run")
    lines = run_script("probe.py", "--config", CONFIG, "--outdir", run).stdout.splitlines()
    acc = accuracy_of(lines[0])
    assert acc > 80, lines  # chance: 10%; the 32 pooled channels of this 4-epoch model reach ~95%
    assert lines[1].startswith("raw pixels:")
    with open(os.path.join(run, "checkpoints", "epoch_4.probe.json")) as f:
        result = json.load(f)[f"{BLOCK}@sigma=0.06/classic/sklearn"]
    assert result["test_accuracy_pct"] == pytest.approx(acc, abs=0.005)
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    events = EventAccumulator(os.path.join(run, "tensorboard")).Reload()
    (scalar,) = events.Scalars(f"probe/{BLOCK}@sigma=0.06/classic")
    assert (scalar.step, scalar.value) == (result["t_img"], pytest.approx(acc, abs=0.005))


def test_deterministic_and_the_cache_spares_the_network(trained_digits_run, tmp_path, capsys, monkeypatch):
    run = copy_run(trained_digits_run, tmp_path / "run")
    C_grid = "probe.C_grid=[0.1,1.0]"  # two values keep the torch classifier quick on a CPU
    acc = accuracy_of(run_probe(capsys, run, C_grid).out)
    features = cached_features(run)

    def no_network(*args, **kwargs):
        raise AssertionError("the network was loaded although every feature is cached")
    with monkeypatch.context() as m:
        m.setattr(probe_features, "load_net", no_network)
        out, err = run_probe(capsys, run, C_grid)
        assert accuracy_of(out) == acc and "features: cached" in err
        # The torch classifier minimises the same objective: the same accuracy within 3 of 300 test images.
        assert accuracy_of(run_probe(capsys, run, C_grid, "--classifier", "torch").out) == pytest.approx(acc, abs=1)

    shutil.rmtree(os.path.join(run, "probe", "features"))  # extract again from scratch: the same numbers
    assert accuracy_of(run_probe(capsys, run, C_grid).out) == acc
    assert torch.equal(cached_features(run), features)


def test_features_do_not_depend_on_ranks_or_batch(trained_digits_run, tmp_path):
    """Two ranks with 7 images per forward give the features of one process with 512 per forward."""
    cfg = load_config(os.path.join(ROOT, CONFIG))
    net, _ = load_net(cfg, trained_digits_run, 4)
    images = load_dataset(cfg, "train")[0]
    seeds = torch.arange(len(images)) + probe_features.SEED_STRIDE * probe_features.STREAMS["train", False]
    expected = probe_features.extract_features(net, 0.5, images, 0.06, [BLOCK], seeds, batch=512)[BLOCK]
    run = copy_run(trained_digits_run, tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "probe.py",
           "--config", CONFIG, "--outdir", run, "--batch", "7", "probe.C_grid=[1.0]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("test accuracy:")
    torch.testing.assert_close(cached_features(run), expected, rtol=0, atol=1e-5)


def test_the_test_split_never_influences_selection(trained_digits_run, tmp_path, capsys, monkeypatch):
    """A grid run whose test labels are all wrong selects the same C per cell and the same best cell."""
    run = copy_run(trained_digits_run, tmp_path / "run")
    args = ("--grid", "probe.grid_sigmas=[0.06,0.3]", "probe.C_grid=[0.1,1.0]")
    grid_json = os.path.join(run, "checkpoints", "epoch_4.probe_grid_classic.json")
    run_probe(capsys, run, *args)
    with open(grid_json) as f:
        clean = json.load(f)
    assert os.path.getsize(grid_json[:-len(".json")] + ".png") > 0

    def wrong_test_labels(cfg, split):
        images, labels = load_dataset(cfg, split)
        return images, (labels + 1) % 10 if split == "test" else labels
    monkeypatch.setattr(probe, "load_dataset", wrong_test_labels)
    out, _ = run_probe(capsys, run, *args)
    with open(grid_json) as f:
        corrupted = json.load(f)

    assert len(clean["cells"]) == 2 * len(probe.list_blocks(load_config(os.path.join(ROOT, CONFIG))))
    selection = lambda grid: [(c["block"], c["sigma"], c["C"], c["holdout_accuracy_pct"]) for c in grid["cells"]]
    assert selection(corrupted) == selection(clean)
    assert (corrupted["best"]["block"], corrupted["best"]["sigma"]) == (clean["best"]["block"], clean["best"]["sigma"])
    assert accuracy_of(out) < 30 < clean["best"]["test_accuracy_pct"]  # the corruption did reach the test score
