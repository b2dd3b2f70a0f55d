"""A fine-tuned bundle on real photos: its outputs load, the best checkpoint is what it saved, it predicts
what its network predicts, it exports, serves, evaluates and compares, and the same seed gives the same
run (the mechanics of a run are in test_finetune_runs.py: two files, so that pytest-xdist can run them
side by side).
"""

import json

import numpy as np
import pytest

from pyimagesearch_tl.bundle import Bundle

keras = pytest.importorskip("keras")
from finetune_common import SIZE, TINY_SETTINGS, ft, options, run, settings_with, validation_rows  # noqa: E402

from pyimagesearch_tl.images import load_image  # noqa: E402

#: The run every test here shares: two head epochs, then a stage 2 whose wild learning rate makes it worse
#: (so the network saved must be stage 1's best), with strong augmentation and balanced class weights.
RUN = dict(TINY_SETTINGS, head_epochs=2, finetune_lr=5.0, augment="strong", class_weight="balanced")


@pytest.fixture(scope="module")
def tuned(pipeline_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    output = run("finetune", "--dataset", str(pipeline_run["dataset"]), "--output", str(out), *options(RUN))
    return out, output


@pytest.fixture(scope="module")
def network(tuned):
    """The saved Keras network of the run, loaded once."""
    return keras.models.load_model(tuned[0] / "finetune.keras")


@pytest.fixture(scope="module")
def validation(pipeline_run, network):
    """The validation photos, their decoded pixels, and what the saved network predicts for them."""
    paths = [pipeline_run["dataset"] / row["path"] for row in validation_rows(pipeline_run["dataset"])]
    pixels = np.stack([load_image(p, SIZE) for p in paths])
    return paths, pixels, network.predict(pixels.astype("float32"), verbose=0)


def test_outputs_exist_and_load_back(tuned, network):
    out, output = tuned
    assert "stage 2 unfroze: block15, top" in output
    for name in (
        "finetune.keras",
        "finetune.skops",
        "history.json",
        "curve_loss.png",
        "curve_accuracy.png",
        "curve_auc.png",
        "checkpoints/best.weights.h5",
    ):
        assert (out / name).is_file(), name
    for curve in out.glob("curve_*.png"):
        assert curve.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    history = json.loads((out / "history.json").read_text())
    assert [s["name"] for s in history["stages"]] == ["head", "finetune"]
    assert history["stage_boundary"] == 2 and len(history["history"]["val_loss"]) == 3
    assert history["stages"][1]["unfrozen_blocks"] == ["block15", "top"]
    assert {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"} <= set(history["history"])

    assert network.input.shape[1:] == (SIZE, SIZE, 3) and network.output.shape[-1] == 2
    assert not [layer for layer in network.layers if type(layer).__name__.startswith("Random")]  # no augmentation
    bundle = Bundle.load(out / "finetune.skops")
    assert bundle.meta.weights == "finetuned" and bundle.meta.input_size == SIZE
    assert bundle.label_names == ["cats", "dogs"] and bundle.novelty is not None


@pytest.mark.filterwarnings("ignore:Your input ran out of data")  # Keras, at the end of a generator
def test_the_best_checkpoint_is_restored_and_validation_is_not_augmented(tuned, network, validation, pipeline_run):
    """Stage 2's wild learning rate made it worse: the network saved is stage 1's best, exactly. Its loss
    on the un-augmented validation photos equals the best validation loss recorded during training, which
    also shows that the validation input was never augmented."""
    out, _ = tuned
    history = json.loads((out / "history.json").read_text())
    assert history["best"]["stage"] == "head"
    val_loss = history["history"]["val_loss"]
    assert history["best"]["value"] == min(val_loss[:2])
    assert all(not value <= history["best"]["value"] for value in val_loss[2:])  # worse, or NaN
    paths, _, _ = validation
    labels = [row["label"] == "dogs" for row in validation_rows(pipeline_run["dataset"])]
    batches = ft.ImageBatches(paths, labels, 2, SIZE, 8, 10**8)
    network.compile(loss="categorical_crossentropy")
    assert network.evaluate(batches.dataset(), verbose=0, return_dict=True)["loss"] == pytest.approx(
        history["best"]["value"], rel=1e-4
    )


def test_bundle_predicts_exactly_what_the_keras_network_predicts(tuned, validation):
    """The folded head on the rebuilt backbone equals the saved network: same decoder, preprocessing, weights."""
    from pyimagesearch_tl.prediction import Predictor

    out, _ = tuned
    paths, _, expected = validation
    predictor = Predictor(Bundle.load(out / "finetune.skops"), batch_size=4)
    results = predictor.predict(paths)
    got = np.array([[dict(r.top)[name] for name in ("cats", "dogs")] for r in results])
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_the_fine_tuned_bundle_exports_to_one_onnx_graph_equal_to_the_network(tuned, validation, tmp_path):
    import onnxruntime

    out, _ = tuned
    run("export", "--model", str(out / "finetune.skops"), "--output", str(tmp_path / "finetune.onnx"))
    _, pixels, expected = validation
    session = onnxruntime.InferenceSession(str(tmp_path / "finetune.onnx"))
    labels, probabilities = session.run(None, {"pixels": pixels})
    np.testing.assert_allclose(probabilities, expected, atol=2e-4)
    assert labels.tolist() == expected.argmax(axis=1).tolist()
    assert json.loads(session.get_modelmeta().custom_metadata_map["label_names"]) == ["cats", "dogs"]


def test_predict_evaluate_serve_and_compare_accept_the_bundle(tuned, pipeline_run, tmp_path):
    from pyimagesearch_tl.prediction import Predictor
    from pyimagesearch_tl.serve import create_app

    out, _ = tuned
    bundle_path = str(out / "finetune.skops")
    photo = pipeline_run["dataset"] / validation_rows(pipeline_run["dataset"])[0]["path"]
    output = run("predict", "--model", bundle_path, str(photo))
    assert "predicted 1" in output

    evaluation = tmp_path / "run" / "evaluation"
    output = run(
        "evaluate", "--model", bundle_path, "--dataset", str(pipeline_run["dataset"]), "--output", str(evaluation)
    )
    metrics = json.loads((evaluation / "finetune" / "metrics.json").read_text())
    assert metrics["split"] == "validation" and metrics["kind"] == "fine-tuned"
    assert metrics["images"] == len(validation_rows(pipeline_run["dataset"]))
    assert metrics["model_bytes"] == (out / "finetune.skops").stat().st_size and metrics["train_seconds"] > 0

    run("train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path / "run" / "models"), "--cv", "3")
    run(
        "evaluate",
        "--model",
        str(tmp_path / "run" / "models" / "logreg.skops"),
        "--features",
        str(pipeline_run["features"]),
        "--output",
        str(evaluation),
    )
    output = run("compare", "--output", str(tmp_path / "run"))
    lines = (tmp_path / "run" / "comparison.csv").read_text().splitlines()
    assert lines[0].startswith("model,kind,backbone,split,images,accuracy,roc_auc,macro_f1,train_seconds,model_mb")
    assert sorted(line.split(",")[1] for line in lines[1:]) == ["features + classifier", "fine-tuned"]
    assert (tmp_path / "run" / "comparison.png").read_bytes()[:4] == b"\x89PNG"
    assert "warning" not in output  # same split, same images

    predictor = Predictor(Bundle.load(bundle_path))
    (expected,) = predictor.predict([photo])
    client = create_app(predictor).test_client()
    reply = client.post("/api/predict", data={"file": (photo.open("rb"), photo.name)})
    assert reply.status_code == 200
    answer = reply.get_json()["predictions"][0]
    assert answer["label"] == expected.label
    assert answer["probability"] == pytest.approx(expected.score, abs=1e-6)


def test_same_seed_same_run(tuned, pipeline_run, tmp_path):
    """The settings of the `tuned` run (through the CLI), again through the API: the same history (NaN, where
    stage 2's learning rate made the loss overflow, compared equal)."""
    again = ft.finetune(pipeline_run["dataset"], tmp_path, settings_with(**RUN)).history["history"]
    np.testing.assert_equal(again, json.loads((tuned[0] / "history.json").read_text())["history"])


def test_the_fine_tuned_head_is_a_scikit_learn_classifier(tuned, pipeline_run):
    """is_classifier, tags, clone and score work on the head of a real fine-tuned bundle."""
    from sklearn.base import clone, is_classifier
    from sklearn.utils import get_tags

    from pyimagesearch_tl.classifiers import DenseHead
    from pyimagesearch_tl.evaluation import evaluate, features_for

    out, _ = tuned
    bundle = Bundle.load(out / "finetune.skops")
    head = bundle.classifier
    assert isinstance(head, DenseHead)
    assert is_classifier(head) and get_tags(head).estimator_type == "classifier"
    assert head.get_params()["kernel"] is head.kernel
    features, _ = features_for(bundle, "validation", (), pipeline_run["dataset"], batch_size=8, runtime="tensorflow")
    copy = clone(head)
    assert copy is not head
    np.testing.assert_array_equal(copy.predict_proba(features.features), head.predict_proba(features.features))
    assert head.score(features.features, features.labels) == pytest.approx(evaluate(bundle, features)["accuracy"])


def test_evaluating_on_a_dataset_of_other_classes_is_refused_before_the_backbone(tuned, cats_dogs, tmp_path):
    """A dataset with a class the model does not know: a DatasetError naming it and the model's classes,
    before any image goes through the network (not a KeyError after the whole split has)."""
    import shutil

    import pyimagesearch_tl as ptl
    from pyimagesearch_tl.errors import DatasetError
    from pyimagesearch_tl.evaluation import features_for

    photos = shutil.copytree(cats_dogs, tmp_path / "photos")
    for split in ("train", "validation"):
        (photos / split / "dogs").rename(photos / split / "wolves")
    dataset = ptl.build_dataset(photos, tmp_path / "dataset", split_fractions=[0.75, 0.15, 0.10]).path
    out, _ = tuned
    bundle_path = out / "finetune.skops"
    bundle = Bundle.load(bundle_path)

    with pytest.raises(DatasetError) as error:
        features_for(bundle, "validation", (), dataset, batch_size=8, runtime="tensorflow")
    message = str(error.value)
    assert "class(es) the model was not trained on: 'wolves'; the model's classes are 'cats', 'dogs'" in message

    output = run(
        "evaluate", "--model", str(bundle_path), "--dataset", str(dataset), "--output", str(tmp_path / "e"), ok=False
    )
    assert output.strip().splitlines() == [f"Error: {message}"]
    assert not (tmp_path / "e").exists()
