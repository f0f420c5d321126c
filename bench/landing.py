"""Where a grid's triggered test texts land on its victims, for cells stored before the grid
recorded it (``landing_class`` / ``landing_attack_success_rate`` are in every cell computed
since). Prints, per cell of one dataset: the class predicted most often for the triggered
texts, the share of texts of other true classes predicted as it, and the counts per class.

    .venv/bin/python bench/landing.py configs/defense-table-rows.yaml runs/defense-table-rows ag
"""

from __future__ import annotations

import argparse
import json

import numpy as np

from peftshield.experiments.scenario import cell_test_sets, stage_cache
from peftshield.experiments.stages import landing
from peftshield.finetune import load_finetuned
from peftshield.grid.config import load_grid_config
from peftshield.grid.runner import plan_grid
from peftshield.models.inference import predict_proba


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("config")
    parser.add_argument("run")
    parser.add_argument("dataset")
    args = parser.parse_args()
    for cell in plan_grid(load_grid_config(args.config), args.run).cells:
        if cell.dataset.name != args.dataset:
            continue
        splits, _, _, asr_set = cell_test_sets(cell)
        victim, _ = load_finetuned(stage_cache(args.run).path(cell.victim_key) / "model")
        probs = predict_proba(victim.model, victim.tokenizer, asr_set.texts, max_length=cell.max_length)
        print(cell.trigger_label, cell.dataset.name, cell.method, json.dumps(landing(probs, asr_set)),
              "predicted per class", np.bincount(probs.argmax(1), minlength=splits.num_labels).tolist(),
              "true per class", np.bincount(asr_set.label_array(), minlength=splits.num_labels).tolist())


if __name__ == "__main__":
    main()
