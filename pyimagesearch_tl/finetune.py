"""Two-stage fine-tuning: a new head on the frozen backbone, then its last blocks unfrozen.

Stage 1 ("head") trains ``global pooling -> BatchNorm -> Dropout -> Dense softmax`` on top of the
frozen pretrained backbone. Stage 2 ("finetune") unfreezes the backbone's last K blocks, whole
blocks as the backbone names them (:func:`~pyimagesearch_tl.backbones.backbone_blocks`), and
trains on with a lower learning rate. Every BatchNormalization layer stays frozen and in
inference mode: the backbone is called with ``training=False`` and no BatchNormalization layer is
ever made trainable, so a small batch never overwrites the ImageNet statistics.

Both stages stop early when the monitored validation metric stops improving and checkpoint the
best weights; after each stage the best checkpoint so far is restored, so stage 2 keeps stage 1's
weights unless it beats them. Class weights counter imbalance; accuracy and ROC AUC are tracked.

Images come from the dataset's manifest through the shared decoder
(:func:`pyimagesearch_tl.images.load_image`), batch by batch from disk every epoch, so memory does
not grow with the dataset. Augmentation (Keras preprocessing layers) is mapped over the training
input only: the validation input and the saved network contain none.

Outputs, in the output folder:

* ``finetune.keras``: the whole network, 0-255 RGB float images in, class probabilities out
  (``import pyimagesearch_tl.finetune`` before ``keras.models.load_model``: it registers the
  preprocessing layer);
* ``finetune.skops``: a bundle (fine-tuned backbone weights, the head as a :class:`DenseHead`,
  the novelty detector) that ``ptl predict``, ``ptl evaluate`` and ``ptl serve`` accept;
* ``history.json``, ``curve_loss.png``, ``curve_accuracy.png``, ``curve_auc.png``;
* ``checkpoints/best.weights.h5``.
"""

from __future__ import annotations

import dataclasses
import time
import warnings
from pathlib import Path
from typing import Callable, Sequence

import keras
import numpy as np

from .atomic import atomic_path, atomic_write_json
from .backbones import backbone_blocks, create_model, get_backbone, preprocess_input
from .bundle import BUNDLE_SUFFIX, Bundle
from .classifiers import DenseHead
from .errors import ConfigError, DatasetError
from .features import FeatureExtractor, dataset_rows, decode_batches, extract_in_memory, interrupt_after_batch
from .images import SQUASH, Resize
from .layouts import stratified_split
from .locks import locks_output
from .metrics import roc_auc
from .novelty import fit_detector
from .plots import new_figure, save_figure

KERAS_MODEL = "finetune.keras"
BUNDLE = f"finetune{BUNDLE_SUFFIX}"
HISTORY = "history.json"
CHECKPOINT = "checkpoints/best.weights.h5"
CURVES = ("loss", "accuracy", "auc")
#: Share of the training split held out for early stopping when the dataset has no validation split.
HOLDOUT = 0.15


@keras.saving.register_keras_serializable(package="pyimagesearch_tl")
class Preprocess(keras.layers.Layer):
    """A backbone's ``preprocess_input`` as a layer, so the saved network takes 0-255 RGB images."""

    def __init__(self, mode: str, **kwargs):
        super().__init__(**kwargs)
        self.mode = mode

    def call(self, images):
        return preprocess_input(images, self.mode)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


def _light(seed):
    layers = keras.layers
    return [
        layers.RandomFlip("horizontal", seed=seed),
        layers.RandomRotation(0.05, seed=seed),
        layers.RandomZoom(0.1, seed=seed),
    ]


def _strong(seed):
    layers = keras.layers
    return [
        layers.RandomFlip("horizontal", seed=seed),
        layers.RandomRotation(0.1, seed=seed),
        layers.RandomZoom(0.2, seed=seed),
        layers.RandomTranslation(0.1, 0.1, seed=seed),
        layers.RandomBrightness(0.2, value_range=(0, 255), seed=seed),
        layers.RandomContrast(0.2, value_range=(0, 255), seed=seed),
    ]


#: ``--augment`` levels: each builds the list of Keras preprocessing layers applied to training images.
AUGMENTATIONS: dict[str, Callable[[int], list]] = {"none": lambda seed: [], "light": _light, "strong": _strong}


