"""Why PSIM misses syntactic triggers, and what catches them (issue 11, part 3).

Reads the syntactic row's grid run (configs/defense-table-syntactic.yaml, run by
``make defense-rows``) and adds three measurements on SST-2:

1. Is the backdoor itself confident? The victim's and the attacker's confidence on triggered
   texts against clean ones (from the run).
2. Does PSIM's random-label head react to style rather than to the backdoor? A control
   backbone is trained with the attacker's exact recipe minus the poison (same HiddenKiller
   SST-2 rows, labels clean), PSIM is fitted on it the same way, and its AUROC between clean
   test texts and the SCPN-template texts is measured: a high AUROC there would mean the
   template's style alone moves PSIM's confidence.
3. Which occlusion unit carries the signal: words or clauses (the victim, 300 clean and 300
   triggered test texts, threshold at 1% / 2% FRR of 400 clean dev texts).
4. DAN (distance of the victim's per-layer states to the clean classes) on the poisoned
   victim, and on a LoRA victim of the clean control backbone: a high AUROC on the control
   would mean DAN sees SCPN's style, not the backdoor.
5. Shift (the backbone's token-state change from the original MiniLM, left over after a ridge
   fit on clean texts) on the poisoned backbone and on the clean control backbone, each with
   and without the ridge fit (a huge penalty: plain differences): a high AUROC on the control
   would mean Shift sees the style of SCPN's texts, not the backdoor. On CR also against plain
   SST-2 texts (the CR row's template texts are paraphrased SST-2 movie reviews).
6. The same domain check for DAN on the CR victim: how much of its CR figure is movie reviews
   against product reviews.
7. Which successful attacks does Shift stop: the triggered texts (up to 2,000) split by whether
   the backdoor moves them (the poisoned victim puts them in the target class, the LoRA victim
   of the clean control backbone does not), whether a clean model misreads them too (both put
   them there), or the attack fails; Shift's AUROC and share flagged in each group.

Writes bench/syntactic_why.md and .json. ``--steps`` runs some of the steps and keeps the
others' figures from the existing .json. ``--dataset`` picks the victim cell the steps read
(default sst-2); the AG's News row (configs/syntactic-ag.yaml) runs the steps that apply to it:

    .venv/bin/python bench/syntactic_why.py [--run runs/defense-table-syntactic] [--steps dan]
    .venv/bin/python bench/syntactic_why.py --config configs/syntactic-ag.yaml --run runs/syntactic-ag \
        --dataset ag --steps confidence,control,dan,shift,moved   # writes bench/syntactic_why_ag.md
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
from sklearn.metrics import roc_auc_score

from peftshield.attacks import PoisonSpec
from peftshield.data import load_splits, load_texts
from peftshield.defenses import DEFENSES, DefenseContext
from peftshield.experiments.scenario import REPORTS_DIR, backbone_defense_stage, backbone_dir, stage_cache
from peftshield.experiments.stages import TriggerChoice, finetune_victim, weight_poison
from peftshield.finetune import TrainingConfig, load_finetuned
from peftshield.grid.config import load_grid_config
from peftshield.grid.runner import plan_grid
from peftshield.io import atomic_write_json, atomic_write_text, read_json
from peftshield.models.inference import predict_proba

N_TEXTS = 300
STEPS = ("confidence", "control", "occlusion", "dan", "shift", "domain", "moved")
MOVED_TEXTS = 2000
DEV_TEXTS = 400  # occlusion calibrates on this many clean dev texts (a forward pass per word each)


def auroc(clean, triggered) -> float:
    return float(roc_auc_score(np.r_[np.zeros(len(clean)), np.ones(len(triggered))], np.r_[clean, triggered]))


def at_frr(dev_scores, clean, triggered, frr: float) -> dict:
    threshold = float(np.quantile(dev_scores, 1 - frr))
    return {"frr_target": frr, "threshold": threshold, "frr": float(np.mean(np.asarray(clean) > threshold)),
            "tpr": float(np.mean(np.asarray(triggered) > threshold))}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--config", default="configs/defense-table-syntactic.yaml")
    parser.add_argument("--run", default="runs/defense-table-syntactic")
    parser.add_argument("--out", default=None, help="default: bench/syntactic_why, or bench/syntactic_why_<dataset> for another dataset")
    parser.add_argument("--steps", default=",".join(STEPS), help="comma-separated, of: " + ", ".join(STEPS))
    parser.add_argument("--dataset", default="sst-2", help="the victim cell whose clean and template texts the steps read")
    args = parser.parse_args()
    steps = set(args.steps.split(","))
    if steps - set(STEPS):
        parser.error(f"--steps: unknown step(s) {', '.join(sorted(steps - set(STEPS)))}; choose from {', '.join(STEPS)}")
    run = Path(args.run)
    plan = plan_grid(load_grid_config(args.config), run)
    cell = next((c for c in plan.cells if c.dataset.name == args.dataset), None)
    if cell is None:
        parser.error(f"--dataset: {args.config} has no '{args.dataset}' cell")
    if "domain" in steps and (args.dataset != "sst-2" or not any(c.dataset.name == "cr" for c in plan.cells)):
        parser.error("--steps domain: needs --dataset sst-2 and a CR cell (it compares CR's texts with plain SST-2 ones)")
    if args.out is None:
        args.out = "bench/syntactic_why" if args.dataset == "sst-2" else f"bench/syntactic_why_{args.dataset}"
    cache = stage_cache(run)
    previous = Path(args.out + ".json")
    result: dict = read_json(previous) if previous.is_file() and steps != set(STEPS) else {}
    if result.get("dataset", args.dataset) != args.dataset:
        parser.error(f"--out {args.out}: holds figures for {result['dataset']}, not {args.dataset}; give another --out")
    result["config"] = args.config
    result["dataset"] = args.dataset
    splits = load_splits(cell.dataset.path, skip_empty=True)
    clean_test = [t for t in splits["test"].texts][:1000]
    triggered = load_texts(str(Path(cell.dataset.poisoned_test)), "test").texts
    control_dir = run / "control-backbone"
    rng = np.random.default_rng(0)
    clean_sample = [clean_test[i] for i in rng.permutation(len(clean_test))[:N_TEXTS]]
    triggered_sample = [triggered[i] for i in rng.permutation(len(triggered))[:N_TEXTS]]
    dev = splits["dev"].subset(list(range(min(DEV_TEXTS, len(splits["dev"])))))
    if "confidence" in steps:
        result["confidence"] = backdoor_confidence(run, cell, cache)
    if "control" in steps:
        result["control_psim"] = control_psim(cell, control_dir, splits, clean_test, triggered)
    if "occlusion" in steps:
        result["occlusion"] = occlusion_units(run, cell, cache, splits, dev, clean_sample, triggered_sample, rng)
    if "dan" in steps:
        result["dan"] = dan_on_victims(run, cell, cache, control_dir, splits, clean_sample, triggered_sample)
    if "shift" in steps:
        result["shift"] = shift_on_backbones(run, plan, control_dir, cell.dataset.name, clean_sample, triggered_sample)
    if "domain" in steps:
        result["domain_dan"] = dan_domain(plan, cache, clean_sample, triggered_sample)
    if "moved" in steps:
        triggered_moved = [triggered[i] for i in np.random.default_rng(1).permutation(len(triggered))[:MOVED_TEXTS]]
        result["moved"] = shift_on_moved_texts(run, cell, cache, splits, clean_sample, triggered_moved)
    for label in ("psim", "psimplus", "dan", "shift"):
        report_path = cache.path(cell.cell_key) / REPORTS_DIR / f"{label}.json"
        if report_path.is_file():
            report = read_json(report_path)
            result[f"grid_{label}"] = {"detection": report["detection"], "defended_attack_success_rate": report["defended_attack_success_rate"],
                                       "defended_clean_accuracy": report["defended_clean_accuracy"]}
    atomic_write_json(previous, result)
    atomic_write_text(Path(args.out + ".md"), render(result))


def backdoor_confidence(run: Path, cell, cache) -> dict:
    """1. the backdoor's own confidence"""
    scores = read_json(cache.path(cell.cell_key) / "scores.json")
    attack = read_json(backbone_dir(run, cell) / "attack.json")
    victim_clean, victim_triggered = np.asarray(scores["none"]["clean"]), np.asarray(scores["none"]["poisoned"])
    psim_clean, psim_triggered = np.asarray(scores["psim"]["clean"]), np.asarray(scores["psim"]["poisoned"])
    confidence = {
        "victim_target_probability_triggered": float(victim_triggered.mean()),
        "victim_target_probability_clean": float(victim_clean.mean()),
        "victim_share_triggered_above_0.99": float(np.mean(victim_triggered > 0.99)),
        "attacker_target_confidence_triggered": attack.get("target_confidence_poisoned"),
        "attacker_asr": attack.get("attack_success_rate"), "attacker_ca": attack.get("clean_accuracy"),
        "psim_mean_clean": float(psim_clean.mean()), "psim_mean_triggered": float(psim_triggered.mean()),
        "psim_auroc": auroc(psim_clean, psim_triggered),
    }
    print(json.dumps(confidence), flush=True)
    return confidence


