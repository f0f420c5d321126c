"""PSIM+: PSIM and filters on the victim together, a text flagged when any finds it unusual.

PSIM catches backdoors that make triggered texts extremely confident; it misses those that do
not (a syntactic template, a low-confidence backdoor). Its members (``members``) add what it
misses: ``occlusion`` (the victim's prediction rests on one word or clause, whatever its
confidence) and ``reference`` (the victim disagrees with a classifier the defender trained on a
trusted backbone). Each score is turned into its rank among the clean dev texts' scores (the
share of them it exceeds), a text's score is the largest rank, and one threshold on that is
calibrated on the same dev texts (1% FRR by default), so the union costs no more false
rejections than one filter alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import Field
from typing import Annotated

from peftshield.defenses.base import DEFENSES, Defense, DefenseContext
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.io import atomic_directory, atomic_write_json, read_json

STATE_FILE = "psimplus.json"
Member = Literal["occlusion", "reference"]


def dev_rank(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The share of (sorted) ``reference`` scores strictly below each score, plus half the ties (in [0, 1])."""
    below = np.searchsorted(reference, scores, side="left")
    upto = np.searchsorted(reference, scores, side="right")
    return (below + upto) / (2.0 * len(reference))


@DEFENSES.register
class PSIMPlus(Defense):
    """PSIM plus victim-side filters (occlusion, reference), each ranked against clean dev texts; the largest rank."""

    name = "psimplus"
    needs_victim = True

    def __init__(self, members: Annotated[tuple[Member, ...], Field(min_length=1)] = ("occlusion",), psim: Optional[dict] = None,
                 occlusion: Optional[dict] = None, reference: Optional[dict] = None, threshold: Optional[ThresholdPolicy] = None) -> None:
        self.members = members
        self.psim = psim
        self.occlusion = occlusion
        self.reference = reference
        self.threshold = threshold

    @classmethod
    def check_options(cls, options: dict) -> None:
        for key in ("psim", "occlusion", "reference"):
            try:
                DEFENSES.get(key).validate_options(options[key] or {})
            except Exception as exc:  # a pydantic ValidationError or a ValueError of the member's own checks
                raise ValueError(f"{key}: {str(exc).splitlines()[0]}") from None

    def parts(self) -> dict[str, Defense]:
        """The member defenses, PSIM first, built from their options."""
        names = ("psim", *dict.fromkeys(self.members))
        return {name: DEFENSES.create(name, **(getattr(self, name) or {})) for name in names}

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "PSIMPlus":
        if context.dev is None or not len(context.dev):
            raise ConfigError("psimplus: needs clean dev texts to rank its scores against")
        self.parts_ = {name: part.fit(context, rng) for name, part in self.parts().items()}
        self.reference_ = {name: np.sort(part.score(context.dev.texts)) for name, part in self.parts_.items()}
        self.calibrate(context.num_labels, self.score(context.dev.texts), default=0.99)
        self.fit_seconds_ = float(sum(getattr(part, "fit_seconds_", 0.0) for part in self.parts_.values()))
        return self

    def member_scores(self, texts: list[str]) -> dict[str, np.ndarray]:
        return {name: part.score(list(texts)) for name, part in self.parts_.items()}

    def score(self, texts: list[str]) -> np.ndarray:
        ranks = [dev_rank(self.reference_[name], scores) for name, scores in self.member_scores(texts).items()]
        return np.max(ranks, axis=0) if len(texts) else np.zeros(0)

    def save(self, directory: str | Path) -> Path:
        with atomic_directory(directory) as tmp:
            for name, part in self.parts_.items():
                part.save(tmp / name)
            atomic_write_json(tmp / STATE_FILE, {"defense": self.spec(), "threshold": self.fitted_threshold(),
                                                 "reference": {name: r.tolist() for name, r in self.reference_.items()}})
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "PSIMPlus":
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{directory}: not a saved 'psimplus' defense (no {STATE_FILE})")
        state = read_json(path)
        defense = DEFENSES.from_spec(state["defense"])
        defense.parts_ = {name: DEFENSES.get(name).load(Path(directory) / name, context) for name in state["reference"]}
        defense.reference_ = {name: np.asarray(r, dtype=np.float64) for name, r in state["reference"].items()}
        defense.threshold_ = state["threshold"]
        return defense
