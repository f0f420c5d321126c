"""Typed settings from command-line flags, for every layer that is handed flag values (the CLI,
and library entry points such as :meth:`peftshield.guard.Guard.load` whose errors name flags)."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, TypeVar

import pydantic

from peftshield.errors import ConfigError, validation_line

Model = TypeVar("Model", bound=pydantic.BaseModel)


def flag_of(name: str) -> str:
    """The command-line flag of a settings field: ``max_wait_ms`` -> ``--max-wait-ms``."""
    return "--" + name.replace("_", "-")


@dataclass(frozen=True)
class GivenFlags:
    """What the command line gave for a settings model's fields: ``values`` by field name (None:
    not given, the model's default or a settings file applies) and, for fields whose flag is not
    :func:`flag_of` their name, ``renamed`` (field -> flag), so every error names the flag typed."""

    values: dict[str, Any]
    renamed: dict[str, str] = field(default_factory=dict)

    def flag(self, name: str) -> str:
        """The flag of field ``name`` (of its top-level field, for a dotted location)."""
        field = name.partition(".")[0]
        return self.renamed.get(field, flag_of(field))

    def as_typed(self, name: str) -> str:
        """The flag as it was typed: ``--no-cache`` for a boolean pair given as false."""
        flag = self.flag(name)
        return "--no-" + flag.removeprefix("--") if self.values.get(name) is False else flag

    def given(self) -> dict[str, Any]:
        """The values that were given."""
        return {name: value for name, value in self.values.items() if value is not None}

    def was_given(self, name: str) -> bool:
        return self.values.get(name) is not None


def given_flags(renamed: dict[str, str] | None = None, **values: Any) -> GivenFlags:
    """``given_flags({"learning_rate": "--lr"}, learning_rate=lr, epochs=epochs)``: the values by
    field name, and the flags that are not the field's name with dashes."""
    return GivenFlags(values, dict(renamed or {}))


def typed_from_flags(model: type[Model], flags: GivenFlags, **fixed: Any) -> Model:
    """Build ``model`` from the flags given (and ``fixed`` values); a value of None means "not
    given" (the model's default applies). A bad value is one line naming its flag."""
    try:
        return model(**fixed, **flags.given())
    except pydantic.ValidationError as exc:
        raise ConfigError(validation_line(exc, flags.flag, whole="option")) from None


def given_options(model: type[pydantic.BaseModel], flags: GivenFlags, **fixed: Any) -> dict[str, Any]:
    """The flags that were given, checked against ``model`` (a section or a component's options)."""
    typed_from_flags(model, flags, **fixed)
    return flags.given()


def typed_component(registry, name: str, flags: GivenFlags, **fixed: Any):
    """A component of ``registry`` from flags: a bad value is one line naming the flag, not the option."""
    options = given_options(registry.get(name).options_model(), flags, **fixed)
    return registry.create(name, **fixed, **options)
