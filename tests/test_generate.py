"""tools/generate.py: images that depend only on their seed (resumable, exact PNGs; any rank count: test_multirank), the balanced class mix,
the training grid, the labels file and guidance flags of a conditional run."""

import filecmp
import json
import os

import pytest

from conftest import COND_EPOCHS, run_script, sample_in_process
from tools.generate import grid_layout, image_path
from tools.sampler import seed_classes


def test_classes_are_balanced_and_follow_seeds_not_ranks():
    """The default class mix is balanced (any K consecutive seeds hold every class once) and a seed's class does not
    depend on which other seeds are sampled with it (the rank split, the batch)."""
    K, seeds = 10, list(range(3, 58))
    classes = seed_classes(seeds, K)
    for start in range(len(seeds) - K + 1):
        assert sorted(classes[start:start + K]) == list(range(K))
    for world in (2, 3):
        for rank in range(world):
            assert seed_classes(seeds[rank::world], K) == classes[rank::world]
    assert [seed_classes([s], K)[0] for s in seeds] == classes
    assert seed_classes(seeds, K, class_index=4) == [4] * len(seeds) and seed_classes(seeds, 0) is None


@pytest.mark.parametrize("label_dim,rows,cols", [(10, 10, 6), (3, 8, 8), (100, 8, 8)])
def test_training_grid_layout(label_dim, rows, cols):
    """One row per class where rows fit in 64 images (digits, CIFAR-10: 10 rows of 6), else image k of class k mod K."""
    classes, per_row = grid_layout(label_dim)
    assert per_row == cols and len(classes) == rows * cols
    if label_dim <= 64 // 2:
        assert all(len(set(classes[r * cols:(r + 1) * cols])) == 1 for r in range(rows))
        assert [classes[r * cols] for r in range(rows)] == [r % label_dim for r in range(rows)]
    else:
        assert classes == [k % label_dim for k in range(64)]


def test_training_grid_has_a_row_per_class(cond_run):
    from PIL import Image
    grid = Image.open(os.path.join(cond_run, "grids", f"epoch_{COND_EPOCHS}.png"))
    assert grid.size == (6 * 66 + 2, 10 * 66 + 2)  # 6 columns, 10 rows of 16 px images shown 4x, 2 px separators


def test_sample_classes_guidance_and_labels_file(cond_run, tmp_path, capsys):
    """Default: the balanced mix, recorded in <out>.labels.json beside a folder of PNGs only; --guidance 1 gives the
    same files; --class K, classifier-free guidance and autoguidance by an earlier checkpoint run and record classes."""
    common = ["--outdir", cond_run, "--seeds", "0-11", "--steps", "4"]
    out = {k: str(tmp_path / k) for k in ("mix", "w1", "class3", "cfg", "auto")}
    sample_in_process(capsys, *common, "--out", out["mix"])
    sample_in_process(capsys, *common, "--guidance", "1", "--out", out["w1"])
    sample_in_process(capsys, *common, "--class", "3", "--out", out["class3"])
    assert "classifier-free guidance 2" in sample_in_process(capsys, *common, "--guidance", "2", "--out", out["cfg"])
    assert "autoguidance 2" in sample_in_process(capsys, *common, "--guidance", "2", "--guide", f"{cond_run}:4", "--out", out["auto"])
    labels = {k: json.load(open(f"{v}.labels.json")) for k, v in out.items()}
    assert labels["mix"] == labels["w1"] == labels["cfg"] == labels["auto"] == {str(s): s % 10 for s in range(12)}
    assert labels["class3"] == {str(s): 3 for s in range(12)}
    assert os.listdir(out["mix"]) == ["000000"] and len(os.listdir(os.path.join(out["mix"], "000000"))) == 12
    same = lambda a, b: [filecmp.cmp(image_path(out[a], s), image_path(out[b], s), shallow=False) for s in range(12)]
    assert all(same("mix", "w1"))
    assert not all(same("mix", "cfg")) and not all(same("mix", "auto")) and not all(same("mix", "class3"))


@pytest.mark.parametrize("config,args,needle", [
    (None, ["--class", "10"], "--class must be a class index in 0..9"),
    (None, ["--class", "-1"], "--class must be a class index in 0..9"),
    ("config/digits/E.yaml", ["--class", "0"], "--class needs a class-conditional run"),
    ("config/digits/E.yaml", ["--guidance", "2"], "classifier-free guidance, which needs a class-conditional run"),
])
def test_bad_class_or_guidance_is_one_line(cond_run, tmp_path, config, args, needle):
    """A conditional run with a class it does not know, or an unconditional one asked for classes or CFG."""
    where = ["--outdir", cond_run] if config is None else ["--config", config, "--outdir", str(tmp_path)]
    proc = run_script("sample.py", *where, "--seeds", "0-1", "--steps", "2", "--out", str(tmp_path / "s"), *args, check=False)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("error:") and needle in lines[0], proc.stderr
    assert not os.path.exists(tmp_path / "s")


def test_samples_are_of_the_requested_class_and_guidance_sharpens_them(cond_run, metric_cache, tmp_path, capsys):
    """--score on a conditional run: the dataset classifier (98.7% on real test digits) names the requested class of
    the balanced mix far above chance (10%), more often with classifier-free guidance. Seen: 51% +- 6% unguided,
    91% +- 3% at W = 3 (4 blocks of 50)."""
    common = ["--outdir", cond_run, "--seeds", "0-199", "--steps", "12", "--score", f"data.cache={metric_cache}"]
    line = [l for l in sample_in_process(capsys, *common, "--out", str(tmp_path / "w1")).splitlines() if l.startswith("quality")]
    assert "requested-class accuracy:" in line[0], line
    sample_in_process(capsys, *common, "--guidance", "3", "--out", str(tmp_path / "w3"))
    unguided, guided = (json.load(open(tmp_path / f"{k}.quality.json")) for k in ("w1", "w3"))
    assert unguided["classes"] == guided["classes"] == "mix" and guided["guidance"] == 3
    assert unguided["class_accuracy"] > 0.3 and guided["class_accuracy"] > max(0.7, unguided["class_accuracy"] + 0.2)
    assert unguided["class_accuracy_std"] > 0 and unguided["classifier_test_accuracy"] > 0.95


def pngs(folder, seeds):
    return [image_path(str(folder), s) for s in seeds]


def test_interrupted_run_continues_to_the_same_files(trained_digits_run, tmp_path):
    args = ["sample.py", "--config", "config/digits/E.yaml", "--outdir", trained_digits_run, "--seeds", "0-7", "--steps", "6", "--batch", "4"]
    run_script(*args, "--out", str(tmp_path / "full"))
    run_script(*args, "--out", str(tmp_path / "part"))
    for p in pngs(tmp_path / "part", [1, 5, 6]):  # an interruption: some images missing, one write half done
        os.remove(p)
    open(image_path(str(tmp_path / "part"), 6) + ".tmp4242", "wb").write(b"\x89PNG partial")
    kept = os.path.getmtime(image_path(str(tmp_path / "part"), 0))
    proc = run_script(*args, "--out", str(tmp_path / "part"))
    assert "3 to go" in proc.stdout
    assert os.path.getmtime(image_path(str(tmp_path / "part"), 0)) == kept  # existing images are not redone
    for a, b in zip(pngs(tmp_path / "full", range(8)), pngs(tmp_path / "part", range(8))):
        assert filecmp.cmp(a, b, shallow=False)
