"""'unknown' for photos of none of the classes: a cats-vs-dogs model shown flowers, ants and bees."""

import json

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.novelty import NoveltyDetector, fit_detector, list_detectors, make_detector
from pyimagesearch_tl.prediction import UNKNOWN, Predictor


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """NumPy's and scikit-learn's matrix products run on one thread in this module: each is small (a few
    hundred rows of 1,280 features), and on a 2-core machine whose cores TensorFlow's pools and other
    processes keep busy, OpenBLAS's second thread made them many times slower (measured: three logistic
    fits on 400 photos 7.4-10.5 s instead of 0.2-0.3 s; the cross-fitted detectors refit five each). The
    same fits, the same scores: only the threading changes."""
    import scipy.linalg  # noqa: F401  (loads SciPy's own OpenBLAS, so that the limit reaches it too)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


def test_threshold_keeps_the_requested_share_of_calibration_images():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(200, 8)) + 3, rng.integers(0, 2, 200)
    calibration = rng.normal(size=(1000, 8)) + 3
    logits, calibration_logits = rng.normal(size=(200, 2)), rng.normal(size=(1000, 2))
    for kind in list_detectors():
        for keep in (0.5, 0.9, 0.95, 1.0):
            detector = fit_detector(kind, features, labels, 2, logits, calibration, calibration_logits, keep)
            kept = detector.is_known(calibration, calibration_logits).mean()
            assert kept == pytest.approx(keep, abs=0.003), (kind, keep)  # ranks tie: a few images
    centroid = fit_detector("centroid", features, labels, 2, logits, calibration, calibration_logits)
    assert np.allclose(np.linalg.norm(centroid.centroids, axis=1), 1.0)
    # Centroids in one pass over blocks (the audit) equal those of all rows at once.
    centroids = NoveltyDetector.centroids_of([(features[:120], labels[:120]), (features[120:], labels[120:])], 2)
    assert np.allclose(centroids, centroid.centroids)


def test_a_calibration_image_scored_again_a_rounding_error_apart_keeps_its_verdict():
    """Another runtime or CPU gives features ~1e-5 apart: thresholds and ranks sit halfway between the
    calibration scores, so no calibration image, the one at the threshold included, changes side."""
    rng = np.random.default_rng(5)
    features, labels = rng.normal(size=(200, 8)) + 3, rng.integers(0, 2, 200)
    calibration = rng.normal(size=(60, 8)) + 3
    logits, calibration_logits = rng.normal(size=(200, 2)), rng.normal(size=(60, 2))
    for kind in list_detectors():
        detector = fit_detector(kind, features, labels, 2, logits, calibration, calibration_logits, 0.9)
        known = detector.is_known(calibration, calibration_logits)
        assert 0.85 <= known.mean() < 1, kind  # some calibration images sit just below the threshold
        for sign in (-1, 1):
            nudged = calibration * (1 + sign * 1e-6), calibration_logits * (1 + sign * 1e-6)
            assert np.array_equal(detector.is_known(*nudged), known), (kind, sign)


def test_mahalanobis_on_very_wide_features_works_in_leading_principal_directions():
    """Flatten pooling makes 25,088 features (VGG16): the stored whitening matrix stays features x 256
    instead of features x features, and a point off the training directions is still the least familiar."""
    rng = np.random.default_rng(3)
    basis = rng.normal(size=(20, 5000))  # the training photos vary along 20 directions
    features, labels = rng.normal(size=(400, 20)) @ basis + 50 * basis[0], rng.integers(0, 2, 400)
    calibration = rng.normal(size=(200, 20)) @ basis + 50 * basis[0]
    detector = fit_detector("mahalanobis", features, labels, 2, None, calibration, None)
    assert detector.whiten.shape == (5000, 256)
    stranger = rng.normal(size=(1, 5000)) * 40 + 50 * basis[0]
    assert detector.familiarity(stranger)[0] < detector.familiarity(calibration).min()


