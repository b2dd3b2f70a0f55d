"""Model files that cannot run code: skops bundles loaded with trusted types only, old pickles only when
trusted, every field checked, and the exported ``.onnx`` predicting and serving without TensorFlow."""

from __future__ import annotations

import dataclasses
import json
import os
import re
import shlex
import subprocess
import sys
import zipfile
from pathlib import Path

import joblib
import numpy as np
import pytest
import skops.io
from click.testing import CliRunner

from pyimagesearch_tl import api
from pyimagesearch_tl.bundle import BUNDLE_SUFFIX, PAYLOAD_KEY, Bundle, trusted_types
from pyimagesearch_tl.classifiers import DenseHead, get_classifier, list_classifiers
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import BundleError
from pyimagesearch_tl.metrics import roc_auc
from pyimagesearch_tl.novelty import list_detectors, make_detector
from pyimagesearch_tl.prediction import Predictor
from pyimagesearch_tl.store import CombinedMeta, FeatureMeta, read_features

#: Top-level packages the ONNX path must never import.
HEAVY = ("tensorflow", "keras", "sklearn")


def run(*args: str, ok: bool = True):
    result = CliRunner().invoke(cli, list(args))
    assert (result.exit_code == 0) == ok, result.output
    return result


def one_error_line(result) -> str:
    """The single ``Error: ...`` line of a refused command (no traceback, nothing else)."""
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    [line] = result.stderr.splitlines()
    assert line.startswith("Error: "), line
    return line


def fields_of(bundle: Bundle) -> dict:
    return {field.name: getattr(bundle, field.name) for field in dataclasses.fields(bundle)}


def save_as_pickle(payload, path: Path) -> Path:
    """What ``Bundle.save`` wrote before ``.skops``: the payload, pickled by joblib."""
    joblib.dump(payload, path)
    return path


class RunsCommand:
    """Unpickled, runs ``command`` in a shell (what a hostile pickle does)."""

    def __init__(self, command: str):
        self.command = command

    def __reduce__(self):
        return os.system, (self.command,)


class Tripwire:
    """Built from a file (skops calls ``__setstate__``), writes its marker: code run by loading."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __setstate__(self, state):
        Path(state["marker"]).write_text("ran")


@pytest.fixture(scope="module")
def trained(pipeline_run, tmp_path_factory) -> dict:
    """Every classifier (the default detector) and every detector (logreg): ``name -> (path, report)``."""
    out = tmp_path_factory.mktemp("bundles")
    models = api.train(pipeline_run["features"], out / "classifiers", classifier="all", cv="2")
    found = {name: (model.path, model.report) for name, model in models.items()}
    for kind in list_detectors():
        model = api.train(pipeline_run["features"], out / kind, classifier="logreg", cv="2", unknown=kind)
        found[f"logreg, {kind}"] = (model.path, model.report)
    return found


@pytest.fixture(scope="module")
def logreg(trained) -> Path:
    return trained["logreg"][0]


@pytest.fixture(scope="module")
def validation(pipeline_run):
    return read_features(pipeline_run["features"] / "validation.h5")


def same_predictions(a: Bundle, b: Bundle, features: np.ndarray) -> None:
    """Exactly the same scores, logits and "unknown" verdicts on ``features``."""
    np.testing.assert_array_equal(a.scores(features)[0], b.scores(features)[0])
    np.testing.assert_array_equal(a.logits(features), b.logits(features))
    for mine, theirs in zip(
        a.novelty.assess(features, a.logits(features)), b.novelty.assess(features, b.logits(features))
    ):
        np.testing.assert_array_equal(mine, theirs)


def folded_head(bundle: Bundle) -> DenseHead:
    """The bundle's scaler and binary logistic regression folded into one softmax head (what a fine-tuned
    bundle holds): ``softmax([0, z])`` is the regression's probability."""
    scaler, regression = (step for _, step in bundle.classifier.steps)
    weights = regression.coef_[0] / scaler.scale_
    bias = regression.intercept_[0] - scaler.mean_ @ weights
    return DenseHead(np.column_stack([np.zeros_like(weights), weights]), np.array([0.0, bias]))


