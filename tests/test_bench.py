"""tools/bench.py: one JSON line of sane figures, on random data (no dataset needs to exist)."""

import json

from conftest import DIGITS, run_script

QUICK = ["--steps", "2", "--windows", "2", "--warmup", "1", "--sample-images", "24", "--writer-images", "40",
         "--sample-batch", "16", "network.model_channels=8", "sample.steps=3"]


def test_bench_prints_one_json_line_without_a_dataset(tmp_path):
    proc = run_script("-m", "tools.bench", "--config", DIGITS, "--batch", "32", *QUICK, "data.dataset=folder",
                      f"data.root={tmp_path / 'nothing-here'}")
    lines = proc.stdout.strip().splitlines()
    row = json.loads(lines[-1])
    assert row["data"].startswith("random pixels") and row["batch"] == 32 and row["device"].startswith("cpu")
    assert len(row["train_windows_img_per_s"]) == 2 and row["train_img_per_s"] > 0 and row["train_peak_mem_gib"] > 0
    assert row["train_step_flops"] > 0 and 0 < row["train_matmul_fraction"] < 1.5
    for k in ("sample_img_per_s_network", "sample_img_per_s_end_to_end", "writer_img_per_s", "atomic_writer_img_per_s"):
        assert row[k] > 0, k
    assert row["sample_images"] == 24 and row["writer_images"] == 40
    # End to end includes loading and writing: it cannot beat the network alone by more than timing noise.
    assert row["sample_img_per_s_end_to_end"] < 1.5 * row["sample_img_per_s_network"]


def test_bench_bad_flag_is_one_line():
    proc = run_script("-m", "tools.bench", "--config", DIGITS, "--steps", "0", check=False)
    assert proc.returncode == 2 and proc.stderr.strip().count("\n") == 0 and "--steps" in proc.stderr, proc.stderr
