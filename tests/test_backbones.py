"""The backbone registry, the offline EfficientNet-Lite weights and the keras.applications path."""

import pickle
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pyimagesearch_tl.backbones import create_model, get_backbone, list_backbones, torch_checkpoint
from pyimagesearch_tl.backbones import efficientnet_lite as lite
from pyimagesearch_tl.errors import ConfigError

skimage_data = pytest.importorskip("skimage.data")


def test_registry_lists_and_rejects_with_names():
    names = list_backbones()
    for expected in [
        "vgg16",
        "vgg19",
        "resnet50",
        "mobilenetv2",
        "efficientnet_lite0",
        "efficientnet_lite1",
        "efficientnet_lite2",
    ] + [f"efficientnetb{i}" for i in range(8)]:
        assert expected in names
    assert list_backbones("efficientnet_lite*") == ["efficientnet_lite0", "efficientnet_lite1", "efficientnet_lite2"]
    with pytest.raises(ConfigError, match="unknown backbone 'alexnet'; choose one of: efficientnet_lite0.*vgg16"):
        get_backbone("alexnet")


def _first_of_family(name: str) -> str:
    """The first registered backbone whose name is ``name`` but for its trailing digits (vgg16 for vgg19)."""
    return next(n for n in list_backbones() if n.rstrip("0123456789") == name.rstrip("0123456789"))


@pytest.mark.parametrize("name", list_backbones())
def test_every_registered_backbone_builds_pools_and_splits_into_blocks(name):
    """What extraction and fine-tuning rely on, for every entry of the registry (as timm checks list_models())."""
    from pyimagesearch_tl.backbones import backbone_blocks, preprocess_input

    record = get_backbone(name)
    size = 64  # the smallest side every family takes: building at 600 px (EfficientNetB7) costs 3x the time
    model = create_model(name, weights="none", pooling="avg", input_size=size)
    assert model.input_shape == (None, size, size, 3)
    assert len(model.output_shape) == 2 and model.output_shape[1] > 0
    if name == _first_of_family(name):  # B1-B7 differ from B0 only in width and depth: one max-pool build a family
        assert create_model(name, weights="none", pooling="max", input_size=size).output_shape == model.output_shape
    blocks = backbone_blocks(name, model)  # raises when the block pattern leaves a weighted layer out
    assert len(blocks) >= 3
    pixels = np.array([[[0.0, 127.5, 255.0]]], np.float32)
    scaled = np.asarray(preprocess_input(pixels.copy(), record.preprocessing))
    assert scaled.shape == pixels.shape and np.isfinite(scaled).all()


@pytest.mark.parametrize(
    "name, pooling, width",
    [
        ("vgg16", "flatten", 7 * 7 * 512),
        ("vgg16", "max", 512),
        ("mobilenetv2", "avg", 1280),
        ("efficientnetb0", "avg", 1280),
        ("efficientnet_lite2", "avg", 1280),
    ],
)
def test_random_weight_models_have_the_documented_feature_width(name, pooling, width):
    model = create_model(name, weights="none", pooling=pooling)
    size = get_backbone(name).input_size
    assert model.input_shape == (None, size, size, 3)
    assert model.output_shape == (None, width)


# --- the packaged EfficientNet-Lite checkpoints ------------------------------------------------


@pytest.fixture(scope="module")
def lite0_state():
    return torch_checkpoint.read_torch_checkpoint(lite.packaged_checkpoint("efficientnet_lite0"))


def test_checkpoint_reader_reads_all_296_tensors(lite0_state):
    assert len(lite0_state) == 296
    assert lite0_state["_fc.weight"].shape == (1000, 1280)
    assert lite0_state["_conv_stem.weight"].dtype == np.float32
    assert lite0_state["_blocks.0._depthwise_conv.weight"].shape == (32, 1, 3, 3)


def test_conversion_consumes_every_tensor(lite0_state):
    model = lite.EfficientNetLite("efficientnet_lite0", weights=None)
    lite.convert_state_dict(model, lite0_state)  # raises if any tensor is left over or misshaped
    extra = dict(lite0_state, **{"_blocks.99._bn0.weight": np.zeros(3, np.float32)})
    with pytest.raises(Exception, match="does not use"):
        lite.convert_state_dict(model, extra)


