"""DAN (distance-based anomaly score; Chen et al., "Expose Backdoors on the Way", 2022): flag a text
whose hidden representations sit far from every clean class, at any layer of the victim.

A backdoor works by sending triggered texts somewhere clean texts never go: a task-agnostic
backdoor (NeuBA, POR) pins them to one predefined vector, a syntactic one to wherever the
attacker's template leads. Confidence need not show it (a task-agnostic backdoor's target is of
ordinary size; a syntactic backdoor is barely confident), but distance does. For every layer of
the victim, the summary token's state ([CLS], or a decoder's last token) of clean held-out texts
gives a mean per class and one shared covariance (Ledoit-Wolf shrinkage, so a few hundred texts
suffice); a text's layer score is its Mahalanobis distance to the nearest class mean. Layer
scores are put on one scale (z-scores on a second half of the clean texts) and the text's score
is the largest. The threshold sits at 1% FRR on that second half. Cost: one forward pass.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import numpy as np
from pydantic import PositiveInt

from peftshield.defenses.base import (DEFENSES, Defense, DefenseContext, clean_reference_halves, layer_scale, load_array_state, save_array_state,
                                     standardise_layers, victim_of)
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.models.inference import layer_token_states

STATE_FILE = "dan.json"
ARRAYS_FILE = "dan.safetensors"


class LayerGaussians:
    """Class means and one shared precision matrix per layer; distances to the nearest class."""

    def __init__(self, means: np.ndarray, precisions: np.ndarray) -> None:
        self.means = means  # (layers, classes, hidden)
        # (layers, hidden, hidden), symmetric as a precision is (to rounding, after Ledoit-Wolf):
        # distances() expands (x - m) P (x - m) into xPx - 2xPm + mPm, which needs it exactly.
        self.precisions = (precisions + np.swapaxes(precisions, -1, -2)) / 2

    @classmethod
    def fit(cls, states: np.ndarray, labels: np.ndarray) -> "LayerGaussians":
        from sklearn.covariance import LedoitWolf

        classes = [c for c in np.unique(labels) if (labels == c).sum() >= 2]
        if not classes:
            raise ConfigError("dan: the clean reference texts need at least two texts of one class")
        means, precisions = [], []
        for layer in states.astype(np.float64):
            layer_means = np.stack([layer[labels == c].mean(axis=0) for c in classes])
            rows = np.isin(labels, classes)
            centred = layer[rows] - layer_means[np.searchsorted(classes, labels[rows])]
            means.append(layer_means)
            precisions.append(LedoitWolf(assume_centered=True).fit(centred).precision_)
        return cls(np.stack(means), np.stack(precisions))

    def distances(self, states: np.ndarray) -> np.ndarray:
        """(layers, texts): squared Mahalanobis distance to the nearest class mean."""
        out = np.zeros(states.shape[:2])
        for index, (layer, means, precision) in enumerate(zip(states.astype(np.float64), self.means, self.precisions)):
            # (x - m) P (x - m) = xPx - 2 xPm + mPm, so each text's state is multiplied by P once,
            # not once per class, and as a matrix product (a three-operand einsum over the
            # differences took 184 ms a batch of 64 in a guard, a quarter of its time). Centred on
            # the class means' mean first, so the three terms stay of the distances' size.
            centre = means.mean(axis=0)
            texts, classes = layer - centre, means - centre
            projected = texts @ precision
            squared = ((projected * texts).sum(axis=1)[:, None] - 2 * projected @ classes.T
                       + ((classes @ precision) * classes).sum(axis=1)[None, :])
            out[index] = np.maximum(squared, 0).min(axis=1)
        return out


@DEFENSES.register
class DAN(Defense):
    """Distance of the victim's per-layer representations to the clean classes (Mahalanobis, max over layers)."""

    name = "dan"
    text_passes = True
    needs_victim = True

    def __init__(self, max_reference_texts: PositiveInt = 1000, batch_size: PositiveInt = 64, max_length: PositiveInt = 128,
                 threshold: Optional[ThresholdPolicy] = None) -> None:
        self.max_reference_texts = max_reference_texts
        self.batch_size = batch_size
        self.max_length = max_length
        self.threshold = threshold

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "DAN":
        self.model_, self.tokenizer_ = victim_of(self.name, context)
        reference, statistics, calibration = clean_reference_halves(self.name, context, self.max_reference_texts, rng)
        states = self._states(reference.texts)
        labels = np.asarray(reference.labels)
        self.gaussians_ = LayerGaussians.fit(states[:, statistics], labels[statistics])
        calibration_distances = self.gaussians_.distances(states[:, calibration])
        self.layer_mean_, self.layer_std_ = layer_scale(calibration_distances)
        calibration_scores = standardise_layers(calibration_distances, self.layer_mean_, self.layer_std_).max(axis=0)
        self.calibrate(context.num_labels, calibration_scores, default=3.0)
        return self

    def _states(self, texts: list[str]) -> np.ndarray:
        return layer_token_states(self.model_, self.tokenizer_, texts, self.batch_size, self.max_length)

    def layer_scores(self, texts: list[str]) -> np.ndarray:
        """(layers, texts): each layer's standardised distance; a text's score is their max."""
        return self._layer_scores_of_states(self._states(list(texts)))

    def _layer_scores_of_states(self, states: np.ndarray) -> np.ndarray:
        return standardise_layers(self.gaussians_.distances(states), self.layer_mean_, self.layer_std_)

    def score(self, texts: list[str]) -> np.ndarray:
        texts = list(texts)
        if not texts:
            return np.zeros(0)
        return self.score_states(self._states(texts))

    def score_states(self, states: np.ndarray) -> np.ndarray:
        """Scores from the victim's summary states, (layers, texts, hidden), read from a pass
        already made (a guard's :class:`~peftshield.models.runtime.StatesRuntime`): DAN then costs
        no forward pass of its own."""
        if states.ndim != 3 or states.shape[0] != self.gaussians_.means.shape[0] or states.shape[2] != self.gaussians_.means.shape[2]:
            raise ValueError(f"dan: states of shape {states.shape} are not the victim's (layers {self.gaussians_.means.shape[0]}, "
                             f"hidden {self.gaussians_.means.shape[2]})")
        if not states.shape[1]:
            return np.zeros(0)
        return self._layer_scores_of_states(states).max(axis=0)

    def save(self, directory: str | Path) -> Path:
        return save_array_state(self, directory, STATE_FILE, ARRAYS_FILE, {
            "means": self.gaussians_.means, "precisions": self.gaussians_.precisions, "layer_mean": self.layer_mean_, "layer_std": self.layer_std_})

    @classmethod
    def load(cls, directory: str | Path, context: DefenseContext | None = None) -> "DAN":
        defense, arrays = load_array_state(cls, directory, STATE_FILE, ARRAYS_FILE)
        defense.gaussians_ = LayerGaussians(arrays["means"], arrays["precisions"])
        defense.layer_mean_, defense.layer_std_ = arrays["layer_mean"], arrays["layer_std"]
        defense.model_, defense.tokenizer_ = victim_of(cls.name, context)
        return defense
