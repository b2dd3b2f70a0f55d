"""Saying "unknown" for images that belong to none of the classes (out-of-distribution rejection).

A classifier always picks one of its classes, even for a photo of something else. A detector scores
how familiar an image looks (in the backbone's feature space, or from the classifier's own logits)
and calls it unknown below a threshold calibrated on in-distribution images the classifier did not
learn from (the validation split) so that a chosen share of them (default 95%) is kept.

:data:`DETECTORS` names them: the nearest class centroid (cosine), the k-th nearest training image,
the Mahalanobis distance to the nearest class, the classifier's energy, and rank combinations of
two. Distance scores reject photos of other worlds almost perfectly but miss look-alikes (other
flowers for a flower model); the classifier's energy sees some look-alikes but is confidently
wrong about far photos. The default, ``mahalanobis+energy``, calls an image unknown when either
finds it unusual, with one threshold for both; ``benchmarks/bench_unknown.py`` measures them all.
"""

from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable, Iterable

import numpy as np

from .registry import Registry


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float64)
    norms = np.linalg.norm(features, axis=1, keepdims=True)
    return features / np.maximum(norms, 1e-12)


def calibration_phrase(calibrated_on: str) -> str:
    """``"validation"`` -> ``"validation photos"``; a phrase (with a space) is kept as it is."""
    return calibrated_on if " " in calibrated_on else f"{calibrated_on} photos"


def _edges(ordered: np.ndarray) -> np.ndarray:
    """The boundary just below each of the sorted calibration scores ``ordered``: halfway to the score
    below it (the lowest: half its gap to the next one below itself).

    Thresholds and ranks sit on these edges, not on the scores themselves, so that a calibration image
    scored again with features a rounding error apart (another runtime, another CPU) stays on the
    same side of them; the images on either side are the same as with the scores."""
    ordered = np.asarray(ordered, dtype=np.float64)
    if len(ordered) < 2:
        return ordered.copy()
    below = np.r_[ordered[0] - (ordered[1] - ordered[0]), ordered[:-1]]
    with np.errstate(invalid="ignore", over="ignore"):
        edges = below + (ordered - below) / 2
    return np.where(np.isfinite(edges), edges, ordered)


def _threshold(familiarity: np.ndarray, keep: float) -> float:
    """The edge (:func:`_edges`) below the calibration score that keeps a ``keep`` share at or above it."""
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    if not len(familiarity):
        return -np.inf
    ordered = np.sort(np.asarray(familiarity, dtype=np.float64))
    cut = np.quantile(ordered, 1 - keep, method="lower")
    return float(_edges(ordered)[np.searchsorted(ordered, cut, side="left")])


