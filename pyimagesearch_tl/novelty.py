"""Saying "unknown" for images that belong to none of the classes (out-of-distribution rejection).

A classifier always picks one of its classes, even for a photo of something else. The detector
here measures, in the backbone's feature space, the cosine similarity of an image to the nearest
class centroid (the mean of that class's L2-normalised training features), and calls the image
unknown below a threshold calibrated on the validation split so that a chosen share of
in-distribution images (default 95%) is kept.

Measured for a cats-vs-dogs model (EfficientNet-Lite0, 500 held-out validation photos kept at
95.0%): the centroid similarity rejected 99.0% of 693 ant, bee and flower photos, while a
threshold on the top-class probability rejected only 82.8% (45.1% of the ants and bees) at the same
kept share. It is also small (classes x features) and can be computed while streaming.
"""

from __future__ import annotations

import dataclasses
from typing import Iterable

import numpy as np


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


@dataclasses.dataclass
class NoveltyDetector:
    """Cosine similarity to the nearest class centroid, with a calibrated threshold.

    Attributes
    ----------
    centroids : ndarray of shape (n_classes, n_features)
        Unit-length mean directions of the classes' training features.
    threshold : float
        Images whose similarity is below it are unknown.
    keep : float
        Share of the calibration (in-distribution) images at or above the threshold.
    calibrated_on : str
        Which images set the threshold.
    """

    centroids: np.ndarray
    threshold: float
    keep: float
    calibrated_on: str

    @staticmethod
    def centroids_of(blocks: Iterable[tuple[np.ndarray, np.ndarray]], n_classes: int) -> np.ndarray:
        """Unit class centroids from ``(features, labels)`` blocks (one pass; works streaming)."""
        sums, dim = None, None
        for features, labels in blocks:
            unit = _unit(features)
            if sums is None:
                dim = unit.shape[1]
                sums = np.zeros((n_classes, dim))
            np.add.at(sums, np.asarray(labels), unit)
        return _unit(sums)

    @classmethod
    def fit(
        cls,
        features: np.ndarray,
        labels: np.ndarray,
        n_classes: int,
        calibration: np.ndarray,
        keep: float = 0.95,
        calibrated_on: str = "validation",
    ) -> "NoveltyDetector":
        """Centroids of the training ``features``, threshold keeping a ``keep`` share of ``calibration``.

        Parameters
        ----------
        features, labels : ndarray
            Training features and their integer labels (``0 .. n_classes - 1``).
        calibration : ndarray
            In-distribution features held out from training (the validation split when there is one).
        keep : float
            Share of ``calibration`` that must come out known, in (0, 1].
        calibrated_on : str
            Recorded with the detector: which images set the threshold.
        """
        centroids = cls.centroids_of([(features, labels)], n_classes)
        return cls.from_similarities(centroids, similarity_to(centroids, calibration), keep, calibrated_on)

    @classmethod
    def from_similarities(
        cls, centroids: np.ndarray, similarity: np.ndarray, keep: float = 0.95, calibrated_on: str = "validation"
    ) -> "NoveltyDetector":
        """As :meth:`fit`, from the calibration images' similarities already computed (streaming)."""
        if not 0 < keep <= 1:
            raise ValueError(f"keep must be in (0, 1], got {keep}")
        similarity = np.asarray(similarity)
        threshold = float(np.quantile(similarity, 1 - keep, method="lower")) if len(similarity) else -1.0
        return cls(centroids, threshold, keep, calibrated_on)

    def similarity(self, features: np.ndarray) -> np.ndarray:
        """Cosine similarity of each row of ``features`` to its nearest class centroid."""
        return similarity_to(self.centroids, features)

    def assess(self, features: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Each row's :meth:`similarity` and whether it is known (at or above the threshold)."""
        similarity = self.similarity(features)
        return similarity, similarity >= self.threshold

    def is_known(self, features: np.ndarray) -> np.ndarray:
        """Whether each row of ``features`` belongs to one of the classes."""
        return self.assess(features)[1]


def similarity_to(centroids: np.ndarray, features: np.ndarray) -> np.ndarray:
    """Cosine similarity of each row of ``features`` to the nearest of the unit ``centroids``."""
    return (_unit(features) @ centroids.T).max(axis=1)
