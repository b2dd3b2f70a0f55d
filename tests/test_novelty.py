"""'unknown' for photos of none of the classes: a cats-vs-dogs model shown flowers, ants and bees."""

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.novelty import NoveltyDetector, list_detectors
from pyimagesearch_tl.prediction import UNKNOWN, Predictor


def test_threshold_keeps_the_requested_share_of_calibration_images():
    rng = np.random.default_rng(0)
    features, labels = rng.normal(size=(200, 8)) + 3, rng.integers(0, 2, 200)
    calibration = rng.normal(size=(1000, 8)) + 3
    for keep in (0.5, 0.9, 0.95, 1.0):
        detector = NoveltyDetector.fit(features, labels, 2, calibration, keep)
        assert detector.is_known(calibration).mean() == pytest.approx(keep, abs=0.002)
    assert np.allclose(np.linalg.norm(detector.centroids, axis=1), 1.0)
    # The streaming path (centroids in one pass over blocks, then similarities) gives the same detector.
    centroids = NoveltyDetector.centroids_of([(features[:120], labels[:120]), (features[120:], labels[120:])], 2)
    assert np.allclose(centroids, detector.centroids)


@pytest.fixture(scope="module")
def cats_dogs_model(pipeline_run, tmp_path_factory):
    models = tmp_path_factory.mktemp("novelty_models")
    result = CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(models), "--cv", "2"]
    )
    assert result.exit_code == 0, result.output
    return models / "logreg.joblib"


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
    assert "\tunknown\t(closest: " in result.output and "similarity " in result.output


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
    bundle = Bundle.load(tmp_path / "logreg.joblib")
    assert bundle.novelty.kind == detector and bundle.info["unknown"] == detector
    validation = read_features(pipeline_run["features"] / "validation.h5")
    own = bundle.novelty.familiarity(validation.features, bundle.logits(validation.features))
    strange = bundle.novelty.familiarity(strangers, bundle.logits(strangers))
    # 0.5 is chance. Energy, which reads only the classifier's confidence, is the weakest on far photos
    # (0.88 here; 0.505 for the flowers model of benchmarks/bench_unknown.py), the others exceed 0.99.
    assert roc_auc_score(np.r_[np.ones(len(own)), np.zeros(len(strange))], np.r_[own, strange]) > 0.8
    assert np.mean(own >= bundle.novelty.threshold) >= 0.95


def test_a_bundle_saved_with_the_original_centroid_detector_still_loads_and_predicts(pipeline_run, tmp_path):
    """Bundles made before the registry hold a NoveltyDetector with its four fields only: unchanged."""
    from pyimagesearch_tl.store import read_features

    result = CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2"]
    )
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(tmp_path / "logreg.joblib")
    old = NoveltyDetector(bundle.novelty.centroids, bundle.novelty.threshold, 0.95, "validation")
    assert set(vars(old)) == {"centroids", "threshold", "keep", "calibrated_on"}
    bundle.novelty = old
    bundle.save(tmp_path / "old.joblib")
    again = Bundle.load(tmp_path / "old.joblib")
    validation = read_features(pipeline_run["features"] / "validation.h5")
    familiarity, known = again.novelty.assess(validation.features, again.logits(validation.features))
    np.testing.assert_allclose(familiarity, old.similarity(validation.features))
    photos = sorted((pipeline_run["dataset"] / "validation").rglob("*.jpg"))[:3]
    assert [r.label for r in Predictor(again).predict(photos)] == [r.label for r in Predictor(bundle).predict(photos)]


def test_streaming_refuses_a_detector_it_cannot_fit_in_one_pass(pipeline_run, tmp_path):
    result = CliRunner().invoke(
        cli,
        ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--classifier", "sgd",
         "--streaming", "--unknown", "knn"],
    )  # fmt: skip
    assert result.exit_code == 1 and "--streaming fits the centroid 'unknown' detector" in result.output


def test_evaluate_reports_the_rejection_rate_on_a_folder_of_strangers(pipeline_run, tmp_path):
    import json

    CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2"]
    )
    strangers = tmp_path / "strangers"
    strangers.mkdir()
    for photo in sorted(shared("hymenoptera_data", "val", "bees").glob("*.jpg"))[:10]:
        (strangers / photo.name).write_bytes(photo.read_bytes())
    result = CliRunner().invoke(
        cli,
        ["evaluate", "--model", str(tmp_path / "logreg.joblib"), "--features", str(pipeline_run["features"]),
         "--output", str(tmp_path / "eval"), "--unknown-test", str(strangers)],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    test = json.loads((tmp_path / "eval" / "logreg" / "metrics.json").read_text())["unknown_test"]
    assert test["images"] == 10 and test["detector"] == "centroid" and test["rejected"] >= 0.8
    assert f"unknown test: {test['unknown']} of 10 photos" in result.output
