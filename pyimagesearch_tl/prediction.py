"""Classify new images with a bundle: the same decoder and backbone as training, rebuilt from the bundle."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Iterable, Sequence

import numpy as np

from .bundle import Bundle
from .errors import BundleError, DatasetError
from .images import is_image_name


@dataclasses.dataclass
class Prediction:
    path: str
    label: str | None
    score: float | None
    top: list[tuple[str, float]]
    error: str | None = None

    def as_dict(self) -> dict:
        return dataclasses.asdict(self)


def expand_paths(inputs: Iterable[str | Path]) -> list[Path]:
    """Files as given, folders expanded to the image files below them (sorted)."""
    paths: list[Path] = []
    for item in map(Path, inputs):
        if item.is_dir():
            paths += sorted(p for p in item.rglob("*") if p.is_file() and is_image_name(p.name))
        elif item.exists():
            paths.append(item)
        else:
            raise DatasetError(f"{item}: no such file or folder")
    return paths


class Predictor:
    """Features and labels for new images, exactly as the bundle's training features were made."""

    def __init__(self, bundle: Bundle, batch_size: int = 32, max_pixels: int = 89_478_485, top_k: int = 3):
        from .backbones import get_backbone
        from .features import FeatureExtractor

        self.bundle, self.top_k = bundle, top_k
        try:
            get_backbone(bundle.meta.backbone)
            self.extractor = FeatureExtractor.from_meta(bundle.meta, batch_size, max_pixels)
        except BundleError:
            raise
        except Exception as exc:
            raise BundleError(f"cannot rebuild the feature extractor of this bundle ({bundle.meta.describe()}): {exc}") from None
        bundle.check_features(self.extractor.meta, "the rebuilt feature extractor")

    def predict(self, paths: Sequence[str | Path]) -> list[Prediction]:
        names = self.bundle.label_names
        results: list[Prediction | None] = [None] * len(paths)
        for batch in self.extractor.iter_batches(paths):
            for index, reason in batch.skipped:
                results[index] = Prediction(str(paths[index]), None, None, [], error=reason)
            if not batch.indices:
                continue
            scores, _ = self.bundle.scores(self.extractor.transform(batch.images))
            for index, row in zip(batch.indices, scores):
                order = np.argsort(row)[::-1][: self.top_k]
                results[index] = Prediction(str(paths[index]), names[order[0]], float(row[order[0]]),
                                            [(names[i], float(row[i])) for i in order])
        return results
