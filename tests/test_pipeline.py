"""The stages end to end on real photos: extract, train, evaluate, predict, through the CLI."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import ROOT, chatter, chatty_env

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.classifiers import list_classifiers
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.store import read_features, read_meta


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert result.exit_code == 0, result.output
    return result.output


def test_extraction_writes_one_file_per_split_with_metadata(pipeline_run):
    features = pipeline_run["features"]
    assert sorted(p.name for p in features.iterdir()) == [
        "training.h5",
        "training.skipped.csv",
        "validation.h5",
        "validation.skipped.csv",
    ]
    training = read_features(features / "training.h5")
    assert training.features.shape == (len(training.paths), 1280) and training.features.dtype == np.float32
    meta = training.meta
    assert (meta.backbone, meta.weights, meta.pooling, meta.input_size, meta.preprocessing) == (
        "efficientnet_lite0",
        "imagenet",
        "avg",
        224,
        "lite",
    )
    assert meta.label_names == ("cats", "dogs")
    # deterministic order: the manifest's
    manifest = (pipeline_run["dataset"] / "manifest.csv").read_text().splitlines()[1:]
    assert training.paths == [line.split(",")[0] for line in manifest if ",training," in line]


def test_rerun_with_same_input_does_no_work(pipeline_run):
    features = pipeline_run["features"]
    before = {p.name: p.stat().st_mtime_ns for p in features.glob("*.h5")}
    output = run("extract", "--dataset", str(pipeline_run["dataset"]), "--output", str(features), "--batch-size", "16")
    assert output.count("up to date, nothing to do") == 2
    assert before == {p.name: p.stat().st_mtime_ns for p in features.glob("*.h5")}


def test_train_grid_search_picks_c_and_bundle_carries_everything(pipeline_run, tmp_path):
    output = run("train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "3")
    bundle = Bundle.load(tmp_path / "logreg.skops")
    # The C kept is the one that scores best in the same stratified folds, computed here independently.
    from sklearn.base import clone
    from sklearn.model_selection import StratifiedKFold, cross_val_score

    training = read_features(pipeline_run["features"] / "training.h5")
    folds = StratifiedKFold(3, shuffle=True, random_state=42)
    by_c = {
        c: cross_val_score(
            clone(bundle.classifier).set_params(clf__C=c), training.features, training.labels, cv=folds
        ).mean()
        for c in bundle.info["grid"]["C"]
    }
    assert len(by_c) > 1
    assert by_c[bundle.info["best_params"]["C"]] == pytest.approx(max(by_c.values()))
    assert bundle.info["cv_score"] == pytest.approx(max(by_c.values()))
    assert bundle.meta == read_meta(pipeline_run["features"] / "training.h5")
    assert bundle.label_names == ["cats", "dogs"]
    assert {"scikit-learn", "tensorflow", "keras", "numpy", "pyimagesearch_tl"} <= set(bundle.versions)
    validation = read_features(pipeline_run["features"] / "validation.h5")
    scores, kind = bundle.scores(validation.features)
    assert kind == "probability" and scores.shape == (len(validation.labels), 2)
    # pretrained features separate real cats from dogs even with a dozen photos per class
    assert (scores.argmax(1) == validation.labels).mean() >= 0.8
    assert "logreg" in output and "saved" in output


def test_train_all_reuses_the_feature_files(pipeline_run, tmp_path):
    features = pipeline_run["features"]
    before = {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    output = run(
        "train", "--features", str(features), "--output", str(tmp_path), "--classifier", "all", "--cv", "validation"
    )
    assert {p.name for p in tmp_path.glob("*.skops")} == {f"{name}.skops" for name in list_classifiers()}
    assert {"logreg", "linear-svm", "sgd"} <= set(list_classifiers())
    assert before == {p.name: p.stat().st_mtime_ns for p in features.iterdir()}
    header = output.splitlines()[0]
    assert "val acc" in header and "fit s" in header
    svm = Bundle.load(tmp_path / "linear-svm.skops")
    assert svm.scores(np.zeros((1, 1280)))[1] == svm.score_kind == "decision"  # one name, everywhere
    assert Bundle.load(tmp_path / "logreg.skops").score_kind == "probability"


def test_evaluate_prints_accuracy_and_writes_metrics_and_plots(pipeline_run, tmp_path):
    run("train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2")
    output = run(
        "evaluate",
        "--model",
        str(tmp_path / "logreg.skops"),
        "--features",
        str(pipeline_run["features"]),
        "--output",
        str(tmp_path / "eval"),
    )
    accuracy_line = [line for line in output.splitlines() if line.startswith("accuracy: ")]
    assert len(accuracy_line) == 1 and len(accuracy_line[0].split()[1]) == 6
    metrics = json.loads((tmp_path / "eval" / "logreg" / "metrics.json").read_text())
    assert metrics["split"] == "validation"  # the photos come pre-split into train and validation only
    assert metrics["accuracy"] == pytest.approx(float(accuracy_line[0].split()[1]), abs=1e-4)
    assert np.sum(metrics["confusion_matrix"]) == metrics["images"] > 0
    assert metrics["roc_auc"] is not None and "roc_auc:" in output
    for name in ("confusion_matrix.png", "roc_curve.png"):
        assert (tmp_path / "eval" / "logreg" / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_leave_the_users_matplotlib_backend_alone(pipeline_run, tmp_path):
    import matplotlib

    from pyimagesearch_tl.evaluation import compare, evaluate

    run("train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2")
    previous = matplotlib.get_backend()
    matplotlib.use("svg")  # a notebook user's choice
    try:
        evaluate(
            Bundle.load(tmp_path / "logreg.skops"),
            read_features(pipeline_run["features"] / "validation.h5"),
            tmp_path / "eval" / "logreg",
            "validation",
        )
        compare(tmp_path)
        assert matplotlib.get_backend() == "svg"
    finally:
        matplotlib.use(previous)
    assert (tmp_path / "eval" / "logreg" / "confusion_matrix.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_predict_rebuilds_the_backbone_from_the_bundle(pipeline_run, tmp_path, cats_dogs):
    run("train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2")
    photos = sorted((cats_dogs / "validation" / "dogs").glob("*.jpg"))[:3]
    broken = tmp_path / "broken.jpg"
    broken.write_text("not a photo")
    # a config with another backbone must not change how the bundle's features are made
    config = tmp_path / "other.toml"
    config.write_text('backbone = "vgg16"\npooling = "flatten"\n')
    output = run(
        "predict",
        "--config",
        str(config),
        "--model",
        str(tmp_path / "logreg.skops"),
        *map(str, photos),
        str(broken),
        "--output",
        str(tmp_path / "p.json"),
    )
    lines = [line for line in output.splitlines() if line.startswith(str(photos[0].parent))]
    assert len(lines) == 3 and all(line.split("\t")[1] == "dogs" for line in lines)
    results = json.loads((tmp_path / "p.json").read_text())
    assert [r["error"] for r in results][-1] == "not an image (unrecognised file content)"
    assert "predicted 3 (0 unknown: threshold set to keep 95% of the validation photos), skipped 1" in output


def test_predict_refuses_a_bundle_whose_features_cannot_be_rebuilt(pipeline_run, tmp_path):
    run("train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2")
    bundle = Bundle.load(tmp_path / "logreg.skops")
    bundle.meta = bundle.meta.__class__(**{**bundle.meta.__dict__, "decoder": "some-other-decoder"})
    bundle.save(tmp_path / "tampered.skops")
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(tmp_path / "tampered.skops"), str(pipeline_run["dataset"])]
    )
    assert result.exit_code == 1 and "decoder=" in result.output and "Traceback" not in result.output
    bundle.meta = bundle.meta.__class__(**{**bundle.meta.__dict__, "backbone": "gone_net"})
    bundle.save(tmp_path / "unknown.skops")
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(tmp_path / "unknown.skops"), str(pipeline_run["dataset"])]
    )
    assert result.exit_code == 1 and "unknown backbone 'gone_net'" in result.output


def test_csv_features_train_too(pipeline_run, tmp_path):
    output = run(
        "extract",
        "--dataset",
        str(pipeline_run["dataset"]),
        "--output",
        str(tmp_path / "csv"),
        "--format",
        "csv",
        "--batch-size",
        "16",
    )
    assert "extracted" in output
    first = (tmp_path / "csv" / "training.csv").read_text().splitlines()[0].split(",")
    assert first[0] in ("0", "1") and len(first) == 1 + 1280  # label first, then the values
    h5 = read_features(pipeline_run["features"] / "training.h5")
    csv = read_features(tmp_path / "csv" / "training.csv")
    assert csv.paths == h5.paths and csv.labels.tolist() == h5.labels.tolist()
    # The same photos, possibly not in the same runtime: a network converted earlier in the session runs
    # small jobs too (runtimes.MIN_IMAGES_TO_CONVERT), within the parity limit of TensorFlow's features.
    from pyimagesearch_tl.runtimes import PARITY_ATOL

    np.testing.assert_allclose(csv.features, h5.features, rtol=0, atol=PARITY_ATOL)
    run("train", "--features", str(tmp_path / "csv"), "--output", str(tmp_path / "models"), "--cv", "2")
    assert Bundle.load(tmp_path / "models" / "logreg.skops").meta == h5.meta


def test_mixing_feature_files_from_different_backbones_is_refused(pipeline_run, tmp_path):
    features = tmp_path / "mixed"
    shutil.copytree(pipeline_run["features"], features)
    dataset = tmp_path / "dataset"
    shutil.copytree(pipeline_run["dataset"], dataset)
    run(
        "extract",
        "--dataset",
        str(dataset),
        "--output",
        str(tmp_path / "other"),
        "--backbone",
        "mobilenetv2",
        "--weights",
        "none",
        "--batch-size",
        "16",
    )
    shutil.copy(tmp_path / "other" / "validation.h5", features / "validation.h5")
    result = CliRunner().invoke(cli, ["train", "--features", str(features), "--output", str(tmp_path / "m")])
    assert result.exit_code == 1
    assert "backbone='mobilenetv2'" in result.output and "cannot be mixed" in result.output


def test_too_few_images_for_the_folds_is_a_clear_error(pipeline_run, tmp_path):
    result = CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "50"]
    )
    assert result.exit_code == 1
    assert "fewer than the 50 cross-validation folds" in result.output


def test_missing_features_folder_is_a_clear_error(tmp_path):
    result = CliRunner().invoke(cli, ["train", "--features", str(tmp_path / "nope")])
    assert result.exit_code == 1 and "features folder" in result.output and "does not exist" in result.output


def test_numbered_scripts_run_in_order(tmp_path, cats_dogs):
    """The five numbered scripts end to end, each printing nothing of TensorFlow's start-up lines."""
    env = chatty_env(PYTHONUNBUFFERED="1")
    out = tmp_path / "out"

    def script(name: str, *args: str) -> str:
        result = subprocess.run(
            [sys.executable, str(ROOT / "scripts" / name), *args],
            capture_output=True,
            text=True,
            env=env,
            cwd=tmp_path,
            timeout=600,
        )
        assert result.returncode == 0, result.stdout + result.stderr
        assert not chatter(result.stderr), result.stderr
        return result.stdout

    script("01_build_dataset.py", "--input", str(cats_dogs), "--output", str(out / "dataset"))
    script(
        "02_extract_features.py",
        "--dataset",
        str(out / "dataset"),
        "--output",
        str(out / "features"),
        "--batch-size",
        "16",
    )
    assert {p.name for p in (out / "features").glob("*.h5")} == {"training.h5", "validation.h5"}
    script(
        "03_train.py",
        "--features",
        str(out / "features"),
        "--output",
        str(out / "models"),
        "--classifier",
        "all",
        "--cv",
        "3",
    )
    evaluation = script(
        "04_evaluate.py",
        "--model",
        str(out / "models" / "logreg.skops"),
        "--features",
        str(out / "features"),
        "--output",
        str(out / "evaluation"),
    )
    assert (out / "evaluation" / "logreg" / "metrics.json").is_file()
    assert float(evaluation.strip().splitlines()[-2].split()[1]) >= 0.8  # 'accuracy: 0.XXXX'
    assert "photos of the classes called unknown (detector mahalanobis+energy, threshold set to keep 95% of the "
    "validation photos)" in evaluation
    predicted = script(
        "05_predict.py", "--model", str(out / "models" / "linear-svm.skops"), str(cats_dogs / "validation" / "cats")
    )
    assert "predicted 15 (0 unknown: threshold set to keep 95% of the validation photos), skipped 0" in predicted


