"""tools/linear_probe.py: the classifier's selection never sees the test split."""

import json
import os

from conftest import DIGITS, ROOT, accuracy_of, copy_run, run_probe
from tools import probe_features, probing
from tools.config import load_config
from tools.data import load_dataset


def test_the_test_split_never_influences_selection(trained_digits_run, tmp_path, capsys, monkeypatch):
    """A grid run whose test labels are all wrong selects the same C per cell and the same best cell."""
    run = copy_run(trained_digits_run, tmp_path / "run")
    args = ("--grid", "probe.grid_sigmas=[0.06,0.3]", "probe.C_grid=[0.1,1.0]")
    grid_json = os.path.join(run, "checkpoints", "epoch_4.probe_grid_classic.json")
    run_probe(capsys, run, *args)
    with open(grid_json) as f:
        clean = json.load(f)
    assert os.path.getsize(grid_json[:-len(".json")] + ".png") > 0

    def wrong_test_labels(cfg, split):
        images, labels = load_dataset(cfg, split)
        return images, (labels + 1) % 10 if split == "test" else labels
    monkeypatch.setattr(probing, "load_dataset", wrong_test_labels)
    out, _ = run_probe(capsys, run, *args)
    with open(grid_json) as f:
        corrupted = json.load(f)

    assert len(clean["cells"]) == 2 * len(probe_features.list_blocks(load_config(os.path.join(ROOT, DIGITS))))
    selection = lambda grid: [(c["block"], c["sigma"], c["C"], c["holdout_accuracy_pct"]) for c in grid["cells"]]
    assert selection(corrupted) == selection(clean)
    assert (corrupted["best"]["block"], corrupted["best"]["sigma"]) == (clean["best"]["block"], clean["best"]["sigma"])
    assert accuracy_of(out) < 30 < clean["best"]["test_accuracy_pct"]  # the corruption did reach the test score
