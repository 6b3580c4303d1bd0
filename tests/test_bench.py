"""tools/bench.py: one JSON line of sane figures, on random data (no dataset needs to exist)."""

import json

import pytest

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
    # The figures are one another's: FLOP/s = FLOPs per step x steps per second (images per second / batch), and the
    # fraction is of the matmul rate measured beside it. (Timing bounds between two measurements are left out: under
    # load one of them can come out several times slower than the other.)
    assert row["train_step_flops"] > 0 and row["train_matmul_fraction"] > 0
    steps_per_s = row["train_img_per_s"] / row["batch"]
    assert row["train_tflops"] == pytest.approx(row["train_step_flops"] * steps_per_s / 1e12, rel=1e-12)
    assert row["train_matmul_fraction"] == pytest.approx(row["train_tflops"] / row["matmul_tflops"], rel=1e-12)
    for k in ("sample_img_per_s_network", "sample_img_per_s_end_to_end", "writer_img_per_s", "atomic_writer_img_per_s"):
        assert row[k] > 0, k
    assert row["sample_images"] == 24 and row["writer_images"] == 40
    # one GPU's share of an 8-GPU run: 32 / 8 images in two micro-batches, with the noise-scale hooks of such a run
    assert (row["share_gpus"], row["share_batch"], row["share_batch_gpu"]) == (8, 4, 2) and row["share_train_img_per_s"] > 0


@pytest.mark.parametrize("flag,value", [("--steps", "0"), ("--batch", "0"), ("--sample-batch", "-1"), ("--gpus", "0"),
                                        ("--warmup", "-1")])
def test_bench_bad_flag_is_one_line(flag, value):
    """Every bad value stops in one line naming its flag (--batch 0 must not fall back to the config's batch)."""
    from tools import bench
    from conftest import one_line_error
    assert one_line_error(bench.main, ["--config", DIGITS, flag, value]).startswith(f"{flag} must be")
