"""A guard's threshold calibrated on the deployment's own clean texts, one per length bucket.

A PSIM's confidence on clean text rises with length: at the threshold it was calibrated to on
SST-2 dev sentences (1% flagged), it flags 17-23% of clean texts of 64 tokens or more
(bench/guard_drift.md). One threshold per length bucket, each set to flag at most the target
share of the deployment's own clean sample in that bucket, removes that drift: a long text is
compared with long clean texts.

``peftshield calibrate`` writes a :class:`GuardCalibration` (JSON); ``guard`` and ``serve``
load it with ``--calibration``. The file is bound to the PSIM it was made with (its
fingerprint) and to the tokens read per text; a calibration for another PSIM is refused, never
applied. It records the sample's hash and size. A guard's threshold never moves on its own: a
new calibration takes effect only when an operator passes the file.
"""

from __future__ import annotations

import hashlib
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, model_validator

from peftshield.defenses.thresholds import calibrate_threshold
from peftshield.errors import ConfigError, first_issue
from peftshield.models.batching import encode_texts

CALIBRATION_FORMAT = "peftshield-guard-calibration/1"
# Bucket edges in tokens (special tokens included, after truncation): [0, 16), [16, 32), [32, 64), [64, ...).
DEFAULT_LENGTH_EDGES: tuple[int, ...] = (16, 32, 64)
# A bucket with fewer clean texts is merged into its neighbour: at a 1% target, 200 texts let
# two score above the threshold, so one outlier does not set it.
MIN_BUCKET_TEXTS = 200
MAX_TOKENS = 1_000_000  # no bucket edge beyond this (a model reads far fewer tokens)


class LengthBucket(BaseModel):
    """Texts of ``min_tokens`` <= length < ``max_tokens`` (no upper bound when None) and their threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_tokens: NonNegativeInt = Field(le=MAX_TOKENS)
    max_tokens: Optional[PositiveInt] = Field(None, le=MAX_TOKENS)
    threshold: float = Field(gt=0, lt=1, description="A PSIM confidence; 1.0 would never flag, so it is refused.")
    texts: PositiveInt = Field(description="Clean sample texts in this bucket.")
    sample_flag_rate: float = Field(ge=0, le=1, description="Share of them above the threshold (in-sample).")


class CalibrationSample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="Where the sample was read (as given).")
    texts: PositiveInt
    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="Hash of the texts, in order, each followed by a newline.")


class GuardCalibration(BaseModel):
    """Per-length thresholds for one PSIM, calibrated on a clean sample of the deployment's traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal["peftshield-guard-calibration/1"] = CALIBRATION_FORMAT
    psim_fingerprint: str = Field(min_length=1, max_length=200)
    max_length: PositiveInt = Field(description="Tokens the PSIM reads per text (a text's length bucket is counted after this cut).")
    target_frr: float = Field(gt=0, lt=0.5)
    buckets: list[LengthBucket] = Field(min_length=1, max_length=64)
    sample: CalibrationSample
    created: str = ""

    @model_validator(mode="after")
    def _buckets_cover_every_length(self) -> "GuardCalibration":
        if self.buckets[0].min_tokens != 0 or self.buckets[-1].max_tokens is not None:
            raise ValueError("buckets must start at 0 tokens and leave the last one open")
        for shorter, longer in zip(self.buckets, self.buckets[1:]):
            if shorter.max_tokens is None or shorter.max_tokens != longer.min_tokens or longer.min_tokens <= shorter.min_tokens:
                raise ValueError("buckets must follow one another without gap or overlap")
        return self

    @property
    def expected_flag_rate(self) -> float:
        """The share of clean traffic like the sample that the guard should flag."""
        return float(self.target_frr)

    def thresholds_for(self, lengths: np.ndarray) -> np.ndarray:
        """Each text's threshold, from its length in tokens."""
        starts = np.array([bucket.min_tokens for bucket in self.buckets[1:]], dtype=np.int64)
        values = np.array([bucket.threshold for bucket in self.buckets], dtype=np.float64)
        return values[np.searchsorted(starts, np.asarray(lengths, dtype=np.int64), side="right")]

    def describe(self) -> str:
        parts = [f"{b.min_tokens}-{'' if b.max_tokens is None else b.max_tokens - 1} tokens: {b.threshold:.4f} ({b.texts} texts)" for b in self.buckets]
        return f"thresholds per length at {self.target_frr:.1%} FRR on {self.sample.texts} texts of {self.sample.source}: " + "; ".join(parts)


