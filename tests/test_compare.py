"""tools/compare.py: the honest run comparison (table, ranks with ties, plots), on runs the EMA sweep has visited."""

import json

from conftest import run_script
from tools.config import dump, load_config


def test_sweep_and_compare(three_ema_run, tmp_path):
    run_script("-m", "tools.ema_sweep", "--config", str(three_ema_run / "config.yaml"), "--outdir", str(three_ema_run),
               "--sigma-rels", "0.05,0.15", "--num-images", "120", "sample.steps=6")
    rows = json.load(open(three_ema_run / "ema_sweep_epoch_6.json"))
    assert [r["sigma_rel"] for r in rows] == [0.05, 0.15]
    assert all(r["probe_acc"] > 30 for r in rows)  # 10 classes: chance is 10%
    assert all(r["fd_name"] == "FD_classifier" and r["count"] == 120 and r["fd_std"] > 0 for r in rows)
    with open(three_ema_run / "metrics.jsonl", "a") as f:  # a line cut short by a killed process is tolerated
        f.write('{"epoch": 6, "fi')
    proc = run_script("-m", "tools.compare", str(three_ema_run), "--out", str(tmp_path / "cmp"))
    row = [line for line in proc.stdout.splitlines() if f"| {three_ema_run.name} |" in line]
    assert len(row) == 1 and "| E | 0.08M |" in row[0] and "(best of 2 by FD_classifier)" in row[0], proc.stdout
    assert "chosen on held-out train" in proc.stdout and " +- " in row[0]
    for name in ("compare.md", "FD_classifier_vs_sigma_rel.png", "probe_vs_sigma_rel.png"):
        assert (tmp_path / "cmp" / name).exists(), name


def quality_row(run, fd, std, count=2000, blocks=4):
    return dict(kind="quality", epoch=10, kimg=14.1, ema="classic", count=count, blocks=blocks, block_size=count // blocks,
                FD_classifier=fd, FD_classifier_std=std, KID=0.01, KID_std=0.001, precision=0.8, precision_std=0.01,
                recall=0.7, recall_std=0.01, memorised_fraction=0.0, memorised_fraction_std=0.0)


def fake_run(root, name, unet, *quality):
    d = root / name
    d.mkdir()
    cfg = load_config(f"config/digits/{unet}.yaml")
    (d / "config.yaml").write_text(dump(cfg))
    (d / "metrics.jsonl").write_text("".join(json.dumps(q) + "\n" for q in quality))
    return str(d)


def test_compare_ranks_with_ties_and_never_mixes_sample_counts(tmp_path):
    """Runs within the combined spread of the best share its rank; a run scored on another sample count
    gets its own table instead of a rank in the first."""
    runs = [fake_run(tmp_path, "a", "C", quality_row("a", 5.0, 0.2)),
            fake_run(tmp_path, "b", "E", quality_row("b", 5.1, 0.2)),     # within sqrt(0.2^2 + 0.2^2) of a: tie
            fake_run(tmp_path, "c", "G", quality_row("c", 7.0, 0.2)),     # clearly worse
            fake_run(tmp_path, "d", "E", quality_row("d", 1.0, 0.1, count=500))]
    proc = run_script("-m", "tools.compare", *runs, "--out", str(tmp_path / "cmp"))
    tables = proc.stdout.split("Quality:")[1:]
    assert len(tables) == 2 and "2000 samples per run" in tables[0] and "500 samples per run" in tables[1]
    rank = {line.split("|")[2].strip(): line.split("|")[1].strip() for line in tables[0].splitlines()
            if line.startswith("| ") and not line.startswith("| rank")}
    assert rank == {"a": "1=", "b": "1=", "c": "3", "d": "-"}, rank
    assert "5.000 +- 0.200" in tables[0] and "1.000 +- 0.100" in tables[1]


def test_runs_that_differ_only_in_seed_are_averaged_as_replicates(tmp_path):
    """Two seeds of each of two settings: the replicates table names the setting by the key that differs and gives
    each figure as mean +- std over the seeds (std with ddof = 1), the best FD over the scored epochs beside it."""
    def run(name, p, seed, *fds, gap=None):
        d = tmp_path / name
        d.mkdir()
        (d / "config.yaml").write_text(dump(load_config("config/digits/E.yaml", [f"augment.p={p}", f"train.seed={seed}"])))
        rows = [dict(quality_row(name, fd, 0.1), epoch=10 * (k + 1)) for k, fd in enumerate(fds)]
        if gap is not None:  # a final validation loss of -0.1 at that gap over the training subset
            rows.append(dict(kind="eval", epoch=20, kimg=28.2, val_loss=-0.1, train_loss=-0.1 - gap, gap=gap))
        (d / "metrics.jsonl").write_text("".join(json.dumps(q) + "\n" for q in rows))
        return str(d)
    runs = [run("p0-s0", 0, 0, 3.0, 4.0, gap=0.1), run("p0-s1", 0, 1, 2.0, 6.0, gap=0.3), run("p1-s0", 0.1, 0, 3.0, 2.0),
            run("p1-s1", 0.1, 1, 3.0, 2.0)]
    from tools.compare import read_run, replicates_table
    lines = replicates_table([read_run(r) for r in runs])
    by_setting = {line.split("|")[1].strip(): line for line in lines if line.startswith("| augment")}
    assert set(by_setting) == {"augment.p=0.0", "augment.p=0.1"}, lines
    cells = [c.strip() for c in by_setting["augment.p=0.0"].split("|")]
    assert cells[2] == "0, 1" and cells[3] == "5.000 +- 1.414" and cells[8] == "2.500 +- 0.707 (10, 10)"
    assert cells[11] == "+0.2000 +- 0.1414"  # a signed mean gap, an unsigned spread
    assert [c.strip() for c in by_setting["augment.p=0.1"].split("|")][3] == "2.000 +- 0.000"
    assert replicates_table([read_run(runs[0])]) == []  # one run per setting: no table


def likelihood_row(epoch, bits, se, num_images=300, divergence="hutchinson-1"):
    return dict(kind="likelihood", epoch=epoch, kimg=1.0, ema="classic", divergence=divergence, num_images=num_images,
                bits_per_dim=bits, bits_per_dim_se=se)


def test_bits_per_dim_column_shows_the_newest_likelihood_only_when_present(tmp_path):
    plain = [fake_run(tmp_path, "p", "E", quality_row("p", 5.0, 0.2))]
    assert "bits/dim" not in run_script("-m", "tools.compare", *plain, "--out", str(tmp_path / "c1")).stdout
    runs = [fake_run(tmp_path, "a", "E", quality_row("a", 5.0, 0.2), likelihood_row(4, 2.5, 0.1), likelihood_row(10, 2.25, 0.05)),
            fake_run(tmp_path, "b", "G", quality_row("b", 6.0, 0.2))]
    lines = run_script("-m", "tools.compare", *runs, "--out", str(tmp_path / "c2")).stdout.splitlines()
    header = next(line for line in lines if line.startswith("| rank"))
    a, b = (next(line for line in lines if line.startswith(f"| {k} | {n} |")) for k, n in (("1", "a"), ("2", "b")))
    assert header.rstrip().endswith("bits/dim (held-out, +- se) |")
    assert a.rstrip().endswith("| 2.2500 +- 0.0500 (n=300, hutchinson-1, epoch 10) |") and b.rstrip().endswith("| - |")
