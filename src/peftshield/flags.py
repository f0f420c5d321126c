"""Typed settings from command-line flags, for every layer that is handed flag values (the CLI,
and library entry points such as :meth:`peftshield.guard.Guard.load` whose errors name flags)."""

from __future__ import annotations

from typing import Any, TypeVar

import pydantic

from peftshield.errors import ConfigError, first_issue

Model = TypeVar("Model", bound=pydantic.BaseModel)


def typed_from_flags(model: type[Model], flags: dict[str, tuple[str, Any]], **fixed: Any) -> Model:
    """Build ``model`` from command-line flags, ``{field: (flag, value)}``; a value of None means
    "not given" (the model's default applies). A bad value is one line naming the flag."""
    values = {name: value for name, (_, value) in flags.items() if value is not None}
    try:
        return model(**fixed, **values)
    except pydantic.ValidationError as exc:
        issue = first_issue(exc)
        flag = flags[issue.field][0] if issue.field in flags else issue.field or "option"
        raise ConfigError(f"{flag}: {issue.message}{issue.got()}") from None


def flag_of(name: str) -> str:
    """The command-line flag of a settings field: ``max_wait_ms`` -> ``--max-wait-ms``."""
    return "--" + name.replace("_", "-")
