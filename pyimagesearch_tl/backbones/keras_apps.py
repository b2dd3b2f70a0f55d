"""Backbones from ``keras.applications``.

``weights="imagenet"`` downloads from Keras' servers on first use (Keras caches the file under
``~/.keras``); offline, that fails and :class:`WeightsUnavailableError` says what to do instead.
A local file (``--weights PATH``) must be the *no-top* weights file of the architecture.
"""

from __future__ import annotations

import functools

from . import Backbone, WeightsUnavailableError, list_backbones, register


def _offline_hint() -> str:
    offline = ", ".join(name for name in list_backbones() if name.startswith("efficientnet_lite"))
    return (
        "Without network access, use a backbone whose weights ship with the package "
        f"({offline}; e.g. --backbone efficientnet_lite0), or download the no-top weights file "
        "elsewhere and pass it with --weights PATH (or --weights none for random weights)."
    )


def _build(constructor: str, weights, input_shape, pooling):
    import keras

    application = getattr(keras.applications, constructor)
    try:
        return application(include_top=False, weights=weights, input_shape=input_shape, pooling=pooling)
    except Exception as exc:  # keras.utils.get_file raises a bare Exception on a failed fetch
        if weights != "imagenet":
            raise
        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise WeightsUnavailableError(
            f"could not download the ImageNet weights of {constructor} ({reason}). {_offline_hint()}"
        ) from None


# How each family names its blocks (see Backbone.block_pattern): VGG block1..block5; ResNet conv1
# and conv{2-5}_block{n}; MobileNetV2 Conv1 (stem, with bn_Conv1), expanded_conv, block_1..16 and
# Conv_1 (the last 1x1); EfficientNet stem, block{1-7}{a,b,...} and top.
_VGG = r"(?P<block>block\d+)_"
_RESNET = r"(?P<block>conv1|conv\d_block\d+)_"
_MOBILENET = r"(?:bn_)?(?P<block>Conv1|expanded_conv|block_\d+|Conv_1)(?:_|$)"
_EFFICIENTNET = r"(?P<block>stem|block\d+[a-z]|top)_"

# name, keras constructor, input size, preprocessing mode, block pattern
_APPLICATIONS = [
    ("vgg16", "VGG16", 224, "caffe", _VGG),
    ("vgg19", "VGG19", 224, "caffe", _VGG),
    ("resnet50", "ResNet50", 224, "caffe", _RESNET),
    ("mobilenetv2", "MobileNetV2", 224, "tf", _MOBILENET),
    ("efficientnetb0", "EfficientNetB0", 224, "none", _EFFICIENTNET),
    ("efficientnetb1", "EfficientNetB1", 240, "none", _EFFICIENTNET),
    ("efficientnetb2", "EfficientNetB2", 260, "none", _EFFICIENTNET),
    ("efficientnetb3", "EfficientNetB3", 300, "none", _EFFICIENTNET),
    ("efficientnetb4", "EfficientNetB4", 380, "none", _EFFICIENTNET),
    ("efficientnetb5", "EfficientNetB5", 456, "none", _EFFICIENTNET),
    ("efficientnetb6", "EfficientNetB6", 528, "none", _EFFICIENTNET),
    ("efficientnetb7", "EfficientNetB7", 600, "none", _EFFICIENTNET),
]

for _name, _constructor, _size, _mode, _blocks in _APPLICATIONS:
    register(
        Backbone(
            name=_name,
            build=functools.partial(_build, _constructor),
            input_size=_size,
            preprocessing=_mode,
            block_pattern=_blocks,
        ),
        description=f"keras.applications.{_constructor}, {_size} px: ImageNet weights downloaded by Keras on first "
        "use (online), or --weights PATH",
    )