def test_a_combination_is_calibrated_as_one_and_rejects_what_either_part_rejects():
    """Each part alone keeps 95% of the calibration images; the combination keeps 95% in total (not
    about 90%), and an image one part finds very unusual is unknown whatever the other part says."""
    rng = np.random.default_rng(1)
    centre = np.r_[5.0, np.zeros(5)]
    features, labels = rng.normal(size=(300, 6)) + centre, rng.integers(0, 3, 300)
    calibration, calibration_logits = rng.normal(size=(2000, 6)) + centre, rng.normal(size=(2000, 3)) + 2
    both = fit_detector("mahalanobis+energy", features, labels, 3, rng.normal(size=(300, 3)) + 2, calibration,
                        calibration_logits)  # fmt: skip
    assert both.is_known(calibration, calibration_logits).mean() == pytest.approx(0.95, abs=0.003)
    far, confident = -centre[None], np.full((1, 3), 50.0)  # the opposite direction, overwhelming evidence
    lookalike, unsure = centre[None], np.full((1, 3), -50.0)  # the middle of the classes, no evidence
    for features, logits, familiar in ((far, confident, 1), (lookalike, unsure, 0)):
        rank = np.searchsorted(both.references[familiar], both.parts[familiar].familiarity(features, logits))
        assert rank[0] / len(calibration) > 0.5  # one part finds it ordinary ...
        assert not both.is_known(features, logits)[0]  # ... the other does not


def test_a_mahalanobis_detector_pickled_with_its_precision_matrix_loads_with_the_same_scores():
    """The first Mahalanobis detector (2026-11-24) pickled the unit class means and the precision matrix."""
    import pickle

    from sklearn.covariance import LedoitWolf

    from pyimagesearch_tl.novelty import MahalanobisDetector

    rng = np.random.default_rng(4)
    features, labels = rng.normal(size=(300, 12)) + 1, rng.integers(0, 3, 300)
    unit = features / np.linalg.norm(features, axis=1, keepdims=True)
    means = np.stack([unit[labels == c].mean(axis=0) for c in range(3)])
    precision = LedoitWolf().fit(unit - means[labels]).precision_
    old = MahalanobisDetector.__new__(MahalanobisDetector)
    old.__setstate__(dict(threshold=-30.0, keep=0.95, calibrated_on="validation", means=means, precision=precision))
    again = pickle.loads(pickle.dumps(old))
    by_hand = [np.einsum("ij,jk,ik->i", unit - mean, precision, unit - mean) for mean in means]
    np.testing.assert_allclose(again.familiarity(features), -np.min(by_hand, axis=0), rtol=1e-4)
    assert again.threshold == -30.0


def test_a_bundle_saved_with_the_first_centroid_energy_class_loads_as_the_combination():
    """Bundles of 2026-11-24 pickled a CentroidEnergyDetector with these fields: it unpickles into the
    rank combination, with the same familiarity."""
    import pickle

    from pyimagesearch_tl.novelty import CentroidEnergyDetector, EnergyDetector

    rng = np.random.default_rng(2)
    features, labels, logits = rng.normal(size=(100, 5)) + 2, rng.integers(0, 2, 100), rng.normal(size=(100, 2))
    centroid = fit_detector("centroid", features, labels, 2, logits, features, logits)
    state = dict(
        threshold=0.05,
        keep=0.95,
        calibrated_on="validation",
        centroid=centroid,
        calibration_centroid=np.sort(centroid.familiarity(features)),
        calibration_energy=np.sort(EnergyDetector().familiarity(features, logits)),
    )
    old = CentroidEnergyDetector.__new__(CentroidEnergyDetector)
    old.__setstate__(state)
    again = pickle.loads(pickle.dumps(old))
    ranks = [np.searchsorted(state[f"calibration_{name}"], part.familiarity(features, logits), side="right") / 100
             for name, part in (("centroid", centroid), ("energy", EnergyDetector()))]  # fmt: skip
    np.testing.assert_allclose(again.familiarity(features, logits), np.minimum(*ranks))
    assert again.kind == "centroid+energy" and again.threshold == 0.05


@pytest.fixture(scope="module")
def cats_dogs_model(pipeline_run, tmp_path_factory):
    models = tmp_path_factory.mktemp("novelty_models")
    result = CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(models), "--cv", "2"]
    )
    assert result.exit_code == 0, result.output
    return models / "logreg.skops"


