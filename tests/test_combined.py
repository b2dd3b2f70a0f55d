"""Mirrored views and combined backbones (several feature folders), on real photos."""

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
from pyimagesearch_tl.store import WRITERS, read_features, read_fingerprint, read_meta

SPLITS = ["training", "validation", "evaluation"]


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


@pytest.fixture(scope="module")
def folders(pipeline_run, tmp_path_factory):
    """The shared lite0 features, plus lite0 with mirrored views and lite2, from the same dataset."""
    work = tmp_path_factory.mktemp("combined")
    dataset = pipeline_run["dataset"]
    for name, options in (("lite0_views2", dict(views=2)), ("lite2", dict(backbone="efficientnet_lite2"))):
        options = dict(dict(backbone="efficientnet_lite0"), **options)
        extract_dataset(dataset, work / name, splits=SPLITS, batch_size=16, progress=False, **options)
    return dict(work=work, dataset=dataset, lite0=pipeline_run["features"], lite0_views2=work / "lite0_views2",
                lite2=work / "lite2")  # fmt: skip


def _copy(folder, target, transform):
    """A copy of a feature folder whose training file is rewritten by ``transform(FeatureSet)``."""
    shutil.copytree(folder, target)
    path = target / "training.h5"
    features, fingerprint = transform(read_features(path)), read_fingerprint(path)
    path.unlink()
    writer = WRITERS["hdf5"](path, features.meta, fingerprint)
    writer.append(features.features, features.labels, features.paths, features.sha256, [])
    writer.finish()
    return target


def test_mirrored_views_are_the_mean_of_the_image_and_its_mirror(folders):
    stored = read_features(folders["lite0_views2"] / "training.h5")
    pixels = np.stack([load_image(folders["dataset"] / p, 224) for p in stored.paths[:6]])
    single = FeatureExtractor("efficientnet_lite0", runtime="tensorflow")
    both = FeatureExtractor("efficientnet_lite0", runtime="tensorflow", views=2)
    by_hand = (single.transform(pixels) + single.transform(np.ascontiguousarray(pixels[:, :, ::-1]))) / 2
    np.testing.assert_allclose(both.transform(pixels), by_hand, atol=1e-5)
    np.testing.assert_allclose(stored.features[:6], by_hand, atol=1e-4)  # what extract stored (runtime auto)
    assert np.abs(by_hand - single.transform(pixels)).max() > 0.01  # the mirror does change the vectors
    assert stored.meta.views == 2 and read_meta(folders["lite0"] / "training.h5").views == 1


def test_views_are_part_of_the_feature_layout(folders, tmp_path):
    run("train", "--features", str(folders["lite0"]), "--output", str(tmp_path), "--cv", "2")
    bundle = Bundle.load(tmp_path / "logreg.joblib")
    with pytest.raises(BundleError, match="views=2 but the reference has 1"):
        bundle.check_features(read_meta(folders["lite0_views2"] / "training.h5"), "the mirrored features")
    mixed = tmp_path / "mixed"
    shutil.copytree(folders["lite0"], mixed)
    output = run("extract", "--dataset", str(folders["dataset"]), "--output", str(mixed), "--views", "2")
    assert "up to date" not in output  # other views: extracted again, never mixed with the old vectors
    assert read_meta(mixed / "training.h5").views == 2


def test_training_on_two_folders_aligns_rows_by_image_not_position(folders, tmp_path):
    shuffled = _copy(
        folders["lite2"],
        tmp_path / "lite2_shuffled",
        lambda s: _rows(s, np.random.default_rng(0).permutation(len(s.labels))),
    )
    for name, second in (("a", folders["lite2"]), ("b", shuffled)):
        run("train", "--features", str(folders["lite0"]), "--features", str(second), "--output", str(tmp_path / name),
            "--cv", "2")  # fmt: skip
    a, b = (Bundle.load(tmp_path / name / "logreg.joblib") for name in ("a", "b"))
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


def test_a_combined_bundle_predicts_evaluates_and_serves_like_the_concatenation_by_hand(folders, tmp_path):
    from pyimagesearch_tl.serve import create_app

    run("train", "--features", str(folders["lite0_views2"]), "--features", str(folders["lite2"]), "--output",
        str(tmp_path), "--cv", "2")  # fmt: skip
    bundle = Bundle.load(tmp_path / "logreg.joblib")
    photo = sorted(folders["dataset"].rglob("*.jpg"))[-1]
    lite0 = FeatureExtractor("efficientnet_lite0", runtime="tensorflow", views=2)
    lite2 = FeatureExtractor("efficientnet_lite2", runtime="tensorflow")
    by_hand = np.hstack([lite0.transform(load_image(photo, 224)[None]), lite2.transform(load_image(photo, 260)[None])])
    expected = bundle.classifier.predict_proba(by_hand)[0]
    (prediction,) = Predictor(bundle, runtime="tensorflow", top_k=2).predict([photo])
    np.testing.assert_allclose([dict(prediction.top)[name] for name in bundle.label_names], expected, atol=1e-4)

    output = run("evaluate", "--model", str(tmp_path / "logreg.joblib"), "--features", str(folders["lite0_views2"]),
                 "--features", str(folders["lite2"]), "--output", str(tmp_path / "eval"))  # fmt: skip
    assert "accuracy: " in output
    result = CliRunner().invoke(
        cli, ["evaluate", "--model", str(tmp_path / "logreg.joblib"), "--features", str(folders["lite2"])]
    )
    assert result.exit_code == 1 and "trained on 2 feature folder(s)" in result.output

    client = create_app(Predictor(bundle)).test_client()
    reply = client.post("/api/predict", data={"file": (photo.open("rb"), photo.name)})
    assert reply.status_code == 200
    assert reply.get_json()["predictions"][0]["label"] == prediction.label
    assert client.get("/health").get_json()["input_size"] == [224, 260]