def control_psim(cell, control_dir: Path, splits, clean_test: list[str], triggered: list[str]) -> dict:
    """2. PSIM on a clean control backbone (the attacker's recipe minus the poison)"""
    attack_section = cell.attack
    started = time.perf_counter()
    if not (control_dir / "attack.json").is_file():
        training = TrainingConfig(learning_rate=attack_section.learning_rate, epochs=attack_section.epochs, max_length=cell.max_length,
                                  max_train_samples=attack_section.samples)
        weight_poison(attack_section.data, cell.backbone, TriggerChoice("none"), PoisonSpec(target_label=attack_section.target_label, count=0, rate=None),
                      training, control_dir, cell.seeds.training_seed, attack_section.max_words, progress=False)
    psim_entry = next(d for d in cell.defenses if d.name == "psim")
    control_psim = psim_entry.build(max_length=cell.max_length).fit(
        DefenseContext(str(control_dir), splits["train"], splits.get("dev"), splits.num_labels, max_length=cell.max_length, progress=False),
        cell.seeds.defense_fit())
    control_clean, control_triggered = control_psim.score(clean_test), control_psim.score(triggered)
    found = {"auroc": auroc(control_clean, control_triggered), "mean_clean": float(control_clean.mean()),
             "mean_triggered": float(control_triggered.mean()), "seconds": time.perf_counter() - started}
    print(json.dumps(found), flush=True)
    return found