def test_streaming_sgd_trains_from_blocks(pipeline_run, tmp_path):
    output = run(
        "train",
        "--features",
        str(pipeline_run["features"]),
        "--output",
        str(tmp_path),
        "--classifier",
        "sgd",
        "--streaming",
    )
    bundle = Bundle.load(tmp_path / "sgd.skops")
    assert bundle.info["cv"] == "streaming, selected on validation"
    assert bundle.info["best_params"]["loss"] in ("log_loss", "hinge")
    validation = read_features(pipeline_run["features"] / "validation.h5")
    scores, _ = bundle.scores(validation.features)
    assert (scores.argmax(1) == validation.labels).mean() >= 0.8
    assert "sgd" in output


@pytest.mark.parametrize("block_rows", [4, 256])  # 256: the whole file is one block
def test_streaming_without_validation_split_holds_out_training_blocks(pipeline_run, tmp_path, block_rows):
    from pyimagesearch_tl.training import train_streaming

    report = train_streaming(
        pipeline_run["features"],
        tmp_path,
        training_split="training",
        validation_split=None,
        block_rows=block_rows,
        epochs=3,
    )
    info = Bundle.load(report.path).info
    assert info["cv"] == "streaming, selected on held-out training blocks"
    total = len(read_features(pipeline_run["features"] / "training.h5").labels)
    # The score and the "unknown" threshold come from rows the classifier never saw.
    assert info["held_out_images"] > 0 and info["fitted_images"] > 0
    assert info["held_out_images"] + info["fitted_images"] == total
    assert 0.5 <= report.cv_score <= 1.0


