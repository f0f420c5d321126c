"""CUBE: clustering-based data cleaning (Cui et al., 2022), a data cleaner.

The victim's representations of a pool of texts (the input of its classification head)
are standardised, reduced (PCA here, where the paper used UMAP, which is not a
dependency of peftshield) and clustered with HDBSCAN. Within each predicted class the
largest cluster is taken as the clean data, and the texts of every other cluster of that
class are flagged: poisoned texts form their own dense cluster because the backdoor maps
them to one place. HDBSCAN's noise points are flagged too with ``flag_noise=True`` (the
paper's rule); by default they are kept, because without UMAP many clean texts end up as
noise. A class with no cluster at all is kept whole.

CUBE is transductive: it judges the texts of one ``score`` call as one pool. A text in
its class's main cluster scores ``1 - membership`` in [0, 1]; any other text scores
``2 - membership / 2`` in [1.5, 2]; the threshold is 1.
"""

from __future__ import annotations

from typing import Annotated, Optional


import numpy as np
from pydantic import Field, PositiveInt

from peftshield.defenses.base import DEFENSES, DefenseContext, VictimDefense
from peftshield.defenses.thresholds import ThresholdPolicy
from peftshield.errors import ConfigError
from peftshield.models.inference import classifier_inputs

MAIN_CLUSTER_THRESHOLD = 1.0


@DEFENSES.register
class CUBE(VictimDefense):
    """Density clustering of the victim's representations; keeps the main cluster of each class."""

    name = "cube"
    transductive = True

    def __init__(self, dimensions: PositiveInt = 10, min_cluster_fraction: Annotated[float, Field(gt=0, lt=1)] = 0.02,
                 flag_noise: bool = False, batch_size: PositiveInt = 128, max_length: PositiveInt = 128,
                 threshold: Optional[ThresholdPolicy] = None) -> None:
        self.dimensions = dimensions
        self.min_cluster_fraction = min_cluster_fraction
        self.flag_noise = flag_noise
        self.batch_size = batch_size
        self.max_length = max_length
        self.threshold = threshold  # kept for the common interface; CUBE flags by cluster

    def fit(self, context: DefenseContext, rng: np.random.Generator) -> "CUBE":
        if self.dimensions < 1 or not 0 < self.min_cluster_fraction < 1:
            raise ConfigError("cube: dimensions must be >= 1 and min_cluster_fraction in (0, 1)")
        self.fit_victim(context)
        self.threshold_ = MAIN_CLUSTER_THRESHOLD
        return self

    def cluster(self, texts: list[str]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Predicted class, HDBSCAN cluster (-1 = noise) and membership strength per text."""
        from sklearn.cluster import HDBSCAN
        from sklearn.decomposition import PCA
        from sklearn.preprocessing import StandardScaler

        probs, representations = classifier_inputs(self.model_, self.tokenizer_, list(texts), self.num_labels_, self.batch_size, self.max_length)
        predicted = probs.argmax(axis=1)
        if len(texts) < 3:
            return predicted, np.zeros(len(texts), dtype=np.int64), np.ones(len(texts))
        scaled = StandardScaler().fit_transform(representations)
        reduced = PCA(n_components=min(self.dimensions, len(texts) - 1, scaled.shape[1]), random_state=0).fit_transform(scaled)
        clusterer = HDBSCAN(min_cluster_size=max(2, int(round(self.min_cluster_fraction * len(texts)))), copy=True).fit(reduced)
        return predicted, clusterer.labels_, clusterer.probabilities_

    def score(self, texts: list[str]) -> np.ndarray:
        predicted, clusters, membership = self.cluster(texts)
        main = np.zeros(len(texts), dtype=bool)
        for label in np.unique(predicted):
            members = predicted == label
            found = clusters[members & (clusters >= 0)]
            if not len(found):  # no dense structure in this class: nothing singles a group out
                main |= members
                continue
            main |= members & (clusters == np.bincount(found).argmax())
            if not self.flag_noise:
                main |= members & (clusters < 0)
        return np.where(main, 1.0 - membership, 2.0 - 0.5 * membership)
