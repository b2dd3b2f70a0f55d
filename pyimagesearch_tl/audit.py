"""``ptl audit``: near-duplicate leaks, likely label errors and outliers, found in the stored feature files.

A classifier is only as good as its labels and its splits. The feature vectors already on disk make
an audit nearly free:

1. **Near-duplicates.** Candidate pairs whose unit-length features have a cosine similarity at or
   above a threshold, found exactly by a radius search over blocks of rows (never an N x N matrix),
   then confirmed pixel by pixel (the correlation of small grayscale thumbnails, whole or cropped by
   10%): ImageNet features of two different photos of look-alike subjects can be as close as a photo
   and its crop, their pixels are not. Both thresholds are *calibrated*: a sample of the dataset's
   own photos is resized to half size, re-encoded at JPEG quality 40 and cropped by 10%, and each
   threshold is what ``DUPLICATE_RECALL`` of those copies reach against their originals. Confirmed
   pairs are joined into groups of copies, and a group is reported once: each member paired with the
   group's first member (earliest split, then file order), ``n - 1`` rows for ``n`` copies. A row is a
   **leak** when the two images lie in different splits (test data seen in training), a **conflict**
   when their labels differ, and **redundant** otherwise.
2. **Likely label errors.** Out-of-fold class probabilities from the project's own classifier
   (cross-validated on the training split; the other splits predicted by a model trained on the
   training split without them), ranked by confident learning (``cleanlab.filter.find_label_issues``),
   each with the suggested label. The folds are as many as the smallest class allows (at most 5); a
   class with a single training photo cannot be held out and still be learned, so its images get no
   verdict (``audit.json`` lists them under ``label_issues``).
3. **Outliers.** Images far from every class (the cosine similarity to the nearest class centroid, as
   the ``centroid`` "unknown" detector measures it) or far from their own class, below Tukey's far-out fence
   (first quartile - 3 x IQR) of the training images' similarities (the own-class fence needs at least
   two training photos of the class).

Outputs: ``audit.csv`` (one row per finding: kind, split, path, label, suggested label, score,
partner, reason), ``audit.json`` (counts per kind and split, thresholds and how they were set) and
contact sheets ``audit_<kind>.png`` of the top suspects. Nothing is deleted from the input:
``ptl build-dataset --exclude audit.csv`` rebuilds without the rows a user kept in the file.
"""

from __future__ import annotations

import dataclasses
import io
import time
import warnings
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_path, atomic_write_csv, atomic_write_json
from .backbones import FINETUNED
from .classifiers import get_classifier, make_pipeline
from .errors import ConfigError, DatasetError
from .features import FeatureExtractor
from .images import load_image
from .layouts import MANIFEST
from .locks import locks_output
from .novelty import CentroidDetector
from .plots import new_figure
from .quantization import read_network
from .store import FeatureSet, check_same_layout, feature_file, has_feature_file, read_features

#: Share of edited copies (half size, JPEG quality 40, 10% crop) both duplicate thresholds must catch.
DUPLICATE_RECALL = 0.99
#: Side of the grayscale thumbnails whose correlation confirms a candidate pair pixel by pixel.
THUMBNAIL = 40
#: Photos of the dataset edited to calibrate the duplicate threshold.
CALIBRATION_PHOTOS = 64
#: Most folds of the out-of-fold cross-validation (fewer when the smallest class has fewer photos).
FOLDS = 5
#: Training photos a class needs for an out-of-fold verdict: one held out, at least one to learn from.
MIN_CLASS_PHOTOS = 2
#: Rows per block of the neighbour search (memory: block x N similarities at most, in sklearn's chunks).
BLOCK_ROWS = 2048
#: Cosine distance by which both searches widen their radius: copies of one vector (similarity 1, give or
#: take float32 rounding) are pairs at any threshold up to 1, and the two searches find the same pairs.
ROUNDING = 1e-6
#: ``neighbour_search`` values: exact, approximate, or auto (approximate above :data:`APPROXIMATE_ROWS`).
SEARCHES = ("auto", "exact", "approximate")
#: Rows above which ``auto`` searches neighbours approximately (benchmarks/bench_audit_scale.py, 1280-d
#: real features grown with noise, 2 cores: at 20,000 rows the exact search took 8.6 s, the approximate
#: 5.0 s with the same pairs; at 100,000 ~375 s against 44 s; at 1,000,000 ~12.8 h against 19 min).
APPROXIMATE_ROWS = 20_000
#: Lists of the inverted-file index each row is compared with (of ``4 * sqrt(rows)``).
PROBED_LISTS = 16
#: Rows of the k-means sample per list of the index (faiss asks for at least 39).
TRAINING_ROWS_PER_LIST = 64
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


