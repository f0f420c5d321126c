"""The scenario's one owner: a cell specification, seed derivation, and ``run_cell()``.

A *cell* is one (seed, trigger, dataset, fine-tuning method): the attacker weight-poisons
the backbone, the victim fine-tunes it, and the victim is evaluated undefended and behind
every defense. ``plan_cells`` turns a :class:`ScenarioConfig` into cells; ``run_cell``
computes one, building each stage it needs once (content-hash cache, see
:mod:`peftshield.experiments.cache`), so cells that share a backbone, a victim or a
backbone-level defense (PSIM) share the stage. ``peftshield run``, ``peftshield demo`` and
the benchmarks all go through here.
"""

from __future__ import annotations

import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from peftshield import __version__
from peftshield.experiments.cache import StageCache, stage_key
from peftshield.experiments.config import AttackSection, DatasetEntry, DefenseEntry, ScenarioConfig, TriggerEntry, VictimSection

STAGES_DIR = "stages"
REPORTS_DIR = "defenses"
NO_DEFENSE = "none"  # the label of a cell's undefended results


@dataclass(frozen=True)
class CellSeeds:
    """Every random stream of a cell, derived from its one seed (the only place that does)."""

    seed: int

    @property
    def training_seed(self) -> int:
        """The attacker's and the victim's runs (data order, initialisation, dropout)."""
        return self.seed

    def test_sets(self) -> np.random.Generator:
        """The test subset and the trigger positions of the triggered test set."""
        return np.random.default_rng(self.seed + 1)

    def defense_fit(self) -> np.random.Generator:
        return np.random.default_rng(self.seed + 2)

    def cleaner_pool(self) -> np.random.Generator:
        """The triggered share of a data cleaner's pool."""
        return np.random.default_rng(self.seed + 3)

    def eval_subset(self) -> np.random.Generator:
        """The texts a slow defense scores (``eval_texts``)."""
        return np.random.default_rng(self.seed + 4)


@dataclass(frozen=True)
class CellSpec:
    """Everything that decides one cell, and the cache keys of the stages it needs."""

    backbone: str
    max_length: int
    attack: AttackSection
    trigger: TriggerEntry
    dataset: DatasetEntry
    method: str
    victim: VictimSection
    defenses: tuple[DefenseEntry, ...]
    seed: int
    backbone_key: str
    victim_key: str
    defense_keys: dict[str, str]  # label -> stage key, for defenses fitted once on the backbone
    cell_key: str

    @property
    def seeds(self) -> CellSeeds:
        return CellSeeds(self.seed)

    @property
    def trigger_label(self) -> str:
        return self.trigger.label

    def coordinates(self) -> dict:
        return {"seed": self.seed, "trigger": self.trigger_label, "dataset": self.dataset.name, "method": self.method}

    def build_defense(self, entry: DefenseEntry):
        return entry.build(max_length=self.max_length)

    def evaluation_key(self, entry: DefenseEntry) -> str:
        """The stage key of one defense's evaluation on this cell's victim. Every defense draws
        its own streams from the cell's seed, so its result does not depend on the other
        defenses of the grid: adding one to a config re-runs only the new one."""
        return stage_key("evaluation", {
            "victim_key": self.victim_key, "defense_key": self.defense_keys.get(entry.label), "defense": self.build_defense(entry).spec(),
            "eval_texts": entry.eval_texts, "target": self.attack.target_label, "trigger": self.trigger.build().spec(),
            "test_samples": self.victim.test_samples, "seed": self.seed,
        })


@dataclass
class CellResult:
    """What ``run_cell`` measured: per defense label ("none" = undefended) its metrics."""

    cell_key: str
    metrics: dict[str, dict]
    seconds: float
    stage_dir: Path
    cached: bool = False
    victim_record: dict = field(default_factory=dict)


def data_fingerprint(path: str) -> str:
    """sha256 over the names and bytes of a data directory's files (or of a ``pkg:``/``hf:`` spec)."""
    import hashlib

    directory = Path(path)
    if not directory.exists():
        return hashlib.sha256(path.encode()).hexdigest()[:16]
    digest = hashlib.sha256()
    for file in sorted(p for p in ([directory] if directory.is_file() else directory.rglob("*")) if p.is_file()):
        digest.update(file.name.encode())
        digest.update(file.read_bytes())
    return digest.hexdigest()[:16]


