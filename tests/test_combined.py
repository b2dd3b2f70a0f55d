"""Mirrored views and combined backbones (several feature folders), on real photos."""

import functools
import shutil

import numpy as np
import pytest
from click.testing import CliRunner

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import BundleError, FeatureFileError
from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.features import FeatureExtractor
from pyimagesearch_tl.images import load_image
from pyimagesearch_tl.prediction import Predictor
from pyimagesearch_tl.store import FORMATS, read_features, read_fingerprint, read_meta

SPLITS = ["training", "validation", "evaluation"]


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def folders(pipeline_run, tmp_path_factory):
    """The shared lite0 features; a copy of them re-extracted by ``ptl extract --views 2`` (mirrored views,
    runtime auto: the mirrored network converted and checked; the command's output kept); and lite2
    features of the same dataset, computed in TensorFlow (converting lite2 would serve no check here)."""
    work = tmp_path_factory.mktemp("combined")
    dataset = pipeline_run["dataset"]
    views2 = shutil.copytree(pipeline_run["features"], work / "lite0_views2")
    views2_output = run("extract", "--dataset", str(dataset), "--output", str(views2), "--views", "2")
    extract_dataset(dataset, work / "lite2", splits=SPLITS, backbone="efficientnet_lite2", batch_size=16,
                    runtime="tensorflow", progress=False)  # fmt: skip
    return dict(work=work, dataset=dataset, lite0=pipeline_run["features"], lite0_views2=views2,
                views2_output=views2_output, lite2=work / "lite2")  # fmt: skip


@pytest.fixture(scope="module")
def reference():
    """``reference(backbone, views)``: the extractor the features are checked against (TensorFlow), built
    once per module."""
    return functools.cache(lambda backbone, views: FeatureExtractor(backbone, runtime="tensorflow", views=views))


def _copy(folder, target, transform):
    """A copy of a feature folder whose training file is rewritten by ``transform(FeatureSet)``."""
    shutil.copytree(folder, target)
    path = target / "training.h5"
    features, fingerprint = transform(read_features(path)), read_fingerprint(path)
    path.unlink()
    writer = FORMATS.get("hdf5").writer(path, features.meta, fingerprint)
    writer.append(features.features, features.labels, features.paths, features.sha256, [])
    writer.finish()
    return target


