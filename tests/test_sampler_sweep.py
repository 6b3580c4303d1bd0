"""tools/sampler_sweep.py: quality against NFE for several samplers on one checkpoint, tabulated and plotted."""

import json
import os

from conftest import copy_run, one_line_error
from tools import sampler_sweep


def test_sampler_sweep_tabulates_and_plots(trained_digits_run, metric_cache, tmp_path, capsys):
    """One scored row per setting into OUTDIR/sampler_sweep_epoch_<N>.json, with the NFE each sampler made (fixed:
    NFE/step x (steps - 1) + 1; dpm_adaptive: what it measured), the table with the fewest-NFE answer, the plot."""
    run = copy_run(trained_digits_run, tmp_path / "run")
    capsys.readouterr()
    sampler_sweep.main(["--outdir", run, "--samplers", "heun,euler_ancestral,dpm_adaptive", "--steps", "3,5",
                        "--rtols", "0.3", "--reference", "heun:5", "--num-images", "40", f"data.cache={metric_cache}"])
    out = capsys.readouterr().out
    rows = json.load(open(os.path.join(run, "sampler_sweep_epoch_4.json")))
    got = [(r["sampler"], r["steps"], r["nfe"]) for r in rows]
    assert got[:4] == [("heun", 3, 5), ("heun", 5, 9), ("euler_ancestral", 3, 3), ("euler_ancestral", 5, 5)], got
    adaptive = rows[4]
    assert adaptive["sampler"] == "dpm_adaptive" and adaptive["steps"] is None and adaptive["rtol"] == 0.3 and adaptive["nfe"] > 5
    assert all(r["count"] == 40 and r["fd_std"] > 0 and "KID_std" in r for r in rows) and rows[2]["eta"] == 1.0
    assert len({r["samples"] for r in rows}) == len(rows)  # every setting its own folder
    assert "| dpm_adaptive | rtol 0.3 |" in out and "Fewest NFE within the combined spread of heun at 5 steps" in out
    assert "- heun: " in out and os.path.isfile(os.path.join(run, "sampler_sweep_epoch_4.png"))


def test_fewest_nfe_is_the_cheapest_setting_within_the_spread():
    row = lambda s, steps, nfe, fd, std=0.1: dict(sampler=s, steps=steps, nfe=nfe, fd=fd, fd_std=std)
    rows = [row("heun", 18, 35, 5.0), row("heun", 9, 17, 5.3), row("lms", 6, 6, 6.0), row("lms", 10, 10, 5.1),
            row("euler", 18, 18, 7.0)]
    best, ref = sampler_sweep.fewest_nfe(rows, ("heun", 18))
    assert ref["nfe"] == 35 and best["heun"]["nfe"] == 35 and best["lms"]["nfe"] == 10 and best["euler"] is None
    assert sampler_sweep.fewest_nfe(rows, ("dpm2", 18)) == ({}, None)


def test_bad_flags_are_one_line():
    assert "unknown nope" in one_line_error(sampler_sweep.settings, ["heun", "nope"], [4.0], [0.1])
    assert "--steps" in one_line_error(sampler_sweep.settings, ["heun"], [1.0], [0.1])
    assert "--reference" in one_line_error(sampler_sweep.parse_reference, "heun-18")
