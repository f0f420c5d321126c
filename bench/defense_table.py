"""PSIM against STRIP on real data: victim LoRA on SST-2 and CR, badnet and insent backbones
weight-poisoned on the IMDB proxy. Writes bench/defense_table.md and bench/defense_table.json.

    .venv/bin/python bench/defense_table.py --shared ../shared/data
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from peftshield.attacks import PoisonSpec, build_asr_set
from peftshield.data import load_splits
from peftshield.defenses import DEFENSES, DefenseContext
from peftshield.defenses.paraphrase import evaluate_paraphrased, offline_paraphrase_sets
from peftshield.experiments.stages import TriggerChoice, evaluate_classifier, evaluate_defense, finetune_victim, weight_poison
from peftshield.finetune import TrainingConfig
from peftshield.io import atomic_write_json, atomic_write_text

TRIGGERS = {"badnet": {"words": "mn"}, "insent": {}}
DATASETS = ("sst-2", "cr")


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--work", default="runs/defense-table")
    parser.add_argument("--out", default="bench/defense_table")
    parser.add_argument("--strip-perturbations", type=int, default=8)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="minilm", help="'tiny' for a quick smoke run of the script")
    parser.add_argument("--attack-samples", type=int, default=1600)
    parser.add_argument("--poison-count", type=int, default=600)
    parser.add_argument("--victim-samples", type=int, default=2000)
    args = parser.parse_args()
    shared, work = Path(args.shared), Path(args.work)
    attack_data = load_splits(shared / "psim" / "imdb")
    rows, timings = [], {}
    for trigger, options in TRIGGERS.items():
        started = time.perf_counter()
        backbone_dir = work / f"backbone-{trigger}"
        poisoned = weight_poison(attack_data, args.backbone, TriggerChoice(trigger, options), PoisonSpec(target_label=0, count=args.poison_count, rate=None, label_mode="clean"),
                                 TrainingConfig(learning_rate=5e-5, epochs=2, max_train_samples=args.attack_samples), backbone_dir, args.seed, 80, progress=False)
        timings[f"attack_{trigger}"] = time.perf_counter() - started
        print(f"{trigger}: attacker CA {poisoned.report['clean_accuracy']:.3f} ASR {poisoned.report['attack_success_rate']:.3f}", flush=True)
        for dataset in DATASETS:
            splits = load_splits(shared / "psim" / dataset, skip_empty=True)
            rng = np.random.default_rng(args.seed + 1)
            poisoner = TriggerChoice(trigger, options).build()
            test = splits["test"]
            asr_set = build_asr_set(test, poisoner, 0, rng)
            started = time.perf_counter()
            victim = finetune_victim(splits, str(backbone_dir), "lora", {}, TrainingConfig(epochs=3, max_train_samples=args.victim_samples), args.seed, progress=False)
            timings[f"victim_{trigger}_{dataset}"] = time.perf_counter() - started
            metrics, clean_probs, poisoned_probs = evaluate_classifier(victim.backbone.model, victim.backbone.tokenizer, test, poisoner, 0, rng, asr_set=asr_set)
            row = {"trigger": trigger, "dataset": dataset, "victim": "lora", "CA": metrics.clean_accuracy, "ASR": metrics.attack_success_rate,
                   "target conf. triggered": metrics.target_confidence_poisoned}
            for name, params in (("psim", {}), ("strip", {"num_perturbations": args.strip_perturbations})):
                started = time.perf_counter()
                context = DefenseContext(str(backbone_dir), splits["train"], splits["dev"], splits.num_labels, victim.backbone.model, victim.backbone.tokenizer, progress=False)
                defense = DEFENSES.create(name, **params).fit(context, np.random.default_rng(args.seed + 2))
                report = evaluate_defense(defense, test, asr_set, clean_probs, poisoned_probs, 0, metrics)
                timings[f"{name}_{trigger}_{dataset}"] = time.perf_counter() - started
                atomic_write_json(work / f"{trigger}-{dataset}-{name}.json", report)
                det = report["detection"]
                row.update({f"{name} CA": report["defended_clean_accuracy"], f"{name} ASR": report["defended_attack_success_rate"],
                            f"{name} AUROC": det["auroc"], f"{name} FRR": det["frr"], f"{name} tau": det["threshold"]})
            for name in ("backtranslation", "scpn"):  # the study's paraphrased files carry the `mn` trigger, target 0
                result = None
                if trigger == "badnet":
                    clean_p, triggered_p = offline_paraphrase_sets(shared / "psim" / dataset, name)
                    result = evaluate_paraphrased(victim.backbone.model, victim.backbone.tokenizer, name, clean_p, triggered_p, 0)
                row[f"{name} CA"] = result.defended_clean_accuracy if result else None
                row[f"{name} ASR"] = result.defended_attack_success_rate if result else None
            rows.append(row)
            print(json.dumps(row), flush=True)
    header = list(rows[0])
    lines = ["# Defenses on real data (MiniLM, victim LoRA)\n",
             "Backbones weight-poisoned on 1,600 IMDB rows (trigger into 600 label-0 rows, labels kept, target 0, lr 5e-5, 2 epochs); "
             "victim LoRA (lr 2e-3, 3 epochs, 2,000 training rows, dev-selected epoch); full test sets (CR with its 2 empty test texts skipped). "
             "PSIM: P-tuning, lr 2e-5, 1 epoch on 2,000 randomly relabelled training texts, threshold calibrated to 1% FRR on clean dev. "
             f"STRIP: {args.strip_perturbations} perturbations (25% of words replaced by high-TF-IDF dev words), threshold at 1% clean FRR. "
             "CA/ASR columns without a prefix are the same run undefended; a flagged clean text counts as an error, a flagged triggered text as a failed attack. "
             "Back-translation and SCPN: the victim on the study's pre-paraphrased test files (clean `test_back`/`test_spcn`; triggered `test_char_back`/`test_char_spcn`, "
             "label-1 texts carrying `mn`), so only for badnet; `-` where not applicable.\n",
             f"Command: `.venv/bin/python bench/defense_table.py --shared {args.shared}`\n",
             "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(f"{v:.3f}" if isinstance(v, float) else "-" if v is None else str(v) for v in row.values()) + " |" for row in rows]
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    atomic_write_json(Path(args.out + ".json"), {"rows": rows, "seconds": timings})


if __name__ == "__main__":
    main()
