"""User-facing errors.

Anything the user can fix (a bad file, row, option or an unreachable hub) raises a
:class:`PeftshieldError`. The CLI prints its message as one line and exits with
``exit_code``; it never shows a traceback for these.
"""


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
