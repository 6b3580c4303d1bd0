"""Post-hoc EMA sweep: reconstruct several sigma_rel from a run's snapshots, sample, score and probe each, plot against sigma_rel.

    python -m tools.ema_sweep --outdir runs/demo/E --sigma-rels 0.03,0.05,0.075,0.1,0.15
    torchrun --nproc_per_node=8 -m tools.ema_sweep --outdir runs/cifar10-E --num-images 10000 sample.batch=512
"""

if __name__ == "__main__" and not __package__:
    raise SystemExit("run this from the repository root as: python -m tools.ema_sweep ...")

import copy
import os

from tools import sweep
from tools.checkpoint import write_json
from tools.cli import parse_numbers, run_main
from tools.config import check_ranges
from tools.linear_probe import read_probe_results
from tools.probing import probe, resolve_probe


def write(outdir, epoch, sigma_rels, results):
    probes = [r for r in read_probe_results(outdir) if r.get("epoch") == epoch]
    rows = []
    for s, (_, out, _) in zip(sigma_rels, results):
        row = sweep.quality_row(out, sigma_rel=s, epoch=epoch)
        accs = [r["test_accuracy_pct"] for r in probes if r.get("ema") == f"sigma_rel={s:g}"]
        rows.append(row | ({"probe_acc": accs[-1]} if accs else {}))
    base = os.path.join(outdir, f"ema_sweep_epoch_{epoch}")
    write_json(base + ".json", rows)
    print(sweep.table(f"Post-hoc EMA sweep: {rows[0]['count']} samples per sigma_rel, mean +- std over seed blocks.", rows,
                      [("sigma_rel", lambda r: f"{r['sigma_rel']:g}")],
                      [("probe %", lambda r: "-" if "probe_acc" not in r else f"{r['probe_acc']:.2f}")]), end="")
    panels = [(rows[0]["fd_name"], {"": sweep.points(rows, "sigma_rel", "fd")}), ("KID", {"": sweep.points(rows, "sigma_rel", "KID")})]
    if any("probe_acc" in r for r in rows):
        panels.append(("probe accuracy (%)", {"": sweep.points(rows, "sigma_rel", "probe_acc")}))
    sweep.plot(base + ".png", f"post-hoc EMA sweep: {os.path.basename(os.path.normpath(outdir))}", panels, "sigma_rel")
    print(f"written: {base}.json, {base}.png")
    return rows


def main(argv=None):
    p = sweep.parser("ema_sweep", __doc__)
    p.add_argument("--sigma-rels", default="0.03,0.05,0.075,0.10,0.15,0.20")
    p.add_argument("--no-probe", action="store_true")
    args, cfg, outdir = sweep.parse(p, argv)
    sigma_rels = parse_numbers(args.sigma_rels, "--sigma-rels")
    check_ranges("ema", {"sigma_rels": sigma_rels}, names={"sigma_rels": "--sigma-rels"})
    settings = []
    for s in sigma_rels:
        c = copy.deepcopy(cfg)
        c["sample"]["ema"] = c["probe"]["ema"] = f"sigma_rel={s:g}"
        settings.append((f"sigma_rel={s:g}", c, None))

    def with_its_probe(c, epoch, device):
        resolve_probe(c)
        probe(c, outdir, device, epoch=epoch)
    sweep.run_settings(outdir, settings, args, lambda epoch, results: write(outdir, epoch, sigma_rels, results),
                       after=None if args.no_probe else with_its_probe)


if __name__ == "__main__":
    run_main(main)
