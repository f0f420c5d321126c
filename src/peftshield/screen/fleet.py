"""A fleet screened in two stages: weight-space outlier scores for every adapter, the audit for
the most unusual ones within a budget and for a random sample of the rest.

:class:`FleetScreen` follows scikit-learn: the constructor stores, :meth:`FleetScreen.fit`
learns each cohort's centre and spread from the fleet itself (median and MAD of every feature:
no labels, and robust to the few poisoned adapters the fleet may hold), :meth:`FleetScreen.score`
gives each adapter the root mean square of its robust z-scores (each clipped at
``clip``) against its cohort. A cohort of fewer than ``min_cohort`` adapters has no peers to be
compared with (copies of one adapter count once): its adapters score +inf, so they go to the
audit first.
"""

from __future__ import annotations

import hashlib
import math
from dataclasses import asdict, dataclass
from typing import Optional

import numpy as np

from peftshield.screen.weights import AdapterFeatures

MAD_TO_STD = 1.4826  # the MAD of a normal distribution times this is its standard deviation


@dataclass
class ScreenRow:
    """One adapter of the fleet."""

    target: str
    status: str  # stage 1: scored | no-peers | error; after stage 2, the audit's verdict when audited
    cohort: str = ""  # short id of its cohort (same base, method, ranks and modules)
    base: str = ""  # the base model its config names (as written there: fleet text, never trusted)
    score: Optional[float] = None  # stage-1 outlier score (None: error; inf: no peers)
    rank: Optional[int] = None  # 1 = most unusual
    audited: str = ""  # "top" (within the budget), "sample" (the random sample), "" (not audited)
    verdict: str = ""  # the audit's: clean | backdoored | inconclusive | error
    cached: bool = False  # the verdict came from the audit's content cache (unchanged weights and settings)
    message: str = ""

    def to_dict(self) -> dict:
        out = asdict(self)
        out["score"] = None if self.score is None else (self.score if math.isfinite(self.score) else "inf")
        return out


def audit_record(row) -> dict:
    """What stage 2 keeps of an audit's row (a :class:`~peftshield.gate.report.TargetRow`), on every executor."""
    return {"status": row.status, "message": row.message, "cached": row.cached}


def cohort_id(cohort: str) -> str:
    return hashlib.sha256(cohort.encode()).hexdigest()[:8]


class FleetScreen:
    """Unsupervised weight-space outlier score of each adapter against its cohort."""

    def __init__(self, min_cohort: int = 8, clip: float = 10.0) -> None:
        self.min_cohort = min_cohort
        self.clip = clip

    def fit(self, features: list[AdapterFeatures]) -> "FleetScreen":
        grouped: dict[str, list[AdapterFeatures]] = {}
        for item in features:
            grouped.setdefault(item.cohort, []).append(item)
        self.centres_: dict[str, tuple[list[str], np.ndarray, np.ndarray]] = {}
        for cohort, members in grouped.items():
            names = members[0].names
            table = np.stack([m.values for m in members]) if all(m.names == names for m in members) else None
            # Peers are distinct adapters: copies of one adapter (or one adapter listed under several
            # names) must not make a cohort that vouches for itself.
            if table is None or len(np.unique(table, axis=0)) < self.min_cohort:
                continue  # too few distinct peers: scored +inf, audited first
            centre = np.median(table, axis=0)
            spread = MAD_TO_STD * np.median(np.abs(table - centre), axis=0)
            floor = 1e-6 + 1e-3 * np.abs(centre)  # a feature every peer shares exactly must not divide by zero
            self.centres_[cohort] = (names, centre, np.maximum(spread, floor))
        return self

    def score(self, features: list[AdapterFeatures]) -> np.ndarray:
        out = np.full(len(features), np.inf)
        for index, item in enumerate(features):
            fitted = self.centres_.get(item.cohort)
            if fitted is None or fitted[0] != item.names:
                continue
            _, centre, spread = fitted
            z = np.clip((item.values - centre) / spread, -self.clip, self.clip)
            out[index] = float(np.sqrt(np.mean(z ** 2)))
        return out


def parse_budget(value: str, fleet: int, option: str) -> int:
    """``10%`` of the fleet (rounded up) or a count, as an int; one line naming ``option`` otherwise."""
    from peftshield.errors import ConfigError

    text = value.strip()
    try:
        if text.endswith("%"):
            share = float(text[:-1]) / 100
            if not 0 <= share <= 1:
                raise ValueError
            return min(fleet, math.ceil(share * fleet - 1e-9))
        count = int(text)
        if count < 0:
            raise ValueError
        return min(fleet, count)
    except ValueError:
        raise ConfigError(f"{option} {value}: give a share of the fleet (e.g. 10%) or a count (e.g. 20)") from None


def select_for_audit(scores: np.ndarray, budget: int, sample: int, rng: np.random.Generator) -> tuple[list[int], list[int]]:
    """The ``budget`` highest scores (ties broken by position), and ``sample`` more drawn at random
    from the rest with ``rng``: the audited sample of adapters stage 1 did not pick."""
    order = sorted(range(len(scores)), key=lambda i: (-scores[i], i))
    top = order[:budget]
    rest = order[budget:]
    drawn = sorted(rng.choice(len(rest), size=min(sample, len(rest)), replace=False).tolist()) if rest and sample else []
    return top, [rest[i] for i in drawn]