def make_augmenter(level: str, seed: int):
    """A ``keras.Sequential`` of random layers for ``level``, or None for ``"none"``."""
    if level not in AUGMENTATIONS:
        raise ConfigError(f"unknown augmentation {level!r}; choose one of: {', '.join(AUGMENTATIONS)}")
    layers = AUGMENTATIONS[level](seed)
    return keras.Sequential(layers, name=f"augment_{level}") if layers else None


# --- the network ---------------------------------------------------------------------------------


def build_model(
    backbone: str,
    n_classes: int,
    weights="imagenet",
    input_size: int | None = None,
    dropout: float = 0.2,
    batchnorm: bool = True,
):
    """The network to fine-tune and its backbone (frozen): image -> preprocess -> backbone -> head.

    Returns
    -------
    model : keras.Model
        Takes ``(N, size, size, 3)`` float 0-255 RGB, returns class probabilities.
    base : keras.Model
        The headless, average-pooled backbone inside ``model``.
    """
    record = get_backbone(backbone)
    size = input_size or record.input_size
    base = create_model(backbone, weights, "avg", size)
    base.trainable = False
    inputs = keras.Input((size, size, 3), name="image")
    x = Preprocess(record.preprocessing, name="preprocess")(inputs)
    x = base(x, training=False)  # BatchNormalization in inference mode, whatever fit() says
    if batchnorm:
        x = keras.layers.BatchNormalization(name="head_bn")(x)
    x = keras.layers.Dropout(dropout, name="head_dropout")(x)
    outputs = keras.layers.Dense(n_classes, activation="softmax", name="head_predictions")(x)
    return keras.Model(inputs, outputs, name=f"{backbone}_finetuned"), base


def blocks_to_unfreeze(base, backbone: str, count: int) -> dict:
    """The blocks of ``base`` by name, once ``count`` is known to be at most their number (a
    :class:`ConfigError` naming them otherwise): checked before stage 1, not after it."""
    frozen, base.trainable = not base.trainable, True  # a frozen layer shows no trainable weights
    try:
        blocks = backbone_blocks(backbone, base)
    finally:
        base.trainable = not frozen
    if count > len(blocks):
        raise ConfigError(f"unfreeze_blocks={count} but {backbone} has {len(blocks)} blocks ({', '.join(blocks)})")
    return blocks


def unfreeze_last_blocks(model, base, backbone: str, count: int) -> list[str]:
    """Make the last ``count`` blocks of ``base`` trainable, except BatchNormalization layers.

    Every other backbone layer, and the head's BatchNormalization, is frozen. Returns the names
    of the unfrozen blocks.
    """
    base.trainable = True
    blocks = blocks_to_unfreeze(base, backbone, count)
    chosen = list(blocks)[-count:]
    for layer in base.layers:
        layer.trainable = False
    for name in chosen:
        for layer in blocks[name]:
            layer.trainable = not isinstance(layer, keras.layers.BatchNormalization)
    for layer in model.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return chosen


def dense_head(model) -> DenseHead:
    """The trained head of ``model`` (BatchNorm folded in) as a NumPy classifier."""
    names = {layer.name for layer in model.layers}
    batchnorm = model.get_layer("head_bn") if "head_bn" in names else None
    return DenseHead.from_layers(
        model.get_layer("head_predictions").get_weights(),
        batchnorm.get_weights() if batchnorm is not None else None,
        batchnorm.epsilon if batchnorm is not None else 0.0,
    )


# --- the input -----------------------------------------------------------------------------------


