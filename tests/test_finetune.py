"""Two-stage fine-tuning on real photos: frozen BatchNorm, whole blocks, restored checkpoint, outputs that load.

The runs are tiny (a few photos, 64 px, one or two epochs per stage): they check the mechanics,
not the accuracy (benchmarks/finetune.py measures that).
"""

import json

import numpy as np
import pytest
from click.testing import CliRunner

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli

keras = pytest.importorskip("keras")
from pyimagesearch_tl import finetune as ft  # noqa: E402  (registers the Preprocess layer)
from pyimagesearch_tl.config import load_config  # noqa: E402
from pyimagesearch_tl.images import load_image  # noqa: E402


def settings_with(**overrides) -> ft.FinetuneSettings:
    """The default configuration's fine-tuning settings, with ``overrides``."""
    return ft.FinetuneSettings.from_config(load_config().replace(**overrides))


SIZE = 64
TINY = [
    "--input-size",
    str(SIZE),
    "--batch-size",
    "8",
    "--head-epochs",
    "1",
    "--finetune-epochs",
    "1",
    "--unfreeze-blocks",
    "2",
    "--seed",
    "7",
]


def run(*args: str, ok: bool = True) -> str:
    result = CliRunner().invoke(cli, list(args), catch_exceptions=False)
    assert (result.exit_code == 0) == ok, result.output
    return result.output


def validation_rows(dataset):
    from pyimagesearch_tl.features import dataset_rows

    return dataset_rows(dataset)["validation"]


@pytest.fixture(scope="module")
def tuned(pipeline_run, tmp_path_factory):
    out = tmp_path_factory.mktemp("finetune")
    output = run("finetune", "--dataset", str(pipeline_run["dataset"]), "--output", str(out), *TINY)
    return out, output


def test_outputs_exist_and_load_back(tuned, pipeline_run):
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
    assert history["stage_boundary"] == 1 and len(history["history"]["val_loss"]) == 2
    assert history["stages"][1]["unfrozen_blocks"] == ["block15", "top"]
    assert {"loss", "accuracy", "auc", "val_loss", "val_accuracy", "val_auc"} <= set(history["history"])

    model = keras.models.load_model(out / "finetune.keras")
    assert model.input.shape[1:] == (SIZE, SIZE, 3) and model.output.shape[-1] == 2
    bundle = Bundle.load(out / "finetune.skops")
    assert bundle.meta.weights == "finetuned" and bundle.meta.input_size == SIZE
    assert bundle.label_names == ["cats", "dogs"] and bundle.novelty is not None


def test_bundle_predicts_exactly_what_the_keras_network_predicts(tuned, pipeline_run):
    """The folded head on the rebuilt backbone equals the saved network: same decoder, preprocessing, weights."""
    from pyimagesearch_tl.prediction import Predictor

    out, _ = tuned
    paths = [pipeline_run["dataset"] / row["path"] for row in validation_rows(pipeline_run["dataset"])]
    network = keras.models.load_model(out / "finetune.keras")
    expected = network.predict(np.stack([load_image(p, SIZE) for p in paths]).astype("float32"), verbose=0)
    predictor = Predictor(Bundle.load(out / "finetune.skops"), batch_size=4)
    results = predictor.predict(paths)
    got = np.array([[dict(r.top)[name] for name in ("cats", "dogs")] for r in results])
    np.testing.assert_allclose(got, expected, atol=2e-4)


def test_the_fine_tuned_bundle_exports_to_one_onnx_graph_equal_to_the_network(tuned, pipeline_run, tmp_path):
    import onnxruntime

    out, _ = tuned
    run("export", "--model", str(out / "finetune.skops"), "--output", str(tmp_path / "finetune.onnx"))
    paths = [pipeline_run["dataset"] / row["path"] for row in validation_rows(pipeline_run["dataset"])]
    pixels = np.stack([load_image(p, SIZE) for p in paths])
    expected = keras.models.load_model(out / "finetune.keras").predict(pixels.astype("float32"), verbose=0)
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


