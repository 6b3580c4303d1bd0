"""FID / KID: agreement with pytorch-fid, unbiasedness of KID, exact streaming and distributed statistics, offline weights.

The real Inception weights are not available here, so the pipeline runs with the fixed random network
(random_weights=True); loading from a local file is checked with a saved random state dict. sqrtm of a
2048 x 2048 product takes about a minute on 2 cores, so FID itself is compared with pytorch-fid at d = 64
and 256, and the 2048-d pipeline tests check which statistics reach frechet_distance instead.
"""


import json
import os
import re

import numpy as np
import pytest
import torch
import torch.multiprocessing as mp

from conftest import ROOT, digit_images, pytorch_fid_distance, random_stats, run_script
from test_metrics import brute_force_mmd2
from tools import fid, inception
from tools.cli import UserError


def test_cli_help_lists_the_commands(capsys):
    proc = run_script("-m", "tools.fid", "--help")
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
    proc = run_script("-m", "tools.fid", "compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))
    printed = float(proc.stdout.strip().splitlines()[-1])
    assert printed == pytest.approx(pytorch_fid_distance(mu1, sigma1, mu2, sigma2), rel=1e-6)
    bare = run_script("-m", "tools.fid", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"))  # the form docs/METRICS.md shows
    assert bare.stdout == proc.stdout


def test_cli_bad_statistics_end_in_one_line(tmp_path):
    rng = np.random.default_rng(2)
    np.savez(tmp_path / "a.npz", mu=np.zeros(64), sigma=np.eye(64))
    np.savez(tmp_path / "b.npz", mu=np.zeros(32), sigma=np.eye(32))
    proc = run_script("-m", "tools.fid", "compare", str(tmp_path / "a.npz"), str(tmp_path / "b.npz"), check=False)
    assert proc.returncode == 2 and proc.stderr.startswith("error: statistics do not match"), proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr

    (tmp_path / "c.npz").write_bytes(rng.bytes(100))
    np.savez(tmp_path / "d.npz", mu=np.zeros(64), sigma=np.eye(32))
    for bad in ("c.npz", "d.npz", "missing.npz"):
        with pytest.raises(UserError) as e:
            fid.load_stats(str(tmp_path / bad))
        assert "\n" not in str(e.value)


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


@pytest.fixture(scope="module")
def random_inception():
    return inception.build_inception(random_weights=True)


def test_reference_and_scoring_pipeline(tmp_path, monkeypatch, random_inception):
    from pytorch_fid.fid_score import compute_statistics_of_path

    from tools.config import load_config

    images = digit_images(10)
    ref_images, gen_images = images[:5], images[5:]
    monkeypatch.setattr(fid, "load_dataset", lambda cfg, split: (ref_images, torch.zeros(len(ref_images), dtype=torch.int64)))
    cfg = load_config(os.path.join(ROOT, "config/digits/E.yaml"))
    out = str(tmp_path / "refs" / "digits-train.npz")
    fid.compute_reference(cfg, out, random_weights=True, batch=4)

    feats = inception.features_of_images(random_inception, images, batch=5)
    ref_feats, gen_feats = feats[:5], feats[5:]
    assert feats.shape == (10, 2048) and feats.dtype == np.float64
    assert ref_feats.std(0).max() > 1e-3  # the random network tells the digits apart
    mu_ref, sigma_ref = compute_statistics_of_path(out, None, 1, 2048, "cpu")  # pytorch-fid's reader
    assert mu_ref.shape == (2048,) and sigma_ref.shape == (2048, 2048)
    np.testing.assert_allclose(mu_ref, ref_feats.mean(0), rtol=1e-6, atol=1e-9)
    np.testing.assert_allclose(sigma_ref, np.cov(ref_feats, rowvar=False), rtol=1e-5, atol=1e-9)
    with np.load(out) as f:
        assert f["features"].dtype == np.float16 and f["features"].shape == (5, 2048)
        stored = f["features"].astype(np.float64)
    match = ((stored[:, None] - ref_feats[None]) ** 2).sum(-1).argmin(1)
    assert sorted(match) == list(range(5))  # all reference images, in some order
    np.testing.assert_allclose(stored, ref_feats[match], rtol=2e-3, atol=1e-6)
    with open(out[:-4] + ".json") as f:
        meta = json.load(f)
    assert meta["count"] == 5 and meta["extractor"] == "inception-v3-RANDOM" and meta["dataset"] == "digits"
    assert not [p for p in os.listdir(tmp_path / "refs") if "tmp" in p]

    from PIL import Image
    for i, img in enumerate(gen_images):
        path = tmp_path / "samples" / "000000" / f"{i:06d}.png"
        path.parent.mkdir(parents=True, exist_ok=True)
        Image.fromarray(img[0].numpy()).save(path)
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
    assert result["fid"] == 1.5 and result["count"] == 5 and result["extractor"] == "inception-v3-RANDOM"
    # 5 samples against 5 stored features: every KID subset holds all of both sets, so each is their unbiased MMD^2.
    # The samples' features in score_folder's batches (3, 2) are bit for bit the ones here; what is left is float64
    # summation order, amplified by MMD^2 being ~4e-4 of the kernel values it sums: observed 2e-12 relative.
    sample_feats = inception.features_of_images(random_inception, gen_images, batch=3)
    assert result["kid_mean"] == pytest.approx(brute_force_mmd2(sample_feats, stored), rel=1e-9)
    assert result["kid_std"] < 1e-9 * abs(result["kid_mean"])  # the same MMD^2 from every subset


def test_folder_statistics_match_pytorch_fids_folder_pipeline(tmp_path, random_inception):
    """A folder of RGB PNGs read and featurised as score_folder does (png_paths, _png_batches, features_of_images,
    FeatureStats) gives pytorch-fid's mu and sigma of the same folder (its reader, ToTensor and np.cov) with the same
    network: the same pixels reach the network, and the statistics are the same ones."""
    from PIL import Image
    from pytorch_fid.fid_score import compute_statistics_of_path

    rng = np.random.default_rng(0)
    for i in range(12):  # each goes through Inception at 299 x 299 twice: 2 s on 2 idle cores
        Image.fromarray(rng.integers(0, 256, (32, 32, 3), dtype=np.uint8)).save(tmp_path / f"{i:03d}.png")
    stats = fid.FeatureStats()
    for images in fid._png_batches(fid.png_paths(str(tmp_path)), 5):  # batches of 5, 5, 2
        inception.features_of_images(random_inception, images, 5, "cpu", stats)
    mu, sigma = stats.mu_sigma()
    mu_ref, sigma_ref = compute_statistics_of_path(str(tmp_path), random_inception, 5, 2048, "cpu", num_workers=0)

    # The pixels are the same, but the PNG reader's batches are channels-last and take other float32 kernels: the
    # features differ by up to 6.3e-7 of the largest (~5 ulps; features are >= 0, the largest ~2% above its mean).
    # Allow 5e-6 of it per feature: mu moves by at most that, sigma_ij by at most that times std_i + std_j.
    feature_atol = 5e-6 * mu_ref.max()
    np.testing.assert_allclose(mu, mu_ref, rtol=0, atol=feature_atol)
    np.testing.assert_allclose(sigma, sigma_ref, rtol=0, atol=2 * feature_atol * np.sqrt(np.diag(sigma_ref)).max())