class ImageBatches:
    """``(images, one-hot labels)`` batches decoded from disk; a new seeded order every call when shuffled.

    Callable without arguments, as ``tf.data.Dataset.from_generator`` wants: Keras iterates the
    dataset once per epoch, which calls this again. Images the decoder refuses are dropped and
    collected in :attr:`skipped`.
    """

    def __init__(
        self,
        paths: Sequence[Path],
        labels: Sequence[int],
        n_classes: int,
        size: int,
        batch_size: int,
        max_pixels: int,
        seed: int | None = None,
        resize: Resize = SQUASH,
    ):
        self.paths, self.labels = list(paths), np.asarray(labels, dtype=np.int64)
        self.n_classes, self.size, self.batch_size, self.max_pixels = n_classes, size, batch_size, max_pixels
        self.seed, self.epoch, self.resize = seed, 0, resize
        self.skipped: dict[str, str] = {}

    def __call__(self):
        order = np.arange(len(self.paths))
        if self.seed is not None:
            order = np.random.default_rng(self.seed + self.epoch).permutation(len(self.paths))
            self.epoch += 1
        paths = [self.paths[i] for i in order]
        for batch in decode_batches(paths, self.size, self.batch_size, self.max_pixels, resize=self.resize):
            self.skipped.update((str(paths[i]), reason) for i, reason in batch.skipped)
            if batch.indices:
                labels = self.labels[order[batch.indices]]
                yield batch.images, np.eye(self.n_classes, dtype=np.float32)[labels]

    def dataset(self, augmenter=None):
        """A ``tf.data.Dataset`` of float 0-255 images; ``augmenter`` (training only) is mapped over it.

        The augmenter runs on whole batches, one batch at a time, so its random draws come in a
        fixed order and a seeded run repeats exactly. tf.data's autotuning is off: the pipeline has no
        knob for it to tune, and its model thread sleeps up to 60 s between rounds, a sleep that the
        iterator's destructor waits out. Keras leaves the iterators of a fit to the garbage collector,
        so a later collection anywhere in the process froze for that long (measured: 5.3 s with 0.6 s
        of CPU after a 3-epoch run; 50 s in the test suite); without the thread, 0.6 s of CPU.
        """
        import tensorflow as tf

        spec = (
            tf.TensorSpec((None, self.size, self.size, 3), tf.uint8),
            tf.TensorSpec((None, self.n_classes), tf.float32),
        )
        data = tf.data.Dataset.from_generator(self, output_signature=spec)
        data = data.map(lambda x, y: (tf.cast(x, tf.float32), y))
        if augmenter is not None:
            data = data.map(lambda x, y: (augmenter(x, training=True), y))
        options = tf.data.Options()
        options.autotune.enabled = False
        return data.prefetch(2).with_options(options)


# --- training ------------------------------------------------------------------------------------


@dataclasses.dataclass
class FinetuneSettings:
    """The knobs of :func:`finetune`: the config keys of the same names, whose defaults are in
    :data:`pyimagesearch_tl.config.DEFAULTS` (build it with :meth:`from_config`)."""

    backbone: str
    weights: str
    input_size: int | None
    resize: str | None  # how images meet the input (images.RESIZE_MODES); None: the backbone's own
    head_epochs: int
    finetune_epochs: int
    unfreeze_blocks: int
    head_lr: float
    finetune_lr: float
    augment: str
    monitor: str
    patience: int
    head_dropout: float
    head_batchnorm: bool
    batch_size: int
    class_weight: str
    seed: int
    max_image_pixels: int
    unknown: str
    unknown_keep: float
    runtime: str  # where the fine-tuned backbone computes the features the "unknown" detector is fitted on

    @classmethod
    def from_config(cls, config) -> "FinetuneSettings":
        """The settings of a :class:`~pyimagesearch_tl.config.Config` (every field is a config key)."""
        return cls(**{field.name: getattr(config, field.name) for field in dataclasses.fields(cls)})

    @property
    def mode(self) -> str:
        return "min" if self.monitor == "val_loss" else "max"


@dataclasses.dataclass
class FinetuneReport:
    output_dir: Path
    model_path: Path
    bundle_path: Path
    history: dict
    validation_accuracy: float
    validation_auc: float | None
    seconds: float
    unfrozen: list[str]
    holdout: str
    skipped: dict[str, str]
    interrupted: bool = False


class _EpochReport(keras.callbacks.Callback):
    """Times each epoch and passes ``(stage, epoch, logs)`` to the caller's ``on_epoch``."""

    def __init__(self, stage: str, first_epoch: int, on_epoch):
        super().__init__()
        self.stage, self.first_epoch, self.on_epoch, self.seconds = stage, first_epoch, on_epoch, []

    def on_epoch_begin(self, epoch, logs=None):
        self.started = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self.seconds.append(time.perf_counter() - self.started)
        if self.on_epoch is not None:
            self.on_epoch(self.stage, self.first_epoch + epoch + 1, dict(logs or {}))


def _stop_if(model, requested: bool) -> None:
    if requested:
        model.stop_training = True


def _improves(value: float, best: float | None, mode: str) -> bool:
    return best is None or (value < best if mode == "min" else value > best)


