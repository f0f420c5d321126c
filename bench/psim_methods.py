"""Which PEFT method makes the best PSIM here? The grid ``configs/psim-methods.yaml`` (one PSIM
per method and learning rate, on the defense table's badnet backbone and SST-2) run through the
scenario's ``run_cell()``; measures separation (AUROC), FRR/FAR at the reference tau 0.7 and
at the dev-calibrated (1% FRR) tau. Writes bench/psim_methods.md.

    .venv/bin/python bench/psim_methods.py [--config configs/psim-methods.yaml] [--work runs/psim-methods]
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from peftshield.experiments.scenario import REPORTS_DIR, run_cell
from peftshield.grid.config import load_grid_config
from peftshield.grid.executors import LocalExecutor
from peftshield.grid.runner import run_grid
from peftshield.io import atomic_write_text, read_json
from peftshield.metrics import detection_metrics

REFERENCE_TAU = 0.7


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/psim-methods.yaml")
    parser.add_argument("--work", default="runs/psim-methods")
    parser.add_argument("--out", default="bench/psim_methods.md")
    args = parser.parse_args()
    config = load_grid_config(args.config)
    plan = run_grid(config, args.work, LocalExecutor(), progress=False, log=lambda m: print(m, flush=True))
    cell = plan.cells[0]
    result = run_cell(cell, args.work)
    rows = []
    for entry in cell.defenses:
        report = read_json(result.stage_dir / REPORTS_DIR / f"{entry.label}.json")
        clean, poisoned = np.asarray(report["scores"]["clean"]), np.asarray(report["scores"]["poisoned"])
        fixed = detection_metrics(clean, poisoned, REFERENCE_TAU)
        options = report["defense_spec"]["options"]
        rows.append({"method": options["method"], "lr": options["learning_rate"], "auroc": fixed.auroc, "frr@0.7": fixed.frr, "far@0.7": fixed.far,
                     "tau(dev 1% FRR)": report["detection"]["threshold"], "frr@tau": report["detection"]["frr"], "far@tau": report["detection"]["far"],
                     "clean median": float(np.median(clean)), "triggered min": float(poisoned.min()), "fit s": report["fit_seconds"]})
        print(json.dumps(rows[-1]), flush=True)
    header = list(rows[0])
    lines = ["# PSIM method comparison\n",
             f"Grid `{args.config}` (cell {cell.trigger_label} / {cell.dataset.name}, seed {cell.seed}); {rows and result.metrics['none']['n_clean']} clean "
             f"and {result.metrics['none']['n_poisoned']} triggered test texts; 1 epoch on 2,000 randomly relabelled training texts.\n",
             f"Command: `.venv/bin/python bench/psim_methods.py --config {args.config}`\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |" for row in rows]
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