# --- skops bundles: every type a real bundle holds is trusted, and nothing is lost ------------------------


def test_training_writes_skops_bundles_that_load_without_trust(trained):
    trusted = {f"{kind.__module__}.{kind.__name__}" for kind in trusted_types()}
    for name, (path, _) in trained.items():
        assert path.suffix == BUNDLE_SUFFIX and path.read_bytes()[:4] == b"PK\x03\x04", name
        assert set(skops.io.get_untrusted_types(file=path)) <= trusted, name
        Bundle.load(path)  # no trust_pickle: a skops file


def test_every_registered_classifier_and_detector_is_trusted_and_nothing_else():
    trusted = set(trusted_types())
    assert {type(get_classifier(name).make(0, None)) for name in list_classifiers()} <= trusted
    detectors = [make_detector(kind) for kind in list_detectors()]
    assert {type(d) for d in detectors} | {type(part) for d in detectors for part in getattr(d, "parts", ())} <= trusted
    assert {DenseHead, FeatureMeta, CombinedMeta} <= trusted  # the types no registry holds
    assert {kind.__module__.split(".")[0] for kind in trusted} == {"pyimagesearch_tl", "sklearn"}


@pytest.mark.parametrize("name", [*list_classifiers(), *(f"logreg, {kind}" for kind in list_detectors()), "dense head"])
def test_every_classifier_and_detector_round_trips_and_predicts_identically(trained, validation, tmp_path, name):
    path, report = trained["logreg" if name == "dense head" else name]
    bundle = Bundle.load(path)
    if name == "dense head":
        bundle = dataclasses.replace(bundle, classifier=folded_head(bundle), name="finetune")
        np.testing.assert_allclose(
            bundle.scores(validation.features)[0],
            Bundle.load(path).scores(validation.features)[0],
            atol=1e-5,  # the fold is the same model, in float32
        )
    else:  # the loaded bundle scores as the one training held in memory did
        assert roc_auc(validation.labels, bundle.scores(validation.features)[0], 2) == report.validation_auc
    again = Bundle.load(bundle.save(tmp_path / f"again{BUNDLE_SUFFIX}"))
    assert type(again.classifier) is type(bundle.classifier) and type(again.novelty) is type(bundle.novelty)
    for field in ("meta", "name", "info", "versions", "created", "format_version", "label_names"):
        assert getattr(again, field) == getattr(bundle, field), field
    same_predictions(bundle, again, validation.features)


# --- checked fields: a bundle of other fields is one error line, never a traceback --------------------------


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda fields: [fields], "not a pyimagesearch_tl model bundle (it holds an object of type list)"),
        (lambda fields: {PAYLOAD_KEY: fields, "more": 1}, "its entries are ['more', 'pyimagesearch_tl_bundle']"),
        (lambda fields: {PAYLOAD_KEY: list(fields)}, "its fields are a list, not a dict"),
        (lambda fields: {PAYLOAD_KEY: dict(fields, extra=1)}, "unexpected field(s) extra"),
        (  # a field with a default (added after older bundles were saved) may be missing; this one may not
            lambda fields: {PAYLOAD_KEY: {k: v for k, v in fields.items() if k != "classifier"}},
            "missing field(s) classifier",
        ),
        (
            lambda fields: {PAYLOAD_KEY: dict(fields, meta="efficientnet_lite0")},
            "field 'meta' is a str, not a FeatureMeta",
        ),
        (lambda fields: {PAYLOAD_KEY: dict(fields, format_version=99)}, "bundle format 99 is not supported"),
    ],
    ids=["not a dict", "extra entry", "fields not a dict", "extra field", "missing field", "wrong type", "format"],
)
def test_a_bundle_of_other_fields_is_refused_with_one_line(logreg, pipeline_run, tmp_path, change, message):
    path = tmp_path / f"odd{BUNDLE_SUFFIX}"
    skops.io.dump(change(fields_of(Bundle.load(logreg))), path)
    with pytest.raises(BundleError, match=f"^{re.escape(str(path))}: .*{re.escape(message)}"):
        Bundle.load(path)
    line = one_error_line(run("predict", "--model", str(path), str(pipeline_run["dataset"] / "validation"), ok=False))
    assert message in line and str(path) in line


