"""tools/guidance_sweep.py: quality against the guidance weight, tabulated and plotted."""

import json
import os

from conftest import COND_EPOCHS


def test_guidance_sweep_tabulates_and_plots(cond_run, metric_cache, capsys):
    """tools/guidance_sweep.py: one scored row per W (W = 1 unguided) into OUTDIR/guidance_sweep_epoch_<N>-cfg.json,
    a markdown table on stdout and the plot."""
    from tools import guidance_sweep
    capsys.readouterr()
    guidance_sweep.main(["--outdir", cond_run, "--weights", "1,2", "--num-images", "40", "sample.steps=4", f"data.cache={metric_cache}"])
    out = capsys.readouterr().out
    rows = json.load(open(os.path.join(cond_run, f"guidance_sweep_epoch_{COND_EPOCHS}-cfg.json")))
    assert [r["guidance"] for r in rows] == [1, 2] and all(r["count"] == 40 and "class_accuracy_std" in r for r in rows)
    assert "| W | FD_classifier |" in out and "\n| 2 | " in out
    assert os.path.isfile(os.path.join(cond_run, f"guidance_sweep_epoch_{COND_EPOCHS}.png"))
