"""tools/inception.py: the Inception weights come from a local file (any name), never silently from the network."""

import json
import os

import numpy as np
import pytest
import torch

from conftest import digit_images, run_script
from tools import fid, inception
from tools.cli import UserError


def no_download(*args, **kwargs):
    pytest.fail("tried to download")


def test_weights_come_from_a_local_file(tmp_path, monkeypatch, capsys):
    """A state dict saved to disk is what the network holds after build_inception(path), with no download."""
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)  # what torch.hub calls on a cache miss
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in inception.random_inception_state_dict().items()}
    path = str(tmp_path / inception.WEIGHTS_FILE)
    torch.save(state, path)

    model = inception.build_inception(path)
    torch.testing.assert_close(model.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[3][2].branch_pool.bn.running_var, state["Mixed_7c.branch_pool.bn.running_var"], rtol=0, atol=0)
    assert model.extractor.startswith("inception-v3-unverified-")  # not the published file's sha256
    assert "not the published" in capsys.readouterr().err

    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", path)
    assert inception.find_inception_weights() == path
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    (tmp_path / "ref.json").write_text(json.dumps({"extractor": "inception-v3-RANDOM"}))
    with pytest.raises(UserError, match="recompute the reference"):
        fid.score_images(digit_images(2), str(tmp_path / "ref.npz"))

    (tmp_path / "bad.pth").write_bytes(b"\x00" * 64)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    for bad in ("bad.pth", "wrong.pth"):
        with pytest.raises(UserError) as e:
            inception.build_inception(str(tmp_path / bad))
        assert inception.WEIGHTS_URL in str(e.value) and "\n" not in str(e.value)


def test_weights_under_another_name_load_offline_and_leave_the_hub_dir(tmp_path, monkeypatch, capsys):
    """pytorch-fid's constructor reads the file through a temporary torch hub cache: a file under any name loads, nothing
    is downloaded, and torch.hub.get_dir() (still steered by $TORCH_HOME) and the global RNG are as before. A file that is
    already the real cache's is loaded from there."""
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    state = inception.random_inception_state_dict(seed=1)
    path = tmp_path / "some-name.pth"
    torch.save(state, path)
    hub_dir, rng = torch.hub.get_dir(), torch.random.get_rng_state()

    model = inception.build_inception(str(path))
    assert torch.hub.get_dir() == hub_dir and torch.equal(torch.random.get_rng_state(), rng)
    assert not os.path.exists(hub_dir)  # nothing written to the real cache
    torch.testing.assert_close(model.blocks[3][1].branch3x3dbl_3a.conv.weight, state["Mixed_7b.branch3x3dbl_3a.conv.weight"],
                               rtol=0, atol=0)
    assert model.extractor.startswith("inception-v3-unverified-") and "not the published" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    assert torch.hub.get_dir() == str(tmp_path / "elsewhere" / "hub")  # not pinned by build_inception's set_dir

    cached = tmp_path / "elsewhere" / "hub" / "checkpoints" / inception.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    os.link(path, cached)
    model = inception.build_inception()
    torch.testing.assert_close(model.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"], rtol=0, atol=0)
    assert os.listdir(cached.parent) == [inception.WEIGHTS_FILE]


def test_missing_weights_say_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert inception.find_inception_weights() is None
    with pytest.raises(UserError) as e:
        inception.build_inception()
    message = str(e.value)
    assert "--inception-weights" in message and "FID_INCEPTION_WEIGHTS" in message and inception.WEIGHTS_URL in message
    assert "\n" not in message

    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
    with pytest.raises(UserError, match="FID_INCEPTION_WEIGHTS=.*nowhere.pth: no such file"):
        inception.build_inception()

    cached = tmp_path / "torch" / "hub" / "checkpoints" / inception.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS")
    assert inception.find_inception_weights() == str(cached)

    proc = run_script("-m", "tools.fid", "ref", "--config", "config/digits/E.yaml", "--out", str(tmp_path / "ref.npz"),
                      env={"TORCH_HOME": str(tmp_path / "empty"), "FID_INCEPTION_WEIGHTS": ""}, check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: scoring needs") and len(proc.stderr.strip().splitlines()) == 1


def test_missing_weights_are_downloaded_when_online_and_explained_when_offline(tmp_path, monkeypatch, capsys):
    """As pytorch-fid does, a missing weights file is fetched into the torch hub cache (here from a file:// URL
    standing in for the release URL, its sha256 prefix checked); offline, one line says how to provide it."""
    import hashlib
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    release = tmp_path / "release.pth"
    release.write_bytes(b"weights")
    monkeypatch.setattr(inception, "WEIGHTS_URL", release.as_uri())
    monkeypatch.setattr(inception, "WEIGHTS_SHA256_PREFIX", hashlib.sha256(b"weights").hexdigest()[:8])
    path = inception.inception_weights_or_none()
    assert path == str(tmp_path / "torch" / "hub" / "checkpoints" / inception.WEIGHTS_FILE)
    assert open(path, "rb").read() == b"weights" and inception.find_inception_weights() == path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "offline"))
    monkeypatch.setattr(inception, "WEIGHTS_URL", (tmp_path / "unreachable.pth").as_uri())
    assert inception.inception_weights_or_none() is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "--inception-weights" in lines[0] and "FID_INCEPTION_WEIGHTS" in lines[0]