def test_stage_two_trains_exactly_the_chosen_blocks_and_never_batchnorm(pipeline_run):
    """After a real training epoch: BatchNorm (weights and statistics) and frozen blocks unchanged;
    the chosen convolutions moved."""
    from pyimagesearch_tl.backbones import backbone_blocks, create_model

    blocks = backbone_blocks("efficientnet_lite0", create_model("efficientnet_lite0", "none", "avg", SIZE))
    model, base = ft.build_model("efficientnet_lite0", 2, input_size=SIZE)
    chosen = ft.unfreeze_last_blocks(model, base, "efficientnet_lite0", 3)
    assert chosen == ["block14", "block15", "top"]
    batchnorms = [layer for layer in model.layers + base.layers if isinstance(layer, keras.layers.BatchNormalization)]
    assert batchnorms and not any(layer.trainable for layer in batchnorms)
    expected = {
        layer.name
        for name in chosen
        for layer in blocks[name]
        if not isinstance(layer, keras.layers.BatchNormalization)
    }
    assert {layer.name for layer in base.layers if layer.trainable_weights} == expected

    rows = validation_rows(pipeline_run["dataset"])
    images = np.stack([load_image(pipeline_run["dataset"] / row["path"], SIZE) for row in rows]).astype("float32")
    labels = np.eye(2, dtype="float32")[[int(row["label"] == "dogs") for row in rows]]
    before = {v.path: np.array(v) for v in base.weights}
    model.compile(keras.optimizers.Adam(1e-2), "categorical_crossentropy")
    model.fit(images, labels, batch_size=4, epochs=1, verbose=0)
    after = {v.path: np.array(v) for v in base.weights}
    moved = {path for path in before if not np.array_equal(before[path], after[path])}
    chosen_layers = {layer.name for name in chosen for layer in blocks[name]}
    assert moved, "stage 2 trained nothing"
    for layer in base.layers:
        for variable in layer.weights:
            if isinstance(layer, keras.layers.BatchNormalization) or layer.name not in chosen_layers:
                assert variable.path not in moved, f"{variable.path} changed but is frozen"
    assert any("top_conv" in path for path in moved) and any("block14" in path for path in moved)


@pytest.mark.parametrize("backbone", ["vgg16", "resnet50", "mobilenetv2", "efficientnetb0", "efficientnet_lite2"])
def test_whole_blocks_are_unfrozen_for_every_family(backbone):
    from pyimagesearch_tl.backbones import backbone_blocks, create_model

    blocks = backbone_blocks(backbone, create_model(backbone, "none", "avg", 64))
    model, base = ft.build_model(backbone, 3, weights="none", input_size=64)
    chosen = ft.unfreeze_last_blocks(model, base, backbone, 2)
    trainable = {layer.name for layer in base.layers if layer.trainable_weights}
    assert chosen == list(blocks)[-2:]
    assert trainable == {
        layer.name
        for name in chosen
        for layer in blocks[name]
        if not isinstance(layer, keras.layers.BatchNormalization)
    }
    assert trainable  # something is trainable in every family's last blocks


def test_unfreezing_more_blocks_than_exist_is_a_clear_error(pipeline_run, tmp_path):
    output = run(
        "finetune",
        "--dataset",
        str(pipeline_run["dataset"]),
        "--output",
        str(tmp_path),
        *TINY[:-4],
        "--unfreeze-blocks",
        "99",
        "--head-epochs",
        "1",
        ok=False,
    )
    assert "Error: unfreeze_blocks=99 but efficientnet_lite0 has 18 blocks" in output
    assert "Traceback" not in output
    assert not (tmp_path / "checkpoints").exists()  # refused before stage 1 trained, not after it


@pytest.mark.filterwarnings("ignore:Your input ran out of data")  # Keras, at the end of a generator
def test_best_checkpoint_is_restored_and_validation_is_not_augmented(pipeline_run, tmp_path):
    """A wild stage-2 learning rate makes stage 2 worse: the network saved is stage 1's best, exactly.

    Its loss on the un-augmented validation images equals the best validation loss recorded during
    training, which also shows that the validation input was never augmented.
    """
    settings = settings_with(
        input_size=SIZE,
        batch_size=8,
        head_epochs=2,
        finetune_epochs=1,
        finetune_lr=5.0,
        unfreeze_blocks=3,
        augment="strong",
        seed=3,
        runtime="tensorflow",  # the bundle's features in TensorFlow: no conversion of a network used once
    )
    report = ft.finetune(pipeline_run["dataset"], tmp_path, settings)
    history = report.history
    assert history["best"]["stage"] == "head"
    val_loss = history["history"]["val_loss"]
    assert history["best"]["value"] == min(val_loss[:2])
    assert all(not value <= history["best"]["value"] for value in val_loss[2:])  # worse, or NaN

    network = keras.models.load_model(tmp_path / "finetune.keras")
    assert not [layer for layer in network.layers if type(layer).__name__.startswith("Random")]
    rows = validation_rows(pipeline_run["dataset"])
    batches = ft.ImageBatches(
        [pipeline_run["dataset"] / r["path"] for r in rows], [r["label"] == "dogs" for r in rows], 2, SIZE, 8, 10**8
    )
    network.compile(loss="categorical_crossentropy")
    assert network.evaluate(batches.dataset(), verbose=0, return_dict=True)["loss"] == pytest.approx(
        history["best"]["value"], rel=1e-4
    )