def _fit_stage(
    model,
    stage: str,
    train_data,
    validation_data,
    epochs: int,
    lr: float,
    settings: FinetuneSettings,
    checkpoint: Path,
    best: float | None,
    class_weight,
    first_epoch: int,
    on_epoch,
    interrupted: Callable[[], bool],
) -> tuple[dict, list[float]]:
    """Compile with ``lr``, fit with early stopping and best-only checkpointing; return history and epoch times.

    The checkpoint is written only when the monitored value beats ``best`` (the best of earlier
    stages), so after the stage it holds the best weights of the whole run.
    """
    model.compile(
        optimizer=keras.optimizers.Adam(lr),
        loss="categorical_crossentropy",
        metrics=[keras.metrics.CategoricalAccuracy(name="accuracy"), keras.metrics.AUC(name="auc")],
    )
    report = _EpochReport(stage, first_epoch, on_epoch)
    callbacks = [
        keras.callbacks.EarlyStopping(settings.monitor, mode=settings.mode, patience=settings.patience),
        keras.callbacks.ModelCheckpoint(
            str(checkpoint),
            settings.monitor,
            mode=settings.mode,
            save_best_only=True,
            save_weights_only=True,
            initial_value_threshold=best,
        ),
        report,
        keras.callbacks.LambdaCallback(on_train_batch_end=lambda batch, logs: _stop_if(model, interrupted())),
    ]
    with warnings.catch_warnings():  # the generator's length is unknown to Keras: it ends each epoch
        warnings.filterwarnings("ignore", message="Your input ran out of data")
        history = model.fit(
            train_data,
            validation_data=validation_data,
            epochs=epochs,
            class_weight=class_weight,
            callbacks=callbacks,
            shuffle=False,
            verbose=0,
        )
    return {k: [float(v) for v in values] for k, values in history.history.items()}, report.seconds


def training_rows(dataset_dir: Path, training_split: str, validation_split: str | None, seed: int):
    """Training and validation manifest rows; without a validation split, a stratified hold-out of training."""
    by_split = dataset_rows(dataset_dir)
    training = by_split.get(training_split, [])
    if not training:
        raise DatasetError(
            f"dataset {dataset_dir} has no {training_split!r} split (it has: {', '.join(by_split) or 'none'})"
        )
    validation = by_split.get(validation_split or "", [])
    if validation:
        return training, validation, f"the {validation_split} split"
    assignment = stratified_split([row["label"] for row in training], [1 - HOLDOUT, HOLDOUT], seed)
    held_out = [row for row, part in zip(training, assignment) if part == 1]
    if not held_out:
        raise DatasetError(
            f"dataset {dataset_dir}: too few {training_split} images to hold {HOLDOUT:.0%} out for validation"
        )
    return (
        [row for row, part in zip(training, assignment) if part == 0],
        held_out,
        f"{HOLDOUT:.0%} of the {training_split} split held out (no {validation_split or 'validation'} split)",
    )


