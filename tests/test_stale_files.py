"""No stale or half-written feature file is ever read: one format per split, splits the dataset lost,
a CSV whose sidecar does not describe it, columns of different lengths."""

import json
import shutil

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import FeatureFileError
from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.store import (
    CSVFeatureWriter,
    FeatureMeta,
    HDF5FeatureWriter,
    feature_file,
    read_features,
    read_fingerprint,
    read_split,
)

SPLITS = ["training", "validation", "evaluation"]
META = FeatureMeta("efficientnet_lite0", "imagenet", "avg", 224, "lite", "test-decoder", 3, "float32", ("a", "b"))


def test_extracting_another_format_and_pooling_replaces_the_old_file(pipeline_run, tmp_path):
    """Extracting CSV with max pooling over the shared avg-pooled .h5 features leaves only the new files.

    In TensorFlow: the runtime plays no part here, and auto would convert the max-pooling network first."""
    features = shutil.copytree(pipeline_run["features"], tmp_path / "features")
    assert read_split(features, "training").meta.pooling == "avg"
    result = CliRunner().invoke(
        cli,
        ["extract", "--dataset", str(pipeline_run["dataset"]), "--output", str(features)]
        + ["--format", "csv", "--pooling", "max", "--batch-size", "16", "--runtime", "tensorflow"],
    )
    assert result.exit_code == 0, result.output
    assert sorted(p.name for p in features.glob("training.*")) == [
        "training.csv",
        "training.csv.meta.json",
        "training.skipped.csv",
    ]
    assert read_split(features, "training").meta.pooling == "max"  # what was asked for, not the old avg .h5


def test_both_formats_of_one_split_are_refused_not_chosen_between(pipeline_run, tmp_path):
    features = shutil.copytree(pipeline_run["features"], tmp_path / "features")
    (features / "training.csv").write_text("0,1,2,3\n")
    with pytest.raises(FeatureFileError, match=r"two formats \(training.h5, training.csv\)"):
        feature_file(features, "training")


def test_a_split_the_rebuilt_dataset_lacks_has_its_features_removed(pipeline_run, cats_dogs, tmp_path):
    features = shutil.copytree(pipeline_run["features"], tmp_path / "features")
    assert (features / "validation.h5").is_file()
    build_dataset(cats_dogs / "train", tmp_path / "dataset", splits=SPLITS, fractions=[1.0, 0.0, 0.0])  # training only
    with pytest.warns(UserWarning, match=r"removed .*validation.h5: dataset .* has no 'validation' split any more"):
        reports = extract_dataset(
            tmp_path / "dataset", features, splits=SPLITS, backbone="efficientnet_lite0", progress=False
        )
    assert [r.split for r in reports] == ["training"]
    assert sum(r.extracted for r in reports) == 0  # every image's features were reused by content
    assert not (features / "validation.h5").exists() and not (features / "validation.skipped.csv").exists()
    with pytest.raises(FeatureFileError, match="no feature file for split 'validation'"):
        feature_file(features, "validation")


def _csv(path, rows: int, fingerprint: str):
    writer = CSVFeatureWriter(path, META, fingerprint)
    writer.append(np.ones((rows, 3)), [0] * rows, [f"p{i}.jpg" for i in range(rows)], ["0" * 64] * rows, [])
    return writer


def test_a_csv_whose_sidecar_is_older_than_its_rows_is_never_read(tmp_path):
    """A kill between the CSV's rename and its sidecar's: 23 rows beside the sidecar of 21."""
    path = tmp_path / "training.csv"
    _csv(path, 21, "old").finish()
    sidecar = (tmp_path / "training.csv.meta.json").read_text()
    _csv(path, 23, "new").finish()
    (tmp_path / "training.csv.meta.json").write_text(sidecar)  # the state the kill leaves
    with pytest.raises(FeatureFileError, match="its rows and training.csv.meta.json disagree"):
        read_features(path)
    assert read_fingerprint(path) is None  # so the next extraction redoes it instead of calling it up to date
    old = json.loads(sidecar)
    del old["csv_bytes"], old["rows"]  # a sidecar of the first format: the row count is still checked
    (tmp_path / "training.csv.meta.json").write_text(json.dumps(old))
    with pytest.raises(FeatureFileError, match="23 rows of features but 21 paths"):
        read_features(path)


def test_an_hdf5_file_whose_columns_disagree_is_refused(tmp_path):
    path = tmp_path / "training.h5"
    writer = HDF5FeatureWriter(path, META, "fp")
    writer.append(np.ones((3, 3)), [0, 1, 0], ["a", "b", "c"], ["0" * 64] * 3, [])
    writer.finish()
    with h5py.File(path, "a") as f:
        f["paths"].resize(2, axis=0)
    with pytest.raises(FeatureFileError, match=r"its columns disagree \(3 features, 3 labels, 2 paths, 3 sha256\)"):
        read_features(path)


def test_files_ptl_did_not_write_are_never_deleted_or_replaced(pipeline_run, tmp_path):
    features = tmp_path / "features"
    features.mkdir()
    theirs = features / "training.csv"  # PyImageSearch's own CSV, no sidecar: the user's work
    theirs.write_text("0,0.1,0.2\n")
    for fmt in ("hdf5", "csv"):
        result = CliRunner().invoke(
            cli, ["extract", "--dataset", str(pipeline_run["dataset"]), "--output", str(features), "--format", fmt]
        )
        assert result.exit_code == 1, result.output
        assert result.output.strip().splitlines()[-1] == (
            f"Error: {theirs} is not a feature file ptl extract wrote (another program's, or damaged: cut short, "
            "unreadable) and stands where the 'training' features go; move it away, or extract into another folder"
        )
        assert theirs.read_text() == "0,0.1,0.2\n"
    cut = tmp_path / "cut" / "training.h5"  # ptl's own file, cut short by a copy: not called another program's
    cut.parent.mkdir()
    cut.write_bytes((pipeline_run["features"] / "training.h5").read_bytes()[:4096])
    extract = ["extract", "--dataset", str(pipeline_run["dataset"]), "--output", str(cut.parent)]
    result = CliRunner().invoke(cli, extract)
    assert result.exit_code == 1 and "(another program's, or damaged: cut short, unreadable)" in result.output
    assert cut.stat().st_size == 4096


def test_a_lost_split_leaves_no_unfinished_shards_behind(pipeline_run, cats_dogs, tmp_path):
    features = shutil.copytree(pipeline_run["features"], tmp_path / "features")
    (features / ".shards" / "validation").mkdir(parents=True)  # an extraction of it was interrupted once
    build_dataset(cats_dogs / "train", tmp_path / "dataset", splits=SPLITS, fractions=[1.0, 0.0, 0.0])
    with pytest.warns(UserWarning, match="has no 'validation' split any more"):
        extract_dataset(tmp_path / "dataset", features, splits=SPLITS, backbone="efficientnet_lite0", progress=False)
    assert not (features / ".shards").exists()
    with pytest.raises(FeatureFileError, match="no feature file for split 'validation'"):
        feature_file(features, "validation")


@pytest.mark.parametrize("name", ["../victim", "a/b", ".hidden", ""])
def test_a_split_name_that_is_not_a_plain_name_is_refused(name):
    from pyimagesearch_tl.config import load_config
    from pyimagesearch_tl.errors import ConfigError

    with pytest.raises(ConfigError, match="split names .* of letters, digits, '_' and '-'"):
        load_config().replace(splits=["training", name, "evaluation"])
