"""'unknown' for photos of none of the classes: a cats-vs-dogs model shown flowers, ants and bees."""

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.novelty import NoveltyDetector
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