def test_out_of_distribution_photos_are_mostly_unknown(cats_dogs_model, cats_dogs):
    predictor = Predictor(Bundle.load(cats_dogs_model))
    strangers = (
        sorted(shared("flowers", "daisy").glob("*.jpg"))[:10]
        + sorted(shared("hymenoptera_data", "val", "ants").glob("*.jpg"))[:10]
    )
    results = predictor.predict(strangers)
    unknown = [r for r in results if r.label == UNKNOWN]
    assert len(unknown) >= 0.8 * len(strangers)
    assert all(r.top and r.top[0][0] in ("cats", "dogs") and r.similarity is not None for r in unknown)
    # dog photos the model never saw are mostly kept, and called dogs
    assert predictor.bundle.novelty.calibrated_on == "validation"
    fresh = sorted(shared("cats_and_dogs_filtered", "train", "dogs").glob("*.jpg"))[100:120]
    labels = [r.label for r in predictor.predict(fresh)]
    assert labels.count("dogs") >= 0.7 * len(fresh)
    assert labels.count("cats") <= 2


def test_cli_reports_unknown_with_its_reason(cats_dogs_model):
    daisy = sorted(shared("flowers", "daisy").glob("*.jpg"))[:3]
    result = CliRunner().invoke(cli, ["predict", "--model", str(cats_dogs_model), *map(str, daisy)])
    assert result.exit_code == 0, result.output
    assert "\tunknown\t(closest: " in result.output
    assert Bundle.load(cats_dogs_model).novelty.score_name + " " in result.output


# --- the detector registry: each detector on real photos ----------------------------------------------


@pytest.fixture(scope="module")
def strangers():
    """Features of 20 flowers and 20 ants: photos of classes the cats-vs-dogs model never saw."""
    from pyimagesearch_tl.features import FeatureExtractor

    paths = (
        sorted(shared("flowers", "tulip").glob("*.jpg"))[:20]
        + sorted(shared("hymenoptera_data", "train", "ants").glob("*.jpg"))[:20]
    )
    extractor = FeatureExtractor("efficientnet_lite0")
    return np.concatenate([extractor.transform(b.images) for b in extractor.iter_batches(paths)])


@pytest.mark.parametrize("detector", list_detectors())
def test_each_detector_scores_photos_of_other_classes_as_less_familiar(pipeline_run, strangers, detector, tmp_path):
    """Every registered detector, trained with `ptl train --unknown NAME` on real cats and dogs: photos of
    held-out classes (tulips, ants) score below the model's own validation photos, and the threshold
    keeps 95% of the validation photos. (Look-alike classes are measured by benchmarks/bench_unknown.py.)"""
    from sklearn.metrics import roc_auc_score

    from pyimagesearch_tl.store import read_features

    result = CliRunner().invoke(
        cli,
        ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2",
         "--unknown", detector],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(tmp_path / "logreg.skops")
    assert bundle.novelty.kind == detector and bundle.info["unknown"] == detector
    validation = read_features(pipeline_run["features"] / "validation.h5")
    own = bundle.novelty.familiarity(validation.features, bundle.logits(validation.features))
    strange = bundle.novelty.familiarity(strangers, bundle.logits(strangers))
    # 0.5 is chance. Energy, which reads only the classifier's confidence, is the weakest on far photos
    # (0.88 here; 0.505 for the flowers model of benchmarks/bench_unknown.py), the others exceed 0.99.
    assert roc_auc_score(np.r_[np.ones(len(own)), np.zeros(len(strange))], np.r_[own, strange]) > 0.8
    assert np.mean(own >= bundle.novelty.threshold) >= 0.95
    # scikit-learn's outlier vocabulary says the same: score_samples, offset_, decision_function, predict
    fitted, logits = bundle.novelty, bundle.logits(strangers)
    np.testing.assert_array_equal(fitted.score_samples(strangers, logits), strange)
    assert fitted.offset_ == fitted.threshold
    decision = fitted.decision_function(strangers, logits)
    np.testing.assert_array_equal(decision >= 0, fitted.is_known(strangers, logits))
    np.testing.assert_array_equal(fitted.predict(strangers, logits), np.where(decision >= 0, 1, -1))
    # and fit() is learn + calibration, as training does it
    training = read_features(pipeline_run["features"] / "training.h5")
    refit = make_detector(detector, keep=0.95).fit(
        training.features,
        training.labels,
        n_classes=len(bundle.label_names),
        logits=bundle.logits(training.features),
        calibration=validation.features,
        calibration_logits=bundle.logits(validation.features),
    )
    assert np.mean(refit.predict(validation.features, bundle.logits(validation.features)) == 1) >= 0.95


