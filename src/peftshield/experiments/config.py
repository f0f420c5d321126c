"""The scenario's configuration: the one place its reference defaults are written.

A scenario is datasets x triggers x fine-tuning methods x defenses x seeds. ``peftshield
run`` reads it from YAML, ``peftshield demo`` builds a one-dataset scenario from its flags,
and the benchmarks ship theirs under ``configs/``. Every section is a pydantic model that
forbids unknown keys, and every trigger and defense entry is ``{name, options}`` validated
by its registry when the file loads, so a typo is an error that names the key before
anything trains. A component's own defaults (e.g. PSIM: P-tuning, lr 2e-5, 1 epoch on
2,000 texts, threshold calibrated to 1% FRR on clean dev) live in its constructor.
"""

from __future__ import annotations

import re
from typing import Any, Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftshield.errors import ConfigError, validation_line

# A name that becomes a path (a run folder, a report file): no separators, no '.' or '..'.
PLAIN_NAME = r"^[A-Za-z0-9_][A-Za-z0-9_.-]*$"


def slug(text: str) -> str:
    """A file-name-safe plain name (:data:`PLAIN_NAME`) for any label (``badnet-c/f`` -> ``badnet-c_f``)."""
    cleaned = re.sub(r"[^A-Za-z0-9_.-]+", "_", text).lstrip("._-").rstrip(".")
    return cleaned or "unnamed"


class Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


def _validated_options(registry, name: str, options: dict) -> dict:
    """The options as given, checked and in JSON form. Options left out stay out, so that
    scenario-wide settings (``max_length``) can still apply to them."""
    try:
        validated = registry.validate(name, options)
    except ConfigError as exc:
        raise ValueError(str(exc)) from None
    as_json = registry.get(name)(**validated).spec()["options"]
    return {key: as_json[key] for key in options}


