"""tools/ema_sweep.py: its flags meet the ranges of the keys they stand for."""

from conftest import DIGITS, assert_one_line_exit_2, run_script


def test_ema_sweep_rejects_sigma_rel_out_of_range(tmp_path):
    proc = run_script("-m", "tools.ema_sweep", "--config", DIGITS, "--outdir", str(tmp_path), "--sigma-rels", "0.05,0.3", check=False)
    assert_one_line_exit_2(proc, "--sigma-rels must be a list of numbers, each in (0, 1/sqrt(12)), got [0.05, 0.3]")
    proc = run_script("-m", "tools.ema_sweep", "--config", DIGITS, "--outdir", str(tmp_path), "--num-images", "39", check=False)
    assert_one_line_exit_2(proc, "--num-images must be >= 40")
