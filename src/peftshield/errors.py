"""User-facing errors.

Anything the user can fix (a bad file, row, option or an unreachable hub) raises a
:class:`PeftshieldError`. The CLI prints its message as one line and exits with
``exit_code``; it never shows a traceback for these.
"""

from dataclasses import dataclass
from typing import Any


class PeftshieldError(Exception):
    """An error caused by input the user can fix; printed as one line."""

    exit_code = 2


class DataError(PeftshieldError):
    """A dataset file, row or source specification is invalid."""


class ConfigError(PeftshieldError):
    """An option or configuration value is invalid."""


class HubUnavailableError(PeftshieldError):
    """A model or dataset hub was needed but could not be reached."""


class OutputError(PeftshieldError):
    """An output place cannot be written (read-only, full, a file in the way, no permission)."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job's timeout or cancel) raised where the command stands, so that it unwinds
    as Ctrl-C does: temporary files removed, nothing half-written, one line."""


class PeftshieldWarning(Warning):
    """Something the user should know that does not stop the command; the CLI prints it as one line.

    Not a ``UserWarning``: filters that silence library chatter (``ignore::UserWarning``) keep it."""



@dataclass(frozen=True)
class ValidationIssue:
    """The first problem of a pydantic ``ValidationError``, in the parts every one-line message
    is built from (see :func:`first_issue`)."""

    location: str  # the dotted path, e.g. "threshold.kind" ("" for the whole model)
    field: str  # its first part: the top-level field ("" for the whole model)
    message: str  # pydantic's message without its "Value error, " prefix
    raw_message: str  # pydantic's message as it is
    input: Any  # the value that failed
    kind: str  # pydantic's error type, e.g. "extra_forbidden", "missing"

    def got(self) -> str:
        """``" (got VALUE)"``: the value that failed, as every flag error ends."""
        return f" (got {self.input!r})"


def first_issue(exc) -> ValidationIssue:
    """The first entry of a pydantic ``ValidationError``: the one place its parts are read, so
    each one-line message (a flag, a settings-file key, a config path, an API field) is built
    from the same pieces."""
    first = exc.errors()[0]
    loc = tuple(first.get("loc", ()))
    return ValidationIssue(".".join(str(part) for part in loc), str(loc[0]) if loc else "", first["msg"].removeprefix("Value error, "),
                           first["msg"], first.get("input"), first.get("type", ""))
