"""The grid file of ``peftshield run``: datasets x triggers x fine-tuning methods x defenses x seeds.

Every section is a pydantic model that forbids unknown keys, so a typo is an error that
names the key instead of a silently ignored setting.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from peftshield.yaml_config import load_yaml_model


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class TriggerEntry(_Section):
    name: str
    options: dict[str, str] = Field(default_factory=dict)
    attack: dict = Field(default_factory=dict, description="overrides of the attack section for this trigger (e.g. data, target_label)")

    @field_validator("name")
    @classmethod
    def _known(cls, name: str) -> str:
        from peftshield.attacks import POISONERS

        if name not in POISONERS.names():
            raise ValueError(f"unknown trigger '{name}' (choose from {', '.join(POISONERS.names())})")
        return name

    @property
    def label(self) -> str:
        return self.name + "".join(f"-{v}" for _, v in sorted(self.options.items()) if len(v) <= 12).replace(",", "+").replace(" ", "_")


class DatasetEntry(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    path: str


class AttackSection(_Section):
    data: str
    samples: Optional[int] = Field(1600, ge=1)
    poison_count: int = Field(600, ge=1)
    target_label: int = Field(0, ge=0)
    label_mode: Literal["clean", "dirty"] = "clean"
    learning_rate: float = Field(5e-5, gt=0)
    epochs: int = Field(2, ge=1)
    max_words: Optional[int] = Field(80, ge=1)


class VictimSection(_Section):
    samples: Optional[int] = Field(2000, ge=1)
    epochs: int = Field(3, ge=1)
    lr_full: float = Field(2e-5, gt=0)
    lr_peft: float = Field(2e-3, gt=0)
    test_samples: Optional[int] = Field(None, ge=1)
    probe_samples: int = Field(300, ge=0, description="test texts (and their triggered versions) for the ASR-per-epoch curve; 0 turns it off")


class PsimSection(_Section):
    method: str = "ptuning"
    learning_rate: float = Field(2e-5, gt=0)
    epochs: int = Field(1, ge=1)
    samples: Optional[int] = Field(2000, ge=1)
    threshold_mode: Literal["auto", "fixed", "frr"] = "auto"
    threshold: Optional[float] = Field(None, gt=0, lt=1)
    target_frr: float = Field(0.01, ge=0, lt=1)


class GridConfig(_Section):
    name: str = Field(pattern=r"^[A-Za-z0-9_.-]+$")
    backbone: str = "minilm"
    seeds: list[int] = Field(default_factory=lambda: [0], min_length=1)
    max_length: int = Field(128, ge=8)
    attack: AttackSection
    triggers: list[TriggerEntry] = Field(min_length=1)
    datasets: list[DatasetEntry] = Field(min_length=1)
    methods: list[str] = Field(min_length=1)
    victim: VictimSection = Field(default_factory=VictimSection)
    defenses: list[str] = Field(default_factory=lambda: ["psim"])
    defense_options: dict[str, dict] = Field(default_factory=dict)
    psim: PsimSection = Field(default_factory=PsimSection)

    def attack_for(self, trigger: TriggerEntry) -> AttackSection:
        """The attack section with this trigger's overrides applied."""
        return AttackSection(**{**self.attack.model_dump(), **trigger.attack})

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
    def _known_defenses(cls, defenses: list[str]) -> list[str]:
        from peftshield.defenses import DEFENSES

        unknown = [d for d in defenses if d not in DEFENSES.names()]
        if unknown:
            raise ValueError(f"unknown defense(s) {', '.join(unknown)} (choose from {', '.join(DEFENSES.names())})")
        return defenses

    @model_validator(mode="after")
    def _valid_trigger_attacks(self) -> "GridConfig":
        for index, trigger in enumerate(self.triggers):
            try:
                self.attack_for(trigger)
            except ValidationError as exc:
                first = exc.errors()[0]
                raise ValueError(f"triggers.{index}.attack.{'.'.join(str(p) for p in first['loc'])}: {first['msg']}") from None
        return self

    @field_validator("datasets")
    @classmethod
    def _unique_names(cls, datasets: list[DatasetEntry]) -> list[DatasetEntry]:
        names = [d.name for d in datasets]
        if len(set(names)) != len(names):
            raise ValueError(f"dataset names must be unique, got {names}")
        return datasets


def load_grid_config(path: str | Path) -> GridConfig:
    return load_yaml_model(path, GridConfig)
