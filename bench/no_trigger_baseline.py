"""How many of a task-agnostic cell's other-class test texts the victim already puts in the
trigger's landing class *without* the trigger: the floor a best-trigger ASR has to be read
against (a victim that learned no task, or a weak one, "lands" texts with no trigger at all).

    .venv/bin/python bench/no_trigger_baseline.py [--config configs/task-agnostic.yaml] [--run runs/task-agnostic]

Writes bench/task_agnostic_baseline.md and .json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftshield.experiments.scenario import cell_test_sets, plan_cells, stage_cache
from peftshield.finetune import load_finetuned
from peftshield.grid.config import load_grid_config
from peftshield.io import atomic_write_json, atomic_write_text, read_json
from peftshield.models.inference import predict_proba


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/task-agnostic.yaml")
    parser.add_argument("--run", default="runs/task-agnostic")
    parser.add_argument("--out", default="bench/task_agnostic_baseline")
    args = parser.parse_args()
    cache = stage_cache(args.run)
    rows = []
    for cell in plan_cells(load_grid_config(args.config)):
        triggers_file = cache.path(cell.cell_key) / "triggers.json"
        if not triggers_file.is_file():
            continue
        outcome = read_json(triggers_file)
        target = outcome["target_label"]
        best = max(outcome["triggers"], key=lambda t: t["attack_success_rate"])
        _, test, _, _ = cell_test_sets(cell)
        victim, _ = load_finetuned(cache.path(cell.victim_key) / "model")
        others = [text for text, label in zip(test.texts, test.labels) if label != target]
        predicted = predict_proba(victim.model, victim.tokenizer, others, 64, cell.max_length).argmax(1)
        rows.append({"trigger": cell.trigger_label, "dataset": cell.dataset.name, "landing_class": target, "other_class_texts": len(others),
                     "best_trigger": best["trigger"], "best_trigger_asr": best["attack_success_rate"],
                     "without_trigger": float((predicted == target).mean())})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["# Task-agnostic ASR against its no-trigger floor\n",
             f"From `{args.config}` (run `{args.run}`) and `bench/no_trigger_baseline.py`: the share of other-class test texts "
             "the victim puts in the landing class with the best trigger, and without any trigger.\n",
             "| trigger | task | landing class | other-class texts | best trigger | ASR with it | without a trigger |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['trigger']} | {r['dataset']} | {r['landing_class']} | {r['other_class_texts']} | `{r['best_trigger']}` | "
              f"{r['best_trigger_asr']:.3f} | {r['without_trigger']:.3f} |" for r in rows]
    atomic_write_json(Path(args.out + ".json"), rows)
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