def test_a_bundle_saved_with_the_original_centroid_detector_still_loads_and_predicts(pipeline_run, tmp_path):
    """Bundles made before the registry hold a NoveltyDetector with its four fields only: unchanged."""
    from pyimagesearch_tl.store import read_features

    result = CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2"]
    )
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(tmp_path / "logreg.skops")
    train = read_features(pipeline_run["features"] / "training.h5")
    centroids = NoveltyDetector.centroids_of([(train.features, train.labels)], 2)
    # What unpickling a bundle made before the registry does: these four fields only.
    old = NoveltyDetector.__new__(NoveltyDetector)
    old.__dict__.update(centroids=centroids, threshold=0.5, keep=0.95, calibrated_on="validation")
    bundle.novelty = old
    bundle.save(tmp_path / "old.skops")
    again = Bundle.load(tmp_path / "old.skops")
    validation = read_features(pipeline_run["features"] / "validation.h5")
    familiarity, known = again.novelty.assess(validation.features, again.logits(validation.features))
    np.testing.assert_allclose(familiarity, old.similarity(validation.features))
    photos = sorted((pipeline_run["dataset"] / "validation").rglob("*.jpg"))[:3]
    assert [r.label for r in Predictor(again).predict(photos)] == [r.label for r in Predictor(bundle).predict(photos)]


