"""The outcome of ``audit`` or ``scan`` as a gate: one row per target, findings, exit code.

Exit codes, the same for both commands:

- 0: every target is clean (``audit``: verdict ``clean``, or a verdict ``--fail-on`` lets
  pass; ``scan``: fewer flagged texts than ``--fail-on-rate``);
- 1: findings;
- 2: the scan could not complete for at least one target (an error is never 0 or 1, and a
  target that was skipped is never clean).

The exit code of several targets is the worst row's.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

SCHEMA_VERSION = "1.0"
EXIT_CLEAN, EXIT_FINDINGS, EXIT_INCOMPLETE = 0, 1, 2

RULES = {
    "backdoor.trigger": "A trigger that flips the model's prediction to one class: the checkpoint is backdoored.",
    "backdoor.inconclusive": "The strongest trigger found is stronger than on clean checkpoints, but not enough to call a backdoor.",
    "scan.flagged": "A text the PSIM flags: its confidence on the random-label module exceeds the threshold, as triggered texts do.",
    "gate.incomplete": "The target could not be audited or scanned to the end; it is not reported as clean.",
}
LEVELS = {"backdoor.trigger": "error", "backdoor.inconclusive": "warning", "scan.flagged": "error", "gate.incomplete": "error"}


@dataclass
class Finding:
    rule: str  # a key of RULES
    message: str
    location: str  # the file the finding points at
    properties: dict[str, Any] = field(default_factory=dict)
    level: str = ""  # SARIF level: error | warning | note (default: the rule's)

    def __post_init__(self) -> None:
        self.level = self.level or LEVELS[self.rule]


@dataclass
class TargetRow:
    """One audited (or scanned) target."""

    target: str
    kind: str
    location: str
    status: str  # audit: clean | backdoored | inconclusive | error; scan: clean | passed | flagged | error
    exit_code: int
    message: str  # one line for people
    score: float | None = None
    sha256: str | None = None
    cached: bool = False
    report_dir: str | None = None
    findings: list[Finding] = field(default_factory=list)
    details: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict:
        out = asdict(self)
        return out


@dataclass
class GateReport:
    command: str  # audit | scan
    policy: dict[str, Any]  # fail_on / fail_on_rate
    settings_file: str | None
    rows: list[TargetRow]
    seconds: float = 0.0
    settings_sources: dict[str, str] = field(default_factory=dict)  # setting -> "--flag", the settings file, or "default"

    @property
    def exit_code(self) -> int:
        return max((row.exit_code for row in self.rows), default=EXIT_INCOMPLETE)

    def to_dict(self) -> dict:
        from peftshield import __version__

        return {
            "schema_version": SCHEMA_VERSION, "tool": {"name": "peftshield", "version": __version__}, "command": self.command,
            "exit_code": self.exit_code, "policy": self.policy, "settings_file": self.settings_file,
            "settings_sources": self.settings_sources, "seconds": round(self.seconds, 3),
            "summary": {status: sum(r.status == status for r in self.rows) for status in sorted({r.status for r in self.rows})},
            "targets": [row.to_dict() for row in self.rows],
        }


def audit_exit_code(verdict: str, fail_on: str) -> int:
    if verdict == "backdoored":
        return EXIT_FINDINGS
    if verdict == "inconclusive":
        return EXIT_FINDINGS if fail_on == "inconclusive" else EXIT_CLEAN
    if verdict == "clean":
        return EXIT_CLEAN
    return EXIT_INCOMPLETE


def error_row(target: str, kind: str, location: str, message: str) -> TargetRow:
    return TargetRow(target, kind, location, "error", EXIT_INCOMPLETE, message,
                     findings=[Finding("gate.incomplete", f"{target}: {message}", location)])
