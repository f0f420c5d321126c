"""User-facing errors.

Anything the user can fix (a bad file, row, option or an unreachable hub) raises a
:class:`PeftshieldError`. The CLI prints its message as one line and exits with
``exit_code``; it never shows a traceback for these.
"""

from dataclasses import dataclass
from typing import Any, Callable


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


class GateInterrupted(PeftshieldError):
    """A gate command (audit, scan) stopped by Ctrl-C or SIGTERM: one line and exit 2, as every
    gate error, never 130."""


class Terminated(KeyboardInterrupt):
    """SIGTERM (a CI job's timeout or cancel) raised where the command stands, so that it unwinds
    as Ctrl-C does: temporary files removed, nothing half-written, one line."""


class PeftshieldWarning(Warning):
    """Something the user should know that does not stop the command; the CLI prints it as one line.

    Not a ``UserWarning``: filters that silence library chatter (``ignore::UserWarning``) keep it."""



MAX_SHOWN_INPUT = 80  # characters of a failing value an error line repeats (the value may be hostile and huge)
MAX_SHOWN_TEXT = 200  # characters of a location or message built from hostile keys and values


def printable(text: str, limit: int = MAX_SHOWN_TEXT) -> str:
    """``text`` as one bounded line: characters that are not printable (a newline, an escape
    sequence, a CI runner's ``::error::`` on a line of its own) written as escapes, at most
    ``limit`` characters. Everything an error line repeats from its input goes through this."""
    shown = "".join(c if c.isprintable() else repr(c)[1:-1] for c in str(text))
    return shown[:limit] + "..." if len(shown) > limit else shown


@dataclass(frozen=True)
class ValidationIssue:
    """The first problem of a pydantic ``ValidationError``, in the parts a one-line message is
    built from (see :func:`first_issue`, and :meth:`line`, the one way they become a line)."""

    location: str  # the dotted path, e.g. "threshold.kind" ("" for the whole model)
    field: str  # its first part: the top-level field ("" for the whole model)
    message: str  # pydantic's message without its "Value error, " prefix
    raw_message: str  # pydantic's message as it is
    input: Any  # the value that failed
    kind: str  # pydantic's error type, e.g. "extra_forbidden", "missing"

    def got(self) -> str:
        """``" (got VALUE)"``: the value that failed, shortened to one bounded piece of a line."""
        shown = repr(self.input)
        return f" (got {shown[:MAX_SHOWN_INPUT] + '...' if len(shown) > MAX_SHOWN_INPUT else shown})"

    def line(self, rename: Callable[[str], str] | None = None, whole: str = "", label: str = "", show_input: bool = True) -> str:
        """``WHERE: WHAT`` for this issue. WHERE is the dotted location as ``rename`` writes it (the
        flag a field was given as, say), or ``whole`` for the model itself,
        quoted after ``label`` when given (``option 'r'``); WHAT says the key is unknown or
        required, else gives pydantic's message and (``show_input``) the value that failed, when it
        is one field's."""
        where = printable((rename(self.location) if rename and self.location else self.location) or whole)
        if self.kind == "extra_forbidden":
            return f"unknown {label} '{where}'" if label else f"{where}: unknown key"
        if self.kind == "missing":
            return f"{label} '{where}' is required" if label else f"{where}: required"
        quoted = isinstance(self.input, str) and self.input in self.message  # the message names the value already
        what = printable(self.message) + (self.got() if show_input and self.location and not quoted else "")  # the whole input is no value to quote
        where = f"{label} '{where}'" if label else where
        return f"{where}: {what}" if where else what


def first_issue(exc) -> ValidationIssue:
    """The first entry of a pydantic ``ValidationError``: the one place its parts are read."""
    first = exc.errors()[0]
    loc = tuple(first.get("loc", ()))
    return ValidationIssue(".".join(str(part) for part in loc), str(loc[0]) if loc else "", first["msg"].removeprefix("Value error, "),
                           first["msg"], first.get("input"), first.get("type", ""))


def validation_line(exc, rename: Callable[[str], str] | None = None, whole: str = "", label: str = "", show_input: bool = True) -> str:
    """One line for a pydantic ``ValidationError`` (its first problem, :meth:`ValidationIssue.line`):
    every message that reports a bad flag, settings-file key, config path, component option or
    API field is built here; callers only say where the values came from."""
    return first_issue(exc).line(rename, whole, label, show_input)
