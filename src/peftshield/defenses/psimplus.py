"""PSIM+: PSIM and occlusion together, a text flagged when either finds it unusual.

PSIM catches backdoors that make triggered texts extremely confident; it misses those that do
not (a syntactic template, a low-confidence backdoor). Occlusion on the victim catches a
prediction that rests on one word or clause, whatever its confidence. Each score is turned into
its rank among the clean dev texts' scores (the share of them it exceeds), a text's score is the
larger rank, and one threshold on that is calibrated on the same dev texts (1% FRR by default),
so the pair costs no more false rejections than either alone.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np

from peftshield.defenses.base import DEFENSES, Defense, DefenseContext
from peftshield.defenses.occlusion import Occlusion
from peftshield.defenses.psim import PSIM
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.io import atomic_directory, atomic_write_json, read_json

STATE_FILE = "psimplus.json"


def dev_rank(reference: np.ndarray, scores: np.ndarray) -> np.ndarray:
    """The share of ``reference`` scores strictly below each score, plus half the ties (in [0, 1])."""
    below = np.searchsorted(reference, scores, side="left")
    upto = np.searchsorted(reference, scores, side="right")
    return (below + upto) / (2.0 * len(reference))


@DEFENSES.register
class PSIMPlus(Defense):
    """PSIM's confidence and the victim's occlusion drop, each ranked against clean dev texts; the larger rank."""

    name = "psimplus"
    needs_victim = True

    def __init__(self, psim: Optional[dict] = None, occlusion: Optional[dict] = None, threshold: Optional[ThresholdPolicy] = None) -> None:
        self.psim = psim
        self.occlusion = occlusion
        self.threshold = threshold

    @classmethod
    def check_options(cls, options: dict) -> None:
        for key, registered in (("psim", PSIM), ("occlusion", Occlusion)):
            try:
                registered.validate_options(options[key] or {})
            except Exception as exc:  # a pydantic ValidationError or a ValueError of the member's own checks
                raise ValueError(f"{key}: {str(exc).splitlines()[0]}") from None

    def members(self) -> tuple[PSIM, Occlusion]:
        return PSIM(**PSIM.validate_options(self.psim or {})), Occlusion(**Occlusion.validate_options(self.occlusion or {}))

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "PSIMPlus":
        if context.dev is None or not len(context.dev):
            raise ConfigError("psimplus: needs clean dev texts to rank its two scores against")
        self.psim_, self.occlusion_ = self.members()
        self.psim_.fit(context, rng)
        self.occlusion_.fit(context, rng)
        self.reference_ = [np.sort(self.psim_.score(context.dev.texts)), np.sort(self.occlusion_.score(context.dev.texts))]
        dev_scores = self.score(context.dev.texts)
        self.threshold_ = (self.threshold or ThresholdPolicy(kind="frr")).resolve(context.num_labels, dev_scores, default=0.99)
        self.fit_seconds_ = float(getattr(self.psim_, "fit_seconds_", 0.0))
        return self

    def member_scores(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray]:
        return self.psim_.score(list(texts)), self.occlusion_.score(list(texts))

    def score(self, texts: list[str]) -> np.ndarray:
        psim_scores, occlusion_scores = self.member_scores(texts)
        return np.maximum(dev_rank(self.reference_[0], psim_scores), dev_rank(self.reference_[1], occlusion_scores))

    def save(self, directory: str | Path) -> Path:
        with atomic_directory(directory) as tmp:
            self.psim_.save(tmp / "psim")
            self.occlusion_.save(tmp / "occlusion")
            atomic_write_json(tmp / STATE_FILE, {"defense": self.spec(), "threshold": self.fitted_threshold(),
                                                 "reference": [r.tolist() for r in self.reference_]})
        return Path(directory)

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "PSIMPlus":
        path = Path(directory) / STATE_FILE
        if not path.is_file():
            raise ConfigError(f"{directory}: not a saved 'psimplus' defense (no {STATE_FILE})")
        state = read_json(path)
        defense = DEFENSES.from_spec(state["defense"])
        defense.psim_ = PSIM.load(Path(directory) / "psim", context)
        defense.occlusion_ = Occlusion.load(Path(directory) / "occlusion", context)
        defense.reference_ = [np.asarray(r, dtype=np.float64) for r in state["reference"]]
        defense.threshold_ = state["threshold"]
        return defense