# --- hostile files: nothing in them runs -------------------------------------------------------------------


def test_a_skops_bundle_naming_an_untrusted_type_is_refused_and_builds_nothing(logreg, pipeline_run, tmp_path):
    marker = tmp_path / "marker"
    fields = fields_of(Bundle.load(logreg))
    fields["info"] = dict(fields["info"], note=Tripwire(marker), call=os.system)  # a real bundle, two stowaways
    path = tmp_path / f"tampered{BUNDLE_SUFFIX}"
    skops.io.dump({PAYLOAD_KEY: fields}, path)
    stowaways = f"posix.system, {Tripwire.__module__}.Tripwire"
    with pytest.raises(BundleError, match=re.escape(f"holds types a model bundle never holds ({stowaways}); nothing")):
        Bundle.load(path, trust_pickle=True)  # trusting pickles trusts no skops type
    for command in ("predict", "serve", "export", "evaluate"):
        extra = {"predict": [str(pipeline_run["dataset"])], "export": ["--output", str(tmp_path / "m.onnx")]}
        extra["evaluate"] = ["--features", str(pipeline_run["features"]), "--output", str(tmp_path / "evaluation")]
        line = one_error_line(run(command, "--model", str(path), *extra.get(command, []), ok=False))
        assert stowaways in line, line
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    skops.io.load(path, trusted=[*trusted_types(), Tripwire, "posix.system"])  # the control: built, it runs
    assert marker.read_text() == "ran"


def test_a_bundle_that_could_not_be_loaded_again_is_never_saved(logreg, tmp_path):
    bundle = Bundle.load(logreg)
    bundle.info["callback"] = os.system
    with pytest.raises(BundleError, match=r"cannot save .*\(posix\.system\), so it could not be loaded again"):
        bundle.save(tmp_path / f"model{BUNDLE_SUFFIX}")
    assert list(tmp_path.iterdir()) == []


def test_a_pickle_bundle_is_refused_without_trust_pickle_and_runs_nothing(logreg, pipeline_run, tmp_path):
    marker = tmp_path / "marker"
    fields = dict(fields_of(Bundle.load(logreg)), x=RunsCommand(f"touch {shlex.quote(str(marker))}"))
    path = save_as_pickle({PAYLOAD_KEY: fields}, tmp_path / "model.joblib")  # a real bundle with one extra key
    with pytest.raises(BundleError, match="is not a .skops bundle: read as a pickle .* could run any code"):
        api.load_model(path)
    photos = str(pipeline_run["dataset"] / "validation")
    arguments = {
        "predict": [photos],
        "serve": [],
        "export": ["--output", str(tmp_path / "m.onnx")],
        "evaluate": ["--features", str(pipeline_run["features"]), "--output", str(tmp_path / "evaluation")],
        "convert-bundle": [],
    }
    for command, extra in arguments.items():
        line = one_error_line(run(command, "--model", str(path), *extra, ok=False))
        assert f"{path} is not a .skops bundle" in line and "--trust-pickle" in line, line
        assert f"ptl convert-bundle --trust-pickle --model {path}" in line
    assert not marker.exists() and sorted(p.name for p in tmp_path.iterdir()) == [path.name]
    # Trusted, the pickle runs (what --trust-pickle accepts), and the stowaway field is still refused.
    line = one_error_line(run("predict", "--model", str(path), "--trust-pickle", photos, ok=False))
    assert marker.exists() and "unexpected field(s) x" in line, line


