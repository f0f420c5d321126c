"""Ways to set a filter's threshold: fixed, or calibrated on clean data to a target FRR."""

from __future__ import annotations

from typing import Annotated, Literal, Optional

import numpy as np
from pydantic import AfterValidator, BaseModel, ConfigDict, Field, model_validator

from peftshield.errors import ConfigError

CONFIDENCE_BOUNDS = "a PSIM threshold is a confidence in (0, 1]"


def check_confidence_threshold(value: float) -> float:
    """``value`` if it can be a PSIM threshold (a confidence in (0, 1]), else ``ValueError``."""
    if not 0 < value <= 1:
        raise ValueError(CONFIDENCE_BOUNDS)
    return value


# A threshold on a PSIM's confidence, as a settings field or option: the one place its bounds are written.
ConfidenceThreshold = Annotated[float, AfterValidator(check_confidence_threshold)]


def default_confidence_threshold(num_labels: int) -> float:
    """0.7 for two classes (the reference value), scaled with the class count: the same
    fraction (40%) of the way from uniform confidence 1/K to certainty."""
    uniform = 1.0 / num_labels
    return uniform + 0.4 * (1.0 - uniform)


def calibrate_threshold(clean_scores: np.ndarray, target_frr: float) -> float:
    """The smallest threshold that rejects at most ``target_frr`` of these clean scores."""
    if not 0.0 <= target_frr < 1.0:
        raise ConfigError(f"target_frr must be in [0, 1), got {target_frr}")
    scores = np.sort(np.asarray(clean_scores, dtype=np.float64))
    if scores.size == 0:
        raise ConfigError("cannot calibrate a threshold without clean scores")
    allowed = int(np.floor(target_frr * scores.size))  # texts that may score above the threshold
    return float(scores[scores.size - 1 - allowed])


DEFAULT_TARGET_FRR = 0.01  # the clean false-rejection rate a detector or guard is calibrated to unless told otherwise


class ThresholdPolicy(BaseModel):
    """``fixed`` (``value`` or the defense's default), ``frr`` (calibrated to ``target_frr``
    on clean dev scores), or ``auto``: ``frr`` when clean dev data is given, else ``fixed``.

    Saved and loaded like every option (``model_dump`` / the constructor)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    kind: Literal["auto", "fixed", "frr"] = "auto"
    value: Optional[float] = None
    target_frr: float = Field(DEFAULT_TARGET_FRR, ge=0, lt=1)

    @model_validator(mode="before")
    @classmethod
    def _value_means_fixed(cls, payload: object) -> object:
        """A threshold value given without a kind (or with 'auto') is a fixed threshold."""
        if isinstance(payload, dict) and payload.get("value") is not None:
            kind = payload.get("kind", "auto")
            if kind == "auto":
                return {**payload, "kind": "fixed"}
            if kind == "frr":
                raise ValueError("a threshold value is fixed: it cannot be combined with calibration (kind 'frr')")
        return payload

    def resolve(self, num_labels: int, clean_dev_scores: np.ndarray | None, default: float | None = None) -> float:
        if self.kind == "fixed" or (self.kind == "auto" and (clean_dev_scores is None or len(clean_dev_scores) == 0)):
            if self.value is not None:
                return float(self.value)
            return float(default if default is not None else default_confidence_threshold(num_labels))
        if clean_dev_scores is None or len(clean_dev_scores) == 0:
            raise ConfigError("threshold kind 'frr' needs clean dev data to calibrate on")
        return calibrate_threshold(clean_dev_scores, self.target_frr)


CLEAN_FRR_POLICY = ThresholdPolicy(kind="frr")  # the baselines' default: 1% false rejections on clean dev
AUTO_POLICY = ThresholdPolicy()  # the PSIM family's default: calibrated as CLEAN_FRR_POLICY when there are clean dev texts, else fixed