@locks_output("output_dir")
def finetune(
    dataset_dir: str | Path,
    output_dir: str | Path,
    settings: FinetuneSettings,
    *,
    training_split: str = "training",
    validation_split: str | None = "validation",
    on_epoch: Callable[[str, int, dict], None] | None = None,
) -> FinetuneReport:
    """Fine-tune ``settings.backbone`` on the dataset in two stages and write the outputs.

    Parameters
    ----------
    dataset_dir : path
        A dataset written by ``build-dataset`` (its manifest names splits and labels).
    output_dir : path
        Where the network, the bundle, the history and the curves go.
    settings : FinetuneSettings
    training_split, validation_split : str
        Split names; without a validation split, 15% of the training split is held out.
    on_epoch : callable, optional
        Called after every epoch with the stage name, the epoch number (counted across both
        stages) and Keras' logs.
    """
    from sklearn.preprocessing import LabelEncoder
    from sklearn.utils.class_weight import compute_class_weight

    dataset_dir, output_dir = Path(dataset_dir), Path(output_dir)
    started = time.perf_counter()
    keras.utils.set_random_seed(settings.seed)
    training, validation, holdout = training_rows(dataset_dir, training_split, validation_split, settings.seed)
    encoder = LabelEncoder().fit(sorted({row["label"] for row in training + validation}))
    names = [str(c) for c in encoder.classes_]
    if len(names) < 2:
        raise DatasetError(f"dataset {dataset_dir}: fine-tuning needs at least 2 classes, found {names}")
    model, base = build_model(
        settings.backbone,
        len(names),
        settings.weights,
        settings.input_size,
        settings.head_dropout,
        settings.head_batchnorm,
    )
    if settings.finetune_epochs:
        blocks_to_unfreeze(base, settings.backbone, settings.unfreeze_blocks)
    size, resize = int(model.input.shape[1]), get_backbone(settings.backbone).resizing(settings.resize)

    def batches(rows, seed=None):
        return ImageBatches(
            [dataset_dir / row["path"] for row in rows],
            encoder.transform([row["label"] for row in rows]),
            len(names),
            size,
            settings.batch_size,
            settings.max_image_pixels,
            seed,
            resize,
        )

    train_batches, validation_batches = batches(training, settings.seed), batches(validation)
    train_data = train_batches.dataset(make_augmenter(settings.augment, settings.seed))
    validation_data = validation_batches.dataset()
    class_weight = None
    if settings.class_weight == "balanced":
        labels = encoder.transform([row["label"] for row in training])
        class_weight = dict(enumerate(compute_class_weight("balanced", classes=np.arange(len(names)), y=labels)))

    record = _train(model, base, settings, train_data, validation_data, class_weight, output_dir / CHECKPOINT, on_epoch)
    record.update(
        validation=holdout,
        settings=dataclasses.asdict(settings),
        labels=names,
        images=dict(training=len(training), validation=len(validation)),
    )

    output_dir.mkdir(parents=True, exist_ok=True)
    model_path = output_dir / KERAS_MODEL
    with atomic_path(model_path) as temporary:
        model.save(temporary)
    bundle, validation_metrics = _bundle(model, base, settings, dataset_dir, training, validation, encoder, record)
    seconds = time.perf_counter() - started
    bundle.info.update(
        fit_seconds=seconds, validation_accuracy=validation_metrics[0], validation_auc=validation_metrics[1]
    )
    bundle_path = bundle.save(output_dir / BUNDLE)
    record.update(
        seconds=seconds,
        validation_accuracy=validation_metrics[0],
        validation_auc=validation_metrics[1],
        skipped=dict(train_batches.skipped, **validation_batches.skipped),
    )
    atomic_write_json(output_dir / HISTORY, record)
    plot_curves(record, output_dir)
    return FinetuneReport(
        output_dir,
        model_path,
        bundle_path,
        record,
        validation_metrics[0],
        validation_metrics[1],
        seconds,
        record["stages"][-1]["unfrozen_blocks"],
        holdout,
        record["skipped"],
        record["interrupted"],
    )


def _train(
    model, base, settings: FinetuneSettings, train_data, validation_data, class_weight, checkpoint: Path, on_epoch
) -> dict:
    """Run the stages, restoring the best checkpoint of the run after each; the history record.

    Ctrl-C stops after the batch in flight (the partial epoch is still validated and may be
    checkpointed); the later stages are skipped and the best weights so far are kept. Ctrl-C before
    any checkpoint exists, or a second Ctrl-C, raises ``KeyboardInterrupt``.
    """
    checkpoint.parent.mkdir(parents=True, exist_ok=True)
    checkpoint.unlink(missing_ok=True)
    plan = [("head", settings.head_epochs, settings.head_lr)]
    if settings.finetune_epochs:
        plan.append(("finetune", settings.finetune_epochs, settings.finetune_lr))
    stages, history, best = [], {}, None
    with interrupt_after_batch() as interrupted:
        for stage, epochs, lr in plan:
            unfrozen = (
                unfreeze_last_blocks(model, base, settings.backbone, settings.unfreeze_blocks)
                if stage == "finetune"
                else []
            )
            started, first_epoch = time.perf_counter(), len(history.get("loss", []))
            logs, seconds = _fit_stage(
                model,
                stage,
                train_data,
                validation_data,
                epochs,
                lr,
                settings,
                checkpoint,
                None if best is None else best["value"],
                class_weight,
                first_epoch,
                on_epoch,
                interrupted,
            )
            for key, values in logs.items():
                history.setdefault(key, []).extend(values)
            for index, value in enumerate(logs.get(settings.monitor, [])):  # the same rule as the checkpoint's
                if _improves(value, None if best is None else best["value"], settings.mode):
                    best = dict(stage=stage, epoch=first_epoch + index + 1, value=value)
            if best is None:  # interrupted before the first epoch was validated: nothing worth keeping
                raise KeyboardInterrupt
            with warnings.catch_warnings():  # the checkpoint's optimizer state is not needed
                warnings.filterwarnings("ignore", message="Skipping variable loading for optimizer")
                model.load_weights(checkpoint)  # the best weights so far, from this stage or an earlier one
            stages.append(
                dict(
                    name=stage,
                    learning_rate=lr,
                    epochs_run=len(seconds),
                    epoch_seconds=seconds,
                    seconds=time.perf_counter() - started,
                    unfrozen_blocks=unfrozen,
                    trainable_parameters=int(sum(np.prod(w.shape) for w in model.trainable_weights)),
                )
            )
            if interrupted():
                break
    return dict(
        monitor=settings.monitor,
        mode=settings.mode,
        stages=stages,
        history=history,
        best=best,
        stage_boundary=stages[0]["epochs_run"],
        interrupted=interrupted(),
    )


