"""FID / KID: agreement with pytorch-fid, unbiasedness of KID, exact streaming and distributed statistics, offline weights.

The real Inception weights are not available here, so the pipeline runs with the fixed random network
(random_weights=True); loading from a local file is checked with a saved random state dict. sqrtm of a
2048 x 2048 product takes about a minute on 2 cores, so FID itself is compared with pytorch-fid at d = 64
and 256, and the 2048-d pipeline tests check which statistics reach frechet_distance instead.
"""

import json
import os
import re
import warnings

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT, run_script
from tools import fid
from tools.cli import UserError


def random_stats(d, rng, n=None):
    """mu and a random SPD covariance (full rank when n > d)."""
    a = rng.standard_normal((d, n or 2 * d))
    return rng.standard_normal(d), a @ a.T / a.shape[1]


def pytorch_fid_distance(*stats):
    from pytorch_fid.fid_score import calculate_frechet_distance
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # scipy's deprecation of sqrtm(disp=...)
        return calculate_frechet_distance(*stats)


@pytest.mark.parametrize("d", [64, 256])
def test_frechet_distance_matches_pytorch_fid(d):
    rng = np.random.default_rng(d)
    (mu1, sigma1), (mu2, sigma2) = random_stats(d, rng), random_stats(d, rng)
    mu2 = 0.1 * mu2  # the trace term, not the mean term, dominates
    ours = fid.frechet_distance(mu1, sigma1, mu2, sigma2)
    assert ours == pytest.approx(pytorch_fid_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)
    assert ours > 0


def test_cli_help_lists_the_commands(capsys):
    proc = run_script("tools/fid.py", "--help")
    assert "{ref,score,compare}" in proc.stdout
    listed = re.findall(r"^ {4}(\w+) ", proc.stdout.split("\ncommands:\n")[1], re.M)
    assert listed == ["ref", "score", "compare"], proc.stdout
    flags = {"ref": ["--config", "--out", "--inception-weights", "--random-weights", "--batch", "section.key=value"],
             "score": ["REF.npz", "--kid-subsets", "--inception-weights", "--random-weights", "--batch"],
             "compare": ["A.npz", "B.npz"]}
    for command, expected in flags.items():
        with pytest.raises(SystemExit) as e:
            fid.main([command, "--help"])
        usage = capsys.readouterr().out
        assert e.value.code == 0 and all(f in usage for f in expected), usage


def test_cli_fid_of_two_statistics_files(tmp_path):
    rng = np.random.default_rng(1)
    (mu1, sigma1), (mu2, sigma2) = random_stats(64, rng), random_stats(64, rng)
    np.savez(tmp_path / "a.npz", mu=mu1, sigma=sigma1)
    np.savez(tmp_path / "b.npz", mu=mu2, sigma=sigma2)
    proc = run_script("tools/fid.py", "compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    printed = float(proc.stdout.strip().splitlines()[-1])
    assert printed == pytest.approx(pytorch_fid_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)
    bare = run_script("tools/fid.py", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))  # the form docs/METRICS.md shows
    assert bare.stdout == proc.stdout