def thumbnails(source) -> tuple[np.ndarray, np.ndarray]:
    """Standardised grayscale thumbnails of an image: whole, and its central 80% (a 10% crop per side)."""
    views = []
    for side, margin in ((THUMBNAIL, 0), (THUMBNAIL * 5 // 4, THUMBNAIL // 8)):
        if hasattr(source, "seek"):
            source.seek(0)
        gray = load_image(source, side).astype(np.float32).mean(axis=2)
        gray = gray[margin : margin + THUMBNAIL, margin : margin + THUMBNAIL] if margin else gray
        views.append((gray - gray.mean()) / max(float(gray.std()), 1e-6))
    return views[0], views[1]


def pixel_agreement(a, b) -> float:
    """How alike two images are pixel by pixel: the best correlation of their thumbnails, whole or with
    one of them cropped by 10% per side (so a resized, re-encoded or cropped copy scores near 1, and a
    different photo of a look-alike subject does not). ``a`` and ``b``: images, or their :func:`thumbnails`."""
    (a_whole, a_crop), (b_whole, b_crop) = (x if isinstance(x, tuple) else thumbnails(x) for x in (a, b))
    return float(max(np.mean(a_whole * b_whole), np.mean(a_crop * b_whole), np.mean(a_whole * b_crop)))


def calibrate_duplicates(
    extractor: FeatureExtractor, dataset_dir: Path, paths: Sequence[str], unit: np.ndarray, seed: int
) -> tuple[float, float, dict]:
    """The two thresholds of a near-duplicate: feature similarity and pixel agreement.

    A sample of the training photos is edited (half size, JPEG quality 40, 10% crop); each threshold
    is the value ``DUPLICATE_RECALL`` of the edited copies reach against their originals. Features
    find the candidates (ImageNet features of two different photos of look-alike subjects can be as
    similar as a photo and its crop), the pixels confirm them.
    """
    rng = np.random.default_rng(seed)
    sample = rng.choice(len(paths), size=min(CALIBRATION_PHOTOS, len(paths)), replace=False)
    sources, owners = [], []
    for row in sample:
        for copy in edited_copies(dataset_dir / paths[row]):
            sources.append(copy)
            owners.append(row)
    similarity = np.zeros(len(sources), np.float32)
    extractor.expect(len(sources))
    for batch in extractor.iter_batches(sources):
        if batch.indices:
            features = _unit(extractor.transform(batch.images))
            similarity[batch.indices] = np.sum(features * unit[[owners[i] for i in batch.indices]], axis=1)
    agreement = np.array([pixel_agreement(copy, dataset_dir / paths[row]) for copy, row in zip(sources, owners)])
    by_features = float(np.quantile(similarity, 1 - DUPLICATE_RECALL, method="lower"))
    by_pixels = float(np.quantile(agreement, 1 - DUPLICATE_RECALL, method="lower"))
    return (
        by_features,
        by_pixels,
        dict(
            method=f"edited copies (half size, JPEG quality 40, 10% crop) of {len(sample)} training photos: a pair "
            f"is a near-duplicate when its feature similarity and its pixel agreement (correlation of {THUMBNAIL}px "
            f"grayscale thumbnails) both reach what {DUPLICATE_RECALL:.0%} of the copies reach against their "
            "originals",
            copies=len(sources),
            feature_similarity=by_features,
            pixel_agreement=by_pixels,
            copies_feature_similarity_median=float(np.median(similarity)),
            copies_pixel_agreement_median=float(np.median(agreement)),
        ),
    )


def similar_pairs(unit: np.ndarray, threshold: float, search: str = "auto") -> list[tuple[int, int, float]]:
    """Every pair ``(i, j, similarity)``, ``i < j``, of unit rows at or above ``threshold``, in order (within
    :data:`ROUNDING`: a threshold of 1 or more finds the copies of one vector).

    ``search``: ``"exact"`` (blockwise, quadratic), ``"approximate"`` (:func:`approximate_pairs`) or
    ``"auto"``: approximate above :data:`APPROXIMATE_ROWS` rows.
    """
    if resolved_search(search, len(unit)) == "approximate":
        return approximate_pairs(unit, threshold)
    return exact_pairs(unit, threshold)


def resolved_search(search: str, rows: int) -> str:
    """``"exact"`` or ``"approximate"``: what neighbour search ``search`` (one of :data:`SEARCHES`) means for
    ``rows`` rows (``auto``: approximate above :data:`APPROXIMATE_ROWS`)."""
    if search not in SEARCHES:
        raise ConfigError(f"neighbour_search must be one of {', '.join(SEARCHES)}, got {search!r}")
    return "approximate" if search == "approximate" or (search == "auto" and rows > APPROXIMATE_ROWS) else "exact"


def exact_pairs(unit: np.ndarray, threshold: float, rows: int | None = None) -> list[tuple[int, int, float]]:
    """:func:`similar_pairs`, exactly: each row compared with every other, block by block (never an N x N
    matrix). ``rows``: only the pairs whose first row is one of the first ``rows`` (a benchmark's sample)."""
    from sklearn.neighbors import NearestNeighbors

    radius = max(0.0, 1.0 - threshold) + ROUNDING
    index = NearestNeighbors(radius=radius, metric="cosine", algorithm="brute").fit(unit)
    pairs = []
    for start in range(0, len(unit) if rows is None else rows, BLOCK_ROWS):
        stop = start + BLOCK_ROWS if rows is None else min(rows, start + BLOCK_ROWS)
        distances, neighbours = index.radius_neighbors(unit[start:stop], sort_results=True)
        for offset, (found, distance) in enumerate(zip(neighbours, distances)):
            row = start + offset
            pairs += [(row, int(j), float(1 - d)) for j, d in zip(found, distance) if j > row]
    return sorted(pairs)


def index_lists(rows: int) -> int:
    """Lists of the inverted-file index over ``rows`` rows: ``4 * sqrt(rows)``, as many as its k-means sample trains."""
    return max(1, min(rows // TRAINING_ROWS_PER_LIST, round(4 * np.sqrt(rows))))


def approximate_pairs(unit: np.ndarray, threshold: float, seed: int = 0) -> list[tuple[int, int, float]]:
    """:func:`similar_pairs` through an inverted-file index (faiss ``IndexIVFFlat``, inner product).

    The rows are clustered into ``4 * sqrt(n)`` lists (k-means on a seeded sample); each row is compared
    with the rows of its :data:`PROBED_LISTS` nearest lists only, by a radius search at ``threshold``,
    and each pair found is scored again exactly on the full vectors. Unlike a k-nearest-neighbour graph,
    a radius search has no cap on the pairs of one row, so a large group of copies is found whole.
    Measured (benchmarks/bench_audit_scale.py): see docs/audit.md.
    """
    try:
        import faiss
    except ImportError:
        raise ConfigError(
            f"the approximate neighbour search (above {APPROXIMATE_ROWS:,} rows, or neighbour_search="
            "'approximate') needs faiss: pip install 'pyimagesearch_tl[audit]'"
        ) from None
    unit = np.ascontiguousarray(unit, dtype=np.float32)
    rows, width = unit.shape
    if rows < 2:
        return []
    lists = index_lists(rows)
    index = faiss.IndexIVFFlat(faiss.IndexFlatIP(width), width, lists, faiss.METRIC_INNER_PRODUCT)
    index.cp.seed = seed
    sample = np.random.default_rng(seed).choice(rows, min(rows, TRAINING_ROWS_PER_LIST * lists), replace=False)
    index.train(unit[np.sort(sample)])
    index.add(unit)
    index.nprobe = min(lists, PROBED_LISTS)
    radius, pairs = max(0.0, 1.0 - threshold) + ROUNDING, []
    for start in range(0, rows, BLOCK_ROWS):
        block = unit[start : start + BLOCK_ROWS]
        limits, _, found = index.range_search(block, np.float32(1 - radius) - np.float32(1e-5))  # float32 ties kept
        owners = np.repeat(np.arange(start, start + len(block)), np.diff(limits).astype(np.int64))
        keep = found > owners
        owners, found = owners[keep], found[keep]
        # exactly, on the full vectors, kept by the exact search's rule (cosine distance within its radius)
        similarity = np.einsum("ij,ij->i", unit[owners].astype(np.float64), unit[found].astype(np.float64))
        keep = 1 - similarity <= radius
        pairs += [(int(i), int(j), float(v)) for i, j, v in zip(owners[keep], found[keep], similarity[keep])]
    return sorted(pairs)


def duplicate_groups(pairs, key) -> list[list[int]]:
    """The groups of rows joined, directly or through others, by ``pairs`` (``(i, j)`` keys); each group
    sorted by ``key``, its first member first, and the groups in the order of their first members."""
    parent: dict[int, int] = {}

    def root(k: int) -> int:
        parent.setdefault(k, k)
        while parent[k] != k:
            parent[k] = parent[parent[k]]
            k = parent[k]
        return k

    for i, j in pairs:
        parent[root(i)] = root(j)
    members: dict[int, list[int]] = {}
    for k in list(parent):
        members.setdefault(root(k), []).append(k)
    return sorted((sorted(group, key=key) for group in members.values()), key=lambda group: key(group[0]))


# --- label issues -----------------------------------------------------------------------------------------


def out_of_fold_probabilities(
    X: np.ndarray, y: np.ndarray, is_training: np.ndarray, n_classes: int, classifier: str, seed: int, n_jobs: int
) -> tuple[np.ndarray, np.ndarray, int]:
    """Class probabilities of every row from a model that did not see it: ``(probabilities, checked, folds)``.

    Only the classes with at least :data:`MIN_CLASS_PHOTOS` training photos take part (a single photo
    cannot be held out and still be learned); ``checked`` marks the rows of those classes, the others
    keep probabilities of zero. Training rows: stratified cross-validation on the training split with
    as many folds as the smallest of those classes allows, at most :data:`FOLDS` (the regularisation
    chosen by the classifier's grid first). Other rows: the model refit on those training rows.
    ``folds`` is 0 when fewer than two classes can take part (nothing is checked).
    """
    from sklearn.model_selection import GridSearchCV, StratifiedKFold, cross_val_predict

    spec = get_classifier(classifier)
    pipeline = make_pipeline(spec, seed, None)
    if not hasattr(pipeline, "predict_proba"):
        raise ConfigError(f"the audit needs class probabilities; {classifier!r} gives none (use logreg)")
    counts = np.bincount(y[is_training], minlength=n_classes)
    taking_part = counts >= MIN_CLASS_PHOTOS
    probabilities = np.zeros((len(y), n_classes))
    if taking_part.sum() < 2:
        return probabilities, np.zeros(len(y), dtype=bool), 0
    checked = taking_part[y]
    fit_rows, columns = is_training & checked, np.flatnonzero(taking_part)
    n_folds = int(min(FOLDS, counts[taking_part].min()))
    folds = StratifiedKFold(n_folds, shuffle=True, random_state=seed)
    grid = {f"clf__{name}": values for name, values in spec.grid.items()}
    search = GridSearchCV(pipeline, grid, cv=folds, n_jobs=n_jobs).fit(X[fit_rows], y[fit_rows])
    tuned = search.best_estimator_
    probabilities[np.ix_(fit_rows, columns)] = cross_val_predict(
        tuned, X[fit_rows], y[fit_rows], cv=folds, method="predict_proba", n_jobs=n_jobs
    )
    others = checked & ~is_training
    if others.any():
        probabilities[np.ix_(others, columns)] = tuned.predict_proba(X[others])
    return probabilities, checked, n_folds


# --- the audit --------------------------------------------------------------------------------------------


def check_dataset(dataset_dir: Path, paths: Sequence[str]) -> None:
    """Refuse a ``dataset_dir`` that does not hold the images the features were extracted from."""
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset folder {dataset_dir} does not exist; give --dataset the folder ptl extract read")
    missing = [p for p in paths if not (dataset_dir / p).is_file()]
    if not missing:
        return
    what = f"{len(missing)} of the {len(paths)} images the features were extracted from (e.g. {missing[0]})"
    if not (dataset_dir / MANIFEST).is_file():
        raise DatasetError(
            f"{dataset_dir} is not a dataset built by ptl build-dataset (it has no {MANIFEST}, and {what} are not "
            "in it): give --dataset the folder ptl extract read; to audit a folder of photos, run "
            "ptl build-dataset --input FOLDER --output DATASET, then ptl extract --dataset DATASET"
        )
    raise DatasetError(f"{what} are missing from {dataset_dir}: the dataset changed since ptl extract; run it again")


@locks_output("output_dir")
def audit(
    features_dir: str | Path,
    dataset_dir: str | Path,
    output_dir: str | Path,
    *,
    splits: Sequence[str],
    neighbour_search: str = "auto",
    classifier: str = "logreg",
    seed: int = 42,
    n_jobs: int = -1,
    batch_size: int = 32,
    runtime: str = "auto",
    sheet_size: int = 24,
) -> AuditReport:
    """Audit the feature files of ``features_dir`` (made from ``dataset_dir``); write the report to ``output_dir``.

    ``neighbour_search``: how near-duplicate candidates are found (see :func:`similar_pairs`).
    """
    resolved_search(neighbour_search, 0)  # a wrong value is refused before any work
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
    check_dataset(dataset_dir, merged.paths)
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

    # 1. near-duplicates: candidates by features, confirmed by pixels (identical files need no check)
    network = read_network(Path(features_dir), training.meta)  # int8: the network that made the features
    extractor = FeatureExtractor.from_meta(training.meta, batch_size, runtime=runtime, network=network)
    threshold, pixel_threshold, calibration = calibrate_duplicates(
        extractor, dataset_dir, training.paths, unit[: len(training.labels)], seed
    )
    confirmed: dict[tuple[int, int], tuple[float, str]] = {}
    candidates, views = 0, {}

    def thumbnails_of(k: int) -> tuple[np.ndarray, np.ndarray]:  # each image decoded once, however many pairs
        if k not in views:
            views[k] = thumbnails(dataset_dir / merged.paths[k])
        return views[k]

    search = resolved_search(neighbour_search, len(unit))
    for i, j, similarity in similar_pairs(unit, threshold, search):
        candidates += 1
        if merged.sha256[i] == merged.sha256[j]:
            what = "identical files"
        else:
            agreement = pixel_agreement(thumbnails_of(i), thumbnails_of(j))
            if agreement < pixel_threshold:
                continue  # alike in content, different photos
            what = f"feature similarity {similarity:.3f} >= {threshold:.3f}, pixel agreement {agreement:.3f}"
        confirmed[i, j] = (similarity, what)
    # A group of copies is reported once: each copy against the group's first member (the one kept: the
    # earliest split, then file order), n - 1 rows for n copies rather than a row for every pair.
    role = {split: position for position, split in enumerate(splits)}
    groups = duplicate_groups(confirmed, key=lambda k: (role[split_of[k]], k))
    for members in groups:
        first = members[0]
        size = f", group of {len(members)}" if len(members) > 2 else ""
        for j in members[1:]:
            pair = (min(first, j), max(first, j))
            if pair in confirmed:
                similarity, what = confirmed[pair]
            else:  # joined to the group through another copy
                similarity = float(unit[first] @ unit[j])
                via = next(k for k in members if (min(j, k), max(j, k)) in confirmed)
                what = f"feature similarity {similarity:.3f}, a near-duplicate of {merged.paths[via]}"
            what += size
            if merged.labels[first] != merged.labels[j]:
                labels = f"labelled {names[merged.labels[first]]} and {names[merged.labels[j]]}"
                row("conflict", j, similarity, f"{what}, {labels}", names[merged.labels[first]], first)
            elif split_of[first] != split_of[j]:
                row("leak", j, similarity, f"{what}, in {split_of[first]} and {split_of[j]}", partner=first)
            else:
                row("redundant", j, similarity, f"{what}, both in {split_of[j]}", partner=first)
    calibration["candidate_pairs"] = candidates
    calibration["images_decoded"] = len(views)
    lists = index_lists(len(unit))
    calibration["neighbour_search"] = (
        f"approximate (faiss IndexIVFFlat, {min(lists, PROBED_LISTS)} of {lists} lists probed)"
        if search == "approximate"
        else "exact"
    )
    calibration["confirmed_pairs"] = len(confirmed)
    calibration["groups"] = len(groups)

    # 2. likely label errors
    is_training = split_of == splits[0]
    probabilities, checked, n_folds = out_of_fold_probabilities(
        merged.features, merged.labels, is_training, len(names), classifier, seed, n_jobs
    )
    in_training = np.bincount(merged.labels[is_training], minlength=len(names))
    unchecked = {names[c]: int(n) for c, n in enumerate(in_training) if n < MIN_CLASS_PHOTOS or not n_folds}
    label_issues = dict(
        method=f"cleanlab.filter.find_label_issues (confident learning) on out-of-fold probabilities of {classifier}",
        classifier=classifier,
        folds=n_folds,
        unchecked_classes=unchecked,
    )
    if not n_folds:
        label_issues["note"] = (
            f"no label verdicts: out-of-fold probabilities need two classes with {MIN_CLASS_PHOTOS} or more "
            "training photos each"
        )
    elif unchecked:
        label_issues["note"] = (
            f"classes with fewer than {MIN_CLASS_PHOTOS} training photos get no out-of-fold label verdict (a single "
            "photo cannot be held out and still be learned): "
            + ", ".join(f"{name} ({n} training photo{'s' if n != 1 else ''})" for name, n in unchecked.items())
            + f"; {int((~checked).sum())} images not checked"
        )
    if "note" in label_issues:
        warnings.warn(label_issues["note"], stacklevel=3)
    issues = []
    if checked.any():  # confident learning over the classes that took part, numbered 0..k-1
        rows_checked, columns = np.flatnonzero(checked), np.flatnonzero(in_training >= MIN_CLASS_PHOTOS)
        renumber = np.full(len(names), -1)
        renumber[columns] = np.arange(len(columns))
        found = find_label_issues(
            renumber[merged.labels[rows_checked]],
            probabilities[np.ix_(rows_checked, columns)],
            return_indices_ranked_by="self_confidence",
        )
        issues = rows_checked[found]
    for i in issues:
        given = probabilities[i, merged.labels[i]]
        suggested = int(np.argmax(probabilities[i]))
        row("label", i, 1 - given, f"out-of-fold probability of the given label {given:.3f}, of "
            f"{names[suggested]} {probabilities[i, suggested]:.3f}", names[suggested])  # fmt: skip

    # 3. outliers
    centroids = CentroidDetector.centroids_of([(training.features, training.labels)], len(names))
    similarity = unit @ centroids.T
    nearest, own = similarity.max(axis=1), similarity[np.arange(len(unit)), merged.labels]

    def fence(values: np.ndarray) -> float:
        q1, q3 = np.quantile(values, [0.25, 0.75])
        return float(q1 - 3 * (q3 - q1))

    far_every = fence(nearest[is_training])
    # A class's own fence needs two training photos: the centroid of a single one is that photo itself.
    far_own = {
        c: fence(own[is_training & (merged.labels == c)]) if n >= MIN_CLASS_PHOTOS else None
        for c, n in enumerate(in_training)
    }
    for i in range(len(unit)):
        if nearest[i] < far_every:
            row("outlier", i, 1 - nearest[i], f"far from every class: similarity {nearest[i]:.3f} < {far_every:.3f}")
        elif far_own[merged.labels[i]] is not None and own[i] < far_own[merged.labels[i]]:
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
        pixel_threshold=pixel_threshold,
        duplicate_calibration=calibration,
        label_issues=label_issues,
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


def contact_sheet(rows: Sequence[dict], dataset_dir: Path, path: Path, thumb: int = 176, columns: int = 6) -> str:
    """Thumbnails of the top suspects, captioned with split, given and suggested label; pairs side by side.

    The thumbnails (``thumb`` pixels square) are laid out in one image, drawn at its own resolution under
    the captions: one set of axes for the whole sheet, not one per photo, so a sheet of 48 photos takes a
    fraction of a second instead of seconds.
    """
    pairs = any(r["partner_path"] for r in rows)
    cells = []
    for r in rows:
        if pairs:
            cells.append((r["partner_path"], f"{r['partner_split']}: {r['suggested_label'] or r['label']}"))
            cells.append((r["path"], f"{r['split']}: {r['label']}\nsimilarity {r['score']:.3f}"))
        else:
            suggestion = f"\n-> {r['suggested_label']}" if r["suggested_label"] else ""
            cells.append((r["path"], f"{r['split']}: {r['label']}{suggestion}"))
    dpi, margin, caption = 110, thumb // 8, 30  # pixels: around each thumbnail, and above it for two lines
    width, height = thumb + 2 * margin, thumb + caption + 2 * margin  # of a cell
    lines = -(-len(cells) // columns)
    sheet = np.full((lines * height, columns * width, 3), 255, np.uint8)
    figure = new_figure(figsize=(columns * width / dpi, lines * height / dpi), dpi=dpi)
    axis = figure.add_axes((0, 0, 1, 1))  # the whole figure, in the sheet's pixels
    axis.set_axis_off()
    for n, (image_path, text) in enumerate(cells):
        x, y = (n % columns) * width + margin, (n // columns) * height + margin + caption  # the thumbnail's corner
        try:
            sheet[y : y + thumb, x : x + thumb] = load_image(dataset_dir / image_path, thumb)
        except Exception as exc:  # a file gone since the extraction: the sheet says so
            axis.text(x + thumb / 2, y + thumb / 2, str(exc)[:40], ha="center", va="center", fontsize=6)
        axis.text(x + thumb / 2, y - 4, text, ha="center", va="bottom", fontsize=7)
    axis.imshow(sheet, extent=(0, sheet.shape[1], sheet.shape[0], 0), interpolation="none", aspect="auto", zorder=0)
    with atomic_path(path) as temporary:
        figure.savefig(temporary, dpi=dpi, format="png")
    return str(path)
