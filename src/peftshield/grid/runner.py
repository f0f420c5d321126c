"""Run a grid: plan the cells, compute each stage once (content-hash cache), store results.

Three phases, each a list of independent tasks handed to an executor (local or Ray):
1. weight-poisoned backbones, one per trigger and seed;
2. PSIMs (one per backbone, dataset and seed) and victims (one per backbone, dataset,
   method and seed);
3. cells: evaluate a victim undefended and behind every defense, then write the cell's
   rows to the SQLite store in one transaction.
A task whose stage is already cached returns at once, so a killed run resumes where it
stopped, and cells already in the store are not recomputed.
"""

from __future__ import annotations

import hashlib
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from peftshield import __version__
from peftshield.grid.cache import StageCache, canonical_json, stage_key
from peftshield.grid.config import DatasetEntry, GridConfig, TriggerEntry
from peftshield.grid.store import NO_DEFENSE, CellRecord, ResultStore

STORE_FILE = "results.sqlite"
CSV_FILE = "results.csv"
CONFIG_FILE = "config.json"


def versions() -> dict[str, str]:
    import peft
    import torch
    import transformers

    return {"peftshield": __version__, "torch": torch.__version__, "transformers": transformers.__version__, "peft": peft.__version__}


def data_fingerprint(path: str) -> str:
    """sha256 over the names and bytes of a data directory's files (or of a ``pkg:``/``hf:`` spec)."""
    directory = Path(path)
    if not directory.exists():
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in sorted(p for p in ([directory] if directory.is_file() else directory.rglob("*")) if p.is_file()):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


@dataclass(frozen=True)
class CellPlan:
    seed: int
    trigger: TriggerEntry
    dataset: DatasetEntry
    method: str
    backbone_key: str
    psim_key: str | None
    victim_key: str
    cell_key: str

    def coordinates(self) -> dict:
        return {"seed": self.seed, "trigger": self.trigger.label, "dataset": self.dataset.name, "method": self.method}


@dataclass
class GridPlan:
    config: GridConfig
    run_dir: Path
    config_hash: str
    backbones: dict[str, tuple[TriggerEntry, int]]
    psims: dict[str, tuple[str, DatasetEntry, int]]
    cells: list[CellPlan]


def plan_grid(config: GridConfig, run_dir: str | Path) -> GridPlan:
    """Every stage key of the grid; equal inputs give equal keys, so shared stages run once."""
    fingerprints = {d.name: data_fingerprint(d.path) for d in config.datasets}
    base = {"version": __version__, "backbone": config.backbone, "max_length": config.max_length}
    backbones, psims, cells = {}, {}, []
    for seed in config.seeds:
        for trigger in config.triggers:
            attack_section = config.attack_for(trigger)
            attack = {**attack_section.model_dump(), "data_fingerprint": data_fingerprint(attack_section.data)}
            backbone_key = stage_key("backbone", {**base, "attack": attack, "trigger": trigger.model_dump(), "seed": seed})
            backbones[backbone_key] = (trigger, seed)
            for dataset in config.datasets:
                data = {"dataset": dataset.name, "data_fingerprint": fingerprints[dataset.name]}
                psim_key = None
                if "psim" in config.defenses:
                    psim_key = stage_key("psim", {**base, "backbone_key": backbone_key, **data, "psim": config.psim.model_dump(), "seed": seed})
                    psims[psim_key] = (backbone_key, dataset, seed)
                for method in config.methods:
                    victim_key = stage_key("victim", {**base, "backbone_key": backbone_key, **data, "method": method,
                                                      "victim": config.victim.model_dump(), "seed": seed})
                    cell_key = stage_key("cell", {"victim_key": victim_key, "psim_key": psim_key, "defenses": config.defenses,
                                                  "defense_options": config.defense_options, "target": attack_section.target_label,
                                                  "test_samples": config.victim.test_samples, "seed": seed})
                    cells.append(CellPlan(seed, trigger, dataset, method, backbone_key, psim_key, victim_key, cell_key))
    config_hash = stage_key("config", config.model_dump())
    return GridPlan(config, Path(run_dir), config_hash, backbones, psims, cells)


# --- the stages (module-level functions: Ray ships them to workers) -------------------------

def _cache(run_dir: str | Path) -> StageCache:
    return StageCache(Path(run_dir) / "stages")


def run_backbone_stage(config: GridConfig, run_dir: str, key: str, trigger: TriggerEntry, seed: int, progress: bool) -> dict:
    from peftshield.attacks import PoisonSpec
    from peftshield.experiments.stages import TriggerChoice, weight_poison
    from peftshield.finetune import TrainingConfig

    attack = config.attack_for(trigger)

    def build(directory: Path) -> dict:
        started = time.perf_counter()
        spec = PoisonSpec(target_label=attack.target_label, count=attack.poison_count, rate=None, label_mode=attack.label_mode)
        training = TrainingConfig(learning_rate=attack.learning_rate, epochs=attack.epochs, max_length=config.max_length,
                                  max_train_samples=attack.samples)
        result = weight_poison(attack.data, config.backbone, TriggerChoice(trigger.name, dict(trigger.options)), spec, training,
                               directory / "model", seed, attack.max_words, progress)
        return {"report": result.report, "seconds": time.perf_counter() - started}

    return _cache(run_dir).compute(key, {"trigger": trigger.model_dump(), "seed": seed}, build)[0]


