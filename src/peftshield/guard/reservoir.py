"""A serving guard's proposal for its own recalibration, from the traffic it watched.

``serve --mode monitor --reservoir FILE`` keeps a uniform random sample (Vitter's Algorithm R,
seeded) of every screened text: its length in tokens, each member's score (the PSIM's and
each detector's) and whether the guard flagged it, never the text itself. After every ``--reservoir-size`` texts, and at shutdown,
it writes to FILE the calibration that :func:`~peftshield.guard.calibration.calibrate_scores`
makes from the sample (the same bound, length buckets and one budget as ``peftshield
calibrate``), for an operator to review and pass with ``--calibration`` on the next start.
Nothing is applied on its own: a threshold that moved by itself is one an attacker can move.

The sample is of *all* watched traffic, flagged texts included. A sample of only the unflagged
texts would be cut off at the current thresholds and propose lower ones, round after round. The
price: triggered texts in the traffic are in the sample too, and raise the proposed thresholds
(by at most their share of the traffic, in rank), which is why a person reviews the proposal:
compare its thresholds with the current ones, and its ``sample.flagged_share`` (the share of the
kept texts flagged under the current thresholds) with the target rejection rate, before
accepting it.
"""

from __future__ import annotations

import hashlib
import threading
from pathlib import Path

import numpy as np

from peftshield.guard.calibration import (DEFAULT_CONFIDENCE, PSIM_MEMBER, CalibrationSample, GuardCalibration, calibrate_scores,
                                          sample_texts_needed)
from peftshield.io import atomic_write_text

RESERVOIR_SEED = 0


class ScoreReservoir:
    """Up to ``size`` screened texts' lengths and member scores, a uniform sample of all seen."""

    def __init__(self, size: int, members: list[str], rng: np.random.Generator) -> None:
        self.size = size
        self.members = list(members)
        self.rng = rng
        self.lengths = np.zeros(size, dtype=np.int64)
        self.scores = np.zeros((len(self.members), size), dtype=np.float64)
        self.flagged = np.zeros(size, dtype=bool)
        self.seen = 0
        self._lock = threading.Lock()

    @property
    def kept(self) -> int:
        return min(self.seen, self.size)

    def observe(self, lengths: list[int], member_scores: dict[str, list[float]], flagged: list[bool]) -> None:
        with self._lock:
            for index, length in enumerate(lengths):
                if self.seen < self.size:
                    slot = self.seen
                else:
                    slot = int(self.rng.integers(0, self.seen + 1))
                    if slot >= self.size:
                        self.seen += 1
                        continue
                self.lengths[slot] = length
                self.flagged[slot] = flagged[index]
                for row, name in enumerate(self.members):
                    self.scores[row, slot] = member_scores[name][index]
                self.seen += 1

    def snapshot(self) -> tuple[np.ndarray, dict[str, np.ndarray], np.ndarray, int]:
        with self._lock:
            kept = self.kept
            return (self.lengths[:kept].copy(), {name: self.scores[row, :kept].copy() for row, name in enumerate(self.members)},
                    self.flagged[:kept].copy(), self.seen)

    def propose(self, psim_fingerprint: str, max_length: int, detector_manifests: dict[str, str], target_frr: float,
                confidence: float = DEFAULT_CONFIDENCE) -> GuardCalibration | None:
        """The calibration of the sample, or None while it holds fewer texts than the bound needs; a
        one-line :class:`ConfigError` when the sample cannot be calibrated."""
        lengths, members, flagged, seen = self.snapshot()
        if len(lengths) < sample_texts_needed(target_frr, confidence, len(self.members)):
            return None
        digest = hashlib.sha256(lengths.tobytes() + b"".join(members[name].tobytes() for name in self.members) + flagged.tobytes()).hexdigest()
        sample = CalibrationSample(source=f"serve reservoir: {len(lengths)} texts kept of {seen} screened (monitor mode)",
                                   texts=len(lengths), sha256=digest, flagged_share=round(float(flagged.mean()), 6),
                                   split_seed=RESERVOIR_SEED if len(self.members) > 1 else None)
        return calibrate_scores(lengths, members, psim_fingerprint, max_length, target_frr, confidence, sample, detector_manifests,
                                where="the reservoir", split_rng=np.random.default_rng(RESERVOIR_SEED))  # a ConfigError (e.g. a length where traffic scores 1.0) says why there is none


def write_proposal(path: Path, calibration: GuardCalibration) -> None:
    atomic_write_text(path, calibration.model_dump_json(indent=2) + "\n")


def reservoir_for(guard, size: int) -> ScoreReservoir:
    return ScoreReservoir(size, [PSIM_MEMBER, *(d.name for d in guard.detectors)], np.random.default_rng(RESERVOIR_SEED))
