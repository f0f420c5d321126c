"""Helpers shared by the command modules: typed options from flags, and where models came from."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydantic

from peftshield.errors import ConfigError
from peftshield.finetune import TrainingConfig, merge_training


def defaults_of(model: type[pydantic.BaseModel]) -> dict[str, Any]:
    """A model's field defaults, for help texts that show them without writing them again."""
    return {name: field.default for name, field in model.model_fields.items()}


def training_from_options(base: TrainingConfig | None = None, **overrides) -> TrainingConfig:
    return merge_training(base or TrainingConfig(), overrides)


def typed_from_flags(model: type[pydantic.BaseModel], flags: dict[str, tuple[str, Any]], **fixed: Any) -> pydantic.BaseModel:
    """Build ``model`` from command-line flags, ``{field: (flag, value)}``; a value of None means
    "not given" (the model's default applies). A bad value is one line naming the flag."""
    values = {name: value for name, (_, value) in flags.items() if value is not None}
    try:
        return model(**fixed, **values)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        field = str(first["loc"][0]) if first.get("loc") else ""
        flag = flags[field][0] if field in flags else field or "option"
        message = first["msg"].removeprefix("Value error, ")
        raise ConfigError(f"{flag}: {message} (got {first.get('input')!r})") from None


def given_options(model: type[pydantic.BaseModel], flags: dict[str, tuple[str, Any]], **fixed: Any) -> dict[str, Any]:
    """The flags that were given, checked against ``model`` (a section or a component's options)."""
    typed_from_flags(model, flags, **fixed)
    return {name: value for name, (_, value) in flags.items() if value is not None}


def typed_component(registry, name: str, flags: dict[str, tuple[str, Any]], **fixed: Any):
    """A component from flags (``{option: (flag, value)}``, None = not given): a bad value is one
    line naming the flag, not the option."""
    options = given_options(registry.get(name).options_model(), flags, **fixed)
    return registry.create(name, **fixed, **options)


def first_message(exc: Exception) -> str:
    """The message of a pydantic error's first entry (or of any exception), without pydantic's prefix."""
    if isinstance(exc, pydantic.ValidationError):
        return exc.errors()[0]["msg"].removeprefix("Value error, ")
    return str(exc)


def split_list(value: str, flag: str, allow_empty: bool = False) -> list[str]:
    items = [item.strip() for item in value.split(",") if item.strip()]
    if not items and not allow_empty:
        raise ConfigError(f"{flag}: give at least one name")
    return items


def find_attack_manifest(model_dir: Path) -> dict | None:
    """The ``attack.json`` of a backbone, or of the backbone a fine-tuned model was built on."""
    from peftshield.experiments.stages import ATTACK_MANIFEST
    from peftshield.finetune.checkpoint import MANIFEST_FILE
    from peftshield.io import read_json

    from peftshield.errors import PeftshieldError
    from peftshield.finetune.checkpoint import resolve_recorded_backbone

    candidates = [model_dir / ATTACK_MANIFEST]
    if (model_dir / MANIFEST_FILE).is_file():
        try:
            candidates.append(Path(resolve_recorded_backbone(model_dir)[0]) / ATTACK_MANIFEST)
        except PeftshieldError:
            pass
    for path in candidates:
        if path.is_file():
            return read_json(path)
    return None