class _Evil:
    def __reduce__(self):
        return (print, ("pwned",))


def _legacy_checkpoint(state_pickle: bytes) -> bytes:
    header = b"".join(
        pickle.dumps(x, protocol=2)
        for x in (torch_checkpoint._MAGIC_NUMBER, torch_checkpoint._PROTOCOL_VERSION, {"little_endian": True})
    )
    return header + state_pickle + pickle.dumps([], protocol=2)


def test_reader_refuses_any_other_callable(tmp_path):
    path = tmp_path / "evil.pth"
    path.write_bytes(_legacy_checkpoint(pickle.dumps({"x": _Evil()}, protocol=2)))
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError, match=r"refusing to load __builtin__\.print"):
        torch_checkpoint.read_torch_checkpoint(path)
    path.write_bytes(_legacy_checkpoint(b"\x80\x02cos\nsystem\nX\x02\x00\x00\x00idq\x00\x85R."))
    with pytest.raises(torch_checkpoint.UnsafeCheckpointError, match="os.system"):
        torch_checkpoint.read_torch_checkpoint(path)


def test_reader_rejects_truncated_checkpoint(tmp_path):
    data = lite.packaged_checkpoint("efficientnet_lite0").read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: len(data) - 1000])
    with pytest.raises(Exception, match="truncated"):
        torch_checkpoint.read_torch_checkpoint(path)


def _classify(model, photo: np.ndarray, size: int) -> list[int]:
    """ImageNet classes of ``photo``, the most likely first (one image: the model called directly, which
    skips the graph ``model.predict`` traces first)."""
    pixels = np.asarray(Image.fromarray(photo).resize((size, size), Image.BILINEAR), dtype=np.float32)[None]
    scores = np.asarray(model(lite.preprocess_input(pixels), training=False))[0]
    return list(np.argsort(scores)[::-1])


def test_lite0_with_imagenet_head_recognises_real_photos():
    model = lite.EfficientNetLite("efficientnet_lite0", include_top=True, weights="imagenet")
    assert _classify(model, skimage_data.coffee(), 224)[0] == 967  # espresso
    assert _classify(model, skimage_data.chelsea(), 224)[0] in (281, 282, 285)  # tabby, tiger cat, Egyptian cat


def test_weights_are_converted_once_then_read_from_the_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    first = lite.cached_weights("efficientnet_lite0")
    assert first.parent == tmp_path / "pyimagesearch_tl" / "weights" and first.name.endswith(".weights.h5")
    stamp = first.stat().st_mtime_ns
    monkeypatch.setattr(lite, "_from_checkpoint", lambda *a: pytest.fail("converted again instead of using the cache"))
    assert lite.cached_weights("efficientnet_lite0") == first
    assert first.stat().st_mtime_ns == stamp


def test_pooled_lite_features_of_real_photos():
    model = create_model("efficientnet_lite0", weights="imagenet", pooling="avg")
    photos = [skimage_data.coffee(), skimage_data.chelsea(), skimage_data.astronaut()]
    batch = np.stack([np.asarray(Image.fromarray(p).resize((224, 224)), np.float32) for p in photos])
    features = np.asarray(model(lite.preprocess_input(batch), training=False))  # 3 images: called directly
    assert features.shape == (3, 1280)
    assert (features >= 0).all() and (features <= 6).all()  # ReLU6 outputs, averaged
    cosine = features @ features.T / np.outer(np.linalg.norm(features, axis=1), np.linalg.norm(features, axis=1))
    assert cosine[0, 1] < 0.95  # different photos give different features


