"""Classify new images with a bundle: the same decoder and backbone as training, rebuilt from the bundle."""

from __future__ import annotations

import dataclasses
import glob
from pathlib import Path
from typing import Iterable, Iterator, Sequence

import numpy as np

from .bundle import Bundle
from .errors import DatasetError
from .images import MAX_PIXELS, is_image_name

#: The label given to images that belong to none of the classes.
UNKNOWN = "unknown"


@dataclasses.dataclass
class Prediction:
    """One image's answer. ``label`` is a class name, ``"unknown"``, or None when it was skipped.

    ``score`` and ``top`` are reported for unknown images too: the classifier's best guesses.
    ``familiarity`` is the image's score from the bundle's "unknown" detector (for the ``centroid``
    detector, the cosine similarity to the nearest class centroid; for a combination, the lowest rank
    among the calibration images); below the detector's threshold, the image is unknown.
    """

    path: str
    label: str | None
    score: float | None
    top: list[tuple[str, float]]
    familiarity: float | None = None
    error: str | None = None

    @property
    def similarity(self) -> float | None:
        """The name :attr:`familiarity` had before 2026-12 (kept for code written then)."""
        return self.familiarity

    def as_dict(self) -> dict:
        """The fields, and ``similarity`` (:attr:`familiarity`'s former name, kept for code written before)."""
        return {**dataclasses.asdict(self), "similarity": self.familiarity}


def rejection(predictor: "Predictor", paths: Sequence[Path]) -> dict:
    """How many of ``paths`` -- photos of none of the classes -- ``predictor`` calls unknown."""
    results = predictor.predict(paths)
    decoded = [r for r in results if r.error is None]
    unknown = sum(r.label == UNKNOWN for r in decoded)
    return dict(
        images=len(decoded),
        unknown=unknown,
        rejected=unknown / len(decoded) if decoded else None,
        skipped=len(results) - len(decoded),
        detector=getattr(predictor.bundle.novelty, "kind", None),
        calibration=getattr(predictor.bundle.novelty, "calibration", None),
    )


def expand_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Paths as given, folders expanded to everything named like an image below them (sorted).

    Parameters
    ----------
    inputs : iterable of str or Path
        Files, folders and glob patterns (``photos/**/*.jpg``; a name that exists is never a pattern).

    Returns
    -------
    list of Path
        Whatever the entries are: a folder, FIFO or broken link named like an image, or given by name,
        is kept, so the decoder reports it as skipped with the reason rather than it vanishing.

    Raises
    ------
    DatasetError
        When an input does not exist at all (not even as a broken link), or is empty (``Path("")`` is
        the working folder: an unset shell variable must not classify everything below it).
    """
    paths: list[Path] = []
    for given in inputs:
        if not str(given).strip():
            raise DatasetError(f"an input path is empty ({str(given)!r}); to classify the current folder, pass '.'")
        item = Path(given)
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if is_image_name(p.name))
        elif item.exists() or item.is_symlink():
            paths.append(item)
        elif glob.has_magic(str(item)):
            matches = sorted(glob.glob(str(item), recursive=True))
            if not matches:
                raise DatasetError(f"{item}: the pattern matches no file or folder")
            paths += expand_paths(matches)
        else:
            raise DatasetError(f"{item}: no such file or folder")
    return paths


class Predictor:
    """Features and labels for new images, exactly as the bundle's training features were made.

    :meth:`predict` decodes the images (:meth:`iter_batches`) and scores them (:meth:`assess`); a
    predictor of another kind of model file (:class:`~pyimagesearch_tl.export.OnnxPredictor`) changes
    those two and answers through the same :meth:`predict`.

    Attributes
    ----------
    bundle : Bundle
        The model: what ``ptl predict`` and the web app show of it (``name``, ``label_names``,
        ``meta``, ``novelty``, ``score_kind``) comes from here.
    top_k : int
        How many classes each :class:`Prediction` lists.
    """

    def __init__(
        self, bundle: Bundle, batch_size: int = 32, max_pixels: int = MAX_PIXELS, top_k: int = 3, runtime: str = "auto"
    ):
        self.bundle, self.top_k = bundle, top_k
        self.extractor = bundle.feature_extractor(batch_size, max_pixels, runtime)

    @property
    def score_kind(self) -> str:
        """``"probability"`` or ``"decision"``, as :meth:`Bundle.scores` names them."""
        return self.bundle.score_kind

    #: Whether the runtime choice was told the job's size (:meth:`expect`); :meth:`predict` tells it otherwise.
    job_known = False

    def expect(self, images: int) -> None:
        """The job ahead has ``images`` images: a small one runs where no conversion is needed (see
        :meth:`~pyimagesearch_tl.features.FeatureExtractor.expect`)."""
        self.extractor.expect(images)
        self.job_known = True

    def iter_batches(self, sources: Sequence):
        """The decoded :class:`~pyimagesearch_tl.features.Batch` es of ``sources``, in order."""
        return self.extractor.iter_batches(sources)

    def assess(self, images) -> tuple[np.ndarray, Sequence, Sequence]:
        """A decoded batch's class scores ``(n, classes)``, each image's familiarity (None without an
        "unknown" detector) and whether it is known."""
        features = self.extractor.transform(images)
        scores, _ = self.bundle.scores(features)
        novelty = self.bundle.novelty
        if novelty is None:
            return scores, [None] * len(features), [True] * len(features)
        return (scores, *novelty.assess(features, self.bundle.logits(features)))

    def predict(self, sources: Sequence, names: Sequence[str] | None = None) -> list[Prediction]:
        """Classify image files (paths) or in-memory uploads (binary file objects, with ``names``).

        Unless :meth:`expect` said otherwise, the first call's images are the job the runtime is chosen for,
        as for ``ptl predict``: a few photos run where no network conversion is needed.
        """
        if not self.job_known:
            self.expect(len(sources))
        names = [str(s) for s in sources] if names is None else list(names)
        return self.predict_batches(self.iter_batches(sources), names)

    def predict_batches(self, batches: Iterable, names: Sequence[str]) -> list[Prediction]:
        """The :class:`Prediction` of each of ``names`` from its decoded ``batches`` (those of
        :meth:`iter_batches`; the web app decodes each upload on its own, under its pixel budget)."""
        results: list[Prediction | None] = [None] * len(names)
        for index, prediction in self.iter_predictions(batches, names):
            results[index] = prediction
        return results

    def iter_predictions(self, batches: Iterable, names: Sequence[str]) -> Iterator[tuple[int, Prediction]]:
        """``(index, Prediction)`` of the images of each decoded batch in turn, as :meth:`predict_batches`
        makes them (its skipped images included)."""
        classes = self.bundle.label_names
        for batch in batches:
            for index, reason in batch.skipped:
                yield index, Prediction(names[index], None, None, [], error=reason)
            if not batch.indices:
                continue
            scores, familiarity, known = self.assess(batch.images)
            for index, row, close, is_known in zip(batch.indices, scores, familiarity, known):
                order = np.argsort(row)[::-1][: self.top_k]
                yield (
                    index,
                    Prediction(
                        names[index],
                        classes[order[0]] if is_known else UNKNOWN,
                        float(row[order[0]]),
                        [(classes[i], float(row[i])) for i in order],
                        familiarity=None if close is None else float(close),
                    ),
                )
