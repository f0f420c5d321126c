"""YAML files validated by pydantic models, with one-line errors naming file, line or key."""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pydantic
import yaml

from peftshield.errors import ConfigError

Model = TypeVar("Model", bound=pydantic.BaseModel)


def format_validation_error(source: str, exc: pydantic.ValidationError) -> str:
    first = exc.errors()[0]
    where = ".".join(str(p) for p in first.get("loc", ())) or "(top level)"
    return f"{source}: {where}: {first['msg']}"


def load_yaml_model(path: str | Path, model: type[Model]) -> Model:
    path = Path(path)
    try:
        payload = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return model(**payload)
    except pydantic.ValidationError as exc:
        raise ConfigError(format_validation_error(str(path), exc)) from None
