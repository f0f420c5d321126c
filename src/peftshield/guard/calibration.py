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

Two choices make the target hold on traffic rather than only on the sample:

- **A bound, not a point estimate.** A threshold set so that exactly 1% of a finite sample
  scores above it lets about as much as 1% of fresh traffic through on average, and more half of
  the time. Each bucket's threshold is instead the sample's (k+1)-th highest score for the
  largest k at which P(Binomial(n, target) <= k) <= 1 - confidence: with probability
  ``confidence`` (0.9 by default) the share of clean traffic like the sample above it is at most
  the target (the order-statistic bound behind conformal prediction). A bucket needs at least
  ln(1 - confidence) / ln(1 - target) texts for that (230 at 1% and 0.9).
- **One budget for several members, with the same confidence.** With detectors (``--detector``),
  each bucket's texts are split by a seeded draw. On the smaller part (``NORMALISER_SHARE``) each
  member's scores fix a map from its score to a common level, the score's rarity (-ln of the
  share of clean scores at least as high; past the highest, an exponential tail fitted to the top
  tenth; the PSIM's confidence read through its logit). On the rest, every text's level is the
  highest of its members' levels, and the bound above is taken on those levels: one order
  statistic of one number per text. Each member's threshold is the score its map gives that
  level, so a text is flagged when any member passes its own threshold, and the union of their
  flags keeps the target with the stated confidence, exactly as the PSIM alone does. The price is
  texts: the part the bound is taken on must hold what the bound needs (``union_texts_needed``:
  307 at 1% and 0.9). How the budget is shared rests on the fitted tails: at small samples a
  member with a heavier tail takes most of it. Both parts' scores are kept in the file, so its
  thresholds are recomputed when it is read. Every result carries each member's p-value against
  its clean scores in the text's bucket.
"""

from __future__ import annotations

import functools
import hashlib
import math
import time
from pathlib import Path
from typing import Literal, Optional

import numpy as np
from pydantic import BaseModel, ConfigDict, Field, NonNegativeInt, PositiveInt, ValidationError, model_validator

from peftshield.errors import ConfigError, validation_line
from peftshield.models.batching import encode_texts

CALIBRATION_FORMAT = "peftshield-guard-calibration/3"
# /1: the PSIM alone, its point-estimate thresholds (still read). /2: the bound; with detectors, one
# common rank whose confidence was not exact (read for the PSIM alone; with detectors, refused).
READ_FORMATS = ("peftshield-guard-calibration/1", "peftshield-guard-calibration/2", CALIBRATION_FORMAT)
# Bucket edges in tokens (special tokens included, after truncation): [0, 16), [16, 32), [32, 64), [64, ...).
DEFAULT_LENGTH_EDGES: tuple[int, ...] = (16, 32, 64)
# A bucket with fewer clean texts is merged into its neighbour (and never fewer than the bound
# needs: texts_needed), so one outlier does not set a threshold.
MIN_BUCKET_TEXTS = 200
# The probability that the false-rejection rate on traffic like the sample stays at or below the target.
DEFAULT_CONFIDENCE = 0.9
# Clean scores kept per member and bucket for p-values: all of them up to this, else as many evenly spaced quantiles.
MAX_KEPT_SCORES = 2000
PSIM_MEMBER = "psim"
MAX_SAMPLE_TEXTS = 100_000_000  # a calibration sample larger than this is not one anybody scored
# --fill-lengths fills a bucket to this many times the texts the bound needs: a bucket at exactly
# the least size has its threshold at the sample's highest score, the noisiest choice.
FILL_FACTOR = 3
MAX_TOKENS = 1_000_000  # no bucket edge beyond this (a model reads far fewer tokens)
# With detectors: the share of a bucket's texts (at most MAX_KEPT_SCORES of them) that maps each
# member's scores to a common level; the bound is taken on the rest (at most MAX_KEPT_SCORES).
NORMALISER_SHARE = 0.25
# A level past a member's highest normalising score grows by one per this quantile-to-top spread.
TAIL_QUANTILE = 0.9


class UnionBound(BaseModel):
    """How one bucket's member thresholds were set under one budget: the scores that map each
    member to a common level, and the scores the bound was taken on (kept whole, so the
    thresholds are recomputed from them when the file is read)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    normalising_scores: dict[str, list[float]] = Field(min_length=2, max_length=17, description="Each member's scores of the "
                                                       "normalising texts, ascending.")
    bound_scores: dict[str, list[float]] = Field(min_length=2, max_length=17, description="Each member's scores of the texts the bound "
                                                 "was taken on, one per text in the same order for every member.")
    level: float = Field(description="The common level: at most the bound's allowance of those texts has a member above it.")

    @model_validator(mode="after")
    def _aligned_and_finite(self) -> "UnionBound":
        if set(self.normalising_scores) != set(self.bound_scores):
            raise ValueError("the normalising and the bound's scores must be of the same members")
        for part, limit in ((self.normalising_scores, MAX_KEPT_SCORES), (self.bound_scores, MAX_KEPT_SCORES)):
            sizes = {len(scores) for scores in part.values()}
            if len(sizes) != 1 or not 0 < sizes.pop() <= limit:
                raise ValueError(f"every member needs one score per text, between 1 and {limit} texts")
        values = [self.level, *(v for part in (self.normalising_scores, self.bound_scores) for scores in part.values() for v in scores)]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("levels and scores must be finite numbers")
        if any(scores != sorted(scores) for scores in self.normalising_scores.values()):
            raise ValueError("normalising scores must be ascending")
        return self

    @property
    def normalising_texts(self) -> int:
        return len(next(iter(self.normalising_scores.values())))

    @property
    def bound_texts(self) -> int:
        return len(next(iter(self.bound_scores.values())))


class LengthBucket(BaseModel):
    """Texts of ``min_tokens`` <= length < ``max_tokens`` (no upper bound when None) and their threshold."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    min_tokens: NonNegativeInt = Field(le=MAX_TOKENS)
    max_tokens: Optional[PositiveInt] = Field(None, le=MAX_TOKENS)
    threshold: float = Field(gt=0, lt=1, description="A PSIM confidence; 1.0 would never flag, so it is refused.")
    texts: PositiveInt = Field(le=MAX_SAMPLE_TEXTS, description="Clean sample texts in this bucket.")
    sample_flag_rate: float = Field(ge=0, le=1, description="Share of them flagged (by any member; in-sample).")
    detector_thresholds: dict[str, float] = Field({}, max_length=16, description="Each detector's threshold in this bucket (--detector).")
    clean_scores: dict[str, list[float]] = Field({}, max_length=17, description="Each member's clean scores in this bucket, ascending "
                                                 f"(at most {MAX_KEPT_SCORES}: evenly spaced quantiles of larger samples), for p-values.")
    union: Optional[UnionBound] = Field(None, description="With detectors: how their thresholds and the PSIM's were set under one budget.")

    @model_validator(mode="after")
    def _finite_and_bounded(self) -> "LengthBucket":
        values = [*self.detector_thresholds.values(), *(v for scores in self.clean_scores.values() for v in scores)]
        if not all(math.isfinite(v) for v in values):
            raise ValueError("thresholds and scores must be finite numbers")
        if any(len(scores) > MAX_KEPT_SCORES or scores != sorted(scores) for scores in self.clean_scores.values()):
            raise ValueError(f"clean scores: at most {MAX_KEPT_SCORES} per member, ascending")
        if self.union is not None and self.union.normalising_texts + self.union.bound_texts > self.texts:
            raise ValueError("the union's texts are more than the bucket's")
        return self

    @functools.cached_property
    def kept_arrays(self) -> dict[str, np.ndarray]:
        """``clean_scores`` as arrays, made once (p-values are asked per text and member in the request path)."""
        return {name: np.asarray(scores, dtype=np.float64) for name, scores in self.clean_scores.items()}

    def member_threshold(self, name: str) -> float:
        return self.threshold if name == PSIM_MEMBER else self.detector_thresholds[name]

    def p_value(self, name: str, score: float) -> float | None:
        """The share of this bucket's clean texts scoring at least ``score`` under member
        ``name``, counting the text itself ((1 + m) / (n + 1)); None without kept scores."""
        kept = self.kept_arrays.get(name)
        if kept is None or not kept.size:
            return None
        at_least = (kept.size - np.searchsorted(kept, score, side="left")) / kept.size
        return float((1 + self.texts * at_least) / (self.texts + 1))


class CalibrationSample(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)

    source: str = Field(description="Where the sample was read (as given).")
    texts: PositiveInt
    sha256: str = Field(pattern="^[0-9a-f]{64}$", description="Hash of the texts, in order, each followed by a newline (a serving reservoir: of the lengths and scores it kept).")
    joined: NonNegativeInt = Field(0, description="Texts joined from the sample's own to fill length buckets it had too few of "
                                   "('calibrate --fill-lengths'); counted in the buckets, not in texts.")
    fill_seed: Optional[int] = Field(None, description="The seed that drew the joined texts (--seed), so the calibration can be made again.")
    split_seed: Optional[int] = Field(None, description="With detectors: the seed that split each bucket into its normalising part and "
                                      "the bound's (--seed).")
    flagged_share: Optional[float] = Field(None, ge=0, le=1, description="A serving reservoir's proposal: the share of the kept texts "
                                           "the guard flagged under the thresholds it served with. Triggered traffic in the sample raises "
                                           "the proposed thresholds: review this share before accepting the proposal.")


class GuardCalibration(BaseModel):
    """Per-length thresholds for one PSIM, calibrated on a clean sample of the deployment's traffic."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    format: Literal[READ_FORMATS] = CALIBRATION_FORMAT
    psim_fingerprint: str = Field(min_length=1, max_length=200)
    max_length: PositiveInt = Field(description="Tokens the PSIM reads per text (a text's length bucket is counted after this cut).")
    target_frr: float = Field(gt=0, lt=0.5)
    confidence: Optional[float] = Field(None, ge=0.5, lt=1, description="Probability that the rate on traffic like the sample is at most "
                                        "target_frr (None: each bucket's threshold flags target_frr of its sample texts, format /1).")
    detectors: dict[str, str] = Field({}, max_length=16, description="The detectors calibrated with the PSIM under one budget: the SHA-256 "
                                      "of each one's detector.json.")
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
        for bucket in self.buckets:
            if set(bucket.detector_thresholds) != set(self.detectors) or not set(bucket.clean_scores) <= {PSIM_MEMBER, *self.detectors}:
                raise ValueError("every bucket must hold a threshold for each calibrated detector, and scores only of members")
        if self.format == READ_FORMATS[0]:
            if self.detectors or self.confidence is not None:
                raise ValueError("a format /1 calibration is of the PSIM alone, without a confidence")
        elif self.confidence is None:
            raise ValueError("a calibration of format /2 or later states its confidence")
        if self.detectors and self.format != CALIBRATION_FORMAT:
            raise ValueError("made with detectors by an older peftshield, whose bound for several members was not exact; "
                             "calibrate again with 'peftshield calibrate'")
        if sum(bucket.texts for bucket in self.buckets) != self.sample.texts + self.sample.joined:
            raise ValueError("the buckets' texts do not add up to the sample's")
        if self.confidence is not None:  # format /2: every threshold must be the one its bucket's own clean scores give
            for bucket in self.buckets:
                problem = threshold_problem(bucket, self.target_frr, self.confidence)
                if problem:
                    raise ValueError(f"bucket {bucket.min_tokens}+ tokens: {problem}")
        return self

    def bucket_indices(self, lengths: np.ndarray) -> np.ndarray:
        """Each text's bucket (an index into ``buckets``), from its length in tokens."""
        starts = np.array([bucket.min_tokens for bucket in self.buckets[1:]], dtype=np.int64)
        return np.searchsorted(starts, np.asarray(lengths, dtype=np.int64), side="right")

    @property
    def expected_flag_rate(self) -> float:
        """The share of clean traffic like the sample that the guard should flag."""
        return float(self.target_frr)

    def thresholds_for(self, lengths: np.ndarray) -> np.ndarray:
        """Each text's threshold, from its length in tokens."""
        values = np.array([bucket.threshold for bucket in self.buckets], dtype=np.float64)
        return values[self.bucket_indices(lengths)]

    def describe(self) -> str:
        def members(b: LengthBucket) -> str:
            return "".join(f", {name} {value:.4g}" for name, value in sorted(b.detector_thresholds.items()))

        parts = [f"{b.min_tokens}-{'' if b.max_tokens is None else b.max_tokens - 1} tokens: {b.threshold:.4f}{members(b)} ({b.texts} texts)"
                 for b in self.buckets]
        bound = f" with {self.confidence:.0%} confidence" if self.confidence is not None else ""
        return (f"thresholds per length at {self.target_frr:.1%} FRR{bound}{' for psim and ' + ', '.join(sorted(self.detectors)) if self.detectors else ''} "
                f"on {self.sample.texts} texts of {self.sample.source}{f' (and {self.sample.joined} joined from them)' if self.sample.joined else ''}: "
                + "; ".join(parts))


def check_target_frr(target_frr: float) -> float:
    """``target_frr`` if it can be a calibration's target, else a one-line :class:`ConfigError`."""
    if not 0 < target_frr < 0.5:
        raise ConfigError(f"--target-frr {target_frr}: must be above 0 and below 0.5 (a share, e.g. 0.01 for 1%)")
    return target_frr


def check_confidence(confidence: float) -> float:
    if not 0.5 <= confidence < 1:
        raise ConfigError(f"--confidence {confidence}: must be at least 0.5 and below 1 (e.g. 0.9)")
    return confidence


def texts_needed(target_frr: float, confidence: float) -> int:
    """The fewest clean texts for which a threshold can keep the rate at most ``target_frr`` with
    probability ``confidence``: even the sample's highest score does it only from this size on."""
    return math.ceil(math.log(1 - confidence) / math.log(1 - target_frr) - 1e-9)


def union_texts_needed(target_frr: float, confidence: float) -> int:
    """The fewest clean texts a bucket needs to be calibrated with detectors: the bound's part
    (all but ``NORMALISER_SHARE``) must hold :func:`texts_needed`."""
    return math.ceil(texts_needed(target_frr, confidence) / (1 - NORMALISER_SHARE) - 1e-9)


def sample_texts_needed(target_frr: float, confidence: float, members: int, min_bucket_texts: int = MIN_BUCKET_TEXTS) -> int:
    """The fewest clean texts per bucket for ``members`` members (the PSIM and its detectors)."""
    bound = texts_needed(target_frr, confidence) if members == 1 else union_texts_needed(target_frr, confidence)
    return max(min_bucket_texts, bound)


def allowed_above(texts: int, target_frr: float, confidence: float) -> int:
    """The most of ``texts`` clean sample texts that may be flagged so that, with probability
    ``confidence``, at most ``target_frr`` of clean traffic is: the largest k with
    P(Binomial(texts, target_frr) <= k) <= 1 - confidence (-1 when even k = 0 is too many)."""
    from scipy.stats import binom

    level = 1 - confidence
    k = int(binom.ppf(level, texts, target_frr))  # the smallest k with CDF(k) >= level: the answer is k or k - 1
    while k >= 0 and binom.cdf(k, texts, target_frr) > level:
        k -= 1
    while k + 1 <= texts and binom.cdf(k + 1, texts, target_frr) <= level:
        k += 1
    return k


LOGIT_CLIP = 1e-12  # PSIM confidences are read through the logit within [LOGIT_CLIP, 1 - LOGIT_CLIP]


def _logit(scores: np.ndarray) -> np.ndarray:
    clipped = np.clip(scores, LOGIT_CLIP, 1 - LOGIT_CLIP)
    return np.log(clipped) - np.log1p(-clipped)


def _sigmoid(value: float) -> float:
    return float(1 / (1 + math.exp(-value))) if value > -700 else 0.0


class MemberLevels:
    """A member's map from score to common level, fixed by its normalising scores. A level is a
    surprisal, -ln P(a clean score at least this high): inside the normalising scores it comes
    from their mid-rank share (interpolated), past the highest from an exponential tail whose
    scale is the mean excess of the top tenth over its lowest (and likewise below the lowest).
    So levels of different members compare as tail probabilities, also beyond what the sample
    saw, and the map is strictly increasing: a level has exactly one score. The PSIM's
    confidence, bounded by 1, is read through its logit."""

    def __init__(self, name: str, normalising: np.ndarray) -> None:
        self.logit = name == PSIM_MEMBER
        values = self._scale(np.sort(np.asarray(normalising, dtype=np.float64)))
        self.points, counts = np.unique(values, return_counts=True)
        if self.points.size < 2:
            raise ConfigError(f"{name} gave one score to all {values.size} normalising texts, so its scores say nothing about a text; "
                              "it cannot be calibrated on this sample")
        self.levels = -np.log1p(-(np.cumsum(counts) - counts / 2) / values.size)
        top = values[values >= np.quantile(values, TAIL_QUANTILE)]
        bottom = values[values <= np.quantile(values, 1 - TAIL_QUANTILE)]
        self.upper_scale = self._positive(float(np.mean(top - top[0])), self.points)
        self.lower_scale = self._positive(float(np.mean(bottom[-1] - bottom)), self.points)

    @staticmethod
    def _positive(scale: float, points: np.ndarray) -> float:
        return scale if scale > 0 else float(points[-1] - points[0]) / points.size

    def _scale(self, scores: np.ndarray) -> np.ndarray:
        return _logit(scores) if self.logit else scores

    def level(self, scores: np.ndarray) -> np.ndarray:
        x = self._scale(np.asarray(scores, dtype=np.float64))
        inside = np.interp(x, self.points, self.levels)
        below = self.levels[0] - (self.points[0] - x) / self.lower_scale
        above = self.levels[-1] + (x - self.points[-1]) / self.upper_scale
        return np.where(x < self.points[0], below, np.where(x > self.points[-1], above, inside))

    def score(self, level: float) -> float:
        if level < self.levels[0]:
            x = self.points[0] - (self.levels[0] - level) * self.lower_scale
        elif level > self.levels[-1]:
            x = self.points[-1] + (level - self.levels[-1]) * self.upper_scale
        else:
            x = float(np.interp(level, self.levels, self.points))
        return _sigmoid(x) if self.logit else float(x)


def union_thresholds(normalising: dict[str, np.ndarray], bound: dict[str, np.ndarray], allowed: int) -> tuple[float, dict[str, float]]:
    """The common level and each member's threshold at it: the level is the (``allowed`` + 1)-th
    highest of the bound's texts' levels (each text's level the highest of its members'), so at
    most ``allowed`` of them have a member above its threshold. A threshold is never below a score
    its member gave a text at or under the level (so rounding cannot add a flag)."""
    with np.errstate(over="ignore", invalid="ignore"):  # scores near the largest float: a threshold that is not finite is refused by the caller
        maps = {name: MemberLevels(name, values) for name, values in normalising.items()}
        text_levels = np.max([maps[name].level(bound[name]) for name in maps], axis=0)
        level = float(np.sort(text_levels)[::-1][allowed])
        kept = text_levels <= level
        thresholds = {}
        for name, levels in maps.items():
            threshold = levels.score(level)
            if kept.any():
                threshold = max(threshold, float(np.max(np.asarray(bound[name], dtype=np.float64)[kept])))
            thresholds[name] = threshold
    return level, thresholds


def split_for_union(count: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """A bucket's text indices drawn into the normalising part and the bound's part (each at most
    ``MAX_KEPT_SCORES``; a larger bucket leaves the rest unused)."""
    order = rng.permutation(count)
    normalising = min(MAX_KEPT_SCORES, int(count * NORMALISER_SHARE))
    return order[:normalising], order[normalising:normalising + MAX_KEPT_SCORES]


def threshold_problem(bucket: LengthBucket, target_frr: float, confidence: float) -> str | None:
    """What is wrong with a bucket's thresholds, checked against its own kept clean scores, or None.

    A calibration file is configuration anyone with write access to it can edit: a threshold
    raised by hand (``"dan": 1e300``) would switch a member off without a word. So each
    member's threshold must be the one :func:`calibrate_guard` sets from the bucket's scores.
    With detectors, every threshold is recomputed from the union's two parts (:func:`_union_problem`).
    The PSIM alone: when every score was kept (``texts`` up to ``MAX_KEPT_SCORES``) its threshold
    must be the (k+1)-th highest (k the texts the bound allows above); otherwise the kept scores
    are evenly spaced quantiles, and the share of them above it must lie between what ranks k - 1
    and k + 1 give, give or take one quantile step. A file whose scores were forged together with
    its thresholds passes: the sample's hash is recorded for that audit.
    """
    members = [PSIM_MEMBER, *sorted(bucket.detector_thresholds)]
    missing = [name for name in members if name not in bucket.clean_scores]
    if missing:
        return f"no clean scores kept for {missing[0]}, so its threshold cannot be checked"
    if len(members) > 1 or bucket.union is not None:
        return _union_problem(bucket, members, target_frr, confidence)
    kept = {name: np.asarray(bucket.clean_scores[name], dtype=np.float64) for name in members}  # not kept_arrays: a cached property would join the model's equality
    expected_size = min(bucket.texts, MAX_KEPT_SCORES)
    short = [name for name in members if kept[name].size != expected_size]
    if short:
        return f"{short[0]} keeps {kept[short[0]].size} clean scores, not the {expected_size} its {bucket.texts} texts give"
    allowed = allowed_above(bucket.texts, target_frr, confidence)
    if allowed < 0:
        return f"{bucket.texts} texts are too few for a {target_frr:.1%} bound at {confidence:.0%} confidence"
    if bucket.texts <= MAX_KEPT_SCORES:
        return _exact_rank_problem(bucket, kept, allowed)
    # Evenly spaced quantiles of a larger sample (its lowest and highest scores among them).
    step = 1.0 / (MAX_KEPT_SCORES - 1)
    lowest_rank, highest_rank = max(0, allowed - 1), allowed + 1
    for name in members:
        threshold = bucket.member_threshold(name)
        if threshold > kept[name][-1]:
            return f"{name}'s threshold {threshold:.6g} is above every clean score ({kept[name][-1]:.6g}): it would never fire on clean-like text"
        above = float(np.count_nonzero(kept[name] > threshold)) / kept[name].size
        at_or_above = float(np.count_nonzero(kept[name] >= threshold)) / kept[name].size  # ties at the threshold count either way
        low, high = lowest_rank / bucket.texts - 2 * step, highest_rank / bucket.texts + 2 * step
        if at_or_above < low or above > high:
            return (f"{name}'s threshold {threshold:.6g} puts {above:.2%} of its clean scores above it, "
                    f"not the {lowest_rank / bucket.texts:.2%}-{highest_rank / bucket.texts:.2%} the bound allows")
    return None


def _union_problem(bucket: LengthBucket, members: list[str], target_frr: float, confidence: float) -> str | None:
    """Several members: their thresholds are recomputed from the scores the file keeps."""
    union = bucket.union
    if union is None:
        return "thresholds for several members without the scores that set them"
    if set(union.bound_scores) != set(members):
        return "the union's scores are not of the bucket's members"
    expected = min(bucket.texts, MAX_KEPT_SCORES)
    short = [name for name in members if len(bucket.clean_scores[name]) != expected]
    if short:
        return f"{short[0]} keeps {len(bucket.clean_scores[short[0]])} clean scores, not the {expected} its {bucket.texts} texts give"
    normalising = min(MAX_KEPT_SCORES, int(bucket.texts * NORMALISER_SHARE))
    if (union.normalising_texts, union.bound_texts) != (normalising, min(MAX_KEPT_SCORES, bucket.texts - normalising)):
        return (f"the union's parts hold {union.normalising_texts} and {union.bound_texts} texts, not the {normalising} and "
                f"{min(MAX_KEPT_SCORES, bucket.texts - normalising)} a bucket of {bucket.texts} texts is split into")
    if bucket.texts <= MAX_KEPT_SCORES:  # every text is in one part or the other: the kept scores are theirs
        for name in members:
            if sorted(union.normalising_scores[name] + union.bound_scores[name]) != bucket.clean_scores[name]:
                return f"{name}'s clean scores are not those of the union's two parts"
    allowed = allowed_above(union.bound_texts, target_frr, confidence)
    if allowed < 0:
        return f"{union.bound_texts} texts are too few for a {target_frr:.1%} bound at {confidence:.0%} confidence"
    try:
        level, thresholds = union_thresholds({name: np.asarray(v) for name, v in union.normalising_scores.items()},
                                             {name: np.asarray(v) for name, v in union.bound_scores.items()}, allowed)
    except ConfigError as error:
        return str(error)
    if not bucket.threshold < 1 - LOGIT_CLIP:
        return f"psim's threshold {bucket.threshold!r} is where its confidence can no longer be told apart"
    if not math.isclose(level, union.level, rel_tol=1e-9, abs_tol=1e-12):
        return f"the union's level {union.level:.6g} is not the {level:.6g} its scores give"
    for name in members:
        if not math.isclose(bucket.member_threshold(name), thresholds[name], rel_tol=1e-9, abs_tol=1e-12):
            return f"{name}'s threshold {bucket.member_threshold(name):.6g} is not the {thresholds[name]:.6g} the union's scores give"
    return None


def _exact_rank_problem(bucket: LengthBucket, kept: dict[str, np.ndarray], allowed: int) -> str | None:
    """Every score kept, the PSIM alone (``kept`` holds one member): its threshold must be one of
    its scores, with at most k above it, and not higher than the bound needs (more than k above
    the next score down)."""
    descending = {name: np.sort(scores)[::-1] for name, scores in kept.items()}
    ranks = None
    for name in kept:
        at = set(np.flatnonzero(descending[name] == bucket.member_threshold(name)).tolist())
        if not at:
            return f"{name}'s threshold {bucket.member_threshold(name):.6g} is none of its kept clean scores"
        ranks = at if ranks is None else ranks & at
        if np.count_nonzero(descending[name] > bucket.member_threshold(name)) > allowed:
            return f"{name}'s threshold {bucket.member_threshold(name):.6g} has more clean scores above it than the bound allows ({allowed})"
    if not ranks:
        return "the members' thresholds are not at one common rank of their clean scores"
    rank = max(ranks)
    if rank + 1 < bucket.texts and sum(int(np.count_nonzero(descending[name] > descending[name][rank + 1])) for name in kept) <= allowed:
        return f"the thresholds sit at rank {rank}, higher than the bound needs (it allows {allowed} clean texts above them)"
    return None


def kept_scores(scores: np.ndarray) -> list[float]:
    """Ascending clean scores to keep for p-values: all, or evenly spaced quantiles of many."""
    ordered = np.sort(np.asarray(scores, dtype=np.float64))
    if ordered.size > MAX_KEPT_SCORES:
        ordered = np.quantile(ordered, np.linspace(0, 1, MAX_KEPT_SCORES))
    return [float(v) for v in ordered]


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


def filled_lengths(texts: list[str], lengths: np.ndarray, edges: tuple[int, ...], max_length: int, per_bucket: int,
                   rng: np.random.Generator) -> list[str]:
    """Texts joined from randomly drawn ``texts`` (each of ``lengths`` tokens) so that every
    length bucket up to ``max_length`` holds at least ``per_bucket``: long clean texts for a
    calibration whose sample (a PSIM's dev sentences, say) has few or none. Each joined text
    aims at a length drawn uniformly in its bucket and adds whole texts that keep it inside the bucket."""
    lengths = np.asarray(lengths, dtype=np.int64)
    content = lengths - 2  # tokens of a text without its [CLS] and [SEP]
    bounds = [0, *(e for e in sorted(set(edges)) if e <= max_length), max_length + 1]
    joined: list[str] = []
    for low, high in zip(bounds, bounds[1:]):
        missing = per_bucket - int(np.count_nonzero((lengths >= low) & (lengths < high)))
        ceiling = high - 1 if high <= max_length else np.iinfo(np.int64).max  # the last bucket has none (the PSIM cuts)
        for _ in range(max(missing, 0)):
            goal, total, parts = int(rng.integers(max(low, 3), max(high, 4))), 2, []
            while total < goal:
                fitting = np.flatnonzero((content > 0) & (content <= ceiling - total))
                if fitting.size == 0:
                    break
                pick = int(fitting[rng.integers(fitting.size)])
                parts.append(texts[pick])
                total += int(content[pick])
            if parts:
                joined.append(" ".join(parts))
    return joined


def calibrate_guard(psim, psim_fingerprint: str, texts: list[str], target_frr: float, source: str,
                    edges: tuple[int, ...] = DEFAULT_LENGTH_EDGES, min_bucket_texts: int = MIN_BUCKET_TEXTS,
                    scores: np.ndarray | None = None, confidence: float = DEFAULT_CONFIDENCE,
                    detector_scores: dict[str, np.ndarray] | None = None, detector_manifests: dict[str, str] | None = None,
                    fill_rng: np.random.Generator | None = None, fill_seed: int | None = None,
                    split_rng: np.random.Generator | None = None, split_seed: int | None = None) -> GuardCalibration:
    """Per-length thresholds for ``psim`` (whose folder has ``psim_fingerprint``,
    :func:`~peftshield.finetune.checkpoint.model_fingerprint`) under which, with probability
    ``confidence``, at most ``target_frr`` of clean traffic like ``texts`` is flagged in each
    bucket. ``scores`` are the PSIM's scores of ``texts`` when already computed;
    ``detector_scores`` each detector's scores of ``texts`` (calibrated under the same budget),
    ``detector_manifests`` the SHA-256 of each one's detector.json. With ``fill_rng``, every
    length bucket short of texts is filled with texts joined from the sample's own
    (:func:`filled_lengths`, ``FILL_FACTOR`` times the texts the bound needs); ``fill_seed``, the
    seed ``fill_rng`` was made from, is recorded with the sample. With detectors, ``split_rng``
    (made from ``split_seed``, recorded too) draws each bucket's normalising part."""
    check_target_frr(target_frr)
    check_confidence(confidence)
    detector_scores = {name: np.asarray(values, dtype=np.float64) for name, values in (detector_scores or {}).items()}
    if set(detector_scores) != set(detector_manifests or {}) or PSIM_MEMBER in detector_scores:
        raise ConfigError("calibrate: every detector needs its scores and its manifest's hash")
    needed = sample_texts_needed(target_frr, confidence, 1 + len(detector_scores), min_bucket_texts)
    if len(texts) < needed:
        raise ConfigError(f"--texts {source}: {len(texts)} texts; a calibration at {target_frr:.1%} with {confidence:.0%} confidence "
                          f"needs at least {needed} clean texts")
    read = list(texts)
    lengths = token_lengths(psim.tokenizer_, read, psim.max_length)
    scores = np.asarray(psim.score(read) if scores is None else scores, dtype=np.float64)
    joined = filled_lengths(read, lengths, edges, psim.max_length, FILL_FACTOR * needed, fill_rng) if fill_rng is not None else []
    if joined:  # long (or short) clean texts the sample lacks, joined from its own
        if detector_scores:
            raise ConfigError("--fill-lengths: joined texts are for the PSIM alone; calibrate detectors on a sample of real traffic")
        lengths = np.concatenate([lengths, token_lengths(psim.tokenizer_, joined, psim.max_length)])
        scores = np.concatenate([scores, psim.score(joined)])
    texts = read + joined
    return calibrate_scores(lengths, {PSIM_MEMBER: scores, **detector_scores}, psim_fingerprint, psim.max_length, target_frr, confidence,
                            CalibrationSample(source=source, texts=len(read), sha256=sample_hash(read), joined=len(texts) - len(read),
                                              fill_seed=fill_seed if joined else None, split_seed=split_seed if detector_scores else None),
                            dict(detector_manifests or {}), edges, needed, where=f"--texts {source}", split_rng=split_rng)


def calibrate_scores(lengths: np.ndarray, members: dict[str, np.ndarray], psim_fingerprint: str, max_length: int, target_frr: float,
                     confidence: float, sample: CalibrationSample, detector_manifests: dict[str, str],
                     edges: tuple[int, ...] = DEFAULT_LENGTH_EDGES, needed: int | None = None, where: str = "the sample",
                     split_rng: np.random.Generator | None = None) -> GuardCalibration:
    """The calibration of texts already scored: their lengths in tokens and each member's scores
    (``psim`` and each detector), one per text. What :func:`calibrate_guard` and a serving
    guard's reservoir (:class:`~peftshield.guard.reservoir.ScoreReservoir`) share. With
    detectors, ``split_rng`` draws each bucket's normalising part (:func:`split_for_union`)."""
    needed = needed or sample_texts_needed(target_frr, confidence, len(members))
    if len(members) > 1 and split_rng is None:
        raise ConfigError("calibrate: detectors need a seeded generator for the split of each bucket")
    lengths = np.asarray(lengths, dtype=np.int64)
    members = {name: np.asarray(values, dtype=np.float64) for name, values in members.items()}
    for name, values in members.items():
        if values.shape != lengths.shape or not np.all(np.isfinite(values)):
            raise ConfigError(f"calibrate: {name} did not give one finite score per text")
    bounds = [0, *merged_edges(lengths, edges, needed), None]
    buckets = []
    for low, high in zip(bounds, bounds[1:]):
        inside = (lengths >= low) & (lengths < (high if high is not None else np.iinfo(np.int64).max))
        bucket_scores = {name: values[inside] for name, values in members.items()}
        span = f"{low} to {'more' if high is None else high - 1} tokens"
        union = None
        normalising, bound = split_for_union(int(inside.sum()), split_rng) if len(members) > 1 else (None, np.flatnonzero(inside))
        allowed = allowed_above(bound.size, target_frr, confidence)
        if allowed < 0:  # callers merge buckets to the size the bound needs; a bug otherwise, never a threshold at the lowest score
            raise ConfigError(f"{where}: {int(inside.sum())} texts of {span} are too few for a {target_frr:.1%} bound at {confidence:.0%} confidence")
        if len(members) == 1:
            thresholds = {PSIM_MEMBER: float(np.sort(bucket_scores[PSIM_MEMBER])[::-1][allowed])}
        else:
            level, thresholds = union_thresholds({name: values[normalising] for name, values in bucket_scores.items()},
                                                 {name: values[bound] for name, values in bucket_scores.items()}, allowed)
            union = UnionBound(normalising_scores={name: sorted(float(v) for v in values[normalising]) for name, values in bucket_scores.items()},
                               bound_scores={name: [float(v) for v in values[bound]] for name, values in bucket_scores.items()}, level=level)
        switched_off = [name for name, value in thresholds.items() if name != PSIM_MEMBER and not value < np.finfo(np.float64).max]
        if switched_off:  # a detector's scores that were not numbers count as the highest: its threshold would never be passed
            raise ConfigError(f"--detector {switched_off[0]}: too many of the clean texts of {span} got no finite score from it, "
                              "so no threshold can keep them; it cannot be calibrated on this sample")
        if union is not None and not thresholds[PSIM_MEMBER] < 1 - LOGIT_CLIP:
            raise ConfigError(f"{where}: among the clean texts of {span}, a detector's rarest scores lie so far beyond the rest that the "
                              "PSIM's threshold at the same rarity is past what its confidence can tell apart; give more clean texts of that length")
        if not thresholds[PSIM_MEMBER] < 1.0:
            raise ConfigError(f"{where}: too many of the clean texts of {span} score 1.0, so no threshold can keep them; "
                              "this PSIM cannot screen texts of that length")
        flagged = np.any([bucket_scores[name] > value for name, value in thresholds.items()], axis=0)
        buckets.append(LengthBucket(min_tokens=low, max_tokens=high, threshold=thresholds.pop(PSIM_MEMBER), texts=int(inside.sum()),
                                    sample_flag_rate=float(flagged.mean()), detector_thresholds=thresholds,
                                    clean_scores={name: kept_scores(values) for name, values in bucket_scores.items()}, union=union))
    try:
        return GuardCalibration(psim_fingerprint=psim_fingerprint, max_length=max_length, target_frr=target_frr, confidence=confidence,
                                detectors=detector_manifests, buckets=buckets, sample=sample,
                                created=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()))
    except ValidationError as error:  # a bug, were it to happen: the check refused what calibration made
        raise ConfigError(f"calibrate: {where}: the calibration made does not pass its own check ({validation_line(error, show_input=False)})") from None


# Four buckets of three members, each keeping 3 x 2000 scores (p-values, and with detectors the
# union's two parts), take about 2 MB indented. Parsing costs far more memory than the file's
# size (about 50x), so the cap stays well under what the most buckets and members could fill.
MAX_CALIBRATION_BYTES = 16_000_000


def read_guard_calibration(path: str | Path) -> GuardCalibration:
    """The calibration in ``path``, validated (every threshold checked against its bucket's kept
    clean scores), not yet matched to a PSIM; a one-line :class:`ConfigError` otherwise."""
    path = Path(path)
    where = f"--calibration {path}"
    if not path.is_file():
        raise ConfigError(f"{where}: no such file")
    if path.stat().st_size > MAX_CALIBRATION_BYTES:
        raise ConfigError(f"{where}: larger than {MAX_CALIBRATION_BYTES} bytes; not a guard calibration")
    try:
        return GuardCalibration.model_validate_json(path.read_bytes())
    except ValidationError as error:
        raise ConfigError(f"{where}: not a guard calibration ({validation_line(error, show_input=False)}); "
                          "write one with 'peftshield calibrate'") from None


def load_guard_calibration(path: str | Path, psim_fingerprint: str, max_length: int | None) -> GuardCalibration:
    """The calibration in ``path`` (:func:`read_guard_calibration`), checked against the PSIM it is
    for and, unless None, the tokens the guard reads per text."""
    where = f"--calibration {path}"
    calibration = read_guard_calibration(path)
    if calibration.psim_fingerprint != psim_fingerprint:
        raise ConfigError(f"{where}: made for another PSIM (or the PSIM or its backbone changed since); calibrate again with 'peftshield calibrate'")
    if max_length is not None and calibration.max_length != max_length:
        raise ConfigError(f"{where}: made for {calibration.max_length} tokens per text, the guard reads {max_length}; "
                          "calibrate again or pass the same --max-length")
    return calibration


def check_calibrated_detectors(calibration: GuardCalibration, given: dict[str, str], where: Path | str) -> None:
    """A calibration made with detectors is used with exactly those: ``given`` maps each detector
    passed to the SHA-256 of its detector.json. One made without any leaves each detector at
    its own threshold."""
    if not calibration.detectors:
        return
    if set(given) != set(calibration.detectors):
        raise ConfigError(f"--calibration {where}: calibrated with the detectors {', '.join(sorted(calibration.detectors))}; "
                          f"pass exactly those with --detector (given: {', '.join(sorted(given)) or 'none'}), or calibrate again")
    changed = sorted(name for name, digest in given.items() if calibration.detectors[name] != digest)
    if changed:
        raise ConfigError(f"--calibration {where}: the detector {changed[0]} was fitted again since; calibrate again with 'peftshield calibrate'")
