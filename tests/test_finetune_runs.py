"""Two-stage fine-tuning on real photos: frozen BatchNorm, whole blocks, augmentation on training input
only, Ctrl-C on a Keras-applications backbone, clear refusals (the best checkpoint: test_finetune.py).

The runs are tiny (a few photos, 64 px, one or two epochs per stage): they check the mechanics,
not the accuracy (benchmarks/finetune.py measures that).
"""

import json
import os

import numpy as np
import pytest
from conftest import PTL

from pyimagesearch_tl.bundle import Bundle

keras = pytest.importorskip("keras")
from finetune_common import SIZE, TINY, ft, run, validation_rows  # noqa: E402

from pyimagesearch_tl.images import load_image  # noqa: E402


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


#: Each family's last two blocks, by the names of its architecture's layers (not the package's own table).
LAST_BLOCKS = {
    "vgg16": ["block4", "block5"],
    "resnet50": ["conv5_block2", "conv5_block3"],
    "mobilenetv2": ["block_16", "Conv_1"],
    "efficientnetb0": ["block7a", "top"],
    "efficientnet_lite2": ["block20", "top"],
}


@pytest.mark.parametrize("backbone", list(LAST_BLOCKS))
def test_whole_blocks_are_unfrozen_for_every_family(backbone):
    from pyimagesearch_tl.backbones import backbone_blocks, create_model

    blocks = backbone_blocks(backbone, create_model(backbone, "none", "avg", 64))
    model, base = ft.build_model(backbone, 3, weights="none", input_size=64)
    chosen = ft.unfreeze_last_blocks(model, base, backbone, 2)
    trainable = {layer.name for layer in base.layers if layer.trainable_weights}
    assert chosen == list(blocks)[-2:] == LAST_BLOCKS[backbone]
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


def test_augmentation_touches_training_input_only(pipeline_run):
    photos = [pipeline_run["dataset"] / row["path"] for row in validation_rows(pipeline_run["dataset"])][:8]
    batches = ft.ImageBatches(photos, [0] * len(photos), 2, SIZE, 8, 10**8)
    decoded = np.stack([load_image(p, SIZE) for p in photos]).astype("float32")
    ((plain, _),) = list(batches.dataset().as_numpy_iterator())
    np.testing.assert_array_equal(plain, decoded)
    ((augmented, _),) = list(batches.dataset(ft.make_augmenter("strong", seed=1)).as_numpy_iterator())
    assert augmented.shape == decoded.shape and np.abs(augmented - decoded).mean() > 1.0
    # No autotuning thread, whose sleep (up to 60 s) a later garbage collection of the iterator waited out.
    assert batches.dataset().options().autotune.enabled is False


def test_without_a_validation_split_part_of_training_is_held_out(pipeline_run):
    from pyimagesearch_tl.features import dataset_rows

    training, validation, note = ft.training_rows(pipeline_run["dataset"], "training", "missing", seed=1)
    everything = dataset_rows(pipeline_run["dataset"])["training"]
    assert "held out" in note and len(training) + len(validation) == len(everything)
    assert {r["path"] for r in training}.isdisjoint(r["path"] for r in validation)
    assert {r["label"] for r in validation} == {"cats", "dogs"}  # stratified


def test_ctrl_c_stops_early_and_keeps_the_best_weights_and_corrupt_images_are_skipped(pipeline_run, tmp_path):
    """Ctrl-C to a real ``ptl finetune`` once stage 1's first epoch is reported: it stops at the next batch,
    skips stage 2, and saves the best weights so far as a bundle; a corrupt photo is skipped, with the reason.

    The run is also the Keras-applications case (test_finetune's run is EfficientNet-Lite's): MobileNetV2,
    random weights offline, 'tf' preprocessing, with class weights; its bundle predicts what its network does.

    A process of its own, as a user's: SIGINT raised inside a test worker after eight other test files had
    run in it (runtimes, locks, novelty, ...) crashed it with a segmentation fault in native code, which
    took the pytest-xdist run down with it."""
    import shutil
    import signal
    import subprocess
    import threading

    from pyimagesearch_tl.features import dataset_rows

    dataset = shutil.copytree(pipeline_run["dataset"], tmp_path / "dataset")
    victim = dataset / dataset_rows(dataset)["training"][3]["path"]
    victim.write_bytes(victim.read_bytes()[:300])  # a truncated JPEG
    out = tmp_path / "out"
    command = [*PTL, "finetune", "--dataset",
               str(dataset), "--output", str(out), *TINY[:-8], "--head-epochs", "20", "--patience", "20",
               "--finetune-epochs", "3", "--seed", "5", "--runtime", "tensorflow", "--backbone", "mobilenetv2",
               "--weights", "none", "--class-weight", "balanced"]  # fmt: skip
    # As in a terminal's foreground job: Ctrl-C delivered, even where pytest runs in the background.
    with (tmp_path / "stderr.txt").open("w+") as stderr:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=stderr,
            text=True,
            env=dict(os.environ, PYTHONUNBUFFERED="1"),
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
        )
        timer = threading.Timer(300, process.kill)  # a run that stalls fails the test, it does not hang it
        timer.start()
        lines = []
        for line in process.stdout:
            lines.append(line)
            if line.startswith("head") and line.split()[2] == "1":  # 'head     epoch   1  loss ...'
                process.send_signal(signal.SIGINT)
                break
        lines += process.stdout.readlines()
        process.wait()
        timer.cancel()
        stderr.seek(0)
        errors = stderr.read()
    assert process.returncode == 0, "".join(lines) + errors
    assert "interrupted: training stopped early; the best weights so far are saved" in errors
    assert f"skipped {victim}: corrupt image" in errors
    history = json.loads((out / "history.json").read_text())
    assert [s["name"] for s in history["stages"]] == ["head"]  # stage 2 skipped
    assert 1 <= history["stages"][0]["epochs_run"] < 20  # stopped at the Ctrl-C, long before stage 1's end
    bundle = Bundle.load(out / "finetune.skops")
    assert bundle.meta.weights == "finetuned" and bundle.meta.backbone == "mobilenetv2"

    from pyimagesearch_tl.prediction import Predictor

    paths = [dataset / row["path"] for row in validation_rows(dataset)][:6]
    network = keras.models.load_model(out / "finetune.keras")
    [backbone] = [layer for layer in network.layers if isinstance(layer, keras.Model)]
    weights = backbone.get_weights()  # the run's own random draw: no other build would give the same
    assert len(bundle.backbone_weights) == len(weights)
    assert all(np.array_equal(a, b) for a, b in zip(bundle.backbone_weights, weights))
    expected = network.predict(np.stack([load_image(p, SIZE) for p in paths]).astype("float32"), verbose=0)
    results = Predictor(bundle, runtime="tensorflow").predict(paths)
    np.testing.assert_allclose([[dict(r.top)[c] for c in ("cats", "dogs")] for r in results], expected, atol=2e-4)