def test_streaming_refuses_cv_instead_of_ignoring_it(pipeline_run, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--features",
            str(pipeline_run["features"]),
            "--output",
            str(tmp_path),
            "--classifier",
            "sgd",
            "--streaming",
            "--cv",
            "3",
        ],
    )
    assert result.exit_code == 1
    assert (
        "--streaming selects on the validation split (or held-out training blocks); --cv does not apply"
        in result.output
    )
    assert not (tmp_path / "sgd.skops").exists()


def test_streaming_all_says_streaming_trains_one_classifier(pipeline_run, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--features",
            str(pipeline_run["features"]),
            "--output",
            str(tmp_path),
            "--classifier",
            "all",
            "--streaming",
        ],
    )
    assert result.exit_code == 1
    assert "--streaming trains one classifier that learns incrementally (sgd), not 'all'" in result.output
    assert "choose one of" not in result.output  # the old message offered 'all', the value it refused


def test_streaming_needs_an_incremental_classifier(pipeline_run, tmp_path):
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--features",
            str(pipeline_run["features"]),
            "--output",
            str(tmp_path),
            "--classifier",
            "logreg",
            "--streaming",
        ],
    )
    assert result.exit_code == 1 and "learns incrementally (sgd), not 'logreg'" in result.output


def test_bfloat16_features_are_close_and_never_mixed_with_float32(cats_dogs):
    from pyimagesearch_tl.errors import FeatureFileError
    from pyimagesearch_tl.features import FeatureExtractor
    from pyimagesearch_tl.store import check_same_layout

    photos = sorted((cats_dogs / "train" / "cats").glob("*.jpg"))[:4]
    full = FeatureExtractor("efficientnet_lite0", batch_size=4)
    half = FeatureExtractor("efficientnet_lite0", batch_size=4, precision="bfloat16")
    images = np.stack([full.decode(p) for p in photos])
    a, b = full.transform(images), half.transform(images)
    assert b.dtype == np.float32 and a.shape == b.shape == (4, 1280)
    cosine = np.sum(a * b, axis=1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1))
    assert cosine.min() > 0.98 and not np.array_equal(a, b)
    assert half.meta.precision == "bfloat16"
    with pytest.raises(FeatureFileError, match="precision='bfloat16'"):
        check_same_layout(full.meta, half.meta, "bf16 features")
