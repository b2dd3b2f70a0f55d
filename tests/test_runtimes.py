"""Runtimes (TensorFlow, ONNX Runtime, OpenVINO) on real photos, and `ptl export` checked by ONNX Runtime."""

import json
import math
import os
import re
import shutil
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cache import SIDECAR, cache_dir, file_sha256, record_sha256
from pyimagesearch_tl.classifiers import list_classifiers
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import ConfigError, PTLError
from pyimagesearch_tl.features import FeatureExtractor
from pyimagesearch_tl.images import load_image
from pyimagesearch_tl.prediction import Predictor
from pyimagesearch_tl.runtimes import (
    MIN_IMAGES_TO_CONVERT,
    PARITY_ATOL,
    PREFERENCE,
    RUNTIMES,
    TENSORFLOW,
    installed,
    machine_key,
    network_path,
    verdicts,
)

ONNX_RUNTIMES = [name for name in RUNTIMES if name != TENSORFLOW]


@pytest.fixture(scope="module", autouse=True)
def one_blas_thread():
    """NumPy's and scikit-learn's matrix products (training the bundles and their 'unknown' detectors) run
    on one thread in this module: they are small, and on a 2-core machine whose cores TensorFlow's pools
    and other processes keep busy, OpenBLAS's second thread made them several times slower (measured: a
    Mahalanobis fit on 1,280 features 2.1-2.9 s instead of 0.4-0.6 s). The same products, the same results."""
    import scipy.linalg  # noqa: F401  (loads SciPy's own OpenBLAS, so that the limit reaches it too)
    from threadpoolctl import threadpool_limits

    with threadpool_limits(1, user_api="blas"):
        yield


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """16 real photos, decoded as the default backbone sees them."""
    paths = sorted(shared("hymenoptera_data", "train", "ants").glob("*.jpg"))[:8]
    paths += sorted(shared("hymenoptera_data", "train", "bees").glob("*.jpg"))[:8]
    return np.stack([load_image(p, 224) for p in paths])


@pytest.fixture(scope="module")
def tensorflow_extractor() -> FeatureExtractor:
    """The default backbone run in TensorFlow, the reference: built once for the module."""
    extractor = FeatureExtractor("efficientnet_lite0", runtime="tensorflow", label_names=["ants", "bees"])
    assert extractor.runtime == TENSORFLOW
    return extractor


@pytest.fixture(scope="module")
def tensorflow_features(photos, tensorflow_extractor) -> np.ndarray:
    return tensorflow_extractor.transform(photos)


@pytest.fixture(scope="module")
def converted_network(tensorflow_extractor) -> tuple[Path, Path]:
    """The default network converted in the session cache (once for the whole session), and the folder
    of the converted weights it is built from."""
    return tensorflow_extractor.network_file(), cache_dir() / "weights"


@pytest.mark.parametrize("runtime", ONNX_RUNTIMES)
def test_every_float32_runtime_gives_tensorflow_features(photos, tensorflow_features, runtime):
    extractor = FeatureExtractor("efficientnet_lite0", runtime=runtime, label_names=["ants", "bees"])
    features = extractor.transform(photos)
    assert extractor.runtime == runtime
    assert features.dtype == np.float32 and features.shape == tensorflow_features.shape
    np.testing.assert_allclose(features, tensorflow_features, rtol=0, atol=PARITY_ATOL)
    # A server's threads call one extractor at once: each call still gets its own images' features.
    starts = [0, 4, 8, 12] * 4
    with ThreadPoolExecutor(4) as pool:
        outputs = list(pool.map(lambda start: extractor.transform(photos[start : start + 4]), starts))
    for start, output in zip(starts, outputs):
        np.testing.assert_allclose(output, tensorflow_features[start : start + 4], rtol=0, atol=PARITY_ATOL)


def _network_files():
    return sorted((cache_dir() / "networks").glob("*.onnx"))


def _verdicts(network) -> dict:
    """This machine's verdicts stored beside ``network``."""
    return json.loads(network.with_suffix(".json").read_text())[machine_key()]


NEW_PROCESS_EXTRACTS = """
import json, sys
import numpy as np
from pyimagesearch_tl.features import FeatureExtractor
extractor = FeatureExtractor("efficientnet_lite0", label_names=["ants", "bees"])
features = extractor.transform(np.load(sys.argv[1]))
print(json.dumps(dict(runtime=extractor.runtime, tensorflow="tensorflow" in sys.modules, features=features.tolist())))
"""