def test_streaming_fits_the_default_detector_from_a_sample_and_it_rejects_strangers(pipeline_run, strangers, tmp_path):
    from sklearn.metrics import roc_auc_score

    from pyimagesearch_tl.store import read_features

    result = CliRunner().invoke(
        cli,
        ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--classifier", "sgd",
         "--streaming"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(tmp_path / "sgd.skops")
    training = read_features(pipeline_run["features"] / "training.h5")
    assert bundle.novelty.kind == "mahalanobis+energy" and bundle.info["unknown_learned_from"] == len(training.labels)
    validation = read_features(pipeline_run["features"] / "validation.h5")
    own = bundle.novelty.familiarity(validation.features, bundle.logits(validation.features))
    strange = bundle.novelty.familiarity(strangers, bundle.logits(strangers))
    assert np.mean(own >= bundle.novelty.threshold) >= 0.95
    assert roc_auc_score(np.r_[np.ones(len(own)), np.zeros(len(strange))], np.r_[own, strange]) > 0.8


def test_evaluate_reports_the_rejection_rate_on_a_folder_of_strangers(pipeline_run, tmp_path):
    CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2"]
    )
    strangers = tmp_path / "strangers"
    strangers.mkdir()
    for photo in sorted(shared("hymenoptera_data", "val", "bees").glob("*.jpg"))[:10]:
        (strangers / photo.name).write_bytes(photo.read_bytes())
    result = CliRunner().invoke(
        cli,
        ["evaluate", "--model", str(tmp_path / "logreg.skops"), "--features", str(pipeline_run["features"]),
         "--output", str(tmp_path / "eval"), "--unknown-test", str(strangers)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    test = json.loads((tmp_path / "eval" / "logreg" / "metrics.json").read_text())["unknown_test"]
    assert test["images"] == 10 and test["detector"] == "mahalanobis+energy" and test["rejected"] >= 0.8
    assert f"unknown test: {test['unknown']} of 10 photos" in result.output
    assert test["calibration"] == "validation photos" and "calibrated on the validation photos)" in result.output
    import dataclasses  # a model without a detector is refused before its split goes through it

    dataclasses.replace(Bundle.load(tmp_path / "logreg.skops"), novelty=None).save(tmp_path / "plain.skops")
    result = CliRunner().invoke(
        cli,
        ["evaluate", "--model", str(tmp_path / "plain.skops"), "--features", str(pipeline_run["features"]),
         "--output", str(tmp_path / "eval"), "--unknown-test", str(strangers)],
    )  # fmt: skip
    assert result.exit_code == 1 and result.output.strip().endswith("has no 'unknown' detector to test")
    assert not (tmp_path / "eval" / "plain").exists()


@pytest.fixture(scope="module")
def train_test_flowers(tmp_path_factory):
    """Flowers as a train/test-only dataset (Food-101 and Oxford Pets ship such lists): 100 training and
    70 test photos of each of 5 classes, extracted once; no validation split to calibrate on."""
    from pyimagesearch_tl.extraction import extract_dataset
    from pyimagesearch_tl.layouts import build_dataset

    source, work, rng = shared("flowers"), tmp_path_factory.mktemp("train-test"), np.random.default_rng(0)
    for folder in sorted(p for p in source.iterdir() if p.is_dir()):
        photos = list(rng.permutation(sorted(folder.glob("*.jpg")))[:170])  # a seeded random split, as the lists are
        for split, chosen in (("train", photos[:100]), ("test", photos[100:])):
            (work / "photos" / split / folder.name).mkdir(parents=True)
            for photo in chosen:
                (work / "photos" / split / folder.name / photo.name).symlink_to(photo)
    splits = ["training", "validation", "evaluation"]
    build_dataset(work / "photos", work / "dataset", splits=splits, fractions=[0.75, 0.15, 0.10])
    extract_dataset(work / "dataset", work / "features", splits=splits, backbone="efficientnet_lite0", progress=False)
    return work


def _kept(bundle, detector, test) -> float:
    return float(detector.is_known(test.features, bundle.logits(test.features)).mean())


def test_without_a_validation_split_train_calibrates_unknown_on_cross_fitted_rows(train_test_flowers, tmp_path):
    """Calibrated on the training rows themselves, Mahalanobis kept 0.79 of new photos; ``ptl train`` on a
    train/test-only dataset now keeps 95% +- 3 of the 350 test photos, and says what it calibrated on."""
    from pyimagesearch_tl.store import read_split
    from pyimagesearch_tl.training import train

    features = train_test_flowers / "features"
    [report] = train(
        features, train_test_flowers / "models", training_split="training", validation_split="validation",
        grids={"logreg": {"C": [0.1]}},
    )  # fmt: skip
    bundle = Bundle.load(report.path)
    test = read_split(features, "evaluation")
    assert len(test.labels) == 350 and bundle.novelty.kind == "mahalanobis+energy"  # the default
    assert _kept(bundle, bundle.novelty, test) == pytest.approx(0.95, abs=0.03)
    assert bundle.novelty.calibration == (
        "training photos held out by leave-one-out (mahalanobis) and 5-fold cross-fitting (energy)"
    )
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(report.path), str(train_test_flowers / "photos" / "test")]
    )
    assert result.exit_code == 0, result.output
    summary = result.output.strip().splitlines()[-1]
    unknown = int(summary.split("(")[1].split()[0])
    assert unknown <= 0.08 * 350  # before: "predicted 150 (148 unknown)" on a dataset like this one
    assert f"unknown: threshold set to keep 95% of the {bundle.novelty.calibration}), skipped 0" in summary
    result = CliRunner().invoke(  # evaluate says how many photos of the classes were turned away, and why
        cli, ["evaluate", "--model", str(report.path), "--features", str(features), "--output", str(tmp_path)]
    )
    assert result.exit_code == 0, result.output
    found = json.loads((tmp_path / "logreg" / "metrics.json").read_text())["unknown"]
    assert found["kept"] == pytest.approx(_kept(bundle, bundle.novelty, test)) and found["keep"] == 0.95
    assert f"unknown: {found['called_unknown']} of 350 photos of the classes called unknown (detector " in result.output


@pytest.mark.parametrize("detector", [d for d in list_detectors() if d != "mahalanobis+energy"])
def test_without_a_validation_split_every_detector_keeps_95_percent_of_new_photos(train_test_flowers, detector):
    from pyimagesearch_tl.store import read_split
    from pyimagesearch_tl.training import cross_fitted_detector

    bundle = Bundle.load(train_test_flowers / "models" / "logreg.skops")  # trained by the test above
    train_set = read_split(train_test_flowers / "features", "training")
    fitted = cross_fitted_detector(detector, bundle, train_set, bundle.classifier, 0.95, 42, "training")
    assert _kept(bundle, fitted, read_split(train_test_flowers / "features", "evaluation")) == pytest.approx(
        0.95, abs=0.03
    )