def test_cli_bad_statistics_end_in_one_line(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "a.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "b.npz", mu=np.zeros(32), sigma=np.eye(32))
    proc = run_script("tools/fid.py", "compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: statistics do not match"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    (tmp_path / "c.npz").write_bytes(rng.bytes(100))
    np.savez(tmp_path / "d.npz", mu=np.zeros(64), sigma=np.eye(32))
    for bad in ("c.npz", "d.npz", "missing.npz"):
        with pytest.raises(UserError) as e:
            fid.load_stats(str(tmp_path / bad))
        assert "\n" not in str(e.value)


def test_fid_of_a_set_with_itself_is_zero():
    """|FID| < 1e-9 tr(S) for a full-rank covariance, < 1e-6 tr(S) for a singular one (n < d, as with few images)."""
    rng = np.random.default_rng(3)
    mu, sigma = random_stats(128, rng)
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-9 * np.trace(sigma)
    mu, sigma = fid.FeatureStats(dim=128).update(rng.standard_normal((40, 128))).mu_sigma()
    assert abs(fid.frechet_distance(mu, sigma, mu, sigma)) < 1e-6 * np.trace(sigma)


def cubic_kernel(x, y):
    return (x @ y.T / x.shape[1] + 1) ** 3


def test_kid_is_unbiased():
    """Subsets drawn without replacement from finite sets A, B: the mean of the unbiased estimate is the U-statistic of
    the full sets, computed exactly here; the plain V-statistic is off by more than 10 standard errors."""
    rng = np.random.default_rng(4)
    a, b = rng.standard_normal((60, 8)), rng.standard_normal((50, 8)) + 0.3
    k_aa, k_bb, k_ab = cubic_kernel(a, a), cubic_kernel(b, b), cubic_kernel(a, b)
    off = lambda k: (k.sum() - np.trace(k)) / (len(k) * (len(k) - 1))
    exact = off(k_aa) + off(k_bb) - 2 * k_ab.mean()

    m, num_subsets = 10, 4000
    mean, std = fid.kid(a, b, num_subsets=num_subsets, subset_size=m, seed=0)
    stderr = std / np.sqrt(num_subsets)
    assert abs(mean - exact) < 4 * stderr, (mean, exact, stderr)
    v_statistic_bias = (np.diag(k_aa).mean() - off(k_aa) + np.diag(k_bb).mean() - off(k_bb)) / m
    assert v_statistic_bias > 10 * stderr

    assert fid.kid(a, b, num_subsets=num_subsets, subset_size=m, seed=0) == (mean, std)
    full_mean, full_std = fid.kid(a, b, num_subsets=3, subset_size=10 ** 6)  # clipped to 50: every subset of b is b
    assert full_mean != pytest.approx(exact, rel=1e-3)  # ... but only 50 of a's 60
    assert fid.kid(a[:50], b, num_subsets=3, subset_size=10 ** 6)[0] == pytest.approx(
        off(k_aa[:50, :50]) + off(k_bb) - 2 * k_ab[:50].mean(), rel=1e-10)


def test_feature_stats_streaming_matches_numpy():
    rng = np.random.default_rng(5)
    x = rng.standard_normal((300, 16)) * rng.uniform(0.1, 10, 16) + rng.standard_normal(16)
    stats = fid.FeatureStats(dim=16, max_keep=100)
    for lo, hi in ((0, 7), (7, 128), (128, 129), (129, 300)):
        stats.update(torch.from_numpy(x[lo:hi]) if lo % 2 else x[lo:hi])
    mu, sigma = stats.mu_sigma()
    np.testing.assert_allclose(mu, x.mean(0), rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(sigma, np.cov(x, rowvar=False), rtol=1e-10, atol=1e-12)
    assert stats.num == 300
    np.testing.assert_array_equal(stats.features(), x[:100])


def _all_reduce_worker(rank, init_file, x, out):
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=2)
    stats = fid.FeatureStats(dim=x.shape[1], max_keep=3)
    mine = x[rank::2]
    stats.update(mine[:1]).update(mine[1:])
    stats.all_reduce()
    if rank == 0:
        mu, sigma = stats.mu_sigma()
        np.savez(out, num=stats.num, mu=mu, sigma=sigma, features=stats.features())
    torch.distributed.destroy_process_group()


def test_feature_stats_all_reduce_over_two_ranks(tmp_path):
    """Two gloo ranks on a rank-strided pass equal one process on all features; kept features come back in pass order."""
    x = np.random.default_rng(6).standard_normal((7, 5))
    mp.spawn(_all_reduce_worker, args=(str(tmp_path / "init"), x, str(tmp_path / "out.npz")), nprocs=2)
    with np.load(tmp_path / "out.npz") as r:
        assert int(r["num"]) == 7
        np.testing.assert_allclose(r["mu"], x.mean(0), rtol=1e-12)
        np.testing.assert_allclose(r["sigma"], np.cov(x, rowvar=False), rtol=1e-10, atol=1e-14)
        np.testing.assert_array_equal(r["features"], x[:6])  # 3 kept on each rank, rank 1 holds the odd items


def digit_images(n):
    """n 16 x 16 gray uint8 digits from scikit-learn, without loading a config."""
    from sklearn.datasets import load_digits
    images = torch.from_numpy(np.round(load_digits().images[:n] * (255 / 16)).astype(np.uint8))[:, None]
    return torch.nn.functional.interpolate(images.float(), size=16, mode="nearest").to(torch.uint8)


@pytest.fixture(scope="module")
def random_inception():
    return fid.build_inception(random_weights=True)


def test_reference_and_scoring_pipeline(tmp_path, monkeypatch, random_inception):
    import tools.data
    from pytorch_fid.fid_score import compute_statistics_of_path
    from tools.config import load_config

    images = digit_images(10)
    ref_images, gen_images = images[:6], images[6:]
    monkeypatch.setattr(tools.data, "load_dataset", lambda cfg, split: (ref_images, torch.zeros(len(ref_images), dtype=torch.int64)))
    cfg = load_config(os.path.join(ROOT, "config/digits/E.yaml"))
    out = str(tmp_path / "refs" / "digits-train.npz")
    fid.compute_reference(cfg, out, random_weights=True, batch=4)

    feats = fid.features_of_images(random_inception, images, batch=5)
    ref_feats, gen_feats = feats[:6], feats[6:]
    assert feats.shape == (10, 2048) and feats.dtype == np.float64
    assert ref_feats.std(0).max() > 1e-3  # the random network tells the digits apart
    mu_ref, sigma_ref = compute_statistics_of_path(out, None, 1, 2048, "cpu")  # pytorch-fid's reader
    assert mu_ref.shape == (2048,) and sigma_ref.shape == (2048, 2048)
    np.testing.assert_allclose(mu_ref, ref_feats.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma_ref, np.cov(ref_feats, rowvar=False), rtol=1e-5, atol=1e-9)
    with np.load(out) as f:
        assert f["features"].dtype == np.float16 and f["features"].shape == (6, 2048)
        stored = f["features"].astype(np.float64)
    match = ((stored[:, None] - ref_feats[None]) ** 2).sum(-1).argmin(1)
    assert sorted(match) == list(range(6))  # all reference images, in some order
    np.testing.assert_allclose(stored, ref_feats[match], rtol=2e-3, atol=1e-6)
    with open(out[:-4] + ".json") as f:
        meta = json.load(f)
    assert meta["count"] == 6 and meta["extractor"] == "inception-v3-RANDOM" and meta["dataset"] == "digits"
    assert not [p for p in os.listdir(tmp_path / "refs") if "tmp" in p]

    from PIL import Image
    for i, img in enumerate(gen_images):
        path = tmp_path / "samples" / "000000" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(path)
    Image.fromarray(np.zeros((64, 64), np.uint8)).save(tmp_path / "samples" / "grid.png")  # sample.py's preview, not a sample
    seen = {}

    def frechet_distance(*stats):
        seen["stats"] = stats
        return 1.5
    monkeypatch.setattr(fid, "frechet_distance", frechet_distance)
    result = fid.score_folder(str(tmp_path / "samples"), out, random_weights=True, batch=3, kid_subsets=10)
    mu, sigma, mu2, sigma2 = seen["stats"]
    np.testing.assert_allclose(mu, gen_feats.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma, np.cov(gen_feats, rowvar=False), rtol=1e-5, atol=1e-9)
    np.testing.assert_array_equal(mu2, mu_ref)
    np.testing.assert_array_equal(sigma2, sigma_ref)
    assert result["fid"] == 1.5 and result["count"] == 4 and result["extractor"] == "inception-v3-RANDOM"
    assert result["kid_mean"] == pytest.approx(fid.kid(gen_feats, stored, 10)[0], rel=1e-4, abs=1e-9)


def no_download(*args, **kwargs):
    pytest.fail("tried to download")


def test_weights_come_from_a_local_file(tmp_path, monkeypatch, capsys):
    """A state dict saved to disk is what the network holds after build_inception(path), with no download."""
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)  # what torch.hub calls on a cache miss
    state = {k: v + torch.randn_like(v) if v.is_floating_point() else v for k, v in fid.random_inception_state_dict().items()}
    path = str(tmp_path / fid.WEIGHTS_FILE)
    torch.save(state, path)

    model = fid.build_inception(path)
    torch.testing.assert_close(model.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"], rtol=0, atol=0)
    torch.testing.assert_close(model.blocks[3][2].branch_pool.bn.running_var, state["Mixed_7c.branch_pool.bn.running_var"], rtol=0, atol=0)
    assert model.extractor.startswith("inception-v3-unverified-")  # not the published file's sha256
    assert "not the published" in capsys.readouterr().err

    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", path)
    assert fid.find_inception_weights() == path
    np.savez(tmp_path / "ref.npz", mu=np.zeros(2048), sigma=np.eye(2048))
    (tmp_path / "ref.json").write_text(json.dumps({"extractor": "inception-v3-RANDOM"}))
    with pytest.raises(UserError, match="recompute the reference"):
        fid.score_images(digit_images(2), str(tmp_path / "ref.npz"))

    (tmp_path / "bad.pth").write_bytes(b"\x00" * 64)
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "wrong.pth")
    for bad in ("bad.pth", "wrong.pth"):
        with pytest.raises(UserError) as e:
            fid.build_inception(str(tmp_path / bad))
        assert fid.WEIGHTS_URL in str(e.value) and "\n" not in str(e.value)


def test_weights_under_another_name_load_offline_and_leave_the_hub_dir(tmp_path, monkeypatch, capsys):
    """pytorch-fid's constructor reads the file through a temporary torch hub cache: a file under any name loads, nothing
    is downloaded, and torch.hub.get_dir() (still steered by $TORCH_HOME) and the global RNG are as before. A file that is
    already the real cache's is loaded from there."""
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    monkeypatch.setattr(torch.hub, "download_url_to_file", no_download)
    state = fid.random_inception_state_dict(seed=1)
    path = tmp_path / "some-name.pth"
    torch.save(state, path)
    hub_dir, rng = torch.hub.get_dir(), torch.random.get_rng_state()

    model = fid.build_inception(str(path))
    assert torch.hub.get_dir() == hub_dir and torch.equal(torch.random.get_rng_state(), rng)
    assert not os.path.exists(hub_dir)  # nothing written to the real cache
    torch.testing.assert_close(model.blocks[3][1].branch3x3dbl_3a.conv.weight, state["Mixed_7b.branch3x3dbl_3a.conv.weight"],
                               rtol=0, atol=0)
    assert model.extractor.startswith("inception-v3-unverified-") and "not the published" in capsys.readouterr().err
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "elsewhere"))
    assert torch.hub.get_dir() == str(tmp_path / "elsewhere" / "hub")  # not pinned by build_inception's set_dir

    cached = tmp_path / "elsewhere" / "hub" / "checkpoints" / fid.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    os.link(path, cached)
    model = fid.build_inception()
    torch.testing.assert_close(model.blocks[0][0].conv.weight, state["Conv2d_1a_3x3.conv.weight"], rtol=0, atol=0)
    assert os.listdir(cached.parent) == [fid.WEIGHTS_FILE]


