"""Resize modes end to end on real photos (issue 26): the mode a run chose is recorded in its feature files
and bundles, prediction decodes new photos the same way, a folder made with another mode is extracted again,
and files written before resize modes existed read as the squash they were made with."""

import dataclasses
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import FeatureFileError
from pyimagesearch_tl.images import Resize
from pyimagesearch_tl.prediction import Predictor
from pyimagesearch_tl.store import FeatureMeta, feature_file, read_features


def _ptl(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def test_a_cropped_run_is_recorded_and_predicted_the_same_way(pipeline_run, tmp_path):
    dataset, squashed = pipeline_run["dataset"], pipeline_run["features"]
    features = tmp_path / "features"
    _ptl("extract", "--dataset", str(dataset), "--output", str(features), "--resize", "crop")
    validation = read_features(feature_file(features, "validation"))
    assert (validation.meta.resize, validation.meta.crop_pct) == ("crop", 0.875)
    assert "centre crop 0.875" in validation.meta.describe()
    before = read_features(feature_file(squashed, "validation"))
    assert before.meta.resizing == Resize() and before.paths == validation.paths
    assert np.abs(before.features - validation.features).mean() > 0.01  # other pixels, other features

    _ptl("train", "--features", str(features), "--output", str(tmp_path / "models"), "--cv", "2")
    bundle = Bundle.load(tmp_path / "models" / "logreg.skops")
    predictor = Predictor(bundle, runtime="tensorflow")
    assert predictor.extractor.resize == Resize("crop", 0.875)
    photos = [dataset / path for path in validation.paths[:4]]
    expected, _ = bundle.scores(validation.features[:4])
    got = [[dict(p.top)[name] for name in bundle.label_names] for p in predictor.predict(photos)]
    np.testing.assert_allclose(got, expected, atol=1e-4)  # the features of the crop, not of the squash

    output = _ptl("extract", "--dataset", str(dataset), "--output", str(features), "--resize", "squash")
    assert "up to date" not in output  # another mode: the folder's files are made again
    assert read_features(feature_file(features, "validation")).meta.resize == "squash"


def test_a_file_from_before_resize_modes_reads_as_squash_and_a_forged_mode_is_refused(pipeline_run, tmp_path):
    old = shutil.copy(feature_file(pipeline_run["features"], "validation"), tmp_path / "validation.h5")
    with h5py.File(old, "a") as file:
        del file.attrs["resize"], file.attrs["crop_pct"]
    assert read_features(old).meta.resizing == Resize()
    meta = read_features(old).meta
    for forged, message in (
        ({"resize": "zoom"}, "resize must be one of squash, crop, letterbox"),
        ({"resize": "crop", "crop_pct": 0.0}, "crop_pct must be a number from 0.25 to 1, got 0.0"),
        ({"resize": "crop", "crop_pct": 1e-320}, "crop_pct must be a number from 0.25 to 1, got 1e-320"),
        ({"resize": "crop", "crop_pct": 10**400}, "crop_pct must be a number from 0.25 to 1, got 1000000000"),
        ({"resize": "squash", "crop_pct": 0.5}, "crop_pct applies to resize 'crop' only"),
    ):
        attrs = dataclasses.replace(meta, **{k: v for k, v in forged.items() if k == "resize"}).to_attrs()
        attrs.update(forged)
        with pytest.raises(FeatureFileError, match=message):
            FeatureMeta.from_attrs(attrs, "forged.h5")