def backbone_dir(run_dir: str | Path, backbone_key: str) -> Path:
    return (_cache(run_dir).path(backbone_key) / "model").resolve()


def run_psim_stage(config: GridConfig, run_dir: str, key: str, backbone_key: str, dataset: DatasetEntry, seed: int, progress: bool) -> dict:
    from peftshield.data import load_splits
    from peftshield.defenses import PSIM, DefenseContext, ThresholdPolicy

    def build(directory: Path) -> dict:
        splits = load_splits(dataset.path, skip_empty=True)
        policy = ThresholdPolicy(config.psim.threshold_mode, config.psim.threshold, config.psim.target_frr)
        psim = PSIM(method=config.psim.method, learning_rate=config.psim.learning_rate, epochs=config.psim.epochs,
                    max_train_samples=config.psim.samples, max_length=config.max_length, threshold=policy)
        context = DefenseContext(str(backbone_dir(run_dir, backbone_key)), splits["train"], splits.get("dev"), splits.num_labels,
                                 max_length=config.max_length, progress=progress)
        psim.fit(context, np.random.default_rng(seed + 2))
        psim.save(directory / "psim")
        return {"threshold": psim.threshold_, "fit_seconds": psim.fit_seconds_}

    return _cache(run_dir).compute(key, {"backbone_key": backbone_key, "dataset": dataset.name, "seed": seed}, build)[0]


def _test_sets(config: GridConfig, dataset: DatasetEntry, trigger: TriggerEntry, seed: int):
    from peftshield.attacks import build_asr_set
    from peftshield.data import load_splits
    from peftshield.experiments.stages import TriggerChoice

    splits = load_splits(dataset.path, skip_empty=True)
    rng = np.random.default_rng(seed + 1)
    test = splits["test"].sample(config.victim.test_samples, rng)
    poisoner = TriggerChoice(trigger.name, dict(trigger.options)).build()
    return splits, test, poisoner, build_asr_set(test, poisoner, config.attack_for(trigger).target_label, rng)


def run_victim_stage(config: GridConfig, run_dir: str, cell: CellPlan, progress: bool) -> dict:
    from peftshield.experiments.stages import evaluate_classifier, finetune_victim
    from peftshield.finetune import TrainingConfig

    def build(directory: Path) -> dict:
        splits, test, poisoner, asr_set = _test_sets(config, cell.dataset, cell.trigger, cell.seed)
        probe_test = test.subset(list(range(min(config.victim.probe_samples, len(test)))))
        probe_asr = asr_set.subset(list(range(min(config.victim.probe_samples, len(asr_set)))))

        def probe(model, tokenizer) -> dict[str, float]:
            metrics, _, _ = evaluate_classifier(model, tokenizer, probe_test, poisoner, config.attack_for(cell.trigger).target_label,
                                                np.random.default_rng(0), max_length=config.max_length, asr_set=probe_asr)
            return {"clean_accuracy": metrics.clean_accuracy, "attack_success_rate": metrics.attack_success_rate}

        training = TrainingConfig(learning_rate=config.victim.lr_full if cell.method == "full" else config.victim.lr_peft,
                                  epochs=config.victim.epochs, max_length=config.max_length, max_train_samples=config.victim.samples)
        result = finetune_victim(splits, str(backbone_dir(run_dir, cell.backbone_key)), cell.method, {}, training, cell.seed,
                                 directory / "model", progress, label=f"victim {cell.method}",
                                 epoch_probe=probe if config.victim.probe_samples else None)
        return {"train_result": result.train_result.to_dict()}

    return _cache(run_dir).compute(cell.victim_key, {**cell.coordinates(), "backbone_key": cell.backbone_key}, build)[0]