def test_an_old_joblib_bundle_of_a_real_model_loads_and_predicts_with_trust_pickle(
    logreg, pipeline_run, validation, tmp_path
):
    bundle = Bundle.load(logreg)
    old = save_as_pickle({PAYLOAD_KEY: fields_of(bundle)}, tmp_path / "logreg.joblib")
    photos = str(pipeline_run["dataset"] / "validation")
    run("predict", "--model", str(logreg), "--output", str(tmp_path / "new.json"), photos)
    run("predict", "--model", str(old), "--trust-pickle", "--output", str(tmp_path / "old.json"), photos)
    expected, got = (json.loads((tmp_path / f"{name}.json").read_text()) for name in ("new", "old"))
    # The same rows; the scores to float32 rounding (a runtime's thread count, which the test worker's CPU
    # affinity sets, orders its sums)
    assert [(r["path"], r["label"], r["unknown"]) for r in got] == [
        (r["path"], r["label"], r["unknown"]) for r in expected
    ]
    np.testing.assert_allclose([r["score"] for r in got], [r["score"] for r in expected], rtol=0, atol=1e-6)
    assert len(expected) > 1
    same_predictions(bundle, api.load_model(old, trust_pickle=True).bundle, validation.features)

    output = run("convert-bundle", "--model", str(old), "--trust-pickle").output
    assert output == f"wrote {tmp_path / 'logreg.skops'}\n"
    converted = Bundle.load(tmp_path / "logreg.skops")  # no flag needed any more
    assert converted.meta == bundle.meta and converted.info == bundle.info
    same_predictions(bundle, converted, validation.features)


def test_the_format_is_told_by_content_not_by_name(logreg, tmp_path):
    skops_named_joblib = tmp_path / "model.joblib"
    skops_named_joblib.write_bytes(logreg.read_bytes())
    assert Bundle.load(skops_named_joblib).name == "logreg"
    pickle_named_skops = save_as_pickle({PAYLOAD_KEY: fields_of(Bundle.load(logreg))}, tmp_path / f"old{BUNDLE_SUFFIX}")
    with pytest.raises(BundleError, match="read as a pickle"):
        Bundle.load(pickle_named_skops)
    assert Bundle.load(pickle_named_skops, trust_pickle=True).name == "logreg"
    (tmp_path / "junk").write_bytes(b"not a pickle")
    for trust_pickle in (False, True):  # neither format: never the pickle reader's advice to trust it
        with pytest.raises(BundleError, match=r"junk: not a model bundle \(neither a .skops archive nor a pickle"):
            Bundle.load(tmp_path / "junk", trust_pickle=trust_pickle)
    cut = tmp_path / f"cut{BUNDLE_SUFFIX}"  # a bundle cut short (a copy interrupted): not "read as a pickle"
    cut.write_bytes(logreg.read_bytes()[:5000])
    for trust_pickle in (False, True):
        with pytest.raises(BundleError, match=r"cut.skops: a damaged .skops bundle, nothing in it was loaded: copy"):
            Bundle.load(cut, trust_pickle=trust_pickle)
    blanked = bytearray(logreg.read_bytes())  # its directory intact, its entries' headers blanked
    blanked[4:4000] = bytes(3996)
    (tmp_path / f"blanked{BUNDLE_SUFFIX}").write_bytes(bytes(blanked))
    with pytest.raises(BundleError, match=r"blanked.skops: a damaged .skops bundle, nothing in it was loaded"):
        Bundle.load(tmp_path / f"blanked{BUNDLE_SUFFIX}")
    line = one_error_line(run("evaluate", "--model", str(cut), "--features", str(tmp_path), ok=False))
    assert "a damaged .skops bundle" in line and "pickle" not in line, line
    with zipfile.ZipFile(tmp_path / f"other{BUNDLE_SUFFIX}", "w") as other:  # a zip, not a skops file
        other.writestr("notes.txt", "hello")
    with pytest.raises(BundleError, match=f"other{BUNDLE_SUFFIX}: not a readable model bundle"):
        Bundle.load(tmp_path / f"other{BUNDLE_SUFFIX}")


# --- the exported .onnx: predict and serve without TensorFlow -----------------------------------------------