@dataclasses.dataclass
class Detector:
    """A familiarity score with a threshold that keeps a ``keep`` share of in-distribution calibration images.

    Fitting is two steps, so that it also works over blocks of a feature file (``train --streaming``):
    :meth:`learn` from training features (and the classifier's ``logits`` for them,
    :meth:`Bundle.logits`), then :meth:`set_threshold` from the :meth:`raw_scores` of the calibration
    images. Higher :meth:`familiarity`: more like the training classes. Subclasses set :attr:`kind`
    (the registry name) and :attr:`score_name` (shown when an image is called unknown).
    """

    threshold: float = 0.0
    keep: float = 0.95
    calibrated_on: str = ""

    kind = ""
    score_name = ""
    #: Whether :meth:`familiarity` scores the classifier's logits (it then needs them, not features alone).
    uses_logits = False

    @property
    def calibration(self) -> str:
        """The photos the threshold was set on, as a phrase (``calibrated_on`` is a split name or a phrase)."""
        return calibration_phrase(self.calibrated_on)

    @property
    def calibration_rule(self) -> str:
        """What the threshold keeps: ``"95% of the validation photos"``."""
        return f"{self.keep:.0%} of the {self.calibration}"

    def learn(self, features: np.ndarray, labels: np.ndarray, n_classes: int, logits: np.ndarray) -> None:
        """Learn what the score needs from the training ``features`` (integer ``labels``)."""

    @property
    def components(self) -> tuple["Detector", ...]:
        """The single scores this detector calibrates: the detector itself (a combination: its parts)."""
        return (self,)

    def stack(self, familiarities: list[np.ndarray]) -> np.ndarray:
        """:meth:`raw_scores` from the familiarities of :attr:`components` (for a single score: that score)."""
        [familiarity] = familiarities
        return familiarity

    def raw_scores(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        """What :meth:`set_threshold` calibrates from: the :meth:`stack` of the components' familiarities."""
        return self.stack([part.familiarity(features, logits) for part in self.components])

    def held_out_familiarity(self, features: np.ndarray, labels: np.ndarray, n_classes: int) -> np.ndarray | None:
        """Each training row's familiarity under this detector learnt from all the other rows, in closed form,
        or None where there is none (cross-fitting then scores each fold with a detector learnt without it).
        A pure function of the rows: it needs no :meth:`learn` first."""
        return None

    def set_threshold(self, calibration_scores: np.ndarray) -> None:
        """Set the threshold that keeps a ``keep`` share of the calibration images' :meth:`raw_scores`."""
        self.threshold = _threshold(calibration_scores, self.keep)

    def familiarity(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        raise NotImplementedError

    def assess(self, features: np.ndarray, logits: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """Each row's :meth:`familiarity` and whether it is known (at or above the threshold)."""
        familiarity = self.familiarity(features, logits)
        return familiarity, familiarity >= self.threshold

    def is_known(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        """Whether each row of ``features`` belongs to one of the classes."""
        return self.assess(features, logits)[1]

    # scikit-learn's outlier-detection vocabulary (IsolationForest, LocalOutlierFactor): the same detector

    def fit(self, features, labels, *, n_classes=None, logits=None, calibration=None, calibration_logits=None):
        """:meth:`learn` from training ``features`` and ``labels``, then :meth:`set_threshold` on ``calibration``
        (in-distribution rows held out from training; default: ``features`` themselves). Returns the detector."""
        labels = np.asarray(labels)
        n_classes = int(labels.max()) + 1 if n_classes is None else n_classes
        self.learn(np.asarray(features), labels, n_classes, logits)
        if calibration is None:
            calibration, calibration_logits = features, logits
        self.set_threshold(self.raw_scores(np.asarray(calibration), calibration_logits))
        return self

    @property
    def offset_(self) -> float:
        """The threshold, as scikit-learn names it: :meth:`decision_function` is below 0 for an unknown image."""
        return self.threshold

    def score_samples(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        """The :meth:`familiarity` of each row (higher: more like the training classes)."""
        return self.familiarity(features, logits)

    def decision_function(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        """:meth:`score_samples` minus :attr:`offset_`: 0 or more for a known image, below 0 for an unknown one."""
        return self.score_samples(features, logits) - self.offset_

    def predict(self, features: np.ndarray, logits: np.ndarray | None = None) -> np.ndarray:
        """+1 for a known image, -1 for an unknown one (scikit-learn's inlier / outlier)."""
        return np.where(self.is_known(features, logits), 1, -1)


@dataclasses.dataclass
class CentroidDetector(Detector):
    """Cosine similarity to the nearest class centroid (the unit mean of the class's unit training features).

    The audit uses its centroids too.
    """

    centroids: np.ndarray | None = None
    kind = "centroid"
    score_name = "similarity to the nearest class"

    @staticmethod
    def centroids_of(blocks: Iterable[tuple[np.ndarray, np.ndarray]], n_classes: int) -> np.ndarray:
        """Unit class centroids from ``(features, labels)`` blocks (one pass; works streaming)."""
        sums = None
        for features, labels in blocks:
            unit = _unit(features)
            if sums is None:
                sums = np.zeros((n_classes, unit.shape[1]))
            np.add.at(sums, np.asarray(labels), unit)
        return _unit(sums)

    def learn(self, features, labels, n_classes, logits):
        self.centroids = self.centroids_of([(features, labels)], n_classes)

    def similarity(self, features: np.ndarray) -> np.ndarray:
        """Cosine similarity of each row of ``features`` to its nearest class centroid."""
        return (_unit(features) @ self.centroids.T).max(axis=1)

    def familiarity(self, features, logits=None):
        return self.similarity(features)


@dataclasses.dataclass
class KNNDetector(Detector):
    """Cosine similarity to the k-th nearest training image (Sun et al., ICML 2022), k = 10."""

    k: int = 10
    reference: np.ndarray | None = None  # unit training features (at most 10,000, seeded sample)
    kind = "knn"
    score_name = "similarity to the 10th nearest training photo"

    def learn(self, features, labels, n_classes, logits):
        rows = np.random.default_rng(0).permutation(len(features))[:10_000]
        self.reference = _unit(features[np.sort(rows)]).astype(np.float32)

    def familiarity(self, features, logits=None):
        unit, k = _unit(features).astype(np.float32), min(self.k, len(self.reference))
        scores = np.empty(len(unit), np.float32)
        for start in range(0, len(unit), 1024):
            similarity = unit[start : start + 1024] @ self.reference.T
            scores[start : start + 1024] = -np.partition(-similarity, k - 1, axis=1)[:, k - 1]
        return scores


@dataclasses.dataclass
class MahalanobisDetector(Detector):
    """Minus the smallest Mahalanobis distance to a class mean, shared covariance (Lee et al., NeurIPS 2018),
    on unit-length features with Ledoit-Wolf shrinkage.

    Stored as a whitening matrix ``W`` (``precision = W @ W.T``, float32) and the whitened class means,
    so a distance is a squared Euclidean distance after one matrix product. Features wider than
    :attr:`max_features` (``flatten`` pooling: 25,088 for VGG16) are first projected on their
    :attr:`projected_width` leading principal directions (folded into ``W``), so ``W`` stays small.
    """

    whiten: np.ndarray | None = None
    means: np.ndarray | None = None
    kind = "mahalanobis"
    score_name = "closeness to the nearest class (Mahalanobis)"
    max_features = 4096
    projected_width = 256

    @staticmethod
    def _residuals(features, labels, n_classes) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Unit features, their class means, and each row's residual from its class mean."""
        unit = _unit(features)
        means = np.stack([unit[labels == c].mean(axis=0) for c in range(n_classes)])
        return unit, means, unit - means[labels]

    def learn(self, features, labels, n_classes, logits):
        from scipy.linalg import solve_triangular
        from sklearn.covariance import ledoit_wolf
        from sklearn.decomposition import PCA

        unit, means, residuals = self._residuals(features, labels, n_classes)
        projection = None
        if unit.shape[1] > self.max_features:
            pca = PCA(min(self.projected_width, len(unit) - 1), svd_solver="randomized", random_state=0).fit(unit)
            projection = pca.components_.T  # distances between projected points ignore the PCA's centring
            residuals = residuals @ projection
        # covariance = L @ L.T, so W = inv(L).T whitens (W @ W.T is the precision): two triangular steps, no
        # eigendecomposition. All-equal residuals (one photo per class) get a tiny ridge instead of failing.
        covariance = ledoit_wolf(residuals)[0]
        ridge = max(float(np.trace(covariance)) / len(covariance), 1e-12) * 1e-6
        try:
            lower = np.linalg.cholesky(covariance)
        except np.linalg.LinAlgError:
            lower = np.linalg.cholesky(covariance + ridge * np.eye(len(covariance)))
        whiten = solve_triangular(lower, np.eye(len(covariance)), lower=True).T
        self.whiten = (whiten if projection is None else projection @ whiten).astype(np.float32)
        self.means = (means @ self.whiten).astype(np.float32)

    def __setstate__(self, state):
        if "precision" in state:  # pickled by the first version (2026-11-24): unit means and the precision
            whiten = np.linalg.cholesky(state.pop("precision")).astype(np.float32)
            state.update(whiten=whiten, means=(state["means"] @ whiten).astype(np.float32))
        self.__dict__.update(state)

    def familiarity(self, features, logits=None):
        whitened = _unit(features).astype(np.float32) @ self.whiten
        return -np.min([((whitened - mean) ** 2).sum(axis=1) for mean in self.means], axis=0)

    def held_out_familiarity(self, features, labels, n_classes):
        """Leave-one-out, in closed form. Calibrating on folds learnt from 80% of the rows kept 0.925 of new
        photos instead of 0.95 (cats and dogs, 400 training rows of 1,280 features, 10 draws): with rows few
        against the features' width, distances grow with the rows a covariance is learnt from. Left out, a
        row moves its class mean by ``r / (n_c - 1)`` and leaves the residuals' scatter ``n S - n_c / (n_c - 1)
        r r^T`` exactly (``r``: its residual), so the left-out covariance is a matrix diagonal in the
        eigenvectors of ``S`` minus a rank-one term (Sherman-Morrison). Ledoit-Wolf's shrinkage weight stays
        the one of all rows: exact with it held (9e-8 of a refit), within 0.2% of refits that learn it anew
        on 360-500 rows (0.7% at worst), up to 12% for classes of 2 rows, where the weight moves most. Every
        class's distance is a matrix product (no rows x classes x width array). None for features wider than
        :attr:`max_features` (their projection is learnt from every row), or a class of one row."""
        from sklearn.covariance import ledoit_wolf

        labels = np.asarray(labels)
        counts = np.bincount(labels, minlength=n_classes)
        _, means, residuals = self._residuals(features, labels, n_classes)
        (n, width), classes = residuals.shape, len(means)
        if width > self.max_features or counts.min() < 2:
            return None
        shrinkage = ledoit_wolf(residuals)[1]
        variances, basis = np.linalg.eigh(residuals.T @ residuals / n)
        variances, means = np.clip(variances, 0, None), means @ basis
        ridge = max(float(variances.sum()) / width, 1e-12) * 1e-6  # as learn's, for all-equal residuals
        moved = counts / (counts - 1.0)  # a left-out row's residual from its class's left-out mean, per unit of r
        familiarity = np.empty(n)
        step = max(1, 2**21 // max(classes, width))  # rows per block: blocks of rows x max(classes, width)
        for own in range(classes):  # a class's rows at a time: its differences to every mean are exact
            apart = means[own] - means  # a row minus class c's mean is z + apart[c] (z: its residual)
            apart_squared = (apart**2).T
            scale, members = moved[own], np.flatnonzero(labels == own)
            for start in range(0, len(members), step):
                rows = members[start : start + step]
                z = residuals[rows] @ basis  # residuals in the eigenvectors of S
                trace = (n * variances.sum() - scale * (z**2).sum(axis=1)) / ((n - 1) * width)
                diagonal = (1 - shrinkage) * n / (n - 1) * variances + shrinkage * trace[:, None]
                inverse = 1 / np.maximum(diagonal, ridge)
                downdate = (1 - shrinkage) * scale / (n - 1)  # covariance = diag(diagonal) - downdate * z z^T
                scaled, norm = z * inverse, (z**2 * inverse).sum(axis=1)
                denominator = 1 - downdate * norm
                # every class's (z + apart[c]) terms as matrix products: no rows x classes x width array
                across = scaled @ apart.T
                distances = norm[:, None] + 2 * across + inverse @ apart_squared
                along = norm[:, None] + across
                distances += downdate * along**2 / denominator[:, None]
                distances[:, own] = scale**2 * norm * (1 + downdate * norm / denominator)  # its own mean, without it
                familiarity[rows] = -np.maximum(distances, 0).min(axis=1)
        return familiarity


@dataclasses.dataclass
class EnergyDetector(Detector):
    """The energy score of the classifier's logits, ``logsumexp`` (Liu et al., NeurIPS 2020): how much
    evidence the classifier has for any class."""

    kind = "energy"
    score_name = "the classifier's evidence (energy)"
    uses_logits = True

    def familiarity(self, features, logits=None):
        from scipy.special import logsumexp

        if logits is None:
            raise ValueError("the energy detector needs the classifier's logits")
        return logsumexp(np.asarray(logits, dtype=np.float64), axis=1)


@dataclasses.dataclass
class OutlierEstimatorDetector(Detector):
    """A scikit-learn outlier estimator as a detector: fitted on the training features, its ``score_samples``
    (higher: more normal, scikit-learn's convention) is the familiarity, and the threshold keeps a ``keep``
    share of the calibration images, as every detector's does (the estimator's own ``offset_``, set from a
    contamination guess on the training data, is not used). A subclass names the estimator in
    :meth:`make`; registered in :data:`DETECTORS`, it trains, saves, predicts and is measured
    (``benchmarks/bench_unknown.py``) as the project's own detectors are.
    """

    estimator: Any = None

    @staticmethod
    def make() -> Any:
        """A new, unfitted scikit-learn outlier estimator."""
        raise NotImplementedError

    def learn(self, features, labels, n_classes, logits):
        self.estimator = self.make().fit(np.asarray(features, dtype=np.float32))

    def familiarity(self, features, logits=None):
        return np.asarray(self.estimator.score_samples(np.asarray(features, dtype=np.float32)), dtype=np.float64)


@dataclasses.dataclass
class LocalOutlierFactorDetector(OutlierEstimatorDetector):
    """scikit-learn's ``LocalOutlierFactor(novelty=True)`` (20 neighbours, brute force): a photo's local
    density against its neighbours' among the training photos."""

    kind = "lof"
    score_name = "local outlier factor normality"

    @staticmethod
    def make():
        from sklearn.neighbors import LocalOutlierFactor

        return LocalOutlierFactor(n_neighbors=20, novelty=True, algorithm="brute")


@dataclasses.dataclass
class RankCombination(Detector):
    """Several detectors calibrated as one: each part's score becomes its rank among the calibration
    images (the share of them scoring at or below it), the familiarity is the lowest of those ranks,
    and one threshold on it keeps ``keep`` of the calibration images. An image is unknown when any part
    finds it unusual, and the kept share is set for the combination, not part by part."""

    parts: tuple[Detector, ...] = ()
    references: tuple[np.ndarray, ...] = ()  # each part's calibration scores, sorted
    kind: str = ""
    score_name: str = ""

    @classmethod
    def of(cls, kinds: tuple[str, ...], keep: float, calibrated_on: str) -> "RankCombination":
        parts = tuple(make_detector(kind, keep, calibrated_on) for kind in kinds)
        name = f"lowest rank among the {calibration_phrase(calibrated_on)} ({' and '.join(kinds)})"
        return cls(keep=keep, calibrated_on=calibrated_on, parts=parts, kind="+".join(kinds), score_name=name)

    @property
    def uses_logits(self) -> bool:
        return any(part.uses_logits for part in self.parts)

    @property
    def components(self) -> tuple[Detector, ...]:
        return self.parts

    def stack(self, familiarities):
        return np.column_stack(familiarities)

    def learn(self, features, labels, n_classes, logits):
        for part in self.parts:
            part.learn(features, labels, n_classes, logits)

    def set_threshold(self, calibration_scores):
        self.references = tuple(np.sort(column) for column in np.asarray(calibration_scores).T)
        self.threshold = _threshold(self._lowest_rank(calibration_scores), self.keep)

    def _lowest_rank(self, scores: np.ndarray) -> np.ndarray:
        """The share of calibration images at or below each score, counted against their edges
        (:func:`_edges`): a calibration image keeps its own rank when its score moves by a rounding error."""
        ranks = [
            np.searchsorted(_edges(ref), column, side="right") / len(ref)
            for ref, column in zip(self.references, scores.T)
        ]
        return np.min(ranks, axis=0)

    def familiarity(self, features, logits=None):
        return self._lowest_rank(self.raw_scores(features, logits))


class NoveltyDetector(CentroidDetector):
    """What bundles made before 2026-12 hold for ``centroid`` (the class had this name; those made before
    the registry pickled exactly ``centroids``, ``threshold``, ``keep`` and ``calibrated_on``)."""


class CentroidEnergyDetector(RankCombination):
    """What bundles made with ``--unknown centroid+energy`` before :class:`RankCombination` pickled."""

    def __setstate__(self, state):
        if "centroid" not in state:  # saved again after loading: already in the combination's fields
            self.__dict__.update(state)
            return
        centroid = state["centroid"]
        self.__dict__.update(
            threshold=state["threshold"],
            keep=state["keep"],
            calibrated_on=state["calibrated_on"],
            parts=(centroid, EnergyDetector(keep=state["keep"], calibrated_on=state["calibrated_on"])),
            references=(state["calibration_centroid"], state["calibration_energy"]),
            kind="centroid+energy",
            score_name=f"lowest rank among the {state['calibrated_on']} photos (centroid and energy)",
        )


def _combination(*kinds: str) -> Callable[[float, str], RankCombination]:
    return functools.partial(RankCombination.of, kinds)


#: The detectors ``train --unknown NAME`` can fit, by name: ``make(keep, calibrated_on)``, an unfitted detector
#: (see :mod:`pyimagesearch_tl.registry`).
DETECTORS: Registry[Callable[[float, str], Detector]] = Registry("detector", "detectors")
DETECTORS.register("centroid", CentroidDetector, description="cosine similarity to the nearest class centroid")
DETECTORS.register("knn", KNNDetector, description="cosine similarity to the k-th nearest training image")
DETECTORS.register(
    "mahalanobis", MahalanobisDetector, description="Mahalanobis distance to the nearest class (shared covariance)"
)
DETECTORS.register("energy", EnergyDetector, description="energy (log-sum-exp) of the classifier's logits")
DETECTORS.register(
    "lof", LocalOutlierFactorDetector, description="scikit-learn's LocalOutlierFactor (novelty) on the features"
)
DETECTORS.register(
    "centroid+energy",
    _combination("centroid", "energy"),
    description="the lower calibrated rank of centroid and energy",
)
DETECTORS.register(
    "mahalanobis+energy",
    _combination("mahalanobis", "energy"),
    description="the lower calibrated rank of mahalanobis and energy; the default",
)


def list_detectors() -> list[str]:
    return DETECTORS.names()


def make_detector(kind: str, keep: float = 0.95, calibrated_on: str = "validation") -> Detector:
    """An unfitted detector ``kind`` (a name of :data:`DETECTORS`)."""
    make = DETECTORS.get(kind)
    if not 0 < keep <= 1:
        raise ValueError(f"keep must be in (0, 1], got {keep}")
    return make(keep=keep, calibrated_on=calibrated_on)


def fit_detector(
    kind: str,
    features: np.ndarray,
    labels: np.ndarray,
    n_classes: int,
    logits: np.ndarray,
    calibration: np.ndarray,
    calibration_logits: np.ndarray,
    keep: float = 0.95,
    calibrated_on: str = "validation",
) -> Detector:
    """Fit detector ``kind`` on training features and calibrate its threshold on in-distribution images.

    Parameters
    ----------
    kind : str
        A name of :data:`DETECTORS`.
    features, labels : ndarray
        Training features and their integer labels (``0 .. n_classes - 1``).
    logits : ndarray
        The classifier's logits for ``features`` (:meth:`Bundle.logits`).
    calibration, calibration_logits : ndarray
        In-distribution features held out from training (the validation split when there is one), and
        the classifier's logits for them.
    keep : float
        Share of ``calibration`` that must come out known, in (0, 1].
    calibrated_on : str
        Recorded with the detector: which images set the threshold.
    """
    return make_detector(kind, keep, calibrated_on).fit(
        features,
        labels,
        n_classes=n_classes,
        logits=logits,
        calibration=calibration,
        calibration_logits=calibration_logits,
    )