def test_mahalanobis_leave_one_out_in_closed_form_is_a_refit_without_the_row(train_test_flowers):
    """The closed form (a rank-one downdate) gives what a detector learnt without the row gives it, on real
    features (500 rows of 1,280: fewer rows than features, where distances depend most on the row count)."""
    from pyimagesearch_tl.store import read_split

    train_set = read_split(train_test_flowers / "features", "training")
    X, y = train_set.features, train_set.labels
    held_out = make_detector("mahalanobis").held_out_familiarity(X, y, 5)
    rows = [0, int(np.flatnonzero(y == 4)[-1])]
    refits = []
    for row in rows:
        others = np.arange(len(y)) != row
        refits.append(make_detector("mahalanobis").fit(X[others], y[others]).familiarity(X[row : row + 1])[0])
    learnt = make_detector("mahalanobis").fit(X, y).familiarity(X[rows])  # in-sample: far closer
    np.testing.assert_allclose(held_out[rows], refits, rtol=2e-3)  # Ledoit-Wolf's weight: that of all rows
    assert (np.abs(held_out[rows] - refits) < 0.05 * np.abs(held_out[rows] - learnt)).all()


def test_leave_one_out_stays_exact_where_class_means_nearly_coincide():
    """Expanded around the class means themselves, the distances cancelled where the means nearly coincide
    (a positive familiarity: a negative squared distance); expanded around their differences, they are what
    a float64 fit without the row gives (Ledoit-Wolf's weight held at all rows', as the closed form holds it)."""
    from sklearn.covariance import ledoit_wolf

    from pyimagesearch_tl.novelty import MahalanobisDetector

    rng = np.random.default_rng(1)
    X = rng.normal(size=30) * 10 + rng.normal(size=(40, 30)) * 1e-7
    y = np.repeat(np.arange(4), 10)
    held_out = make_detector("mahalanobis").held_out_familiarity(X, y, 4)
    assert np.isfinite(held_out).all() and (held_out < 0).all()
    shrinkage = ledoit_wolf(MahalanobisDetector._residuals(X, y, 4)[2])[1]
    for row in (0, 39):
        others = np.arange(40) != row
        unit, means, residuals = MahalanobisDetector._residuals(X[others], y[others], 4)
        scatter = residuals.T @ residuals / len(residuals)
        covariance = (1 - shrinkage) * scatter + shrinkage * np.trace(scatter) / 30 * np.eye(30)
        point = X[row] / np.linalg.norm(X[row])
        distances = [(point - mean) @ np.linalg.solve(covariance, point - mean) for mean in means]
        assert held_out[row] == pytest.approx(-min(distances), rel=1e-6)


@pytest.mark.parametrize("per_class", [1, 2, 3])
def test_classes_too_small_to_hold_out_are_calibrated_in_sample_with_a_warning(train_test_flowers, per_class):
    """Two photos per class made the Mahalanobis fit of a fold singular (a crash); now: a warning and the
    in-sample threshold below three photos per class, cross-fitting from three on."""
    import warnings

    from pyimagesearch_tl.store import FeatureSet, read_split
    from pyimagesearch_tl.training import cross_fitted_detector

    bundle = Bundle.load(train_test_flowers / "models" / "logreg.skops")
    full = read_split(train_test_flowers / "features", "training")
    rows = np.concatenate([np.flatnonzero(full.labels == c)[:per_class] for c in range(5)])
    small = FeatureSet(full.features[rows], full.labels[rows], [], [], full.meta)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        detector = cross_fitted_detector("mahalanobis+energy", bundle, small, bundle.classifier, 0.95, 42, "training")
    too_few = [w for w in caught if "too few to hold any out" in str(w.message)]
    assert len(too_few) == (per_class < 3)
    assert detector.calibration == (
        "training photos themselves (too few to hold any out)" if per_class < 3 else
        "training photos held out by leave-one-out (mahalanobis) and 3-fold cross-fitting (energy)"
    )  # fmt: skip
    assert np.isfinite(detector.familiarity(full.features, bundle.logits(full.features))).all()
