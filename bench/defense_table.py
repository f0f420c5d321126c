"""PSIM against the baseline defenses on real data: victim LoRA on SST-2 and CR, badnet and
insent backbones weight-poisoned on the IMDB proxy. Writes bench/defense_table.md and .json.

    .venv/bin/python bench/defense_table.py --shared ../shared/data [--reuse-backbones]
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
from peftshield.io import atomic_write_json, atomic_write_text, read_json

TRIGGERS = {"badnet": {"words": "mn"}, "insent": {}}
DATASETS = ("sst-2", "cr")
COLUMNS = ("trigger", "dataset", "defense", "CA", "ASR", "defended CA", "defended ASR", "AUROC", "FRR", "FAR", "tau", "n clean", "n triggered", "texts/s")


def poisoned_backbone(args, trigger: str, options: dict, attack_data, backbone_dir: Path, timings: dict) -> dict:
    if args.reuse_backbones and (backbone_dir / "attack.json").is_file():
        return read_json(backbone_dir / "attack.json")
    started = time.perf_counter()
    poisoned = weight_poison(attack_data, args.backbone, TriggerChoice(trigger, options), PoisonSpec(target_label=0, count=args.poison_count, rate=None, label_mode="clean"),
                             TrainingConfig(learning_rate=5e-5, epochs=2, max_train_samples=args.attack_samples), backbone_dir, args.seed, 80, progress=False)
    timings[f"attack_{trigger}"] = time.perf_counter() - started
    return poisoned.report


def defense_options(name: str, args) -> dict:
    return {"strip": {"num_perturbations": args.strip_perturbations}, "rap": {"word": args.rap_word},
            "onion": {"calibration_texts": args.onion_texts}}.get(name, {})


def subsample(test, asr_set, clean_probs, poisoned_probs, size: int, rng: np.random.Generator):
    """At most ``size`` clean and ``size`` triggered texts, for the slow ONION."""
    keep_clean = np.sort(rng.permutation(len(test))[:size])
    keep_triggered = np.sort(rng.permutation(len(asr_set))[:size])
    return test.subset(keep_clean.tolist()), asr_set.subset(keep_triggered.tolist()), clean_probs[keep_clean], poisoned_probs[keep_triggered]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shared", default="../shared/data")
    parser.add_argument("--work", default="runs/defense-table")
    parser.add_argument("--out", default="bench/defense_table")
    parser.add_argument("--defenses", default="psim,strip,rap,bki,cube,onion")
    parser.add_argument("--triggers", default=",".join(TRIGGERS))
    parser.add_argument("--datasets", default=",".join(DATASETS))
    parser.add_argument("--strip-perturbations", type=int, default=8)
    parser.add_argument("--rap-word", default="jj", help="RAP's rare word (one token of the backbone's vocabulary)")
    parser.add_argument("--onion-texts", type=int, default=60, help="ONION scores this many clean and triggered test texts (it is slow)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--backbone", default="minilm", help="'tiny' for a quick smoke run of the script")
    parser.add_argument("--attack-samples", type=int, default=1600)
    parser.add_argument("--poison-count", type=int, default=600)
    parser.add_argument("--victim-samples", type=int, default=2000)
    parser.add_argument("--reuse-backbones", action="store_true", help="reuse weight-poisoned backbones already in --work")
    parser.add_argument("--merge", action="store_true", help="replace only the rows computed now in an existing --out table")
    args = parser.parse_args()
    shared, work = Path(args.shared), Path(args.work)
    defenses = [d for d in args.defenses.split(",") if d]
    attack_data = load_splits(shared / "psim" / "imdb")
    rows, timings, attackers = [], {}, {}
    for trigger in args.triggers.split(","):
        backbone_dir = work / f"backbone-{trigger}"
        report = poisoned_backbone(args, trigger, TRIGGERS[trigger], attack_data, backbone_dir, timings)
        attackers[trigger] = {k: report[k] for k in ("clean_accuracy", "attack_success_rate")}
        print(f"{trigger}: attacker CA {report['clean_accuracy']:.3f} ASR {report['attack_success_rate']:.3f}", flush=True)
        for dataset in args.datasets.split(","):
            splits = load_splits(shared / "psim" / dataset, skip_empty=True)
            rng = np.random.default_rng(args.seed + 1)
            poisoner = TriggerChoice(trigger, TRIGGERS[trigger]).build()
            test = splits["test"]
            asr_set = build_asr_set(test, poisoner, 0, rng)
            started = time.perf_counter()
            victim = finetune_victim(splits, str(backbone_dir), "lora", {}, TrainingConfig(epochs=3, max_train_samples=args.victim_samples), args.seed, progress=False)
            timings[f"victim_{trigger}_{dataset}"] = time.perf_counter() - started
            metrics, clean_probs, poisoned_probs = evaluate_classifier(victim.backbone.model, victim.backbone.tokenizer, test, poisoner, 0, rng, asr_set=asr_set)
            base = {"trigger": trigger, "dataset": dataset, "CA": metrics.clean_accuracy, "ASR": metrics.attack_success_rate}
            rows.append({**base, "defense": "none (victim LoRA)", "defended CA": metrics.clean_accuracy, "defended ASR": metrics.attack_success_rate,
                         "n clean": len(test), "n triggered": len(asr_set)})
            for name in defenses:
                started = time.perf_counter()
                context = DefenseContext(str(backbone_dir), splits["train"], splits["dev"], splits.num_labels, victim.backbone.model, victim.backbone.tokenizer,
                                         protected_label=0, progress=False)
                defense = DEFENSES.create(name, **defense_options(name, args)).fit(context, np.random.default_rng(args.seed + 2))
                scored = (test, asr_set, clean_probs, poisoned_probs)
                if name == "onion":
                    scored = subsample(*scored, args.onion_texts, np.random.default_rng(args.seed + 4))
                report = evaluate_defense(defense, *scored, 0, metrics, rng=np.random.default_rng(args.seed + 3))
                timings[f"{name}_{trigger}_{dataset}"] = time.perf_counter() - started
                atomic_write_json(work / f"{trigger}-{dataset}-{name}.json", report)
                det = report["detection"]
                rows.append({**base, "defense": name, "defended CA": report["defended_clean_accuracy"], "defended ASR": report["defended_attack_success_rate"],
                             "AUROC": det["auroc"], "FRR": det["frr"], "FAR": det["far"], "tau": det["threshold"],
                             "n clean": report["n_clean"], "n triggered": report["n_poisoned"], "texts/s": report["texts_per_second"]})
                print(json.dumps(rows[-1]), flush=True)
            if trigger == "badnet":  # the study's paraphrased files carry the `mn` trigger, target 0
                for name in ("backtranslation", "scpn"):
                    clean_p, triggered_p = offline_paraphrase_sets(shared / "psim" / dataset, name)
                    result = evaluate_paraphrased(victim.backbone.model, victim.backbone.tokenizer, name, clean_p, triggered_p, 0)
                    rows.append({**base, "defense": name, "defended CA": result.defended_clean_accuracy, "defended ASR": result.defended_attack_success_rate,
                                 "n clean": len(clean_p), "n triggered": len(triggered_p)})
    if args.merge and Path(args.out + ".json").is_file():
        previous = read_json(Path(args.out + ".json"))
        fresh = {(r["trigger"], r["dataset"], r["defense"]) for r in rows}
        order = {key: i for i, key in enumerate((r["trigger"], r["dataset"]) for r in previous["rows"])}
        rows = sorted([r for r in previous["rows"] if (r["trigger"], r["dataset"], r["defense"]) not in fresh] + rows,
                      key=lambda r: (order.get((r["trigger"], r["dataset"]), 99), r["defense"] != "none (victim LoRA)"))
        timings = {**previous["seconds"], **timings}
        attackers = {**previous.get("attackers", {}), **attackers}
    write_table(args, rows, timings, attackers)


def write_table(args, rows: list[dict], timings: dict, attackers: dict) -> None:
    lines = ["# Defenses on real data (MiniLM, victim LoRA)\n",
             "Backbones weight-poisoned on 1,600 IMDB rows (trigger into 600 label-0 rows, labels kept, target 0, lr 5e-5, 2 epochs); "
             "attacker's own CA/ASR on IMDB: " + ", ".join(f"{t} {a['clean_accuracy']:.3f}/{a['attack_success_rate']:.3f}" for t, a in attackers.items()) + ". "
             "Victim LoRA (lr 2e-3, 3 epochs, 2,000 training rows, dev-selected epoch); full test sets (CR with its 2 empty test texts skipped). "
             "CA/ASR are the same run undefended; in the defended columns a flagged clean text counts as an error and a flagged triggered text as a failed attack.\n",
             "- **psim**: P-tuning, lr 2e-5, 1 epoch on 2,000 randomly relabelled training texts; tau calibrated to 1% FRR on clean dev.",
             f"- **strip**: {args.strip_perturbations} perturbations (25% of words replaced by high-TF-IDF dev words); tau at 1% clean-dev FRR.",
             f"- **rap**: rare word `{args.rap_word}` at the start, its embedding row learned (5 epochs) so that clean label-0 texts lose 0.1-0.3 of their label-0 probability; tau at 1% clean-dev FRR.",
             "- **bki**, **cube**: data cleaners, run on one pool of all clean test texts plus triggered texts drawn to make 10% of it "
             "(BKI: the top keyword of leave-one-word-out representation shifts; CUBE: PCA to 10 dimensions, HDBSCAN, main cluster per predicted class).",
             f"- **onion**: SmolLM2-135M (fp32), leave-one-word-out log-perplexity drop; on {args.onion_texts} clean and {args.onion_texts} triggered test texts drawn at random (it is slow); tau at 1% FRR on {args.onion_texts} clean dev texts.",
             "- **backtranslation**, **scpn**: the victim on the study's pre-paraphrased test files (clean `test_back`/`test_spcn`; triggered `test_char_back`/`test_char_spcn`, label-1 texts carrying `mn`), badnet only.\n",
             f"Command: `.venv/bin/python bench/defense_table.py --shared {args.shared}" + (" --reuse-backbones" if args.reuse_backbones else "") + "`\n",
             "| " + " | ".join(COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]

    def cell(value) -> str:
        if value is None:
            return "-"
        if isinstance(value, float):
            return f"{value:.0f}" if value >= 10 else f"{value:.3f}"
        return str(value)

    lines += ["| " + " | ".join(cell(row.get(c)) for c in COLUMNS) + " |" for row in rows]
    lines += ["", "Seconds per stage: " + ", ".join(f"{k} {v:.0f}" for k, v in timings.items())]
    atomic_write_text(Path(args.out + ".md"), "\n".join(lines) + "\n")
    atomic_write_json(Path(args.out + ".json"), {"rows": rows, "seconds": timings, "attackers": attackers})


if __name__ == "__main__":
    main()
