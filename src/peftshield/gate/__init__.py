"""``audit`` and ``scan`` where practitioners run them: as a CI gate.

- :mod:`~peftshield.gate.targets`: what can be audited (folders, .safetensors files, PEFT
  adapters, ``hf://`` names from the local cache, globs);
- :mod:`~peftshield.gate.settings`: settings from ``pyproject.toml`` / ``peftshield.toml``
  under the command line;
- :mod:`~peftshield.gate.report`: rows, findings and the exit code (0 clean, 1 findings,
  2 incomplete);
- :mod:`~peftshield.gate.formats`: text, JSON (schema in ``report.schema.json``), SARIF
  2.1.0, Markdown and HTML;
- :mod:`~peftshield.gate.cache`: audits reused by weights' sha256 and settings;
- :mod:`~peftshield.gate.audit_gate`: the audit over several targets.
"""

from peftshield.gate.report import EXIT_CLEAN, EXIT_FINDINGS, EXIT_INCOMPLETE, Finding, GateReport, TargetRow

__all__ = ["EXIT_CLEAN", "EXIT_FINDINGS", "EXIT_INCOMPLETE", "Finding", "GateReport", "TargetRow"]
