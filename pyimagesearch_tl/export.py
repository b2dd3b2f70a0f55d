"""``ptl export``: one ONNX graph from 0-255 RGB pixels to class scores, to deploy without pickles.

The graph is the backbone's whole forward pass (preprocessing included: the network the ONNX
runtimes run, see :mod:`pyimagesearch_tl.runtimes`) followed by the bundle's classifier (its
scikit-learn pipeline through skl2onnx, or a fine-tuned network's dense head):

* input ``pixels``: uint8 ``(N, size, size, 3)``, RGB, decoded and resized as :func:`images.load_image` does;
* output ``label``: int64 ``(N,)``, the index of the best class;
* output ``probabilities`` (or ``scores`` for classifiers without probabilities): float ``(N, classes)``.

The model's metadata holds the label names (JSON), the input size, the score kind and the feature
layout, so a deployment needs this one file and an image decoder. The "unknown" detector is not
part of the graph.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .atomic import atomic_path
from .bundle import Bundle
from .classifiers import DenseHead
from .errors import BundleError
from .runtimes import OPSET

ML_OPSET = 3  # the ai.onnx.ml opset of the classifier part


def _dense_head(head: DenseHead):
    """softmax(features @ kernel + bias) and its argmax, as an ONNX model."""
    from onnx import TensorProto, helper, numpy_helper

    dim, classes = head.kernel.shape
    graph = helper.make_graph(
        [
            helper.make_node("MatMul", ["features", "kernel"], ["logits"]),
            helper.make_node("Add", ["logits", "bias"], ["shifted"]),
            helper.make_node("Softmax", ["shifted"], ["probabilities"], axis=1),
            helper.make_node("ArgMax", ["probabilities"], ["label"], axis=1, keepdims=0),
        ],
        "dense_head",
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, dim])],
        [
            helper.make_tensor_value_info("label", TensorProto.INT64, [None]),
            helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, [None, classes]),
        ],
        [numpy_helper.from_array(head.kernel, "kernel"), numpy_helper.from_array(head.bias, "bias")],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", OPSET)])


def _sklearn_head(pipeline, dim: int):
    """The fitted scikit-learn pipeline as an ONNX model with outputs ``label`` and ``probabilities``."""
    from skl2onnx import to_onnx
    from sklearn.svm import LinearSVC

    estimator = pipeline.steps[-1][1]
    options = {} if isinstance(estimator, LinearSVC) else {"zipmap": False}
    if not hasattr(estimator, "predict_proba"):
        options["raw_scores"] = True  # decision values, as Bundle.scores gives them
    return to_onnx(
        pipeline,
        np.zeros((1, dim), np.float32),
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        options={id(estimator): options},
    )


def _same_opsets(*models) -> None:
    """Declare one opset per domain in every model (the highest any declares), as merging requires."""
    from onnx import helper

    versions: dict[str, int] = {}
    for model in models:
        for opset in model.opset_import:
            versions[opset.domain] = max(versions.get(opset.domain, 0), opset.version)
    for model in models:
        del model.opset_import[:]
        model.opset_import.extend(helper.make_opsetid(domain, version) for domain, version in sorted(versions.items()))


def export_bundle(bundle: Bundle, output: str | Path) -> Path:
    """Write ``bundle`` as one ONNX model at ``output`` (see the module's description)."""
    import onnx
    from onnx import compose

    if len(bundle.meta.parts) > 1:
        raise BundleError(
            f"this model combines {len(bundle.meta.parts)} feature extractors ({bundle.meta.backbone}); "
            "ONNX export takes a model of one extractor (ptl predict and ptl serve take this one)"
        )
    if bundle.meta.precision != "float32":
        raise BundleError(
            f"only float32 models export to ONNX; this one was trained on {bundle.meta.precision} features"
        )
    extractor = bundle.feature_extractor(runtime="tensorflow")
    backbone = onnx.compose.add_prefix(extractor.to_onnx(), "backbone/")
    dim = bundle.meta.feature_dim
    head = (
        _dense_head(bundle.classifier)
        if isinstance(bundle.classifier, DenseHead)
        else _sklearn_head(bundle.classifier, dim)
    )
    head = onnx.compose.add_prefix(head, "head/")
    head.ir_version = backbone.ir_version
    _same_opsets(backbone, head)
    kind = bundle.score_kind
    scores = "probabilities" if kind == "probability" else "scores"
    merged = compose.merge_models(
        backbone,
        head,
        io_map=[(backbone.graph.output[0].name, head.graph.input[0].name)],
        outputs=["head/label", "head/probabilities"],
    )
    graph = merged.graph
    graph.input[0].name, renames = (
        "pixels",
        {backbone.graph.input[0].name: "pixels", "head/label": "label", "head/probabilities": scores},
    )
    for node in graph.node:
        node.input[:] = [renames.get(name, name) for name in node.input]
        node.output[:] = [renames.get(name, name) for name in node.output]
    classes = len(bundle.label_names)
    for value in graph.output:
        value.name = renames.get(value.name, value.name)
        dims = value.type.tensor_type.shape.dim
        del dims[:]
        dims.add().dim_param = "N"
        if value.name == scores:
            dims.add().dim_value = classes
    metadata = {
        "label_names": json.dumps(bundle.label_names),
        "input_size": str(extractor.input_size),
        "score_kind": kind,
        "feature_layout": json.dumps(bundle.meta.to_attrs()),
        "model": bundle.name,
    }
    onnx.helper.set_model_props(merged, metadata)
    merged.producer_name = "pyimagesearch_tl"
    onnx.checker.check_model(merged)
    with atomic_path(output) as temporary:
        temporary.write_bytes(merged.SerializeToString())
    return Path(output)