def check_target_frr(target_frr: float) -> float:
    """``target_frr`` if it can be a calibration's target, else a one-line :class:`ConfigError`."""
    if not 0 < target_frr < 0.5:
        raise ConfigError(f"--target-frr {target_frr}: must be above 0 and below 0.5 (a share, e.g. 0.01 for 1%)")
    return target_frr


def sample_hash(texts: list[str]) -> str:
    digest = hashlib.sha256()
    for text in texts:
        digest.update(text.encode("utf-8", "surrogatepass") + b"\n")
    return digest.hexdigest()


def token_lengths(tokenizer, texts: list[str], max_length: int) -> np.ndarray:
    """Tokens each text occupies when the PSIM reads it (special tokens included, cut at ``max_length``)."""
    return encode_texts(tokenizer, texts, max_length).lengths()


def merged_edges(lengths: np.ndarray, edges: tuple[int, ...], min_texts: int) -> list[int]:
    """``edges`` with those removed whose bucket would hold fewer than ``min_texts`` of ``lengths``
    (a short bucket joins the next longer one; a short last bucket joins the one before)."""
    kept: list[int] = []
    start = 0
    for edge in sorted(set(int(e) for e in edges if e > 0)):
        if np.count_nonzero((lengths >= start) & (lengths < edge)) >= min_texts:
            kept.append(edge)
            start = edge
    while kept and np.count_nonzero(lengths >= kept[-1]) < min_texts:
        kept.pop()
    return kept


def calibrate_guard(psim, psim_fingerprint: str, texts: list[str], target_frr: float, source: str,
                    edges: tuple[int, ...] = DEFAULT_LENGTH_EDGES, min_bucket_texts: int = MIN_BUCKET_TEXTS,
                    scores: np.ndarray | None = None) -> GuardCalibration:
    """Per-length thresholds for ``psim`` (whose folder has ``psim_fingerprint``,
    :func:`~peftshield.finetune.checkpoint.model_fingerprint`) that flag at most ``target_frr``
    of the clean ``texts`` in each bucket. ``scores`` are the PSIM's scores of ``texts`` when
    already computed."""
    check_target_frr(target_frr)
    if len(texts) < min_bucket_texts:
        raise ConfigError(f"--texts {source}: {len(texts)} texts; a calibration needs at least {min_bucket_texts} clean texts")
    lengths = token_lengths(psim.tokenizer_, texts, psim.max_length)
    scores = np.asarray(psim.score(texts) if scores is None else scores, dtype=np.float64)
    bounds = [0, *merged_edges(lengths, edges, min_bucket_texts), None]
    buckets = []
    for low, high in zip(bounds, bounds[1:]):
        inside = (lengths >= low) & (lengths < (high if high is not None else np.iinfo(np.int64).max))
        threshold = calibrate_threshold(scores[inside], target_frr)
        if not threshold < 1.0:
            raise ConfigError(f"--texts {source}: more than {target_frr:.1%} of the clean texts of {low} to {'more' if high is None else high - 1} "
                              "tokens score 1.0, so no threshold can keep them; this PSIM cannot screen texts of that length")
        buckets.append(LengthBucket(min_tokens=low, max_tokens=high, threshold=threshold, texts=int(inside.sum()),
                                    sample_flag_rate=float(np.mean(scores[inside] > threshold))))
    return GuardCalibration(psim_fingerprint=psim_fingerprint, max_length=psim.max_length, target_frr=target_frr, buckets=buckets,
                            sample=CalibrationSample(source=source, texts=len(texts), sha256=sample_hash(texts)),
                            created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))


MAX_CALIBRATION_BYTES = 1_000_000


def load_guard_calibration(path: str | Path, psim_fingerprint: str, max_length: int) -> GuardCalibration:
    """The calibration in ``path``, checked against the PSIM it is for; a one-line :class:`ConfigError` otherwise."""
    path = Path(path)
    where = f"--calibration {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    if path.stat().st_size > MAX_CALIBRATION_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CALIBRATION_BYTES} bytes; not a guard calibration")
    try:
        calibration = GuardCalibration.model_validate_json(path.read_bytes())
    except ValidationError as error:
        issue = first_issue(error)
        raise ConfigError(f"{where}: not a guard calibration ({issue.location + ': ' if issue.location else ''}{issue.message}); "
                          "write one with 'peftshield calibrate'") from None
    if calibration.psim_fingerprint != psim_fingerprint:
        raise ConfigError(f"{where}: made for another PSIM (or the PSIM or its backbone changed since); calibrate again with 'peftshield calibrate'")
    if calibration.max_length != max_length:
        raise ConfigError(f"{where}: made for {calibration.max_length} tokens per text, the guard reads {max_length}; "
                          "calibrate again or pass the same --max-length")
    return calibration
