"""tools/runs.py: a run's config read from its directory, and run directories whose names look like glob patterns."""

import os
import shutil

import pytest

from conftest import sample_in_process, train_here
from tools.cli import UserError
from tools.linear_probe import read_probe_results
from tools.posthoc import list_snapshots
from tools.runs import resolve


def test_outdir_alone_reads_the_runs_config(trained_digits_run):
    cfg, outdir = resolve(None, trained_digits_run, ["sample.steps=5"])
    assert outdir == trained_digits_run and cfg["train"]["epochs"] == 4 and cfg["sample"]["steps"] == 5
    cfg, outdir = resolve("config/digits/E.yaml", trained_digits_run)  # --config replaces the run's own
    assert cfg["train"]["epochs"] == 20 and outdir == trained_digits_run
    with pytest.raises(UserError, match="no config.yaml"):
        resolve(None, os.path.dirname(trained_digits_run))
    with pytest.raises(UserError, match="--outdir RUN"):
        resolve(None, None)




def test_a_run_directory_with_glob_characters_trains_resumes_samples_and_probes(trained_digits_run, tmp_path, capsys):
    """Checkpoints, snapshots and probe results are listed by plain directory listings, so a run directory named
    like a glob pattern ([, ], *) is found like any other: a copy of a run under such a name resumes and trains on,
    and its newest checkpoint is sampled (with a post-hoc EMA from its snapshots) and probed."""
    run = str(tmp_path / "run[E]*1")
    shutil.copytree(trained_digits_run, run)
    capsys.readouterr()
    train_here("--config", os.path.join(run, "config.yaml"), "--outdir", run, "train.epochs=5")
    assert f"resumed {run} at epoch 4" in capsys.readouterr().out and os.path.isfile(os.path.join(run, "checkpoints", "epoch_5.pt"))
    assert len(list_snapshots(os.path.join(run, "snapshots"))) >= 5
    sample_in_process(capsys, "--outdir", run, "--seeds", "0-3", "--steps", "3", "--ema", "sigma_rel=0.08")
    assert len(os.listdir(os.path.join(run, "samples", "epoch_5-sigma_rel0.08-heun3-fp32", "000000"))) == 4
    import probe
    probe.main(["--outdir", run, "probe.C_grid=[1.0]"])
    assert capsys.readouterr().out.startswith("test accuracy:") and read_probe_results(run)[0]["epoch"] == 5