def run_cell_stage(config: GridConfig, run_dir: str, config_hash: str, cell: CellPlan, progress: bool) -> dict:
    """Evaluate one victim undefended and behind every defense; store the cell's rows."""
    store = ResultStore(Path(run_dir) / STORE_FILE)
    if store.has_cell(cell.cell_key):
        return {"cell_key": cell.cell_key, "cached": True}

    def build(directory: Path) -> dict:
        from peftshield.defenses import DEFENSES, PSIM, DefenseContext
        from peftshield.experiments.stages import evaluate_classifier, evaluate_defense
        from peftshield.finetune import load_finetuned
        from peftshield.io import atomic_write_json

        started = time.perf_counter()
        splits, test, poisoner, asr_set = _test_sets(config, cell.dataset, cell.trigger, cell.seed)
        victim, _ = load_finetuned(_cache(run_dir).path(cell.victim_key) / "model")
        target = config.attack_for(cell.trigger).target_label
        metrics, clean_probs, poisoned_probs = evaluate_classifier(victim.model, victim.tokenizer, test, poisoner, target,
                                                                   np.random.default_rng(0), max_length=config.max_length, asr_set=asr_set)
        results = {NO_DEFENSE: metrics.to_dict()}
        scores = {NO_DEFENSE: {"clean": clean_probs[:, target].round(6).tolist(), "poisoned": poisoned_probs[:, target].round(6).tolist()}}
        context = DefenseContext(str(backbone_dir(run_dir, cell.backbone_key)), splits["train"], splits.get("dev"), splits.num_labels,
                                 victim.model, victim.tokenizer, protected_label=target, max_length=config.max_length, progress=progress)
        for name in config.defenses:
            if name == "psim":
                defense = PSIM.load(_cache(run_dir).path(cell.psim_key) / "psim")
            else:
                defense = DEFENSES.create(name, **config.defense_options.get(name, {})).fit(context, np.random.default_rng(cell.seed + 2))
            report = evaluate_defense(defense, test, asr_set, clean_probs, poisoned_probs, target, metrics, rng=np.random.default_rng(cell.seed + 3))
            results[name] = {"defended_clean_accuracy": report["defended_clean_accuracy"], "defended_attack_success_rate": report["defended_attack_success_rate"],
                             **{f"detection_{k}": v for k, v in report["detection"].items()}, "score_seconds": report["score_seconds"]}
            scores[name] = report["scores"]
        atomic_write_json(directory / "scores.json", scores)
        return {"metrics": results, "seconds": time.perf_counter() - started}

    record, _ = _cache(run_dir).compute(cell.cell_key, cell.coordinates(), build)
    victim = _cache(run_dir).result(cell.victim_key)
    epochs = [{"epoch": e["epoch"], **e.get("probe", {})} for e in victim["train_result"]["epochs"]]
    store.save_cell(CellRecord(
        cell.cell_key, config_hash, cell.seed, cell.dataset.name, cell.trigger.label, cell.method, versions(),
        record["seconds"] + victim["train_result"]["seconds"], record["metrics"],
        {"victim_key": cell.victim_key, "backbone_key": cell.backbone_key, "psim_key": cell.psim_key, "epochs": epochs,
         "best_epoch": victim["train_result"]["best_epoch"]},
    ))
    return {"cell_key": cell.cell_key, "cached": False}


def run_grid(config: GridConfig, run_dir: str | Path, executor, progress: bool = True, log=print) -> GridPlan:
    from peftshield.io import atomic_write_text

    plan = plan_grid(config, run_dir)
    run = str(Path(run_dir))
    Path(run).mkdir(parents=True, exist_ok=True)
    atomic_write_text(Path(run) / CONFIG_FILE, canonical_json({"config_hash": plan.config_hash, "config": config.model_dump()}))
    store = ResultStore(Path(run) / STORE_FILE)
    todo = [c for c in plan.cells if not store.has_cell(c.cell_key)]
    log(f"[grid] {config.name}: {len(plan.cells)} cells ({len(plan.cells) - len(todo)} already stored), "
        f"{len(plan.backbones)} backbones, {len(plan.psims)} PSIMs -> {run}")
    needed_backbones = {c.backbone_key for c in todo}
    executor.map(run_backbone_stage, [(config, run, k, *plan.backbones[k], progress) for k in plan.backbones if k in needed_backbones])
    needed_psims = {c.psim_key for c in todo if c.psim_key}
    executor.map(_phase_two, [("psim", config, run, (k, *plan.psims[k]), progress) for k in plan.psims if k in needed_psims]
                 + [("victim", config, run, (cell,), progress) for cell in _unique_victims(todo)])
    done = executor.map(run_cell_stage, [(config, run, plan.config_hash, cell, progress) for cell in todo])
    log(f"[grid] {sum(1 for d in done if not d['cached'])} cells computed; results in {Path(run) / STORE_FILE}")
    store.export_csv(Path(run) / CSV_FILE)
    return plan


def _unique_victims(cells: list[CellPlan]) -> list[CellPlan]:
    seen, unique = set(), []
    for cell in cells:
        if cell.victim_key not in seen:
            seen.add(cell.victim_key)
            unique.append(cell)
    return unique


def _phase_two(kind: str, config: GridConfig, run_dir: str, args: tuple, progress: bool) -> dict:
    if kind == "psim":
        key, backbone_key, dataset, seed = args
        return run_psim_stage(config, run_dir, key, backbone_key, dataset, seed, progress)
    return run_victim_stage(config, run_dir, args[0], progress)