def fits_on_backbone(entry: DefenseEntry) -> bool:
    """A defense that does not score with the victim is fitted once per backbone and dataset."""
    from peftshield.defenses import DEFENSES

    return not DEFENSES.get(entry.name).needs_victim


def plan_cells(config: ScenarioConfig) -> list[CellSpec]:
    """Every cell of the scenario with its stage keys; equal inputs give equal keys."""
    fingerprints = {d.name: data_fingerprint(d.path) for d in config.datasets}
    poisoned_fingerprints = {d.name: data_fingerprint(d.poisoned_test) for d in config.datasets if d.poisoned_test}
    base = {"version": __version__, "backbone": config.backbone, "max_length": config.max_length}
    cells = []
    for seed in config.seeds:
        for trigger in config.triggers:
            attack = config.attack_for(trigger)
            trigger_spec = trigger.build().spec()
            backbone_key = stage_key("backbone", {**base, "attack": {**attack.model_dump(), "data_fingerprint": data_fingerprint(attack.data)},
                                                  "trigger": trigger_spec, "seed": seed})
            for dataset in config.datasets:
                data = {"dataset": dataset.name, "data_fingerprint": fingerprints[dataset.name], "num_labels": dataset.num_labels,
                        "poisoned_test": poisoned_fingerprints.get(dataset.name)}
                defense_specs = {d.label: d.build(max_length=config.max_length).spec() for d in config.defenses}
                defense_keys = {
                    d.label: stage_key("defense", {**base, "backbone_key": backbone_key, **data, "defense": defense_specs[d.label], "seed": seed})
                    for d in config.defenses if fits_on_backbone(d)
                }
                for method in config.methods:
                    victim_key = stage_key("victim", {**base, "backbone_key": backbone_key, **data, "method": method,
                                                      "victim": config.victim.model_dump(), "seed": seed})
                    cell_key = stage_key("cell", {
                        "victim_key": victim_key, "defense_keys": defense_keys, "defenses": defense_specs,
                        "eval_texts": {d.label: d.eval_texts for d in config.defenses}, "target": attack.target_label,
                        "trigger": trigger_spec, "test_samples": config.victim.test_samples, "seed": seed,
                    })
                    cells.append(CellSpec(config.backbone, config.max_length, attack, trigger, dataset, method, config.victim,
                                          tuple(config.defenses), seed, backbone_key, victim_key, defense_keys, cell_key))
    return cells


# --- the stages (module-level functions: Ray ships them to workers) -------------------------

def stage_cache(run_dir: str | Path) -> StageCache:
    return StageCache(Path(run_dir) / STAGES_DIR)


def backbone_dir(run_dir: str | Path, cell: CellSpec) -> Path:
    return (stage_cache(run_dir).path(cell.backbone_key) / "model").resolve()


def backbone_stage(cell: CellSpec, run_dir: str | Path, progress: bool = False) -> dict:
    """The attacker's weight-poisoned backbone."""
    from peftshield.attacks import PoisonSpec
    from peftshield.experiments.stages import TriggerChoice, weight_poison
    from peftshield.finetune import TrainingConfig

    attack = cell.attack

    def build(directory: Path) -> dict:
        started = time.perf_counter()
        spec = PoisonSpec(target_label=attack.target_label, count=attack.poison_count, rate=None, label_mode=attack.label_mode)
        training = TrainingConfig(learning_rate=attack.learning_rate, epochs=attack.epochs, max_length=cell.max_length,
                                  max_train_samples=attack.samples)
        result = weight_poison(attack.data, cell.backbone, TriggerChoice(cell.trigger.name, dict(cell.trigger.options)), spec, training,
                               directory / "model", cell.seeds.training_seed, attack.max_words, progress)
        return {"report": result.report, "seconds": time.perf_counter() - started}

    return stage_cache(run_dir).compute(cell.backbone_key, {"trigger": cell.trigger.model_dump(), "seed": cell.seed}, build)[0]


def _load_dataset(cell: CellSpec):
    from peftshield.data import load_splits

    return load_splits(cell.dataset.path, skip_empty=True, num_labels=cell.dataset.num_labels)


def _defense_context(cell: CellSpec, run_dir: str | Path, splits, victim=None, progress: bool = False, protected_label: int | None = None):
    from peftshield.defenses import DefenseContext

    return DefenseContext(
        str(backbone_dir(run_dir, cell)), splits["train"], splits.get("dev"), splits.num_labels,
        victim.model if victim else None, victim.tokenizer if victim else None,
        protected_label=cell.attack.target_label if protected_label is None else protected_label,
        max_length=cell.max_length, progress=progress,
    )


