"""tools/probe_features.py: block names that match the network, noise levels from the sampling schedule, features
independent of ranks and batch, and a checksummed cache that spares the network."""

import os
import shutil
import subprocess
import sys

import pytest
import torch

from conftest import DIGITS, PROBE_BLOCK, ROOT, accuracy_of, cached_features, copy_run, flip_byte, run_probe, weights
from tools import probe_features
from tools.checkpoint import atomic_save
from tools.cli import UserError
from tools.config import build_network, load_config
from tools.data import load_dataset
from tools.probe_features import read_cached
from tools.runs import load_net


def test_flipped_byte_in_the_probe_cache_extracts_again(tmp_path):
    path = str(tmp_path / "features" / "train.pt")
    meta = {"version": 1, "block": "enc.8x8"}
    atomic_save(dict(features=weights(3.0, 64).reshape(8, 8), meta=meta, t_img=1234), path)
    features, t_img = read_cached(path, meta)
    assert t_img == 1234 and (features == 3).all()
    flip_byte(path, weights(3.0, 64).numpy().tobytes())
    assert read_cached(path, meta) is None


def test_block_listing_matches_the_network(capsys, tmp_path):
    rows = [line.split() for line in run_probe(capsys, str(tmp_path / "no-run"), "--list-blocks").out.splitlines()[1:]]
    net = build_network(load_config(os.path.join(ROOT, DIGITS))).eval()
    shapes = {}
    for name, m in probe_features.named_blocks(net):
        m.register_forward_hook(lambda m, i, o, name=name: shapes.__setitem__(name, o.shape))
    with torch.no_grad():
        net(torch.zeros(1, 1, 16, 16), torch.zeros(1))
    expected = [f"enc.{k}" for k in net.enc] + [f"dec.{k}" for k in net.dec]
    assert [r[0] for r in rows] == expected
    assert [(int(r[1]), r[2]) for r in rows] == [(shapes[n][1], f"{shapes[n][2]}x{shapes[n][3]}") for n in expected]
    assert [r[0] for r in rows if "<-" in r] == [PROBE_BLOCK]
    # An empty probe.block means the DDAE reference position: block1 of the decoder's second-lowest resolution.
    for config, block in (("cifar10/E.yaml", "dec.8x8_block1"), ("tinyimagenet/G.yaml", "dec.16x16_block1")):
        assert probe_features.default_block(probe_features.list_blocks(load_config(os.path.join(ROOT, "config", config)))) == block


def test_t_indexes_the_reversed_sampling_schedule():
    cfg = load_config(os.path.join(ROOT, DIGITS))
    assert probe_features.sigma_of_t(cfg, 4) == pytest.approx(0.0599, abs=1e-4)  # DDAE's reference noise level
    with pytest.raises(UserError):
        probe_features.sigma_of_t(cfg, 0)  # sigma = 0: no noise level to condition on


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
    cfg = load_config(os.path.join(ROOT, DIGITS))
    net, _ = load_net(cfg, trained_digits_run, 4)
    images = load_dataset(cfg, "train")[0]
    stream = probe_features.STREAMS["train", False]
    expected = probe_features.extract_features(net, 0.5, images, 0.06, [PROBE_BLOCK], stream, batch=512)[PROBE_BLOCK]
    run = copy_run(trained_digits_run, tmp_path / "run")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "probe.py",
           "--config", DIGITS, "--outdir", run, "--batch", "7", "probe.C_grid=[1.0]"]
    proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.startswith("test accuracy:")
    torch.testing.assert_close(cached_features(run), expected, rtol=0, atol=1e-5)