def occlusion_units(run: Path, cell, cache, splits, dev, clean_sample: list[str], triggered_sample: list[str], rng) -> dict:
    """3. occlusion units on the victim"""
    victim, _ = load_finetuned(cache.path(cell.victim_key) / "model")
    dev_texts = dev.texts
    context = DefenseContext(str(backbone_dir(run, cell)), splits["train"], dev, splits.num_labels, victim.model, victim.tokenizer,
                             protected_label=cell.attack.target_label, max_length=cell.max_length, progress=False)
    found = {}
    for unit in ("word", "clause"):
        started = time.perf_counter()
        occlusion = DEFENSES.create("occlusion", unit=unit, max_units=30).fit(context, rng)
        dev_scores, clean_scores, triggered_scores = occlusion.score(dev_texts), occlusion.score(clean_sample), occlusion.score(triggered_sample)
        found[unit] = {"auroc": auroc(clean_scores, triggered_scores), "at_1pct": at_frr(dev_scores, clean_scores, triggered_scores, 0.01),
                                     "at_2pct": at_frr(dev_scores, clean_scores, triggered_scores, 0.02), "seconds": time.perf_counter() - started}
        print(unit, json.dumps(found[unit]), flush=True)
    return found


def fit_dan(model_dir: Path, splits, cell):
    """DAN fitted on the victim in ``model_dir`` with the grid's seed, and that victim."""
    victim, _ = load_finetuned(model_dir)
    context = DefenseContext(str(model_dir), splits["train"], splits["dev"], splits.num_labels, victim.model, victim.tokenizer,
                             max_length=cell.max_length, progress=False)
    return DEFENSES.create("dan", max_length=cell.max_length).fit(context, cell.seeds.defense_fit()), victim