def test_failed_imagenet_download_explains_the_offline_options(tmp_path, monkeypatch):
    from keras.src.applications import mobilenet_v2

    from pyimagesearch_tl.backbones import WeightsUnavailableError

    monkeypatch.setenv("KERAS_HOME", str(tmp_path))  # no cached copy
    monkeypatch.setattr(mobilenet_v2, "BASE_WEIGHT_PATH", "http://127.0.0.1:9/unreachable/")
    with pytest.raises(WeightsUnavailableError) as info:
        create_model("mobilenetv2", weights="imagenet")
    message = str(info.value)
    assert "could not download the ImageNet weights of MobileNetV2" in message
    assert "efficientnet_lite0" in message and "--weights PATH" in message
    assert "\n" not in message


def test_missing_weights_file_is_a_clear_error(tmp_path):
    with pytest.raises(ConfigError, match="weights file .* does not exist"):
        create_model("vgg16", weights=str(tmp_path / "nope.h5"))


@pytest.fixture(scope="module")
def vgg16_weights_file(tmp_path_factory) -> Path:
    """A real weights file of another model (random VGG16), saved once for the module."""
    path = tmp_path_factory.mktemp("vgg16") / "vgg.weights.h5"
    create_model("vgg16", weights="none").save_weights(path)
    return path


@pytest.mark.parametrize("name", ["efficientnet_lite0", "mobilenetv2"])
@pytest.mark.filterwarnings("ignore:Skipping nested container")  # Keras' own note while it fails to load
def test_a_weights_file_of_another_model_or_no_model_is_a_clear_error(tmp_path, vgg16_weights_file, name):
    import zipfile

    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not an HDF5 file")
    with pytest.raises(ConfigError, match=f"weights file .*junk.weights.h5' cannot be loaded into {name}: "):
        create_model(name, weights=str(junk))
    with zipfile.ZipFile(tmp_path / "other.keras", "w") as archive:  # a zip, but not a Keras archive
        archive.writestr("notes.txt", "hello")
    with pytest.raises(ConfigError, match=f"other.keras' cannot be loaded into {name}: "):
        create_model(name, weights=str(tmp_path / "other.keras"))
    with pytest.raises(ConfigError, match=f"cannot be loaded into {name}: "):
        create_model(name, weights=str(vgg16_weights_file))


def test_a_file_no_keras_loader_reads_is_refused_before_tensorflow_starts(tmp_path):
    """In a fresh process (as a Ray worker is): the error, and TensorFlow never imported."""
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not an HDF5 file")
    code = (
        "import sys; from pyimagesearch_tl.backbones import create_model\n"
        "from pyimagesearch_tl.errors import ConfigError\n"
        "try: create_model('mobilenetv2', weights=sys.argv[1])\n"
        "except ConfigError as exc: print(exc)\n"
        "print('tensorflow' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(junk)], capture_output=True, text=True, timeout=120)
    refusal = f"weights file {str(junk)!r} cannot be loaded into mobilenetv2: "
    refusal += "it is neither an HDF5 file nor a .keras archive"
    assert result.stdout.splitlines() == [refusal, "False"], result.stderr


def test_a_pytorch_checkpoint_file_is_still_converted():
    """EfficientNet-Lite takes a ``.pth`` (neither HDF5 nor a zip): the check before TensorFlow lets it through."""
    checkpoint = str(lite.packaged_checkpoint("efficientnet_lite0"))
    model = create_model("efficientnet_lite0", weights=checkpoint, input_size=64)
    pretrained = create_model("efficientnet_lite0", weights="imagenet", input_size=64)
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), pretrained.get_weights()))


def test_local_weights_file_is_used(tmp_path):
    model = create_model("mobilenetv2", weights="none")
    path = tmp_path / "mine.weights.h5"
    model.save_weights(path)
    again = create_model("mobilenetv2", weights=str(path))
    assert all(np.array_equal(a, b) for a, b in zip(model.get_weights(), again.get_weights()))


def test_a_missing_weights_file_leaves_the_dtype_policy_alone(tmp_path):
    import keras

    before = keras.config.dtype_policy().name
    with pytest.raises(ConfigError, match="does not exist"):
        create_model("efficientnet_lite0", str(tmp_path / "missing.weights.h5"), precision="bfloat16")
    assert keras.config.dtype_policy().name == before