def task_agnostic_test_set(cell: CellSpec, victim, test, poisoner):
    """A task-agnostic backdoor on the victim: every trigger's landing class and ASR
    (:func:`~peftshield.experiments.stages.trigger_outcomes`); the best trigger's landing class
    becomes the cell's target and its triggered non-target test texts the ASR set."""
    from peftshield.attacks import build_asr_set
    from peftshield.experiments.stages import trigger_outcomes

    outcomes = trigger_outcomes(victim.model, victim.tokenizer, test, poisoner, cell.seeds.test_sets(), cell.max_length)
    best = max(outcomes, key=lambda o: o.attack_success_rate)
    asr_set = build_asr_set(test, poisoner.single(best.index), best.landing_class, cell.seeds.test_sets())
    return best.landing_class, asr_set, outcomes


def backbone_defense_stage(cell: CellSpec, label: str, run_dir: str | Path, progress: bool = False) -> dict:
    """A defense that needs no victim (PSIM), fitted once on the backbone and the dataset and saved."""
    entry = next(d for d in cell.defenses if d.label == label)
    backbone_stage(cell, run_dir, progress)

    def build(directory: Path) -> dict:
        defense = cell.build_defense(entry)
        defense.fit(_defense_context(cell, run_dir, _load_dataset(cell), progress=progress), cell.seeds.defense_fit())
        defense.save(directory / "defense")
        return {"defense": defense.spec(), "threshold": defense.fitted_threshold(), "fit_seconds": float(getattr(defense, "fit_seconds_", 0.0))}

    key = cell.defense_keys[label]
    return stage_cache(run_dir).compute(key, {"backbone_key": cell.backbone_key, "dataset": cell.dataset.name, "defense": label,
                                              "seed": cell.seed}, build)[0]


def cell_test_sets(cell: CellSpec):
    """(splits, clean test set, poisoner, triggered test set) of a cell, from its seeds."""
    from peftshield.attacks import build_asr_set
    from peftshield.experiments.stages import load_poisoned_test

    splits = _load_dataset(cell)
    rng = cell.seeds.test_sets()
    test = splits["test"].sample(cell.victim.test_samples, rng)
    poisoner = cell.trigger.build()
    if cell.dataset.poisoned_test:
        asr_set = load_poisoned_test(cell.dataset.poisoned_test, cell.attack.target_label).sample(cell.victim.test_samples, rng)
    else:
        asr_set = build_asr_set(test, poisoner, cell.attack.target_label, rng)
    return splits, test, poisoner, asr_set


def victim_stage(cell: CellSpec, run_dir: str | Path, progress: bool = False) -> dict:
    """The victim fine-tuned on the backbone; with ``probe_samples``, CA and ASR after every epoch."""
    from peftshield.experiments.stages import evaluate_classifier, finetune_victim
    from peftshield.finetune import TrainingConfig

    backbone_stage(cell, run_dir, progress)

    def build(directory: Path) -> dict:
        splits, test, poisoner, asr_set = cell_test_sets(cell)
        probe_test = test.subset(list(range(min(cell.victim.probe_samples, len(test)))))
        probe_asr = asr_set.subset(list(range(min(cell.victim.probe_samples, len(asr_set)))))

        def probe(model, tokenizer) -> dict[str, float]:
            metrics, _, _ = evaluate_classifier(model, tokenizer, probe_test, poisoner, cell.attack.target_label, None,
                                                max_length=cell.max_length, asr_set=probe_asr)
            return {"clean_accuracy": metrics.clean_accuracy, "attack_success_rate": metrics.attack_success_rate}

        training = TrainingConfig(learning_rate=cell.victim.learning_rate(cell.method), epochs=cell.victim.epochs,
                                  max_length=cell.max_length, max_train_samples=cell.victim.samples)
        result = finetune_victim(splits, str(backbone_dir(run_dir, cell)), cell.method, {}, training, cell.seeds.training_seed,
                                 directory / "model", progress, label=f"victim {cell.method}",
                                 epoch_probe=probe if cell.victim.probe_samples else None)
        return {"train_result": result.train_result.to_dict()}

    return stage_cache(run_dir).compute(cell.victim_key, {**cell.coordinates(), "backbone_key": cell.backbone_key}, build)[0]


