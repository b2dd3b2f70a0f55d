"""`ptl export` and `ptl predict --output`: the output place checked before any work, a float16 bundle
exported as it predicts, and the backbone converted once for export and the ONNX runtimes alike."""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cache import record_sha256
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.images import load_image
from pyimagesearch_tl.prediction import Predictor
from pyimagesearch_tl.runtimes import network_path


def _train(features: Path, output: Path, **options) -> Path:
    from pyimagesearch_tl.training import train

    train(
        features,
        output,
        training_split="training",
        validation_split="validation",
        classifier="logreg",
        cv="2",
        **options,
    )
    return output / "logreg.skops"


@pytest.fixture(scope="module")
def model(pipeline_run, tmp_path_factory) -> Path:
    """A logreg bundle trained on the shared (float32) features."""
    return _train(pipeline_run["features"], tmp_path_factory.mktemp("models"))


@pytest.fixture(scope="module")
def float16_model(pipeline_run, tmp_path_factory) -> Path:
    """A logreg bundle trained on the shared dataset's features stored as float16.

    C=100 (a grid a config file may set): larger weights show how the bundle computes on float16
    features; with its float32 arithmetic the old export was 1.6e-4 away from the bundle here."""
    from pyimagesearch_tl.extraction import extract_dataset

    work = tmp_path_factory.mktemp("float16")
    extract_dataset(
        pipeline_run["dataset"],
        work / "features",
        splits=["training", "validation"],
        backbone="efficientnet_lite0",
        dtype="float16",
        batch_size=16,
        progress=False,
    )
    return _train(work / "features", work / "models", grids={"logreg": {"C": [100.0]}})


def _validation_photos(pipeline_run) -> list[Path]:
    return sorted((pipeline_run["dataset"] / "validation").rglob("*.jpg"))


def _unwritable(tmp_path: Path, kind: str) -> tuple[Path, Path]:
    """(a file that cannot be written, the path the message must name)."""
    if kind == "parent is a file":  # unwritable even for root
        (tmp_path / "notes.txt").write_text("a file, not a folder")
        return tmp_path / "notes.txt" / "out" / "result", tmp_path / "notes.txt"
    if os.geteuid() == 0:
        pytest.skip("running as root, which writes into a chmod 555 folder anyway")
    parent = tmp_path / "read-only"
    parent.mkdir()
    parent.chmod(0o555)
    return parent / "result", parent


@pytest.fixture
def restore_permissions(tmp_path):
    yield
    for path in tmp_path.rglob("*"):
        if path.is_dir() and not path.is_symlink():
            path.chmod(0o755)


def _one_error_line(result, culprit: Path) -> None:
    assert result.exit_code == 1, result.output
    assert result.stdout == ""  # nothing predicted or written first
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: cannot write ") and f": {culprit} is " in line, line
    assert "Traceback" not in result.output


@pytest.mark.parametrize("kind", ["parent is a file", "parent is read-only"])
def test_predict_refuses_an_unwritable_output_before_predicting(
    model, pipeline_run, tmp_path, kind, restore_permissions
):
    target, culprit = _unwritable(tmp_path, kind)
    photos = str(pipeline_run["dataset"] / "validation")
    result = CliRunner().invoke(cli, ["predict", "--model", str(model), "--output", f"{target}.csv", photos])
    _one_error_line(result, culprit)


def test_predict_creates_a_missing_output_folder(model, pipeline_run, tmp_path):
    output = tmp_path / "results" / "today" / "predictions.csv"
    photos = str(pipeline_run["dataset"] / "validation")
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(model), "--output", str(output), "--runtime", "tensorflow", photos]
    )
    assert result.exit_code == 0, result.output
    assert f"wrote {output}" in result.stdout
    assert len(output.read_text().splitlines()) == 1 + len(_validation_photos(pipeline_run))


@pytest.mark.parametrize("kind", ["parent is a file", "parent is read-only"])
def test_export_refuses_an_unwritable_output_before_converting(model, tmp_path, kind, restore_permissions):
    target, culprit = _unwritable(tmp_path, kind)
    result = CliRunner().invoke(cli, ["export", "--model", str(model), "--output", f"{target}.onnx"])
    _one_error_line(result, culprit)


def test_a_float16_bundle_exports_to_a_graph_that_predicts_what_it_predicts(float16_model, pipeline_run, tmp_path):
    import onnxruntime

    output = tmp_path / "exported" / "model.onnx"  # a missing folder is created
    result = CliRunner().invoke(cli, ["export", "--model", str(float16_model), "--output", str(output)])
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(float16_model)
    assert bundle.meta.dtype == "float16" and bundle.score_kind == "probability"
    paths = _validation_photos(pipeline_run)
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(output), options, providers=["CPUExecutionProvider"])
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["feature_layout"])["dtype"] == "float16"
    size = int(metadata["input_size"])
    labels, probabilities = session.run(None, {"pixels": np.stack([load_image(p, size) for p in paths])})

    # Against the reference (TensorFlow's features), within the float32 case's tolerance; and against the
    # bundle on the very network the graph contains (ONNX Runtime's), where only the classifier's float32
    # arithmetic (float64 in scikit-learn) may differ.
    for runtime, atol in (("tensorflow", 1e-4), ("onnxruntime", 1e-5)):
        expected = Predictor(bundle, runtime=runtime, top_k=len(bundle.label_names)).predict(paths)
        for row, label, prediction in zip(probabilities, labels, expected):
            assert bundle.label_names[label] == prediction.top[0][0]
            by_name = dict(prediction.top)
            np.testing.assert_allclose(row, [by_name[name] for name in bundle.label_names], rtol=0, atol=atol)


def test_export_takes_the_backbone_the_onnx_runtimes_converted(model, pipeline_run, tmp_path, monkeypatch):
    import onnx

    bundle = Bundle.load(model)
    key = bundle.feature_extractor(runtime="tensorflow").network_key()
    predictor = Predictor(bundle, runtime="onnxruntime")  # converts the backbone on first use (cached already here)
    assert predictor.predict(_validation_photos(pipeline_run)[:1])[0].error is None
    converted = network_path(key)
    # The same cache entry in a cache of this test's own, marked so the exported graph shows where it came from.
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    network = network_path(key)
    network.parent.mkdir(parents=True)
    marked = onnx.load(converted)
    marked.graph.node[0].name = "converted-once"
    network.write_bytes(marked.SerializeToString())
    record_sha256(network)  # the cache's record of it: the marked file is the one to use
    stamp = network.stat().st_mtime_ns

    result = CliRunner().invoke(cli, ["export", "--model", str(model), "--output", str(tmp_path / "model.onnx")])
    assert result.exit_code == 0, result.output
    exported = onnx.load(tmp_path / "model.onnx")
    assert "backbone/converted-once" in {node.name for node in exported.graph.node}, "the backbone was converted again"
    assert sorted(network.parent.glob("*.onnx")) == [network] and network.stat().st_mtime_ns == stamp
