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

``ptl predict`` and ``ptl serve`` take such a file directly (:class:`OnnxPredictor`): the shared image
decoder and ONNX Runtime, without TensorFlow, scikit-learn or any pickle, so they start faster and
smaller than with the bundle (``benchmarks/bench_onnx_predict.py``). They give what the graph gives:
the label and the top-k class scores, equal to the bundle's; never "unknown", since the detector is not
in the graph.

The backbone part is the network the ONNX runtimes run, taken from their cache (converted there on
first use), so exporting and ``--runtime onnxruntime`` share one conversion. A bundle trained on
features stored as float16 (``--dtype float16``) sees them rounded to float16, and scikit-learn scales
them in float16; the graph rounds them the same way (Casts to float16 and back) before the classifier,
so it predicts what the bundle does.
"""

from __future__ import annotations

import dataclasses
import json
import threading
from pathlib import Path
from typing import Sequence

import numpy as np

from .atomic import atomic_path, check_writable
from .bundle import Bundle
from .classifiers import DenseHead
from .cpus import available_cpus
from .errors import BundleError, FeatureFileError
from .features import decode_batches, run_in_batches
from .images import MAX_PIXELS
from .prediction import Predictor
from .runtimes import OPSET
from .store import FeatureMeta

ML_OPSET = 3  # the ai.onnx.ml opset of the classifier part
#: The output holding the class scores, by score kind (the other output is ``label``).
SCORES = {"probability": "probabilities", "decision": "scores"}


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


def _sklearn_head(pipeline, dim: int, float16: bool = False):
    """The fitted scikit-learn pipeline as an ONNX model with outputs ``label`` and ``probabilities``.

    ``float16``: the pipeline is fed features stored as float16, as the bundle feeds it (see
    :func:`_float16_features`).
    """
    from skl2onnx import to_onnx
    from sklearn.pipeline import Pipeline
    from sklearn.preprocessing import StandardScaler
    from sklearn.svm import LinearSVC

    scaler, rest = None, pipeline
    steps = pipeline.steps
    if float16 and len(steps) > 1 and isinstance(steps[0][1], StandardScaler):
        scaler = steps[0][1]  # on float16 input it computes in float16: done by _float16_features
        rest = steps[1][1] if len(steps) == 2 else Pipeline(steps[1:])
    estimator = steps[-1][1]
    options = {} if isinstance(estimator, LinearSVC) else {"zipmap": False}
    if not hasattr(estimator, "predict_proba"):
        options["raw_scores"] = True  # decision values, as Bundle.scores gives them
    head = to_onnx(
        rest,
        np.zeros((1, dim), np.float32),
        target_opset={"": OPSET, "ai.onnx.ml": ML_OPSET},
        options={id(estimator): options},
    )
    return _float16_features(head, scaler) if float16 else head


def _float16_features(head, scaler=None):
    """``head`` fed what the bundle's classifier sees when its features are stored as float16.

    :meth:`Bundle.scores` rounds the features to float16, and scikit-learn's ``StandardScaler`` keeps
    float16 input in float16: ``x - mean`` and ``/ scale`` are NumPy float16 operations, each computed
    in float32 and rounded to float16. The nodes put in front of ``head`` do exactly that (a Cast to
    float16 and back after each step), ``scaler`` being the scaler taken out of ``head``, if any.
    """
    from onnx import TensorProto, helper, numpy_helper

    graph = head.graph
    features = graph.input[0].name
    nodes, constants = [], []

    def rounded(value: str) -> str:
        nodes.append(helper.make_node("Cast", [value], [f"{value}/float16"], to=TensorProto.FLOAT16))
        nodes.append(helper.make_node("Cast", [f"{value}/float16"], [f"{value}/rounded"], to=TensorProto.FLOAT))
        return f"{value}/rounded"

    current = rounded(features)
    if scaler is not None:
        for op, use, values, name in (
            ("Sub", scaler.with_mean, scaler.mean_, "mean"),
            ("Div", scaler.with_std, scaler.scale_, "scale"),
        ):
            if use:
                constant = np.asarray(values).astype(np.float16).astype(np.float32)  # as sklearn casts them
                constants.append(numpy_helper.from_array(constant, f"{features}/{name}"))
                nodes.append(helper.make_node(op, [current, f"{features}/{name}"], [f"{features}/{op.lower()}"]))
                current = rounded(f"{features}/{op.lower()}")
    for node in graph.node:
        node.input[:] = [current if name == features else name for name in node.input]
    nodes += list(graph.node)
    del graph.node[:]
    graph.node.extend(nodes)
    graph.initializer.extend(constants)
    return head


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
    if bundle.meta.precision == "bfloat16":
        raise BundleError(
            "bfloat16 models do not export to ONNX (their features come from bfloat16 arithmetic, which an "
            "ONNX graph does not state); float32 and int8 models do"
        )
    check_writable(output)  # before the work, not after it
    if bundle.network is not None:  # int8: the quantized network itself (checked when the bundle was loaded)
        backbone, input_size = onnx.load_from_string(bundle.network), bundle.meta.input_size
    else:  # the extractor's forward pass (uint8 pixels -> float32 features), converted once and cached,
        # shared with the ONNX runtimes (see runtimes.cached_network)
        extractor = bundle.feature_extractor(runtime="tensorflow")
        backbone, input_size = onnx.load(extractor.network_file()), extractor.input_size
    backbone = onnx.compose.add_prefix(backbone, "backbone/")
    dim = bundle.meta.feature_dim
    float16 = bundle.meta.dtype == "float16"  # the classifier was trained on, and predicts from, float16 features
    if isinstance(bundle.classifier, DenseHead):  # NumPy promotes float16 features to its float32 kernel
        head = _dense_head(bundle.classifier)
        head = _float16_features(head) if float16 else head
    else:
        head = _sklearn_head(bundle.classifier, dim, float16)
    head = onnx.compose.add_prefix(head, "head/")
    head.ir_version = backbone.ir_version
    _same_opsets(backbone, head)
    kind = bundle.score_kind
    scores = SCORES[kind]
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
        "input_size": str(input_size),
        "resize": bundle.meta.resizing.describe(),  # how a deployment fits its images to the input
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


@dataclasses.dataclass(frozen=True)
class OnnxModel:
    """An exported graph as its metadata describes it: what ``ptl predict`` and the web app show of a model.

    It has the bundle's ``name``, ``label_names``, ``meta`` and ``score_kind``, and no "unknown" detector
    (``novelty`` is None): the graph holds the backbone and the classifier only.
    """

    name: str
    label_names: list[str]
    meta: FeatureMeta
    score_kind: str
    novelty: None = None

    @classmethod
    def from_metadata(cls, metadata: dict[str, str], path: Path) -> "OnnxModel":
        """The model described by the metadata :func:`export_bundle` writes, or a :class:`BundleError`."""
        try:
            labels = json.loads(metadata["label_names"])
            model = cls(
                metadata["model"],
                labels,
                FeatureMeta.from_attrs(json.loads(metadata["feature_layout"])),
                metadata["score_kind"],
            )
        except KeyError as exc:
            raise BundleError(f"{path}: not an ONNX model written by ptl export (no metadata {exc})") from None
        except (ValueError, TypeError, FeatureFileError) as exc:
            raise BundleError(f"{path}: not an ONNX model written by ptl export (its metadata: {exc})") from None
        if not (isinstance(labels, list) and labels and all(isinstance(name, str) for name in labels)):
            raise BundleError(f"{path}: not an ONNX model written by ptl export (label_names is not a list of names)")
        if model.score_kind not in SCORES:
            raise BundleError(f"{path}: not an ONNX model written by ptl export (score kind {model.score_kind!r})")
        if list(model.meta.label_names) != labels:
            raise BundleError(f"{path}: not an ONNX model written by ptl export (its label names disagree)")
        return model


class OnnxPredictor(Predictor):
    """:class:`~pyimagesearch_tl.prediction.Predictor` of an exported graph, run by ONNX Runtime.

    The images go through the shared decoder at the graph's input size, then the graph gives their
    class scores: top-k predictions equal to the bundle's, without importing TensorFlow or
    scikit-learn. No image is called "unknown" (the graph holds no detector): :attr:`bundle` is the
    graph's :class:`OnnxModel`, whose ``novelty`` is None.

    Parameters
    ----------
    path : str or Path
        An ``.onnx`` file written by :func:`export_bundle` (``ptl export``).
    batch_size, max_pixels, top_k
        As for :class:`~pyimagesearch_tl.prediction.Predictor`.
    """

    def __init__(self, path: str | Path, batch_size: int = 32, max_pixels: int = MAX_PIXELS, top_k: int = 3):
        import onnxruntime

        # Not Predictor.__init__: no feature extractor to rebuild, the graph holds the network.
        path = Path(path)
        if not path.is_file():
            raise BundleError(f"ONNX model {str(path)!r} does not exist")
        options = onnxruntime.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = available_cpus(), 1
        options.log_severity_level = 3  # errors only
        try:
            self._session = onnxruntime.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        except Exception as exc:
            reason = (str(exc).strip().splitlines() or [type(exc).__name__])[-1][:200]
            raise BundleError(f"{path}: not a readable ONNX model ({reason})") from None
        self.bundle = OnnxModel.from_metadata(self._session.get_modelmeta().custom_metadata_map, path)
        self._scores = SCORES[self.bundle.score_kind]
        if [i.name for i in self._session.get_inputs()] != ["pixels"] or self._scores not in {
            o.name for o in self._session.get_outputs()
        }:
            raise BundleError(
                f"{path}: not an ONNX model written by ptl export (no 'pixels' input or {self._scores!r} output)"
            )
        size, classes = self.bundle.meta.input_size, len(self.bundle.label_names)
        (pixels,) = self._session.get_inputs()
        (scores,) = [o for o in self._session.get_outputs() if o.name == self._scores]
        if not _fits(pixels.shape, [None, size, size, 3]) or not _fits(scores.shape, [None, classes]):
            raise BundleError(
                f"{path}: its graph takes {pixels.shape} and gives {scores.shape}, not what its metadata says "
                f"([n, {size}, {size}, 3] pixels, [n, {classes}] scores)"
            )
        self.path, self.top_k, self.batch_size, self.max_pixels = path, top_k, batch_size, max_pixels
        self._running = threading.Lock()

    def expect(self, images: int) -> None:
        """Nothing to decide: the graph already runs in ONNX Runtime, whatever the job's size."""

    def iter_batches(self, sources: Sequence):
        meta = self.bundle.meta
        return decode_batches(sources, meta.input_size, self.batch_size, self.max_pixels, resize=meta.resizing)

    def assess(self, images):
        def run(batch):
            return self._session.run([self._scores], {"pixels": batch})[0]

        scores = run_in_batches(run, images, self.batch_size, self._running)
        if scores.shape != (len(images), len(self.bundle.label_names)):
            raise BundleError(f"{self.path}: its graph gave scores of shape {scores.shape} for {len(images)} images")
        return scores, [None] * len(scores), [True] * len(scores)


def _fits(shape, expected) -> bool:
    """Whether a graph's declared ``shape`` can be ``expected`` (a symbolic dimension fits anything, and so
    does None in ``expected``)."""
    return len(shape) == len(expected) and all(
        want is None or not isinstance(dim, int) or dim == want for dim, want in zip(shape, expected)
    )