def test_auto_takes_the_first_preferred_runtime_that_passed_and_remembers_it(photos, tensorflow_features, tmp_path):
    auto = FeatureExtractor("efficientnet_lite0", label_names=["ants", "bees"])  # runtime="auto", the default
    features = auto.transform(photos)
    auto_network = network_path(auto.network_key())
    record = _verdicts(auto_network)
    preferred = next(name for name in PREFERENCE if name in ONNX_RUNTIMES)
    assert record[preferred]["passed"] and record[preferred]["max_abs_diff"] <= PARITY_ATOL
    assert auto.runtime == preferred
    np.testing.assert_allclose(features, tensorflow_features, rtol=0, atol=PARITY_ATOL)
    converted_at = auto_network.stat().st_mtime_ns
    again = FeatureExtractor("efficientnet_lite0", label_names=["ants", "bees"])
    again.transform(photos[:2])
    assert again.runtime == preferred and auto_network.stat().st_mtime_ns == converted_at  # no second conversion
    # A new process runs the cached network, checked on this machine, without importing TensorFlow at all.
    np.save(tmp_path / "photos.npy", photos[:4])
    command = [sys.executable, "-c", NEW_PROCESS_EXTRACTS, str(tmp_path / "photos.npy")]
    done = subprocess.run(command, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    report = json.loads(done.stdout)
    assert report["runtime"] == preferred and report["tensorflow"] is False
    np.testing.assert_allclose(report["features"], tensorflow_features[:4], rtol=0, atol=PARITY_ATOL)


def test_auto_converts_a_network_only_for_a_job_that_repays_the_conversion(photos):
    """A job smaller than MIN_IMAGES_TO_CONVERT runs a network not converted yet in TensorFlow and converts
    nothing; a job of MIN_IMAGES_TO_CONVERT converts it; from then on a small job uses it too."""
    options = dict(backbone="efficientnet_lite0", pooling="max", label_names=["a"])  # a network no other test converts
    small = FeatureExtractor(**options, job_images=MIN_IMAGES_TO_CONVERT - 1)
    network = network_path(small.network_key())
    reference = small.transform(photos[:4])
    assert small.runtime == TENSORFLOW and not network.exists()
    large = FeatureExtractor(**options, job_images=MIN_IMAGES_TO_CONVERT)
    preferred = next(name for name in PREFERENCE if name in ONNX_RUNTIMES)
    np.testing.assert_allclose(large.transform(photos[:4]), reference, rtol=0, atol=PARITY_ATOL)
    assert large.runtime == preferred and network.exists()
    again = FeatureExtractor(**options, job_images=1)
    again.transform(photos[:2])
    assert again.runtime == preferred
    network.write_bytes(network.read_bytes()[:-1000])  # damaged since: a small job says so, and runs in TensorFlow
    damaged = FeatureExtractor(**options, job_images=1)
    with pytest.warns(UserWarning, match="does not match its recorded SHA-256.*; this job runs in TensorFlow"):
        damaged.transform(photos[:2])
    assert damaged.runtime == TENSORFLOW
    for wrong in (-1, 2.5, "many", True):
        with pytest.raises(ConfigError, match="job_images must be a whole number of images"):
            FeatureExtractor(**options, job_images=wrong)


def test_a_timing_taken_on_a_busy_machine_or_another_machine_decides_nothing(photos, own_network):
    network = own_network
    # The first format's verdict, taken while a test suite ran: TensorFlow "fastest", kept forever.
    busy = {
        "tensorflow": {"img_per_s": 108.6},
        "openvino": {"img_per_s": 99.2, "max_abs_diff": 1e-5, "passed": True},
        "onnxruntime": {"img_per_s": 66.5, "max_abs_diff": 1e-5, "passed": True},
        "0123456789abcdef": {name: {"max_abs_diff": 1.0, "passed": False} for name in ONNX_RUNTIMES},  # elsewhere
    }
    network.with_suffix(".json").write_text(json.dumps(busy))
    auto = FeatureExtractor("efficientnet_lite0", label_names=["a"])
    auto.transform(photos[:4])
    assert auto.runtime == next(name for name in PREFERENCE if name in ONNX_RUNTIMES)
    stored = json.loads(network.with_suffix(".json").read_text())
    assert set(stored) == {"0123456789abcdef", machine_key()}  # the other machine's verdicts are kept, not used
    assert stored[machine_key()][auto.runtime]["passed"]


def test_verdicts_written_by_many_processes_at_once_are_all_kept(tmp_path):
    network = tmp_path / "network.onnx"
    network.write_bytes(b"")
    code = (
        "import sys; from pathlib import Path; from pyimagesearch_tl.runtimes import verdicts\n"
        "with verdicts(Path(sys.argv[1])) as record: record[sys.argv[2]] = {'passed': True, 'max_abs_diff': 0.0}"
    )
    writers = [subprocess.Popen([sys.executable, "-c", code, str(network), f"runtime{i}"]) for i in range(6)]
    assert [w.wait(timeout=120) for w in writers] == [0] * 6
    assert sorted(_verdicts(network)) == [f"runtime{i}" for i in range(6)]


@pytest.fixture
def own_network(converted_network, tmp_path, monkeypatch) -> Path:
    """The default network, converted once in the session cache, copied (with its weights and recorded SHA-256)
    into this test's own."""
    source, weights = converted_network
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    network = network_path(source.stem)  # the same key, in this test's cache
    network.parent.mkdir(parents=True)
    shutil.copy(source, network)
    shutil.copy(f"{source}{SIDECAR}", f"{network}{SIDECAR}")
    if weights.is_dir():
        shutil.copytree(weights, cache_dir() / "weights")
    return network


def test_a_cache_that_cannot_be_locked_is_read_without_the_lock_and_never_written(photos, own_network):
    stored = own_network.with_suffix(".json")
    # Where no lock file can be made (a read-only cache; a folder in its place stops even root), runs go on.
    Path(str(stored) + ".lock").mkdir()
    preferred, second = [name for name in PREFERENCE if name in ONNX_RUNTIMES][:2]
    auto = FeatureExtractor("efficientnet_lite0", label_names=["a"])
    auto.transform(photos[:4])
    assert auto.runtime == preferred and not stored.exists()  # checked and used for this run, not stored
    # Verdicts stored by whoever filled the cache are read without the lock, and the file is left as it was.
    failed = {"max_abs_diff": 0.5, "passed": False, "network_sha256": file_sha256(own_network)}
    failed["network_key"] = own_network.name.removesuffix(".onnx")
    stored.write_text(json.dumps({machine_key(): {preferred: failed}}))
    before = stored.read_bytes()
    auto = FeatureExtractor("efficientnet_lite0", label_names=["a"])
    with pytest.warns(UserWarning, match=f"runtime auto passed over {preferred}: 0.5 from TensorFlow's features"):
        auto.transform(photos[:4])
    assert auto.runtime == second
    result = CliRunner().invoke(cli, ["runtimes"])
    assert result.exit_code == 0, result.output
    assert f"{preferred:<12} yes       FAILED (5.0e-01)" in result.output
    assert result.output.splitlines()[-1].startswith(f"auto -> {second} ")
    assert stored.read_bytes() == before and _network_files() == [own_network]


HOSTILE = {
    "a word": "yes",
    "no passed": {"max_abs_diff": 0.5},
    "a word for the difference": {"passed": False, "max_abs_diff": "big"},
    "a word for passed": {"passed": "false", "max_abs_diff": 0.0},
    "a number for passed": {"passed": 1, "max_abs_diff": 0.0},
    "a bool for the difference": {"passed": True, "max_abs_diff": False},
    "NaN": {"passed": False, "max_abs_diff": math.nan},
    "negative": {"passed": True, "max_abs_diff": -1.0},
    "passed, far off": {"passed": True, "max_abs_diff": 0.5},
    "failed, close": {"passed": False, "max_abs_diff": 0.0},
}


def test_malformed_verdicts_are_dropped_and_checked_again(tmp_path):
    network = tmp_path / "network.onnx"
    network.write_bytes(b"")
    good = {"close": {"passed": True, "max_abs_diff": 1e-6}, "far": {"passed": False, "max_abs_diff": math.inf}}
    good = {name: dict(v, network_sha256=file_sha256(network), network_key="network") for name, v in good.items()}
    other_key = {"other": dict(good["close"], network_key="another")}  # copied along with another network's file
    network.with_suffix(".json").write_text(json.dumps({machine_key(): dict(HOSTILE, **good, **other_key)}))
    with verdicts(network) as record:
        assert record == good
    assert _verdicts(network) == good  # the file no longer holds them


def test_a_hostile_verdict_file_neither_crashes_a_run_nor_decides_it(photos, own_network):
    stored = own_network.with_suffix(".json")
    hostile = dict(zip(ONNX_RUNTIMES, HOSTILE.values()))  # one malformed entry per runtime
    stored.write_text(json.dumps({machine_key(): hostile}))
    auto = FeatureExtractor("efficientnet_lite0", label_names=["a"])
    auto.transform(photos[:4])
    preferred = next(name for name in PREFERENCE if name in ONNX_RUNTIMES)
    assert auto.runtime == preferred and _verdicts(own_network)[preferred]["passed"]  # checked again
    stored.write_text(json.dumps({machine_key(): {name: HOSTILE["a word for passed"] for name in ONNX_RUNTIMES}}))
    result = CliRunner().invoke(cli, ["runtimes"])
    assert result.exit_code == 0, result.output
    for name in ONNX_RUNTIMES:
        assert re.search(rf"^{name} +yes +passed \(", result.output, re.M), result.output
        assert _verdicts(own_network)[name]["passed"] is True


def test_a_damaged_network_file_is_named_and_auto_passes_over_it(photos, own_network):
    own_network.write_bytes(own_network.read_bytes()[:1_000_000])  # a truncated file
    record_sha256(own_network)  # recorded as such (by whoever filled the cache): not converted again
    damaged = (
        rf"cannot run the cached network {re.escape(str(own_network))} \(.+\); delete that file to convert it again"
    )
    for name in ONNX_RUNTIMES:
        with pytest.raises(PTLError, match=f"^{name} {damaged}$"):
            FeatureExtractor("efficientnet_lite0", runtime=name, label_names=["a"]).transform(photos[:2])
    auto = FeatureExtractor("efficientnet_lite0", label_names=["a"])
    first = next(name for name in PREFERENCE if name in ONNX_RUNTIMES)
    with pytest.warns(UserWarning, match=f"^runtime auto passed over {first}: {damaged}") as caught:
        features = auto.transform(photos[:2])
    assert auto.runtime == TENSORFLOW and features.shape[0] == 2
    [message] = [str(w.message) for w in caught if "passed over" in str(w.message)]
    assert "\n" not in message and all(f"{name}: cannot run" in message for name in ONNX_RUNTIMES)
    assert not own_network.with_suffix(".json").exists() or not _verdicts(own_network)  # no verdict on a bad file
    result = CliRunner().invoke(cli, ["runtimes"])
    assert result.exit_code == 1 and re.search(f"Error: {PREFERENCE[0]} {damaged}", result.output), result.output


def test_ptl_runtimes_lists_each_runtime_its_parity_and_its_speed():
    result = CliRunner().invoke(cli, ["runtimes", "--benchmark"])
    assert result.exit_code == 0, result.output
    lines = result.output.splitlines()
    for name in PREFERENCE:
        [row] = [line.split() for line in lines if line.startswith(name + " ")]
        assert row[1] == ("yes" if installed(name) else "no")
        assert float(row[-1]) > 0  # images per second, measured here
        if name != TENSORFLOW:
            assert row[2] == "passed" and float(row[3].strip("()")) <= PARITY_ATOL
    preferred = next(name for name in PREFERENCE if installed(name))
    assert lines[-1].startswith(f"auto -> {preferred} ")


def test_a_network_that_fails_the_parity_check_is_refused(photos, own_network):
    import onnx
    from onnx import numpy_helper

    other = onnx.load(own_network)  # the same graph with other values, as another model's weights would be
    for weight in other.graph.initializer:
        values = numpy_helper.to_array(weight)
        if values.dtype == np.float32 and values.size > 1:
            weight.CopyFrom(numpy_helper.from_array(values * np.float32(1.5), weight.name))
    onnx.save(other, own_network)
    record_sha256(own_network)  # as a converter gone wrong would have left it
    with pytest.raises(
        PTLError,
        match=r"onnxruntime gives features of efficientnet_lite0 .* away from TensorFlow's "
        r"\(the limit is 0.0001\); refused: use --runtime tensorflow",
    ):
        FeatureExtractor("efficientnet_lite0", runtime="onnxruntime", label_names=["a"]).transform(photos)
    auto = FeatureExtractor("efficientnet_lite0", label_names=["a"])
    with pytest.warns(UserWarning, match="runtime auto passed over .*onnxruntime"):
        auto.transform(photos)
    assert auto.runtime == TENSORFLOW  # auto passes over what failed, and says so


def test_a_network_that_cannot_be_converted_runs_in_tensorflow_with_a_note(photos, tmp_path, monkeypatch):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    monkeypatch.setitem(sys.modules, "tf2onnx", None)  # the converter cannot be imported: nothing converts
    extractor = FeatureExtractor("efficientnet_lite0", weights="none", runtime="onnxruntime")
    with pytest.warns(UserWarning, match="could not be converted to ONNX .*; it runs in TensorFlow"):
        extractor.transform(photos[:2])
    assert extractor.runtime == TENSORFLOW


def test_reduced_precision_and_missing_runtimes_are_clear_errors():
    from pyimagesearch_tl.runtimes import bfloat16_arithmetic

    with pytest.raises(ConfigError, match="--precision bfloat16 runs in TensorFlow or OpenVINO, not onnxruntime"):
        FeatureExtractor("efficientnet_lite0", weights="none", precision="bfloat16", runtime="onnxruntime")
    for runtime in ("tensorflow", "onnxruntime"):
        with pytest.raises(ConfigError, match=f"int8 features are made in OpenVINO only.*[(]{runtime} given[)]"):
            FeatureExtractor("efficientnet_lite0", weights="none", precision="int8", runtime=runtime)
    # bfloat16: OpenVINO where the CPU has bfloat16 arithmetic (AVX512-BF16 or AMX), else TensorFlow's
    # mixed_bfloat16 model; OpenVINO by name on a CPU without it is refused, saying why.
    auto = FeatureExtractor("efficientnet_lite0", weights="none", precision="bfloat16").runtime
    if bfloat16_arithmetic():
        assert auto == "openvino"
        assert FeatureExtractor("efficientnet_lite0", "none", precision="bfloat16", runtime="openvino").runtime == auto
    else:
        assert auto == TENSORFLOW
        with pytest.raises(ConfigError, match="needs a CPU with AVX512-BF16 or AMX, which this one lacks"):
            FeatureExtractor("efficientnet_lite0", weights="none", precision="bfloat16", runtime="openvino")
    with pytest.raises(ConfigError, match="unknown runtime 'tensorrt'"):
        FeatureExtractor("efficientnet_lite0", weights="none", runtime="tensorrt")


def test_a_runtime_that_is_not_installed_says_how_to_install_it(pipeline_run, tmp_path):
    blocked = [
        sys.executable,
        "-c",
        "import sys; sys.modules['openvino'] = None; from pyimagesearch_tl.cli import main; main()",
    ]
    result = subprocess.run(
        blocked
        + ["extract", "--dataset", str(pipeline_run["dataset"]), "--output", str(tmp_path), "--runtime", "openvino"],
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, TF_ENABLE_ONEDNN_OPTS="1"),  # TensorFlow's start-up lines, on every CPU
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: runtime 'openvino' is not installed: pip install 'pyimagesearch_tl[openvino]'"
    ]


