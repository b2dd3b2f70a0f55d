"""``ptl audit``: near-duplicate leaks, likely label errors and outliers, found in the stored feature files.

A classifier is only as good as its labels and its splits. The feature vectors already on disk make
an audit nearly free:

1. **Near-duplicates.** Pairs whose unit-length features have a cosine similarity at or above a
   threshold, found exactly by a radius search over blocks of rows (never an N x N matrix). The
   threshold is *calibrated*: a sample of the dataset's own photos is resized to half size,
   re-encoded at JPEG quality 40 and cropped by 10% (the similarity ``DUPLICATE_RECALL`` of those
   copies keep to their originals), and the training photos' similarity to their nearest *distinct*
   photo is measured (its ``DISTINCT_QUANTILE``); the threshold is the higher of the two, so
   look-alike photos of different subjects are not taken for copies. A pair is a **leak** when
   its images lie in different splits (test data seen in training), a **conflict** when their labels
   differ, and **redundant** otherwise.
2. **Likely label errors.** Out-of-fold class probabilities from the project's own classifier
   (cross-validated on the training split; the other splits predicted by a model trained on the
   training split without them), ranked by confident learning (``cleanlab.filter.find_label_issues``),
   each with the suggested label.
3. **Outliers.** Images far from every class (the cosine similarity to the nearest class centroid, as
   the "unknown" detector measures it) or far from their own class, below Tukey's far-out fence
   (first quartile - 3 x IQR) of the training images' similarities.

Outputs: ``audit.csv`` (one row per finding: kind, split, path, label, suggested label, score,
partner, reason), ``audit.json`` (counts per kind and split, thresholds and how they were set) and
contact sheets ``audit_<kind>.png`` of the top suspects. Nothing is deleted from the input:
``ptl build-dataset --exclude audit.csv`` rebuilds without the rows a user kept in the file.
"""

from __future__ import annotations

import dataclasses
import io
import time
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_write_csv, atomic_write_json
from .backbones import FINETUNED
from .classifiers import get_classifier, make_pipeline
from .errors import ConfigError, DatasetError
from .features import FeatureExtractor
from .images import load_image
from .locks import locks_output
from .novelty import NoveltyDetector
from .plots import new_figure, save_figure
from .store import FeatureSet, check_same_layout, feature_file, has_feature_file, read_features

#: Share of edited copies (half size, JPEG quality 40, 10% crop) the duplicate threshold aims to catch.
DUPLICATE_RECALL = 0.99
#: Share of training photos whose nearest *distinct* training photo may reach the threshold: a photo
#: and a different photo of a look-alike subject must not pass for duplicates.
DISTINCT_QUANTILE = 0.999
#: Photos of the dataset edited to calibrate the duplicate threshold.
CALIBRATION_PHOTOS = 64
#: Rows per block of the neighbour search (memory: block x N similarities at most, in sklearn's chunks).
BLOCK_ROWS = 2048
FIELDS = [
    "kind",
    "split",
    "path",
    "label",
    "suggested_label",
    "score",
    "partner_split",
    "partner_path",
    "sha256",
    "reason",
]
KINDS = ("leak", "conflict", "redundant", "label", "outlier")


@dataclasses.dataclass
class AuditReport:
    rows: list[dict]
    summary: dict
    files: list[str]


def _unit(features: np.ndarray) -> np.ndarray:
    features = np.asarray(features, dtype=np.float32)
    return features / np.maximum(np.linalg.norm(features, axis=1, keepdims=True), 1e-12)


# --- near-duplicates ------------------------------------------------------------------------------------