def test_augmentation_touches_training_input_only(pipeline_run):
    photos = [pipeline_run["dataset"] / row["path"] for row in validation_rows(pipeline_run["dataset"])][:8]
    batches = ft.ImageBatches(photos, [0] * len(photos), 2, SIZE, 8, 10**8)
    decoded = np.stack([load_image(p, SIZE) for p in photos]).astype("float32")
    ((plain, _),) = list(batches.dataset().as_numpy_iterator())
    np.testing.assert_array_equal(plain, decoded)
    ((augmented, _),) = list(batches.dataset(ft.make_augmenter("strong", seed=1)).as_numpy_iterator())
    assert augmented.shape == decoded.shape and np.abs(augmented - decoded).mean() > 1.0


def test_same_seed_same_run(tuned, pipeline_run, tmp_path):
    """The same settings as the `tuned` run (TINY, through the CLI), again through the API: the same history."""
    settings = settings_with(input_size=SIZE, batch_size=8, head_epochs=1, finetune_epochs=1, unfreeze_blocks=2, seed=7)
    again = ft.finetune(pipeline_run["dataset"], tmp_path, settings).history["history"]
    assert again == json.loads((tuned[0] / "history.json").read_text())["history"]


def test_without_a_validation_split_part_of_training_is_held_out(pipeline_run):
    from pyimagesearch_tl.features import dataset_rows

    training, validation, note = ft.training_rows(pipeline_run["dataset"], "training", "missing", seed=1)
    everything = dataset_rows(pipeline_run["dataset"])["training"]
    assert "held out" in note and len(training) + len(validation) == len(everything)
    assert {r["path"] for r in training}.isdisjoint(r["path"] for r in validation)
    assert {r["label"] for r in validation} == {"cats", "dogs"}  # stratified


@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_ctrl_c_stops_early_and_keeps_the_best_weights_and_corrupt_images_are_skipped(pipeline_run, tmp_path):
    import os
    import shutil
    import signal

    from pyimagesearch_tl.features import dataset_rows

    dataset = shutil.copytree(pipeline_run["dataset"], tmp_path / "dataset")
    victim = dataset / dataset_rows(dataset)["training"][3]["path"]
    victim.write_bytes(victim.read_bytes()[:300])  # a truncated JPEG
    presses = []

    def press_ctrl_c(stage, epoch, logs):
        if epoch == 1:
            presses.append(epoch)
            os.kill(os.getpid(), signal.SIGINT)

    settings = settings_with(
        input_size=SIZE, batch_size=8, head_epochs=3, finetune_epochs=3, seed=5, runtime="tensorflow"
    )
    # As in a terminal's foreground job: Ctrl-C delivered, even where pytest runs in the background
    # (a background job starts with SIGINT ignored, and then fine-tuning rightly leaves it ignored).
    previous = signal.signal(signal.SIGINT, signal.default_int_handler)
    try:
        report = ft.finetune(dataset, tmp_path / "out", settings, on_epoch=press_ctrl_c)
    finally:
        signal.signal(signal.SIGINT, previous)
    assert presses == [1] and report.interrupted
    assert [s["name"] for s in report.history["stages"]] == ["head"]  # stage 2 skipped
    assert report.history["stages"][0]["epochs_run"] <= 2 < settings.head_epochs
    assert Bundle.load(report.bundle_path).meta.weights == "finetuned"
    assert list(report.skipped) == [str(victim)] and report.skipped[str(victim)].startswith("corrupt image")


@pytest.mark.filterwarnings("ignore:Your input ran out of data")
def test_a_keras_applications_backbone_fine_tunes_with_class_weights(pipeline_run, tmp_path):
    """MobileNetV2 (random weights offline, 'tf' preprocessing): the network and its bundle agree."""
    from pyimagesearch_tl.prediction import Predictor

    settings = settings_with(
        backbone="mobilenetv2",
        weights="none",
        input_size=SIZE,
        batch_size=8,
        head_epochs=1,
        finetune_epochs=1,
        unfreeze_blocks=1,
        class_weight="balanced",
        seed=2,
        runtime="tensorflow",
    )
    report = ft.finetune(pipeline_run["dataset"], tmp_path, settings)
    assert report.unfrozen == ["Conv_1"]
    paths = [pipeline_run["dataset"] / row["path"] for row in validation_rows(pipeline_run["dataset"])][:6]
    network = keras.models.load_model(tmp_path / "finetune.keras")
    expected = network.predict(np.stack([load_image(p, SIZE) for p in paths]).astype("float32"), verbose=0)
    results = Predictor(Bundle.load(report.bundle_path), runtime="tensorflow").predict(paths)
    np.testing.assert_allclose([[dict(r.top)[c] for c in ("cats", "dogs")] for r in results], expected, atol=2e-4)


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
