"""The guard: a deployed classifier (the victim) with a PSIM in front of it.

``Guard.load(model_dir, psim_dir).classify(texts)`` scores every text with both models in
one pass over the batch (one tokenisation when they share a tokenizer, as a victim and its
PSIM on the same backbone do) and returns one :class:`GuardResult` per text. In ``block``
mode a flagged text gets no label; ``monitor`` mode labels every text and still reports the
flag, so an operator can watch the guard before enforcing it. A text is flagged above the PSIM's
calibrated threshold, or, with a :class:`~peftshield.guard.calibration.GuardCalibration`
(``peftshield calibrate`` on the deployment's own clean texts), above its length bucket's threshold.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from peftshield.defenses import PSIM
from peftshield.flags import given_flags, typed_from_flags
from peftshield.finetune.checkpoint import load_classifier, model_fingerprint
from peftshield.models.batching import encode_texts
from peftshield.models.backbone import is_decoder_classifier
from peftshield.models.inference import encoded_proba, encoded_proba_and_states
from peftshield.guard.calibration import PSIM_MEMBER, GuardCalibration, check_calibrated_detectors, load_guard_calibration
from peftshield.guard.detectors import Detector, detectors_for
from peftshield.guard.settings import GuardSettings, check_guard_folders
from peftshield.models.runtime import make_runtime


# The victim's runtime when a detector reads its layer states: one whose states are exact.
STATES_RUNTIME = {"onnx-int8": "onnx"}


@dataclass(frozen=True)
class GuardResult:
    """One screened text. ``label`` is None when the text was flagged in block mode."""

    label: int | None
    probabilities: list[float] | None
    psim_score: float
    flagged: bool
    threshold: float  # the one this text was compared with (its length bucket's, under a calibration)
    reasons: list[str] = field(default_factory=list)  # the members that fired: "psim" and detector names
    detector_scores: dict[str, float] = field(default_factory=dict)  # each detector's score (--detector)
    # Each member's p-value against its clean scores in the text's length bucket (a calibration made by this version).
    p_values: dict[str, float] = field(default_factory=dict)
    tokens: int = 0  # the text's length in tokens as the PSIM reads it (after its cut): its length bucket

    def to_dict(self) -> dict:
        return asdict(self)


class Guard:
    """A victim classifier screened by a PSIM. Build it with :meth:`load`."""

    def __init__(self, victim, victim_tokenizer, psim: PSIM, victim_runtime, settings: GuardSettings,
                 calibration: GuardCalibration | None = None, detectors: list[Detector] | None = None) -> None:
        self.victim = victim
        self.victim_tokenizer = victim_tokenizer
        self.psim = psim
        self.victim_runtime = victim_runtime
        self.calibration = calibration
        self.detectors = list(detectors or [])
        if calibration is not None:  # a guard built in code is held to the same pairing as one built from settings
            check_calibrated_detectors(calibration, {d.name: d.manifest_sha256 for d in self.detectors}, settings.calibration or "given")
        # The single threshold (None under a per-length calibration).
        self.threshold = None if calibration else float(psim.threshold_ if settings.threshold is None else settings.threshold)
        self.mode = settings.mode
        self.max_length = int(settings.max_length or psim.max_length)
        self.batch_size = settings.score_batch
        for detector in self.detectors:  # their own passes run in the guard's length-sorted micro-batches too
            detector.pass_texts(self.batch_size)
        self.shared_tokenizer = _same_tokenizer(victim_tokenizer, psim.tokenizer_)
        victim.eval()
        psim.model_.eval()
        self.psim_runtime = psim.scoring_runtime()
        # The victim's pass also gives its layer states, for the detectors that read them (DAN) at
        # the guard's own cut of each text; any other detector makes its own pass.
        self.state_readers = state_readers(self.detectors, self.max_length)
        self.reads_victim_states = bool(self.state_readers) and callable(getattr(victim_runtime, "logits_and_states", None)) \
            and _exports_states(victim_runtime) and getattr(victim_runtime, "name", "") not in STATES_RUNTIME  # never int8 states

    @classmethod
    def load(cls, model_dir: str | Path, psim_dir: str | Path, runtime: str | None = None, threshold: float | None = None, mode: str | None = None,
             backbone: str | None = None, max_length: int | None = None, batch_size: int | None = None,
             calibration: str | Path | None = None, detectors: list[str | Path] | None = None) -> "Guard":
        """The victim in ``model_dir`` (a ``peftshield finetune`` folder or a transformers
        classifier folder) behind the PSIM in ``psim_dir``; ``runtime`` is one of torch, onnx,
        onnx-int8 (for both models). An option left None takes its default from
        :class:`~peftshield.guard.settings.GuardSettings`; a bad one is a one-line :class:`ConfigError`."""
        settings = typed_from_flags(GuardSettings, given_flags(
            {"score_batch": "--batch-size", "detectors": "--detector"},
            model=model_dir, psim=psim_dir, runtime=runtime, threshold=threshold, mode=mode, backbone=backbone, max_length=max_length,
            score_batch=batch_size, calibration=calibration, detectors=list(detectors) if detectors else None))
        return cls.from_settings(settings)

    @classmethod
    def from_settings(cls, settings: GuardSettings) -> "Guard":
        """The guard that ``settings`` (already validated) describe."""
        check_guard_folders(settings.model, settings.psim)
        psim = PSIM.load(settings.psim, backbone=settings.backbone, runtime=settings.runtime)
        calibration = None
        if settings.calibration is not None:
            calibration = load_guard_calibration(settings.calibration, model_fingerprint(settings.psim), int(settings.max_length or psim.max_length))
        victim = load_classifier(settings.model, backbone=settings.backbone)
        fingerprint = model_fingerprint(settings.model)
        detectors = detectors_for(settings.model, settings.detectors, settings.backbone, victim=victim, runtime=settings.runtime)
        # DAN reads the victim's layer states from the guard's own pass (no pass of its own); a
        # decoder's ONNX graph has no states output, so there DAN makes its pass. The states must be
        # exact: int8 activations move DAN's Mahalanobis distances by orders of magnitude (every
        # clean text flagged, measured on MiniLM), so under onnx-int8 the victim then runs fp32 ONNX
        # (the PSIM stays int8).
        states = bool(state_readers(detectors, int(settings.max_length or psim.max_length))) \
            and (settings.runtime == "torch" or not is_decoder_classifier(victim.model))
        victim_runtime = make_runtime(victim.model, STATES_RUNTIME.get(settings.runtime, settings.runtime) if states else settings.runtime,
                                      settings.model, fingerprint, states=states)
        return cls(victim.model, victim.tokenizer, psim, victim_runtime, settings, calibration, detectors)

    @property
    def expected_flag_rate(self) -> float | None:
        """The share of clean texts the guard should flag: the target of its per-length
        calibration, else the PSIM's at its calibrated threshold (None with a threshold of one's
        own, or a PSIM whose calibration is unknown)."""
        psim_rate = self._psim_flag_rate()
        if self.calibration is not None and self.calibration.detectors:
            return psim_rate
        if psim_rate is None or any(d.target_frr is None for d in self.detectors):
            return None
        return min(1.0, psim_rate + sum(d.target_frr for d in self.detectors))  # each member's rate adds up at most (union bound)

    def _psim_flag_rate(self) -> float | None:  # the calibration's whole budget when it covers the detectors
        if self.calibration is not None:
            return self.calibration.expected_flag_rate
        if self.threshold != float(self.psim.threshold_):
            return None
        return self.psim.expected_flag_rate()

    @property
    def threshold_summary(self) -> str:
        """"threshold 0.9559", or the per-length thresholds of the calibration, and the detectors, for logs."""
        if self.calibration is not None and self.calibration.detectors:
            return self.calibration.describe()
        psim = f"threshold {self.threshold:.4f}" if self.calibration is None else self.calibration.describe()
        return psim + "".join(f"; detector {d.name} above {d.threshold:.4g}" for d in self.detectors)

    @property
    def num_labels(self) -> int:
        return int(self.victim_runtime.num_labels)

    def classify(self, texts: list[str]) -> list[GuardResult]:
        """Label and screen ``texts`` (in order)."""
        if not texts:
            return []
        psim_encoded = encode_texts(self.psim.tokenizer_, texts, self.max_length)
        states_from = 0 if self.reads_victim_states else None  # the victim's pass also gives its layer states (DAN)
        if self.shared_tokenizer:
            (victim_probs, psim_probs), victim_states = encoded_proba_and_states([self.victim_runtime, self.psim_runtime], psim_encoded,
                                                                                 self.batch_size, states_from)
        else:
            (psim_probs,) = encoded_proba([self.psim_runtime], psim_encoded, self.batch_size)
            (victim_probs,), victim_states = encoded_proba_and_states([self.victim_runtime], encode_texts(self.victim_tokenizer, texts, self.max_length),
                                                                      self.batch_size, states_from)
        scores = psim_probs.max(axis=1)
        member_scores = {PSIM_MEMBER: scores, **{detector.name: detector.score(texts, victim_states if detector.name in self.state_readers else None)
                                                   for detector in self.detectors}}
        lengths = psim_encoded.lengths()
        thresholds, buckets = self._thresholds(lengths, len(texts))
        results = []
        for index, probs in enumerate(victim_probs):
            reasons = [name for name, values in member_scores.items() if values[index] > thresholds[name][index]]
            flagged = bool(reasons)
            hidden = flagged and self.mode == "block"
            bucket = buckets[index] if buckets is not None else None
            p_values = {} if bucket is None else {name: round(p, 6) for name, values in member_scores.items()
                                                   if (p := bucket.p_value(name, float(values[index]))) is not None}
            results.append(GuardResult(
                label=None if hidden else int(np.argmax(probs)), probabilities=None if hidden else [round(float(p), 6) for p in probs],
                psim_score=round(float(scores[index]), 6), flagged=flagged, threshold=float(thresholds[PSIM_MEMBER][index]), reasons=reasons,
                detector_scores={name: round(float(values[index]), 6) for name, values in member_scores.items() if name != PSIM_MEMBER},
                p_values=p_values, tokens=int(lengths[index]),
            ))
        return results

    def _thresholds(self, lengths: np.ndarray, count: int) -> tuple[dict[str, np.ndarray], list | None]:
        """Each member's threshold per text, and each text's length bucket (None without a calibration)."""
        own = {detector.name: np.full(count, detector.threshold) for detector in self.detectors}
        if self.calibration is None:
            return {PSIM_MEMBER: np.full(count, self.threshold), **own}, None
        buckets = [self.calibration.buckets[i] for i in self.calibration.bucket_indices(lengths)]
        if self.calibration.detectors:
            own = {name: np.array([bucket.member_threshold(name) for bucket in buckets]) for name in own}
        return {PSIM_MEMBER: np.array([bucket.threshold for bucket in buckets]), **own}, buckets


def state_readers(detectors: list[Detector], max_length: int) -> set[str]:
    """The detectors that can score from the victim's layer states of the guard's own pass: those
    that read states (DAN) at the guard's own cut of each text."""
    return {d.name for d in detectors if d.reads_victim_states and getattr(d.defense, "max_length", None) == max_length}


def _exports_states(runtime) -> bool:
    """A torch runtime always gives states; an ONNX one when its graph was exported with them."""
    session = getattr(runtime, "session", None)
    return session is None or "states" in {output.name for output in session.get_outputs()}


def _same_tokenizer(a, b) -> bool:
    """Whether two tokenizers turn every text into the same ids (same class, vocabulary and special tokens)."""
    if a is b:
        return True
    if type(a) is not type(b) or len(a) != len(b):
        return False
    return a.get_vocab() == b.get_vocab() and a.all_special_ids == b.all_special_ids and getattr(a, "do_lower_case", None) == getattr(b, "do_lower_case", None)
