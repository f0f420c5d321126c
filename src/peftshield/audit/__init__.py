"""Audit a checkpoint nobody vouches for: is it backdoored, by which trigger, towards which class?

See :func:`peftshield.audit.auditor.run_audit` for the stages."""

from peftshield.audit.auditor import (
    DEFAULT_AUDIT_TEXTS, AuditResult, AuditSettings, TriggerFinding, load_audit_texts, run_audit,
)
from peftshield.audit.verdict import VerdictCalibration, packaged_calibration, raw_score

__all__ = [
    "DEFAULT_AUDIT_TEXTS", "AuditResult", "AuditSettings", "TriggerFinding", "VerdictCalibration", "load_audit_texts",
    "packaged_calibration", "raw_score", "run_audit",
]