def dan_on_victims(run: Path, cell, cache, control_dir: Path, splits, clean_sample: list[str], triggered_sample: list[str]) -> dict:
    """4. DAN on the poisoned victim and on a LoRA victim of the clean control backbone (the same
    victim recipe as the grid's): does it see the backdoor, or SCPN's style?"""
    if not (control_dir / "attack.json").is_file():
        raise SystemExit(f"{control_dir}: no control backbone yet; run the 'control' step first")
    control_victim_dir = run / "control-victim"
    if not (control_victim_dir / "model").is_dir():
        training = TrainingConfig(learning_rate=cell.victim.learning_rate(cell.method), epochs=cell.victim.epochs,
                                  max_length=cell.max_length, max_train_samples=cell.victim.samples)
        finetune_victim(splits, str(control_dir), cell.method, {}, training, cell.seeds.training_seed, control_victim_dir / "model",
                        progress=False, label="control victim")
    found = {}
    for name, model_dir in (("poisoned", cache.path(cell.victim_key) / "model"), ("control", control_victim_dir / "model")):
        started = time.perf_counter()
        dan, victim = fit_dan(model_dir, splits, cell)
        layers_clean, layers_triggered = dan.layer_scores(clean_sample), dan.layer_scores(triggered_sample)
        clean_scores, triggered_scores = layers_clean.max(axis=0), layers_triggered.max(axis=0)  # = dan.score(), one forward pass
        threshold = dan.fitted_threshold()
        predicted = predict_proba(victim.model, victim.tokenizer, triggered_sample, 64, cell.max_length).argmax(1)
        found[name] = {"auroc": auroc(clean_scores, triggered_scores), "tpr": float(np.mean(triggered_scores > threshold)),
                       "template_texts_at_target": float(np.mean(predicted == cell.attack.target_label)),
                       "frr": float(np.mean(clean_scores > threshold)),
                       "layer_auroc": [auroc(c, t) for c, t in zip(layers_clean, layers_triggered)], "seconds": time.perf_counter() - started}
        print("dan", name, json.dumps(found[name]), flush=True)
    return found


def shift_on_backbones(run: Path, plan, control_dir: Path, focus: str, focus_clean: list[str], triggered_sample: list[str]) -> dict:
    """5. Shift on the poisoned backbone and on the clean control backbone, calibrated on each
    victim task's dev set. On the focus dataset (whose texts the template texts paraphrase) also
    without the ridge fit. On another dataset (CR) the clean texts are product reviews while the
    template texts are paraphrased SST-2 movie reviews, so its clean texts are also compared with
    plain (unparaphrased) focus test texts: what Shift gives those is the part of its figure
    that is the change of domain, not the template."""
    if not (control_dir / "attack.json").is_file():
        raise SystemExit(f"{control_dir}: no control backbone yet; run the 'control' step first")
    found = {}
    for cell in plan.cells:
        entry = next(d for d in cell.defenses if d.name == "shift")
        splits = load_splits(cell.dataset.path, skip_empty=True)
        rng = np.random.default_rng(0)
        clean = [splits["test"].texts[i] for i in rng.permutation(len(splits["test"]))[:N_TEXTS]]
        for name, backbone in (("poisoned", backbone_dir(run, cell)), ("control", control_dir)):
            fits = (("ridge", entry.options.get("ridge", 10.0)), ("plain", 1e9)) if cell.dataset.name == focus else (("ridge", entry.options.get("ridge", 10.0)),)
            for fit, ridge in fits:
                started = time.perf_counter()
                context = DefenseContext(str(backbone), splits["train"], splits["dev"], splits.num_labels, max_length=cell.max_length, progress=False)
                shift = DEFENSES.create("shift", **{**entry.options, "ridge": ridge, "max_length": cell.max_length}).fit(context, cell.seeds.defense_fit())
                layers_clean, layers_triggered = shift.layer_scores(clean), shift.layer_scores(triggered_sample)
                clean_scores, triggered_scores = shift.combine_layers(layers_clean), shift.combine_layers(layers_triggered)  # = shift.score()
                threshold = shift.fitted_threshold()
                record = {"auroc": auroc(clean_scores, triggered_scores), "tpr": float(np.mean(triggered_scores > threshold)),
                          "frr": float(np.mean(clean_scores > threshold)),
                          "layer_auroc": [auroc(c, t) for c, t in zip(layers_clean, layers_triggered)]}
                if cell.dataset.name != focus:
                    plain_sst2 = shift.score(focus_clean)
                    record["plain_sst2_auroc"] = auroc(clean_scores, plain_sst2)
                    record["plain_sst2_flagged"] = float(np.mean(plain_sst2 > threshold))
                record["seconds"] = time.perf_counter() - started
                found[f"{cell.dataset.name}_{name}_{fit}"] = record
                print("shift", cell.dataset.name, name, fit, json.dumps(record), flush=True)
    return found