def imported_heavy(stderr: str) -> set[str]:
    """The packages of :data:`HEAVY` that ``python -X importtime`` reported importing."""
    names = {line.rsplit("|", 1)[1].strip() for line in stderr.splitlines() if line.startswith("import time:")}
    return {name.split(".")[0] for name in names} & set(HEAVY)


def test_predict_and_serve_take_the_onnx_export_give_the_bundles_answers_and_import_no_tensorflow(
    logreg, pipeline_run, tmp_path
):
    onnx_file = tmp_path / "logreg.onnx"
    run("export", "--model", str(logreg), "--output", str(onnx_file))
    photos = sorted((pipeline_run["dataset"] / "validation").rglob("*.jpg"))
    bundle = Bundle.load(logreg)
    expected = Predictor(bundle, runtime="onnxruntime", top_k=2).predict(photos)  # the network the graph holds

    ptl = [sys.executable, "-X", "importtime", "-c", "from pyimagesearch_tl.cli import main; main()"]
    command = [*ptl, "predict", "--model", str(onnx_file), "--top-k", "2", "--output", str(tmp_path / "p.json")]
    predicted = subprocess.run([*command, *map(str, photos)], capture_output=True, text=True, timeout=300)
    assert predicted.returncode == 0, predicted.stderr[-2000:]
    assert imported_heavy(predicted.stderr) == set()
    assert f"predicted {len(photos)} (0 unknown), skipped 0" in predicted.stdout
    results = json.loads((tmp_path / "p.json").read_text())
    for got, want in zip(results, expected):
        assert got["label"] == want.top[0][0] and got["familiarity"] is None  # no detector in the graph
        assert [name for name, _ in got["top"]] == [name for name, _ in want.top]
        np.testing.assert_allclose([s for _, s in got["top"]], [s for _, s in want.top], rtol=0, atol=1e-5)

    serve = (
        "import json, sys\n"
        "from pyimagesearch_tl import api\n"
        "from pyimagesearch_tl.serve import create_app\n"
        f"client = create_app(api.load_predictor({str(onnx_file)!r}, 2)).test_client()\n"
        f"reply = client.post('/api/predict', data={{'file': (open({str(photos[0])!r}, 'rb'), 'photo.jpg')}})\n"
        "print(json.dumps([reply.status_code, reply.get_json(), client.get('/health').get_json(),\n"
        f"    sorted({{m.split('.')[0] for m in sys.modules}} & {set(HEAVY)!r})]))\n"
    )
    served = subprocess.run([sys.executable, "-c", serve], capture_output=True, text=True, timeout=300)
    assert served.returncode == 0, served.stderr[-2000:]
    status, reply, health, heavy = json.loads(served.stdout)
    assert status == 200 and heavy == []
    [answer] = reply["predictions"]
    assert answer["label"] == results[0]["label"] and answer["unknown"] is False
    assert [t["label"] for t in answer["top"]] == [name for name, _ in results[0]["top"]]
    # one upload alone against a batch of all the photos: ONNX Runtime's float32 sums may round differently
    np.testing.assert_allclose([t["probability"] for t in answer["top"]], [s for _, s in results[0]["top"]], atol=1e-6)
    assert health["classes"] == bundle.label_names
    assert health["unknown_threshold"] is health["unknown_calibration"] is None
    assert health["backbone"] == bundle.meta.backbone and health["input_size"] == bundle.meta.input_size


def test_a_file_that_is_not_an_export_is_one_error_line(logreg, pipeline_run, tmp_path):
    photos = str(pipeline_run["dataset"] / "validation")
    fake = tmp_path / "fake.onnx"
    fake.write_bytes(logreg.read_bytes())
    line = one_error_line(run("predict", "--model", str(fake), photos, ok=False))
    assert f"{fake}: not a readable ONNX model" in line
    line = one_error_line(run("predict", "--model", str(tmp_path / "gone.onnx"), photos, ok=False))
    assert "gone.onnx' does not exist" in line
    line = one_error_line(run("predict", "--model", str(fake), "--runtime", "tensorflow", photos, ok=False))
    assert "is an ONNX model, run by ONNX Runtime: runtime 'tensorflow' is for bundles" in line