class TriggerEntry(Section):
    """A trigger by registry name and options, plus overrides of the attack section for it."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    attack: dict[str, Any] = Field(default_factory=dict, description="overrides of the attack section for this trigger (e.g. data, target_label)")
    tag: Optional[str] = Field(None, pattern=PLAIN_NAME, description="the row's name in tables (default: the trigger's label); "
                                                                     "tells apart entries of one trigger with different attack overrides")

    @model_validator(mode="after")
    def _typed_options(self) -> "TriggerEntry":
        from peftshield.attacks import POISONERS

        self.options = _validated_options(POISONERS, self.name, self.options)
        return self

    def build(self):
        from peftshield.attacks import POISONERS

        return POISONERS.create(self.name, **self.options)

    @property
    def label(self) -> str:
        return self.tag or self.build().label()


class DefenseEntry(Section):
    """A defense by registry name and options. ``label`` names it in tables (default: the
    name), so one grid can compare two settings of one defense; ``eval_texts`` caps the
    clean and triggered test texts it scores (for slow defenses such as ONION)."""

    name: str
    options: dict[str, Any] = Field(default_factory=dict)
    label: Optional[str] = Field(None, pattern=PLAIN_NAME)
    eval_texts: Optional[int] = Field(None, ge=1)

    @model_validator(mode="after")
    def _typed_options(self) -> "DefenseEntry":
        from peftshield.defenses import DEFENSES

        self.options = _validated_options(DEFENSES, self.name, self.options)
        if self.label is None:
            self.label = self.name
        return self

    def build(self, **scenario_wide: Any):
        """The defense; ``scenario_wide`` settings (e.g. ``max_length``) apply where the entry
        does not set them and the defense has such an option."""
        from peftshield.defenses import DEFENSES

        fields = DEFENSES.get(self.name).options_model().model_fields
        inherited = {key: value for key, value in scenario_wide.items() if key in fields and key not in self.options}
        return DEFENSES.create(self.name, **{**inherited, **self.options})


class DatasetEntry(Section):
    """The victim's dataset. ``poisoned_test`` is a ready-made triggered test file (texts that
    already carry the trigger, as syntactic-trigger benchmarks ship them); without it the
    triggered set is built by inserting the trigger into the clean non-target test rows."""

    name: str = Field(pattern=PLAIN_NAME)
    path: str
    poisoned_test: Optional[str] = None
    num_labels: Optional[int] = Field(None, ge=2, description="the class count, when the training labels do not show every class")


class AttackSection(Section):
    """The attacker: full fine-tuning of the backbone on a poisoned proxy dataset."""

    data: str
    samples: Optional[int] = Field(1600, ge=1)
    poison_count: int = Field(600, ge=1)
    target_label: int = Field(0, ge=0)
    label_mode: Literal["clean", "dirty"] = "clean"
    learning_rate: float = Field(5e-5, gt=0)  # at 2e-5, 2 epochs on 1,600 rows, MiniLM collapses to the trigger shortcut (CA 0.53)
    epochs: int = Field(2, ge=1)
    max_words: Optional[int] = Field(80, ge=1)


class VictimSection(Section):
    """The victim: fine-tuning of the (poisoned) backbone on clean data, best dev epoch kept."""

    samples: Optional[int] = Field(2000, ge=1)
    epochs: int = Field(3, ge=1)
    lr_full: Optional[float] = Field(None, gt=0, description="default: the full fine-tuning method's (2e-5)")
    lr_peft: Optional[float] = Field(None, gt=0, description="default: each PEFT method's (2e-3)")
    test_samples: Optional[int] = Field(None, ge=1)
    probe_samples: int = Field(300, ge=0, description="test texts (and their triggered versions) for the ASR-per-epoch curve; 0 turns it off")

    def learning_rate(self, method: str) -> float | None:
        """The victim's learning rate for ``method``; None takes the method's own default."""
        return self.lr_full if method == "full" else self.lr_peft


LEGACY_PSIM_KEYS = {"method": "method", "learning_rate": "learning_rate", "epochs": "epochs", "samples": "max_train_samples"}
LEGACY_THRESHOLD_KEYS = {"threshold_mode": "kind", "threshold": "value", "target_frr": "target_frr"}


class ScenarioConfig(Section):
    """A grid of cells. ``defenses`` entries are names or ``{name, options, label, eval_texts}``.

    Release 0.1 files with a ``psim:`` section and ``defense_options:`` still load: both are
    folded into the defense entries."""

    name: str = Field(pattern=PLAIN_NAME)
    backbone: str = "minilm"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    max_length: int = Field(128, ge=8)
    attack: AttackSection
    triggers: list[TriggerEntry] = Field(min_length=1)
    datasets: list[DatasetEntry] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    victim: VictimSection = Field(default_factory=VictimSection)
    defenses: list[DefenseEntry] = Field(default_factory=lambda: [DefenseEntry(name="psim")])

    @model_validator(mode="before")
    @classmethod
    def _fold_release_0_1_sections(cls, payload: Any) -> Any:
        if not isinstance(payload, dict):
            return payload
        payload = dict(payload)
        psim = payload.pop("psim", None)
        per_defense = payload.pop("defense_options", None) or {}
        if psim is None and not per_defense:
            return payload
        if not isinstance(per_defense, dict):
            raise ValueError("defense_options: expected a mapping of defense name to options")
        if psim is not None:
            if not isinstance(psim, dict):
                raise ValueError("psim: expected a mapping")
            unknown = sorted(set(psim) - set(LEGACY_PSIM_KEYS) - set(LEGACY_THRESHOLD_KEYS))
            if unknown:
                raise ValueError(f"psim.{unknown[0]}: unknown key")
            options = {LEGACY_PSIM_KEYS[k]: v for k, v in psim.items() if k in LEGACY_PSIM_KEYS}
            threshold = {LEGACY_THRESHOLD_KEYS[k]: v for k, v in psim.items() if k in LEGACY_THRESHOLD_KEYS}
            if threshold:
                options["threshold"] = threshold
            per_defense = {**per_defense, "psim": {**options, **per_defense.get("psim", {})}}
        entries = []
        for entry in payload.get("defenses", ["psim"]):
            if isinstance(entry, str) and entry in per_defense:
                entry = {"name": entry, "options": per_defense[entry]}
            entries.append(entry)
        payload["defenses"] = entries
        return payload

    @field_validator("defenses", "triggers", mode="before")
    @classmethod
    def _names_as_entries(cls, entries: Any) -> Any:
        """A bare name in a list of components stands for ``{name: ...}`` with default options."""
        if isinstance(entries, list):
            return [{"name": e} if isinstance(e, str) else e for e in entries]
        return entries

    @field_validator("methods")
    @classmethod
    def _known_methods(cls, methods: list[str]) -> list[str]:
        from peftshield.finetune import METHODS

        unknown = [m for m in methods if m not in METHODS.names()]
        if unknown:
            raise ValueError(f"unknown method(s) {', '.join(unknown)} (choose from {', '.join(METHODS.names())})")
        return methods

    @field_validator("defenses")
    @classmethod
    def _unique_defense_labels(cls, defenses: list[DefenseEntry]) -> list[DefenseEntry]:
        labels = [d.label for d in defenses]
        if len(set(labels)) != len(labels) or "none" in labels:
            raise ValueError(f"defense labels must be unique and not 'none', got {labels} (give each entry a 'label')")
        return defenses

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, datasets: list[DatasetEntry]) -> list[DatasetEntry]:
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        return datasets

    @model_validator(mode="after")
    def _valid_trigger_attacks(self) -> "ScenarioConfig":
        for index, trigger in enumerate(self.triggers):
            try:
                attack = self.attack_for(trigger)
            except ValidationError as exc:
                raise ValueError(f"triggers.{index}.attack.{validation_line(exc)}") from None
            if trigger.build().draws_from_pool:
                self._check_pool_trigger(index, attack)
        return self

    def _check_pool_trigger(self, index: int, attack: AttackSection) -> None:
        """A trigger that draws ready-made texts from a pool: dirty-label only, and every
        dataset brings its own triggered test file (a poisoner rebuilt for the victim's test
        set does not know which pool texts the attacker trained on)."""
        if attack.label_mode != "dirty":
            raise ValueError(f"triggers.{index}: its texts come from a pool, which needs attack.label_mode: dirty")
        for number, dataset in enumerate(self.datasets):
            if not dataset.poisoned_test:
                raise ValueError(
                    f"datasets.{number}.poisoned_test: triggers.{index} draws its texts from a pool, which may hold texts "
                    "the attacker trained on; give a ready-made triggered test file"
                )

    def attack_for(self, trigger: TriggerEntry) -> AttackSection:
        """The attack section with this trigger's overrides applied."""
        return AttackSection(**{**self.attack.model_dump(), **trigger.attack})