def dan_domain(plan, cache, sst2_clean: list[str], triggered_sample: list[str]) -> dict:
    """6. DAN on the CR victim: CR clean texts against plain SST-2 texts and against the template texts"""
    cell = next(c for c in plan.cells if c.dataset.name == "cr")
    splits = load_splits(cell.dataset.path, skip_empty=True)
    clean = [splits["test"].texts[i] for i in np.random.default_rng(0).permutation(len(splits["test"]))[:N_TEXTS]]
    dan, _ = fit_dan(cache.path(cell.victim_key) / "model", splits, cell)
    clean_scores, plain, triggered = dan.score(clean), dan.score(sst2_clean), dan.score(triggered_sample)
    found = {"auroc": auroc(clean_scores, triggered), "plain_sst2_auroc": auroc(clean_scores, plain),
             "plain_sst2_flagged": float(np.mean(plain > dan.fitted_threshold())), "tpr": float(np.mean(triggered > dan.fitted_threshold()))}
    print("dan domain", json.dumps(found), flush=True)
    return found


def shift_on_moved_texts(run: Path, cell, cache, splits, clean_sample: list[str], triggered: list[str]) -> dict:
    """7. Shift (the grid's fitted one, on the poisoned backbone) on the triggered texts grouped by
    what moves them: the backdoor alone, a clean model's misreading too, or nothing."""
    control_victim_dir = run / "control-victim" / "model"
    if not control_victim_dir.is_dir():
        raise SystemExit(f"{control_victim_dir}: no control victim yet; run the 'dan' step first")
    target = cell.attack.target_label
    at_target = {}
    for name, model_dir in (("poisoned", cache.path(cell.victim_key) / "model"), ("control", control_victim_dir)):
        victim, _ = load_finetuned(model_dir)
        at_target[name] = predict_proba(victim.model, victim.tokenizer, triggered, 64, cell.max_length).argmax(1) == target
    entry = next(d for d in cell.defenses if d.name == "shift")
    backbone_defense_stage(cell, entry.label, run)  # the grid's own fit, from its stage cache (fitted there if missing)
    context = DefenseContext(str(backbone_dir(run, cell)), splits["train"], splits["dev"], splits.num_labels, max_length=cell.max_length, progress=False)
    shift = DEFENSES.get(entry.name).load(cache.path(cell.defense_keys[entry.label]) / "defense", context)
    clean_scores, triggered_scores = shift.score(clean_sample), shift.score(triggered)
    flagged = triggered_scores > shift.fitted_threshold()
    groups = {"moved by the backdoor": at_target["poisoned"] & ~at_target["control"],
              "misread by a clean model too": at_target["poisoned"] & at_target["control"],
              "attack fails": ~at_target["poisoned"]}
    found = {"n_triggered": len(triggered), "clean_flagged": float(np.mean(clean_scores > shift.fitted_threshold())), "groups": {}}
    for name, members in groups.items():
        found["groups"][name] = {"count": int(members.sum()), "flagged": float(flagged[members].mean()) if members.any() else None,
                                 "auroc": auroc(clean_scores, triggered_scores[members]) if members.any() else None}
    print("moved", json.dumps(found), flush=True)
    return found


