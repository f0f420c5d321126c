"""Which PEFT method makes the best PSIM here? Fit one PSIM per method on a poisoned backbone
and measure separation (AUROC), FRR/FAR at the default tau, and the dev-calibrated (1% FRR) cost.

    .venv/bin/python bench/psim_methods.py --backbone runs/demo/poisoned-backbone --data ../shared/data/psim/sst-2
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from peftshield.attacks import POISONERS, build_asr_set
from peftshield.data import load_splits
from peftshield.defenses import PSIM, DefenseContext, ThresholdPolicy
from peftshield.io import atomic_write_text
from peftshield.metrics import detection_metrics

CANDIDATES = [("lora", 2e-4), ("ptuning", 2e-5), ("ptuning", 2e-3), ("prompt", 2e-3), ("ia3", 2e-3)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--backbone", required=True)
    parser.add_argument("--data", required=True)
    parser.add_argument("--trigger-words", default="mn")
    parser.add_argument("--target", type=int, default=0)
    parser.add_argument("--out", default="bench/psim_methods.md")
    args = parser.parse_args()
    splits = load_splits(args.data)
    rng = np.random.default_rng(0)
    asr_set = build_asr_set(splits["test"], POISONERS.create("badnet", words=args.trigger_words), args.target, rng)
    rows = []
    for method, lr in CANDIDATES:
        psim = PSIM(method=method, learning_rate=lr, threshold=ThresholdPolicy("frr", target_frr=0.01))
        started = time.perf_counter()
        psim.fit(DefenseContext(args.backbone, splits["train"], splits["dev"], splits.num_labels, progress=False), np.random.default_rng(1))
        fit_seconds = time.perf_counter() - started
        clean, poisoned = psim.score(splits["test"].texts), psim.score(asr_set.texts)
        fixed = detection_metrics(clean, poisoned, 0.7)
        calibrated = detection_metrics(clean, poisoned, psim.threshold_)
        rows.append({"method": method, "lr": lr, "auroc": fixed.auroc, "frr@0.7": fixed.frr, "far@0.7": fixed.far,
                     "tau(dev 1% FRR)": psim.threshold_, "frr@tau": calibrated.frr, "far@tau": calibrated.far,
                     "clean median": float(np.median(clean)), "triggered min": float(poisoned.min()), "fit s": fit_seconds})
        print(json.dumps(rows[-1]), flush=True)
    header = list(rows[0])
    lines = [f"# PSIM method comparison\n", f"Backbone `{args.backbone}`, data `{args.data}`, trigger badnet `{args.trigger_words}` -> {args.target}; "
             f"{len(splits['test'])} clean and {len(asr_set)} triggered test texts; 1 epoch on 2,000 randomly relabelled training texts.\n",
             f"Command: `.venv/bin/python bench/psim_methods.py --backbone {args.backbone} --data {args.data}`\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:.3g}" if isinstance(v, float) else str(v) for v in row.values()) + " |" for row in rows]
    atomic_write_text(Path(args.out), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
