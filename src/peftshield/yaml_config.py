"""YAML files validated by pydantic models, with one-line errors naming file, line or key.

Config files are plain data: anchors and aliases (``&name``/``*name``, and ``<<`` merges
built on them) are refused, so a file of nested aliases (an "alias bomb") fails at once
instead of expanding into billions of values.
"""

from __future__ import annotations

from pathlib import Path
from typing import TypeVar

import pydantic
import yaml
from yaml.events import AliasEvent, CollectionStartEvent, ScalarEvent

from peftshield.errors import ConfigError, validation_line

Model = TypeVar("Model", bound=pydantic.BaseModel)


class AliasRefused(yaml.composer.ComposerError):
    """An anchor or alias in a config file."""


class PlainSafeLoader(yaml.SafeLoader):
    """``yaml.SafeLoader`` that refuses anchors and aliases."""

    def compose_node(self, parent, index):  # noqa: D401 - PyYAML hook
        event = self.peek_event()
        if isinstance(event, AliasEvent):
            raise AliasRefused(None, None, f"alias '*{event.anchor}' is not allowed in config files (write the value out)", event.start_mark)
        if isinstance(event, (ScalarEvent, CollectionStartEvent)) and event.anchor is not None:
            raise AliasRefused(None, None, f"anchor '&{event.anchor}' is not allowed in config files (write the value out)", event.start_mark)
        return super().compose_node(parent, index)


def safe_load_plain(text: str):
    """``yaml.safe_load`` without anchors and aliases (raises :class:`AliasRefused`)."""
    return yaml.load(text, Loader=PlainSafeLoader)  # noqa: S506 - a SafeLoader subclass


def load_yaml_model(path: str | Path, model: type[Model]) -> Model:
    path = Path(path)
    try:
        payload = safe_load_plain(path.read_text(encoding="utf-8")) or {}
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file") from None
    except IsADirectoryError:
        raise ConfigError(f"{path}: is a folder, not a config file") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not UTF-8 text") from None
    except AliasRefused as exc:
        raise ConfigError(f"{path}:{exc.problem_mark.line + 1}: {exc.problem}") from None
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        line = f":{mark.line + 1}" if mark is not None else ""
        raise ConfigError(f"{path}{line}: invalid YAML ({getattr(exc, 'problem', exc)})") from None
    if not isinstance(payload, dict):
        raise ConfigError(f"{path}: expected a mapping at the top level")
    try:
        return model(**payload)
    except pydantic.ValidationError as exc:
        raise ConfigError(f"{path}: {validation_line(exc, whole='(top level)')}") from None
