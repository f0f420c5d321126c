"""``peftshield scan`` as a gate: flagged texts become findings; the run's row says whether
their share reaches ``--fail-on-rate``."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from peftshield.gate.report import EXIT_CLEAN, EXIT_FINDINGS, Finding, TargetRow, error_row

MAX_FINDINGS = 1000  # flagged texts listed one by one (the per-text output has them all)


class ScanTally:
    """Counts and the first flagged texts of a scan, chunk by chunk."""

    def __init__(self, data: str, split: str, threshold: float) -> None:
        self.data, self.split, self.threshold = str(data), split, float(threshold)
        self.location = self._location()
        self.scored = self.flagged = self.skipped = 0
        self.findings: list[Finding] = []
        self.max_score = float("-inf")

    def _location(self) -> str:
        from peftshield.data.loaders import local_split_file
        from peftshield.errors import PeftshieldError

        try:
            found = local_split_file(self.data, self.split)
        except PeftshieldError:
            found = None
        return str(found) if found is not None else self.data

    def add(self, chunk, scores: np.ndarray, flags: np.ndarray, reasons: list[list[str]] | None = None) -> None:
        """Count a scored chunk; ``reasons`` names, per text, the members that fired (with --detector)."""
        self.scored += len(chunk)
        self.flagged += int(flags.sum())
        self.skipped += len(getattr(chunk, "skipped_lines", []) or [])
        if len(scores):
            self.max_score = max(self.max_score, float(np.max(scores)))
        for index in np.flatnonzero(flags):
            if len(self.findings) >= MAX_FINDINGS:
                break
            row_id, score = chunk.ids[index], scores[index]
            fired = reasons[index] if reasons is not None else ["psim"]
            why = (f"PSIM score {score:.4f} > threshold {self.threshold:.4f}" if "psim" in fired else f"PSIM score {score:.4f}")
            others = [name for name in fired if name != "psim"]
            self.findings.append(Finding("scan.flagged", f"text {row_id} flagged: {why}" + (f"; fired: {', '.join(others)}" if others else ""),
                                         self.location, {"id": str(row_id), "psim_score": round(float(score), 6), "reasons": fired}))

    def row(self, fail_on_rate: float | None) -> TargetRow:
        if not self.scored:
            return error_row(self.data, "texts", self.location, "no texts were scanned")
        share = self.flagged / self.scored
        failing = self.flagged > 0 and (fail_on_rate is None or share >= fail_on_rate)
        status = "flagged" if failing else ("passed" if self.flagged else "clean")
        if not failing:
            for finding in self.findings:
                finding.level = "note"  # below --fail-on-rate: listed, not failing
        message = (f"{self.flagged} of {self.scored} texts flagged ({share:.2%})"
                   + ("" if fail_on_rate is None else f"; fails at {fail_on_rate:.2%}"))
        return TargetRow(self.data, "texts", self.location, status, EXIT_FINDINGS if failing else EXIT_CLEAN, message,
                         score=round(share, 6), findings=self.findings if self.flagged else [],
                         details={"scored": self.scored, "flagged": self.flagged, "flagged_share": share, "threshold": self.threshold,
                                  "skipped_empty_rows": self.skipped, "findings_listed": len(self.findings),
                                  "max_score": None if self.max_score == float("-inf") else self.max_score, "split": self.split,
                                  "file": Path(self.location).name})