def backbone_evaluation_stage(cell: CellSpec, run_dir: str | Path, progress: bool = False) -> dict:
    """CA, ASR and confidences of the weight-poisoned backbone itself, before any victim tuning."""
    from peftshield.experiments.stages import evaluate_classifier
    from peftshield.models import load_backbone

    backbone_stage(cell, run_dir, progress)

    def build(directory: Path) -> dict:
        splits, test, poisoner, asr_set = cell_test_sets(cell)
        model = load_backbone(str(backbone_dir(run_dir, cell)), splits.num_labels)
        metrics, _, _ = evaluate_classifier(model.model, model.tokenizer, test, poisoner, cell.attack.target_label, None,
                                            max_length=cell.max_length, progress=progress, asr_set=asr_set)
        return {"metrics": metrics.to_dict()}

    key = stage_key("backbone-eval", {"backbone_key": cell.backbone_key, "dataset": cell.dataset.name,
                                      "data_fingerprint": data_fingerprint(cell.dataset.path), "num_labels": cell.dataset.num_labels,
                                      "test_samples": cell.victim.test_samples, "seed": cell.seed,
                                      "poisoned_test": data_fingerprint(cell.dataset.poisoned_test) if cell.dataset.poisoned_test else None})
    return stage_cache(run_dir).compute(key, {"backbone_key": cell.backbone_key, "dataset": cell.dataset.name}, build)[0]


def _eval_subset(test, asr_set, clean_probs, poisoned_probs, size: int, rng: np.random.Generator):
    """At most ``size`` clean and ``size`` triggered texts, for a slow defense."""
    keep_clean = np.sort(rng.permutation(len(test))[:size])
    keep_triggered = np.sort(rng.permutation(len(asr_set))[:size])
    return test.subset(keep_clean.tolist()), asr_set.subset(keep_triggered.tolist()), clean_probs[keep_clean], poisoned_probs[keep_triggered]


def run_cell(cell: CellSpec, run_dir: str | Path, progress: bool = False) -> CellResult:
    """One cell, end to end: every stage it needs (each built once), then the victim evaluated
    undefended and behind every defense. Writes the cell's ``scores.json`` and one full
    report per defense (``defenses/<label>.json``: detection metrics, threshold sweep, scores)."""
    from peftshield.defenses import DEFENSES
    from peftshield.experiments.stages import evaluate_classifier, evaluate_defense, landing
    from peftshield.finetune import load_finetuned
    from peftshield.io import atomic_write_json, read_json

    cache = stage_cache(run_dir)
    backbone_stage(cell, run_dir, progress)
    victim_record = victim_stage(cell, run_dir, progress)
    for label in cell.defense_keys:
        backbone_defense_stage(cell, label, run_dir, progress)

    def build(directory: Path) -> dict:
        started = time.perf_counter()
        splits, test, poisoner, asr_set = cell_test_sets(cell)
        victim, _ = load_finetuned(cache.path(cell.victim_key) / "model")
        target = cell.attack.target_label
        outcomes = None
        if poisoner.task_agnostic and not cell.dataset.poisoned_test:
            target, asr_set, outcomes = task_agnostic_test_set(cell, victim, test, poisoner)
            atomic_write_json(directory / "triggers.json", {"target_label": target, "triggers": [asdict(o) for o in outcomes]})
        metrics, clean_probs, poisoned_probs = evaluate_classifier(victim.model, victim.tokenizer, test, None, target, None,
                                                                   max_length=cell.max_length, asr_set=asr_set)
        results = {NO_DEFENSE: {**metrics.to_dict(), **landing(poisoned_probs, asr_set)}}
        if outcomes is not None:
            results[NO_DEFENSE].update({"target_label": target, "trigger_asr": {o.trigger: o.attack_success_rate for o in outcomes}})
        scores = {NO_DEFENSE: {"clean": clean_probs[:, target].round(6).tolist(), "poisoned": poisoned_probs[:, target].round(6).tolist()}}
        context = None
        for entry in cell.defenses:

            def evaluate(stage_directory: Path, entry=entry) -> dict:
                nonlocal context
                context = context or _defense_context(cell, run_dir, splits, victim, progress, protected_label=target)
                if entry.label in cell.defense_keys:
                    key = cell.defense_keys[entry.label]
                    defense = DEFENSES.get(entry.name).load(cache.path(key) / "defense", context)
                    defense.fit_seconds_ = cache.result(key)["fit_seconds"]  # fitted once, in its own stage
                else:
                    defense = cell.build_defense(entry).fit(context, cell.seeds.defense_fit())
                scored = (test, asr_set, clean_probs, poisoned_probs)
                if entry.eval_texts:
                    scored = _eval_subset(*scored, entry.eval_texts, cell.seeds.eval_subset())
                report = evaluate_defense(defense, *scored, target, metrics, rng=cell.seeds.cleaner_pool())
                atomic_write_json(stage_directory / "report.json", {"defense_spec": defense.spec(), **report})
                return {"metrics": {
                    "defended_clean_accuracy": report["defended_clean_accuracy"],
                    "defended_attack_success_rate": report["defended_attack_success_rate"],
                    **{f"detection_{k}": v for k, v in report["detection"].items()}, "score_seconds": report["score_seconds"],
                }}

            key = cell.evaluation_key(entry)
            record, _ = cache.compute(key, {**cell.coordinates(), "defense": entry.label}, evaluate)
            report_file = cache.path(key) / "report.json"
            (directory / REPORTS_DIR).mkdir(parents=True, exist_ok=True)
            shutil.copyfile(report_file, directory / REPORTS_DIR / f"{entry.label}.json")
            results[entry.label] = record["metrics"]
            scores[entry.label] = read_json(report_file)["scores"]
        atomic_write_json(directory / "scores.json", scores)
        return {"metrics": results, "seconds": time.perf_counter() - started}

    record, cached = cache.compute(cell.cell_key, cell.coordinates(), build)
    return CellResult(cell.cell_key, record["metrics"], record["seconds"] + victim_record["train_result"]["seconds"],
                      cache.path(cell.cell_key), cached, victim_record)