def render(result: dict) -> str:
    c, p = result["confidence"], result["control_psim"]
    dataset = result.get("dataset", "sst-2")
    lines = [f"# Why PSIM misses the syntactic trigger ({dataset.upper()})\n",
             f"From `{result['config']}` (MiniLM weight-poisoned with HiddenKiller's SCPN template, LoRA victim on {dataset.upper()}) "
             "and `bench/syntactic_why.py`.\n",
             "| question | measured |", "|---|---|",
             f"| is the backdoor confident? | victim's target probability on triggered texts {c['victim_target_probability_triggered']:.3f} "
             f"({c['victim_share_triggered_above_0.99']:.1%} above 0.99; clean texts' target probability {c['victim_target_probability_clean']:.3f}); attacker's own {c['attacker_target_confidence_triggered']:.3f} "
             f"(its ASR {c['attacker_asr']:.3f}, CA {c['attacker_ca']:.3f}) |",
             f"| PSIM on the poisoned backbone | mean confidence clean {c['psim_mean_clean']:.3f}, triggered {c['psim_mean_triggered']:.3f}; AUROC {c['psim_auroc']:.3f} |",
             f"| PSIM on a clean control backbone (same recipe, no poison) | mean confidence clean {p['mean_clean']:.3f}, template texts "
             f"{p['mean_triggered']:.3f}; AUROC {p['auroc']:.3f} |"]
    for unit, o in result.get("occlusion", {}).items():
        lines.append(f"| occlusion by {unit} (victim) | AUROC {o['auroc']:.3f}; at 1% dev FRR: TPR {o['at_1pct']['tpr']:.3f} (test FRR "
                     f"{o['at_1pct']['frr']:.3f}); at 2%: TPR {o['at_2pct']['tpr']:.3f} (FRR {o['at_2pct']['frr']:.3f}) |")
    for name, d in result.get("dan", {}).items():
        what = "the poisoned victim" if name == "poisoned" else "a LoRA victim of the clean control backbone"
        lines.append(f"| DAN on {what} | AUROC {d['auroc']:.3f}; at its 1% FRR threshold: TPR {d['tpr']:.3f} (test FRR {d['frr']:.3f}); "
                     f"per layer AUROC {', '.join(f'{a:.2f}' for a in d['layer_auroc'])} |")
        if "template_texts_at_target" in d:
            lines.append(f"| template texts the {name} victim puts in the target class | {d['template_texts_at_target']:.3f} |")
    for key, d in result.get("shift", {}).items():
        cell_dataset, name, fit = key.split("_")
        what = "the poisoned backbone" if name == "poisoned" else "the clean control backbone"
        how = "after the ridge fit" if fit == "ridge" else "plain differences (no ridge fit)"
        line = (f"| Shift on {what}, {how}, {cell_dataset.upper()} clean texts | AUROC {d['auroc']:.3f}; at its 1% FRR threshold: TPR {d['tpr']:.3f} "
                f"(test FRR {d['frr']:.3f}); per layer AUROC {', '.join(f'{a:.2f}' for a in d['layer_auroc'])}")
        if "plain_sst2_auroc" in d:
            line += f"; plain {dataset.upper()} test texts against {cell_dataset.upper()}'s: AUROC {d['plain_sst2_auroc']:.3f}, flagged {d['plain_sst2_flagged']:.3f}"
        lines.append(line + " |")
    if "domain_dan" in result:
        d = result["domain_dan"]
        lines.append(f"| DAN on the CR victim, CR clean texts | against the template texts AUROC {d['auroc']:.3f} (TPR {d['tpr']:.3f}); "
                     f"against plain SST-2 test texts AUROC {d['plain_sst2_auroc']:.3f}, flagged {d['plain_sst2_flagged']:.3f} |")
    if "moved" in result:
        m = result["moved"]
        parts = [f"{name}: {g['count']} texts, AUROC {g['auroc']:.3f}, flagged {g['flagged']:.3f}" if g["count"] else f"{name}: none"
                 for name, g in m["groups"].items()]
        lines.append(f"| Shift (the grid's settings) on {m['n_triggered']} triggered texts, by what puts them in the target class "
                     f"(clean texts flagged {m['clean_flagged']:.3f}) | {'; '.join(parts)} |")
    for label in ("psim", "psimplus", "dan", "shift"):
        if f"grid_{label}" in result:
            g = result[f"grid_{label}"]
            lines.append(f"| {label} in the grid | AUROC {g['detection']['auroc']:.3f}, FRR {g['detection']['frr']:.3f}, FAR {g['detection']['far']:.3f}; "
                         f"defended CA / ASR {g['defended_clean_accuracy']:.3f} / {g['defended_attack_success_rate']:.3f} |")
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