def _bundle(model, base, settings: FinetuneSettings, dataset_dir: Path, training, validation, encoder, record):
    """The fine-tuned backbone and head as a bundle, with the configured "unknown" detector fitted on its own
    features and logits."""
    from sklearn.metrics import accuracy_score

    backbone_weights = base.get_weights()
    extractor = FeatureExtractor(
        settings.backbone,
        backbone_weights,
        "avg",
        settings.batch_size,
        settings.max_image_pixels,
        input_size=int(model.input.shape[1]),
        label_names=[str(c) for c in encoder.classes_],
        runtime=settings.runtime,
        job_images=len(training) + len(validation),
        resize=settings.resize,
    )
    head = dense_head(model)
    train_set, _ = extract_in_memory(extractor, dataset_dir, training)
    validation_set, _ = extract_in_memory(extractor, dataset_dir, validation)
    novelty = fit_detector(
        settings.unknown,
        train_set.features,
        train_set.labels,
        len(encoder.classes_),
        head.decision_function(train_set.features),
        validation_set.features,
        head.decision_function(validation_set.features),
        settings.unknown_keep,
        record["validation"],
    )
    scores = head.predict_proba(validation_set.features)
    metrics = (
        float(accuracy_score(validation_set.labels, scores.argmax(axis=1))),
        roc_auc(validation_set.labels, scores, len(encoder.classes_)),
    )
    info = dict(
        best=record["best"],
        monitor=record["monitor"],
        stages=[{k: v for k, v in stage.items() if k != "epoch_seconds"} for stage in record["stages"]],
        settings=record["settings"],
        validation=record["validation"],
    )
    bundle = Bundle(
        head, encoder, extractor.meta, "finetune", info=info, novelty=novelty, backbone_weights=backbone_weights
    )
    return bundle, metrics


# --- learning curves -----------------------------------------------------------------------------


def plot_curves(record: dict, output_dir: str | Path) -> list[str]:
    """``curve_<metric>.png`` for loss, accuracy and AUC: training vs validation, stage boundary marked."""
    import matplotlib.ticker

    written = []
    history, boundary, best = record["history"], record["stage_boundary"], record["best"]
    for metric in CURVES:
        if metric not in history:
            continue
        epochs = np.arange(1, len(history[metric]) + 1)
        figure = new_figure(figsize=(6.5, 4))
        axes = figure.subplots()
        axes.plot(epochs, history[metric], "o-", label=f"training {metric}")
        axes.plot(epochs, history[f"val_{metric}"], "o-", label=f"validation {metric}")
        if boundary < len(epochs):
            axes.axvline(boundary + 0.5, color="grey", linestyle="--", label="stage 2: blocks unfrozen")
        if f"val_{metric}" == record["monitor"]:
            axes.plot(
                [best["epoch"]], [best["value"]], "k*", markersize=14, label=f"best (restored), epoch {best['epoch']}"
            )
        axes.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
        axes.set_xlabel("epoch")
        axes.set_ylabel(metric)
        axes.set_title(f"{metric}: head on frozen backbone, then fine-tuning")
        axes.legend(fontsize="small")
        written.append(save_figure(figure, Path(output_dir) / f"curve_{metric}.png"))
    return written