def test_no_tool_imports_unittest():
    """Product code uses pytorch-fid through the torch hub cache, not by patching it."""
    import ast
    import glob
    offenders = []
    for path in sorted(glob.glob(os.path.join(ROOT, "tools", "**", "*.py"), recursive=True)):
        with open(path) as f:
            for node in ast.walk(ast.parse(f.read(), path)):
                names = [a.name for a in node.names] if isinstance(node, ast.Import) else \
                        [node.module or ""] if isinstance(node, ast.ImportFrom) else []
                offenders += [f"{os.path.relpath(path, ROOT)}:{node.lineno}" for n in names if n.split(".")[0] == "unittest"]
    assert not offenders, offenders


def test_missing_weights_say_how_to_supply_them(tmp_path, monkeypatch):
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS", raising=False)
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch"))
    assert fid.find_inception_weights() is None
    with pytest.raises(UserError) as e:
        fid.build_inception()
    message = str(e.value)
    assert "--inception-weights" in message and "FID_INCEPTION_WEIGHTS" in message and fid.WEIGHTS_URL in message
    assert "\n" not in message

    monkeypatch.setenv("FID_INCEPTION_WEIGHTS", str(tmp_path / "nowhere.pth"))
    with pytest.raises(UserError, match="FID_INCEPTION_WEIGHTS=.*nowhere.pth: no such file"):
        fid.build_inception()

    cached = tmp_path / "torch" / "hub" / "checkpoints" / fid.WEIGHTS_FILE
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"")
    monkeypatch.delenv("FID_INCEPTION_WEIGHTS")
    assert fid.find_inception_weights() == str(cached)

    proc = run_script("tools/fid.py", "ref", "--config", "config/digits/E.yaml", "--out", str(tmp_path / "ref.npz"),
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
    monkeypatch.setattr(fid, "WEIGHTS_URL", release.as_uri())
    monkeypatch.setattr(fid, "WEIGHTS_SHA256_PREFIX", hashlib.sha256(b"weights").hexdigest()[:8])
    path = fid.inception_weights_or_none()
    assert path == str(tmp_path / "torch" / "hub" / "checkpoints" / fid.WEIGHTS_FILE)
    assert open(path, "rb").read() == b"weights" and fid.find_inception_weights() == path

    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "offline"))
    monkeypatch.setattr(fid, "WEIGHTS_URL", (tmp_path / "unreachable.pth").as_uri())
    assert fid.inception_weights_or_none() is None
    lines = capsys.readouterr().out.strip().splitlines()
    assert len(lines) == 1 and "--inception-weights" in lines[0] and "FID_INCEPTION_WEIGHTS" in lines[0]