def test_mirrored_views_are_the_mean_of_the_image_and_its_mirror(folders, reference):
    """views=2 features are the mean of the image's and its mirror's, in TensorFlow and as extract stored them
    (runtime auto); the mirror does change the vectors, and the shared single-view folder is left as it was."""
    stored = read_features(folders["lite0_views2"] / "training.h5")
    pixels = np.stack([load_image(folders["dataset"] / p, 224) for p in stored.paths[:6]])
    single, both = reference("efficientnet_lite0", 1), reference("efficientnet_lite0", 2)
    by_hand = (single.transform(pixels) + single.transform(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
    np.testing.assert_allclose(both.transform(pixels), by_hand, atol=1e-5)
    np.testing.assert_allclose(stored.features[:6], by_hand, atol=1e-4)  # what extract stored (runtime auto)
    assert np.abs(by_hand - single.transform(pixels)).max() > 0.01  # the mirror does change the vectors
    assert stored.meta.views == 2 and read_meta(folders["lite0"] / "training.h5").views == 1


def test_views_are_part_of_the_feature_layout(folders, tmp_path):
    """A bundle of single-view features refuses mirrored ones; ``ptl extract --views 2`` into a folder of
    single-view features (the fixture's run) extracts again instead of calling them up to date."""
    run("train", "--features", str(folders["lite0"]), "--output", str(tmp_path), "--cv", "2")
    bundle = Bundle.load(tmp_path / "logreg.skops")
    with pytest.raises(BundleError, match="views=2 but the reference has 1"):
        bundle.check_features(read_meta(folders["lite0_views2"] / "training.h5"), "the mirrored features")
    # other views: extracted again, never mixed with the old vectors
    assert "up to date" not in folders["views2_output"]
    assert read_meta(folders["lite0_views2"] / "training.h5").views == 2


def test_training_on_two_folders_aligns_rows_by_image_not_position(folders, tmp_path):
    """Two feature folders are joined image by image: the second folder's rows shuffled train the same
    classifier, whose features are the two backbones' vectors side by side. (The centroid "unknown" detector:
    the default one, fitted on the same joined features in the last test, takes seconds at 2,560 dimensions.)"""
    shuffled = _copy(
        folders["lite2"],
        tmp_path / "lite2_shuffled",
        lambda s: _rows(s, np.random.default_rng(0).permutation(len(s.labels))),
    )
    for name, second in (("a", folders["lite2"]), ("b", shuffled)):
        run("train", "--features", str(folders["lite0"]), "--features", str(second), "--output", str(tmp_path / name),
            "--cv", "2", "--unknown", "centroid")  # fmt: skip
    a, b = (Bundle.load(tmp_path / name / "logreg.skops") for name in ("a", "b"))
    np.testing.assert_allclose(a.classifier[-1].coef_, b.classifier[-1].coef_, atol=1e-8)
    assert a.meta.feature_dim == 1280 + 1280 and a.meta.backbone == "efficientnet_lite0+efficientnet_lite2"


def _rows(features, order):
    from pyimagesearch_tl.store import FeatureSet

    return FeatureSet(
        features.features[order],
        features.labels[order],
        [features.paths[i] for i in order],
        [features.sha256[i] for i in order],
        features.meta,
    )


def test_a_missing_image_or_other_labels_are_clear_errors(folders, tmp_path):
    """Folders that cannot be joined are refused with the reason: an image missing from one, other label
    names, the same folder given twice."""
    short = _copy(folders["lite2"], tmp_path / "short", lambda s: _rows(s, np.arange(1, len(s.labels))))
    first = read_features(folders["lite0"] / "training.h5").paths[0]
    result = CliRunner().invoke(
        cli, ["train", "--features", str(folders["lite0"]), "--features", str(short), "--output", str(tmp_path / "m")]
    )
    assert result.exit_code == 1
    assert f"lacks 1 of the 30 images of {folders['lite0']} (e.g. {first})" in result.output

    def relabel(s):
        import dataclasses

        return dataclasses.replace(s, meta=dataclasses.replace(s.meta, label_names=("ants", "bees")))

    other = _copy(folders["lite2"], tmp_path / "other", relabel)
    result = CliRunner().invoke(
        cli, ["train", "--features", str(folders["lite0"]), "--features", str(other), "--output", str(tmp_path / "o")]
    )
    assert result.exit_code == 1 and "has labels ['ants', 'bees'] but" in result.output
    with pytest.raises(FeatureFileError, match="given twice"):
        from pyimagesearch_tl.store import read_split

        read_split([folders["lite0"], folders["lite0"]], "training")


def test_a_combined_bundle_predicts_evaluates_and_serves_like_the_concatenation_by_hand(folders, reference, tmp_path):
    """A bundle of lite0 (mirrored views) + lite2 features predicts what its classifier gives for the two
    backbones' vectors of the photo side by side, each decoded at its own input size: lite0's computed here,
    lite2's as the fixture extracted it (in TensorFlow). ``ptl evaluate`` takes the same two folders and
    refuses one; the server (around the same predictor) answers the same label and names both input sizes."""
    from pyimagesearch_tl.serve import create_app

    run("train", "--features", str(folders["lite0_views2"]), "--features", str(folders["lite2"]), "--output",
        str(tmp_path), "--cv", "2")  # fmt: skip
    bundle = Bundle.load(tmp_path / "logreg.skops")
    photo = sorted(folders["dataset"].rglob("*.jpg"))[-1]
    name = photo.relative_to(folders["dataset"]).as_posix()
    lite2 = read_features(folders["lite2"] / f"{name.split('/')[0]}.h5")  # the photo's split
    lite0 = reference("efficientnet_lite0", 2).transform(load_image(photo, 224)[None])
    by_hand = np.hstack([lite0, lite2.features[lite2.paths.index(name)][None]])
    expected = bundle.classifier.predict_proba(by_hand)[0]
    predictor = Predictor(bundle, runtime="tensorflow", top_k=2)
    (prediction,) = predictor.predict([photo])
    np.testing.assert_allclose([dict(prediction.top)[name] for name in bundle.label_names], expected, atol=1e-4)

    output = run("evaluate", "--model", str(tmp_path / "logreg.skops"), "--features", str(folders["lite0_views2"]),
                 "--features", str(folders["lite2"]), "--output", str(tmp_path / "eval"))  # fmt: skip
    assert "accuracy: " in output
    result = CliRunner().invoke(
        cli, ["evaluate", "--model", str(tmp_path / "logreg.skops"), "--features", str(folders["lite2"])]
    )
    assert result.exit_code == 1 and "trained on 2 feature folder(s)" in result.output

    client = create_app(predictor).test_client()
    reply = client.post("/api/predict", data={"file": (photo.open("rb"), photo.name)})
    assert reply.status_code == 200
    assert reply.get_json()["predictions"][0]["label"] == prediction.label
    assert client.get("/health").get_json()["input_size"] == [224, 260]