def check_backbone_feasible(cell: CellSpec) -> None:
    """Raise a one-line error if the attacker's stage of ``cell`` cannot run: the same rows are
    drawn as the stage would draw them (no model is loaded), so a poison count larger than the
    rows that can take the trigger is found before any training."""
    from peftshield.attacks import PoisonSpec, check_target, poison_candidates
    from peftshield.data import load_splits
    from peftshield.errors import ConfigError, PeftshieldError
    from peftshield.experiments.stages import attacker_training_rows
    from peftshield.finetune import TrainingConfig

    attack = cell.attack
    where = f"trigger {cell.trigger_label}, seed {cell.seed}"
    if cell.trigger.build().task_agnostic:
        from peftshield.experiments.stages import plain_attacker_texts

        try:
            texts, _, _ = plain_attacker_texts(attack.data, attack.max_words, attack.samples, np.random.default_rng(cell.seeds.training_seed))
        except PeftshieldError as exc:
            raise type(exc)(f"attack ({where}): {exc}") from None
        if attack.poison_count > len(texts):
            raise ConfigError(f"attack ({where}): poison_count {attack.poison_count} is more than the {len(texts)} texts drawn from {attack.data}")
        return
    splits = load_splits(attack.data)
    try:
        check_target(attack.target_label, splits.num_labels)
    except ConfigError as exc:
        raise ConfigError(f"attack ({where}): {exc}") from None
    rows = attacker_training_rows(splits, attack.max_words, TrainingConfig(max_train_samples=attack.samples),
                                  np.random.default_rng(cell.seeds.training_seed))
    spec = PoisonSpec(target_label=attack.target_label, count=attack.poison_count, rate=None, label_mode=attack.label_mode)
    available = len(poison_candidates(rows, cell.trigger.build(), spec))
    if available < attack.poison_count:
        kind = "non-target" if attack.label_mode == "dirty" else f"label-{attack.target_label}"
        raise ConfigError(f"attack ({where}): poison_count {attack.poison_count} is more than the {available} {kind} rows of the "
                          f"{len(rows)} drawn from {attack.data} that can take the trigger; lower poison_count or raise samples")


def check_dataset_feasible(cell: CellSpec) -> None:
    """Raise a one-line error if the victim's data of ``cell`` cannot be used (target out of
    range, no triggered test rows)."""
    from peftshield.attacks import check_target
    from peftshield.errors import PeftshieldError

    where = f"dataset {cell.dataset.name}, trigger {cell.trigger_label}, seed {cell.seed}"
    try:
        splits, _, _, asr_set = cell_test_sets(cell)
        check_target(cell.attack.target_label, splits.num_labels)
    except PeftshieldError as exc:
        raise type(exc)(f"{where}: {exc}") from None
    if not len(asr_set):
        raise PeftshieldError(f"{where}: no triggered test texts")