def edited_copies(path: Path) -> list[io.BytesIO]:
    """The photo at ``path`` resized to half size, re-encoded at JPEG quality 40, and cropped by 10%."""
    from PIL import Image, ImageOps

    with Image.open(path) as image:
        image = ImageOps.exif_transpose(image).convert("RGB")
        width, height = image.size
        copies = [
            (image.resize((max(1, width // 2), max(1, height // 2))), 90),
            (image, 40),
            (image.crop((width // 10, height // 10, width - width // 10, height - height // 10)), 90),
        ]
        files = []
        for edited, quality in copies:
            buffer = io.BytesIO()
            edited.save(buffer, format="JPEG", quality=quality)
            buffer.seek(0)
            files.append(buffer)
    return files


def calibrate_duplicate_threshold(
    extractor: FeatureExtractor,
    dataset_dir: Path,
    paths: Sequence[str],
    sha256: Sequence[str],
    unit: np.ndarray,
    seed: int,
) -> tuple[float, dict]:
    """The cosine similarity above which two photos are near-duplicates, set from two measurements.

    Edited copies (half size, JPEG quality 40, 10% crop) of a sample of the training photos: the
    similarity ``DUPLICATE_RECALL`` of them keep to their originals. Distinct photos: each training
    photo's similarity to its nearest training photo with other bytes; the ``DISTINCT_QUANTILE`` of
    those. The threshold is the higher of the two, so look-alike photos of different subjects stay
    apart even where some heavy edits then fall below it (the summary reports both figures).
    """
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(paths), size=min(CALIBRATION_PHOTOS, len(paths)), replace=False)
    sources, owners = [], []
    for row in sample:
        for copy in edited_copies(dataset_dir / paths[row]):
            sources.append(copy)
            owners.append(row)
    copies = np.zeros(len(sources), np.float32)
    for batch in extractor.iter_batches(sources):
        if batch.indices:
            features = _unit(extractor.transform(batch.images))
            copies[batch.indices] = np.sum(features * unit[[owners[i] for i in batch.indices]], axis=1)
    distinct = nearest_distinct(unit, sha256)
    from_copies = float(np.quantile(copies, 1 - DUPLICATE_RECALL, method="lower"))
    from_distinct = float(np.quantile(distinct, DISTINCT_QUANTILE, method="higher")) if len(distinct) else -1.0
    threshold = max(from_copies, np.nextafter(from_distinct, 2.0))
    return float(threshold), dict(
        method=f"the higher of: the similarity {DUPLICATE_RECALL:.0%} of edited copies (half size, JPEG quality 40, "
        f"10% crop) of {len(sample)} training photos keep to their originals ({from_copies:.3f}); the "
        f"{DISTINCT_QUANTILE:.1%} quantile of training photos' similarity to their nearest distinct photo "
        f"({from_distinct:.3f})",
        copies=len(sources),
        copies_caught=float(np.mean(copies >= threshold)),
        copy_similarity_median=float(np.median(copies)),
        from_copies=from_copies,
        from_distinct=from_distinct,
    )


def nearest_distinct(unit: np.ndarray, sha256: Sequence[str], neighbours: int = 4) -> np.ndarray:
    """Each row's cosine similarity to its most similar row with other bytes (blockwise k-NN)."""
    from sklearn.neighbors import NearestNeighbors

    if len(unit) < 2:
        return np.zeros(0, np.float32)
    index = NearestNeighbors(n_neighbors=min(neighbours + 1, len(unit)), metric="cosine", algorithm="brute").fit(unit)
    best = np.full(len(unit), -1.0, np.float32)
    for start in range(0, len(unit), BLOCK_ROWS):
        distances, found = index.kneighbors(unit[start : start + BLOCK_ROWS])
        for offset, (rows, distance) in enumerate(zip(found, distances)):
            row = start + offset
            others = [1 - d for j, d in zip(rows, distance) if j != row and sha256[j] != sha256[row]]
            best[row] = others[0] if others else -1.0
    return best[best > -1.0]


def similar_pairs(unit: np.ndarray, threshold: float) -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, similarity)``, ``i < j``, of rows at or above ``threshold`` (exact, blockwise)."""
    from sklearn.neighbors import NearestNeighbors

    index = NearestNeighbors(radius=max(0.0, 1.0 - threshold), metric="cosine", algorithm="brute").fit(unit)
    pairs = []
    for start in range(0, len(unit), BLOCK_ROWS):
        distances, neighbours = index.radius_neighbors(unit[start : start + BLOCK_ROWS], sort_results=True)
        for offset, (found, distance) in enumerate(zip(neighbours, distances)):
            row = start + offset
            pairs += [(row, int(j), float(1 - d)) for j, d in zip(found, distance) if j > row]
    return pairs


# --- label issues -----------------------------------------------------------------------------------------


def out_of_fold_probabilities(
    X: np.ndarray, y: np.ndarray, is_training: np.ndarray, classifier: str, seed: int, n_jobs: int
) -> np.ndarray:
    """Class probabilities of every row from a model that did not see it.

    Training rows: 5-fold cross-validation on the training split (the regularisation chosen by the
    classifier's grid first). Other rows: the model refit on the whole training split.
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict

    spec = get_classifier(classifier)
    pipeline = make_pipeline(spec, seed, None)
    if not hasattr(pipeline, "predict_proba"):
        raise ConfigError(f"the audit needs class probabilities; {classifier!r} gives none (use logreg)")
    folds = StratifiedKFold(min(5, int(np.bincount(y[is_training]).min())), shuffle=True, random_state=seed)
    grid = {f"clf__{name}": values for name, values in spec.grid.items()}
    search = GridSearchCV(pipeline, grid, cv=folds, n_jobs=n_jobs).fit(X[is_training], y[is_training])
    tuned = search.best_estimator_
    probabilities = np.zeros((len(y), len(np.unique(y[is_training]))))
    probabilities[is_training] = cross_val_predict(
        tuned, X[is_training], y[is_training], cv=folds, method="predict_proba", n_jobs=n_jobs
    )
    if (~is_training).any():
        probabilities[~is_training] = tuned.predict_proba(X[~is_training])
    return probabilities


# --- the audit --------------------------------------------------------------------------------------------


@locks_output("output_dir")
def audit(
    features_dir: str | Path,
    dataset_dir: str | Path,
    output_dir: str | Path,
    *,
    splits: Sequence[str],
    classifier: str = "logreg",
    seed: int = 42,
    n_jobs: int = -1,
    batch_size: int = 32,
    runtime: str = "auto",
    sheet_size: int = 24,
) -> AuditReport:
    """Audit the feature files of ``features_dir`` (made from ``dataset_dir``); write the report to ``output_dir``."""
    try:
        from cleanlab.filter import find_label_issues
    except ImportError:
        raise ConfigError("ptl audit ranks label issues with cleanlab: pip install 'pyimagesearch_tl[audit]'") from None
    started = time.perf_counter()
    features_dir, dataset_dir, output_dir = Path(features_dir), Path(dataset_dir), Path(output_dir)
    present = [s for s in splits if has_feature_file(features_dir, s)]
    if not present or present[0] != splits[0]:
        raise DatasetError(f"{features_dir} has no features of the training split {splits[0]!r}; run extract first")
    sets = {split: read_features(feature_file(features_dir, split)) for split in present}
    training = sets[splits[0]]
    for split, features in sets.items():
        check_same_layout(training.meta, features.meta, f"the {split!r} features")
    if training.meta.weights == FINETUNED:
        raise ConfigError("audit reads features of a pretrained backbone (extract), not of a fine-tuned one")
    merged = FeatureSet(
        np.concatenate([s.features for s in sets.values()]),
        np.concatenate([s.labels for s in sets.values()]),
        [p for s in sets.values() for p in s.paths],
        [h for s in sets.values() for h in s.sha256],
        training.meta,
    )
    split_of = np.array([split for split, s in sets.items() for _ in s.labels])
    names = list(training.meta.label_names)
    unit = _unit(merged.features)
    rows: list[dict] = []

    def row(kind, i, score, reason, suggested="", partner=None):
        rows.append(
            dict(
                kind=kind,
                split=split_of[i],
                path=merged.paths[i],
                label=names[merged.labels[i]],
                suggested_label=suggested,
                score=round(float(score), 4),
                partner_split="" if partner is None else split_of[partner],
                partner_path="" if partner is None else merged.paths[partner],
                sha256=merged.sha256[i],
                reason=reason,
            )
        )

    # 1. near-duplicates
    extractor = FeatureExtractor.from_meta(training.meta, batch_size, runtime=runtime)
    threshold, calibration = calibrate_duplicate_threshold(
        extractor, dataset_dir, training.paths, training.sha256, unit[: len(training.labels)], seed
    )
    role = {split: position for position, split in enumerate(splits)}
    for i, j, similarity in similar_pairs(unit, threshold):
        if role[split_of[i]] > role[split_of[j]] or (split_of[i] == split_of[j] and i > j):
            i, j = j, i  # the row reported (the copy to drop) is the one in the later split
        exact = merged.sha256[i] == merged.sha256[j]
        what = "identical files" if exact else f"cosine similarity {similarity:.3f} >= {threshold:.3f}"
        if merged.labels[i] != merged.labels[j]:
            row("conflict", j, similarity, f"{what}, labelled {names[merged.labels[i]]} and {names[merged.labels[j]]}",
                names[merged.labels[i]], i)  # fmt: skip
        elif split_of[i] != split_of[j]:
            row("leak", j, similarity, f"{what}, in {split_of[i]} and {split_of[j]}", partner=i)
        else:
            row("redundant", j, similarity, f"{what}, both in {split_of[j]}", partner=i)

    # 2. likely label errors
    is_training = split_of == splits[0]
    probabilities = out_of_fold_probabilities(merged.features, merged.labels, is_training, classifier, seed, n_jobs)
    issues = find_label_issues(merged.labels, probabilities, return_indices_ranked_by="self_confidence")
    for i in issues:
        given = probabilities[i, merged.labels[i]]
        suggested = int(np.argmax(probabilities[i]))
        row("label", i, 1 - given, f"out-of-fold probability of the given label {given:.3f}, of "
            f"{names[suggested]} {probabilities[i, suggested]:.3f}", names[suggested])  # fmt: skip

    # 3. outliers
    centroids = NoveltyDetector.centroids_of([(training.features, training.labels)], len(names))
    similarity = unit @ centroids.T
    nearest, own = similarity.max(axis=1), similarity[np.arange(len(unit)), merged.labels]

    def fence(values: np.ndarray) -> float:
        q1, q3 = np.quantile(values, [0.25, 0.75])
        return float(q1 - 3 * (q3 - q1))

    far_every = fence(nearest[is_training])
    far_own = {c: fence(own[is_training & (merged.labels == c)]) for c in range(len(names))}
    for i in range(len(unit)):
        if nearest[i] < far_every:
            row("outlier", i, 1 - nearest[i], f"far from every class: similarity {nearest[i]:.3f} < {far_every:.3f}")
        elif own[i] < far_own[merged.labels[i]]:
            row("outlier", i, 1 - own[i], f"far from its own class: similarity {own[i]:.3f} < "
                f"{far_own[merged.labels[i]]:.3f}")  # fmt: skip

    rows.sort(key=lambda r: (KINDS.index(r["kind"]), -r["score"]))
    output_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_csv(output_dir / "audit.csv", FIELDS, rows)
    counts = {kind: {} for kind in KINDS}
    for r in rows:
        counts[r["kind"]][r["split"]] = counts[r["kind"]].get(r["split"], 0) + 1
    summary = dict(
        images={split: len(s.labels) for split, s in sets.items()},
        counts=counts,
        duplicate_threshold=threshold,
        duplicate_calibration=calibration,
        label_issues=dict(
            method="cleanlab.filter.find_label_issues (confident learning) on out-of-fold "
            f"probabilities of {classifier}",
            classifier=classifier,
        ),  # fmt: skip
        outlier_thresholds=dict(
            method="Tukey's far-out fence (Q1 - 3 IQR) of the training images' similarities",
            every_class=far_every,
            own_class={names[c]: v for c, v in far_own.items()},
        ),
        seconds=round(time.perf_counter() - started, 1),
    )
    atomic_write_json(output_dir / "audit.json", summary)
    files = [str(output_dir / "audit.csv"), str(output_dir / "audit.json")]
    for kind in KINDS:
        chosen = [r for r in rows if r["kind"] == kind][:sheet_size]
        if chosen:
            files.append(contact_sheet(chosen, dataset_dir, output_dir / f"audit_{kind}.png"))
    return AuditReport(rows, summary, files)


def contact_sheet(rows: Sequence[dict], dataset_dir: Path, path: Path, thumb: int = 128, columns: int = 6) -> str:
    """Thumbnails of the top suspects, captioned with split, given and suggested label; pairs side by side."""
    pairs = any(r["partner_path"] for r in rows)
    cells = []
    for r in rows:
        if pairs:
            cells.append((r["partner_path"], f"{r['partner_split']}: {r['suggested_label'] or r['label']}"))
            cells.append((r["path"], f"{r['split']}: {r['label']}\nsimilarity {r['score']:.3f}"))
        else:
            suggestion = f"\n-> {r['suggested_label']}" if r["suggested_label"] else ""
            cells.append((r["path"], f"{r['split']}: {r['label']}{suggestion}"))
    lines = -(-len(cells) // columns)
    figure = new_figure(figsize=(2.0 * columns, 2.3 * lines))
    for n, (image_path, caption) in enumerate(cells):
        axis = figure.add_subplot(lines, columns, n + 1)
        try:
            axis.imshow(load_image(dataset_dir / image_path, thumb))
        except Exception as exc:  # a file gone since the extraction: the sheet says so
            axis.text(0.5, 0.5, str(exc)[:40], ha="center", va="center", fontsize=6)
        axis.set_title(caption, fontsize=7)
        axis.axis("off")
    return save_figure(figure, path)
