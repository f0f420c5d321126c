"""PSIM against the baseline defenses on real data: the grid ``configs/defense-table.yaml``
(victim LoRA on SST-2 and CR, badnet and insent backbones weight-poisoned on the IMDB
proxy) run through the scenario's one ``run_cell()``, plus the offline paraphrase defenses
on the study's own paraphrased files. Writes bench/defense_table.md and .json.

    .venv/bin/python bench/defense_table.py [--config configs/defense-table.yaml] [--work runs/defense-table]

The run is resumable: stages already in --work are reused.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from peftshield.defenses.paraphrase import OFFLINE_FILES, evaluate_paraphrased, offline_paraphrase_sets
from peftshield.experiments.scenario import REPORTS_DIR, backbone_stage, run_cell, stage_cache
from peftshield.finetune import METHODS, load_finetuned
from peftshield.grid.config import load_grid_config
from peftshield.grid.executors import LocalExecutor
from peftshield.grid.runner import run_grid
from peftshield.io import atomic_write_json, atomic_write_text, read_json

COLUMNS = ("trigger", "dataset", "defense", "CA", "ASR", "defended CA", "defended ASR", "AUROC", "FRR", "FAR", "tau", "n clean", "n triggered", "texts/s")
PARAPHRASE_DEFENSES = ("backtranslation", "scpn")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/defense-table.yaml")
    parser.add_argument("--work", default="runs/defense-table")
    parser.add_argument("--out", default="bench/defense_table")
    args = parser.parse_args()
    config = load_grid_config(args.config)
    plan = run_grid(config, args.work, LocalExecutor(), progress=False, log=lambda m: print(m, flush=True))
    rows, timings, attackers = [], {}, {}
    for cell in plan.cells:
        backbone = backbone_stage(cell, args.work)
        attackers[cell.trigger_label] = {k: backbone["report"][k] for k in ("clean_accuracy", "attack_success_rate")}
        timings[f"attack_{cell.trigger_label}"] = backbone["seconds"]
        result = run_cell(cell, args.work)
        undefended = result.metrics["none"]
        timings[f"victim_{cell.trigger_label}_{cell.dataset.name}"] = result.victim_record["train_result"]["seconds"]
        base = {"trigger": cell.trigger_label, "dataset": cell.dataset.name, "CA": undefended["clean_accuracy"], "ASR": undefended["attack_success_rate"]}
        rows.append({**base, "defense": f"none (victim {cell.method})", "defended CA": undefended["clean_accuracy"],
                     "defended ASR": undefended["attack_success_rate"], "n clean": undefended["n_clean"], "n triggered": undefended["n_poisoned"]})
        for entry in cell.defenses:
            report = read_json(result.stage_dir / REPORTS_DIR / f"{entry.label}.json")
            det = report["detection"]
            timings[f"{entry.label}_{cell.trigger_label}_{cell.dataset.name}"] = report["fit_seconds"] + report["score_seconds"]
            rows.append({**base, "defense": entry.label, "defended CA": report["defended_clean_accuracy"], "defended ASR": report["defended_attack_success_rate"],
                         "AUROC": det["auroc"], "FRR": det["frr"], "FAR": det["far"], "tau": det["threshold"],
                         "n clean": report["n_clean"], "n triggered": report["n_poisoned"], "texts/s": report["texts_per_second"]})
        if (cell.trigger.name == "badnet" and cell.trigger.options.get("words") in ("mn", ["mn"]) and cell.attack.target_label == 0
                and all((Path(cell.dataset.path) / f"{stem}.json").is_file() for name in PARAPHRASE_DEFENSES for stem in OFFLINE_FILES[name])):
            # the study's paraphrased files (SST-2, CR, CoLA) carry the `mn` trigger, target 0
            victim, _ = load_finetuned(stage_cache(args.work).path(cell.victim_key) / "model")
            for name in PARAPHRASE_DEFENSES:
                clean, triggered = offline_paraphrase_sets(cell.dataset.path, name)
                paraphrased = evaluate_paraphrased(victim.model, victim.tokenizer, name, clean, triggered, 0)
                rows.append({**base, "defense": name, "defended CA": paraphrased.defended_clean_accuracy,
                             "defended ASR": paraphrased.defended_attack_success_rate, "n clean": len(clean), "n triggered": len(triggered)})
        for row in rows[-len(cell.defenses) - 1:]:
            print(json.dumps(row), flush=True)
    write_table(args, config, rows, timings, attackers)


def write_table(args, config, rows: list[dict], timings: dict, attackers: dict) -> None:
    options = {entry.label: entry for entry in config.defenses}
    strip = options.get("strip")
    onion = options.get("onion")
    lines = ["# Defenses on real data (MiniLM, victim LoRA)\n",
             f"Grid `{args.config}`, run through the scenario's `run_cell()`. Backbones weight-poisoned on {config.attack.samples:,} rows of `{config.attack.data}` "
             f"(trigger into {config.attack.poison_count} rows, {config.attack.label_mode} label, target {config.attack.target_label}, lr {config.attack.learning_rate:g}, "
             f"{config.attack.epochs} epochs); attacker's own CA/ASR on its data: "
             + ", ".join(f"{t} {a['clean_accuracy']:.3f}/{a['attack_success_rate']:.3f}" for t, a in attackers.items()) + ". "
             f"Victim LoRA (lr {config.victim.lr_peft or METHODS.get('lora').default_learning_rate:g}, {config.victim.epochs} epochs, {config.victim.samples:,} training rows, dev-selected epoch); "
             "full test sets (empty texts skipped). CA/ASR are the same run undefended; in the defended columns a flagged clean text counts as an "
             "error and a flagged triggered text as a failed attack.\n",
             "- **psim**: its defaults (P-tuning, lr 2e-5, 1 epoch on 2,000 randomly relabelled training texts; tau calibrated to 1% FRR on clean dev).",
             f"- **strip**: {strip.build().num_perturbations if strip else '-'} perturbations (25% of words replaced by high-TF-IDF dev words); tau at 1% clean-dev FRR.",
             f"- **rap**: rare word `{options['rap'].build().word if 'rap' in options else '-'}` at the start, its embedding row learned (5 epochs) so that "
             "clean label-0 texts lose 0.1-0.3 of their label-0 probability; tau at 1% clean-dev FRR.",
             "- **bki**, **cube**: data cleaners, run on one pool of all clean test texts plus triggered texts drawn to make 10% of it "
             "(BKI: the top keyword of leave-one-word-out representation shifts; CUBE: PCA to 10 dimensions, HDBSCAN, main cluster per predicted class).",
             f"- **onion**: SmolLM2-135M (fp32), leave-one-word-out log-perplexity drop; on {onion.eval_texts if onion else '-'} clean and "
             f"{onion.eval_texts if onion else '-'} triggered test texts drawn at random (it is slow); tau at 1% FRR on "
             f"{onion.build().calibration_texts if onion else '-'} clean dev texts.",
             "- **backtranslation**, **scpn**: the victim on the study's pre-paraphrased test files (clean `test_back`/`test_spcn`; triggered "
             "`test_char_back`/`test_char_spcn`, label-1 texts carrying `mn`), badnet only.\n",
             f"Command: `.venv/bin/python bench/defense_table.py --config {args.config}`\n",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.0f}" if value >= 10 else f"{value:.3f}"
        return str(value)

    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    lines += ["", "Seconds per stage (from the stage records; a stage reused from the cache keeps the time it took when built): "
              + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    atomic_write_json(Path(args.out + ".json"), {"config": config.model_dump(mode="json"), "rows": rows, "seconds": timings, "attackers": attackers})


if __name__ == "__main__":
    main()