@pytest.fixture(scope="module")
def bundles(pipeline_run, tmp_path_factory):
    models = tmp_path_factory.mktemp("models")
    result = CliRunner().invoke(
        cli,
        [
            "train",
            "--features",
            str(pipeline_run["features"]),
            "--output",
            str(models),
            "--classifier",
            "all",
            "--cv",
            "2",
        ],
    )
    assert result.exit_code == 0, result.output
    return models


@pytest.mark.parametrize("classifier", list_classifiers())
def test_the_exported_onnx_graph_predicts_what_the_bundle_predicts(bundles, pipeline_run, tmp_path, classifier):
    import onnxruntime

    result = CliRunner().invoke(
        cli, ["export", "--model", str(bundles / f"{classifier}.skops"), "--output", str(tmp_path / "model.onnx")]
    )
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(bundles / f"{classifier}.skops")
    paths = sorted((pipeline_run["dataset"] / "validation").rglob("*.jpg"))
    expected = Predictor(bundle, runtime="tensorflow", top_k=len(bundle.label_names)).predict(paths)

    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    session = onnxruntime.InferenceSession(str(tmp_path / "model.onnx"), options)
    metadata = session.get_modelmeta().custom_metadata_map
    assert json.loads(metadata["label_names"]) == bundle.label_names == ["cats", "dogs"]
    size = int(metadata["input_size"])
    labels, scores = session.run(None, {"pixels": np.stack([load_image(p, size) for p in paths])})
    assert [o.name for o in session.get_outputs()][1] == (
        "probabilities" if metadata["score_kind"] == "probability" else "scores"
    )
    for row, label, prediction in zip(scores, labels, expected):
        assert bundle.label_names[label] == prediction.top[0][0]
        by_name = dict(prediction.top)
        np.testing.assert_allclose(row, [by_name[name] for name in bundle.label_names], rtol=1e-3, atol=1e-4)
