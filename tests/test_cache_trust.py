"""Caches verified by content: converted weights and networks whose bytes changed are converted again,
a runtime's verdict holds only for the network content it was taken on, and a cache that cannot be
written (read-only, full) gives way to a temporary one. On real photos, with the session's converted
files copied into each test's own cache."""

from __future__ import annotations

import contextlib
import errno
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest
from conftest import shared

from pyimagesearch_tl.cache import SIDECAR, cache_dir, file_sha256, problem, record_sha256
from pyimagesearch_tl.errors import PTLError
from pyimagesearch_tl.features import FeatureExtractor
from pyimagesearch_tl.images import load_image
from pyimagesearch_tl.runtimes import (
    PARITY_ATOL,
    PREFERENCE,
    TENSORFLOW,
    installed,
    machine_key,
    network_path,
)

ONNX_RUNTIMES = [name for name in PREFERENCE if name != TENSORFLOW and installed(name)]
CONVERTED_AGAIN = r"; converting it again$"


@pytest.fixture(scope="module")
def photos() -> np.ndarray:
    """4 ants and 4 bees, decoded as the default backbone sees them."""
    paths = sorted(shared("hymenoptera_data", "train", "ants").glob("*.jpg"))[:4]
    paths += sorted(shared("hymenoptera_data", "train", "bees").glob("*.jpg"))[:4]
    return np.stack([load_image(p, 224) for p in paths])


@pytest.fixture(scope="module")
def session_cache(photos) -> dict:
    """The session cache's converted weights and network (converted once for the whole session), and
    TensorFlow's features of ``photos`` (the reference)."""
    extractor = FeatureExtractor("efficientnet_lite0", runtime=TENSORFLOW, label_names=["ants", "bees"])
    network = extractor.network_file()
    [weights] = (cache_dir() / "weights").glob("efficientnet_lite0-*.weights.h5")
    return {
        "network": network,
        "weights": weights,
        "key": extractor.network_key(),
        "features": extractor.transform(photos),
    }


def fill(cache: Path, *files: Path) -> None:
    """Copy cached ``files`` (with their recorded SHA-256) to the same places in cache folder ``cache``."""
    for file in files:
        (cache / file.parent.name).mkdir(parents=True, exist_ok=True)
        for suffix in ("", SIDECAR):
            shutil.copy(f"{file}{suffix}", cache / file.parent.name / f"{file.name}{suffix}")


@pytest.fixture
def own_cache(tmp_path, monkeypatch, session_cache) -> dict:
    """This test's own cache holding copies of the session's weights and network: their paths here."""
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    fill(cache_dir(), session_cache["weights"], session_cache["network"])
    return {
        "weights": cache_dir() / "weights" / session_cache["weights"].name,
        "network": network_path(session_cache["key"]),
    }


def scaled_network(source: Path) -> bytes:
    """A valid ONNX network, but not ``source``'s: the same graph with its weights scaled by 1.5."""
    import onnx
    from onnx import numpy_helper

    other = onnx.load(source)
    for weight in other.graph.initializer:
        values = numpy_helper.to_array(weight)
        if values.dtype == np.float32 and values.size > 1:
            weight.CopyFrom(numpy_helper.from_array(values * np.float32(1.5), weight.name))
    return other.SerializeToString()


def notes(caught, pattern: str) -> list[str]:
    return [str(w.message) for w in caught if re.search(pattern, str(w.message))]


def test_weights_whose_kernels_were_permuted_are_converted_again(own_cache, session_cache, photos):
    import h5py

    weights = own_cache["weights"]
    stamp = weights.stat()
    with h5py.File(weights, "r+") as handle:  # every kernel's output channels reversed: same shapes, same size
        kernels = []
        handle.visititems(lambda name, item: kernels.append(item) if getattr(item, "ndim", 0) == 4 else None)
        for kernel in kernels:
            kernel[...] = kernel[...][..., ::-1]
    os.utime(weights, ns=(stamp.st_atime_ns, stamp.st_mtime_ns))  # even with its old time
    assert weights.stat().st_size == stamp.st_size

    with pytest.warns(UserWarning) as caught:
        extractor = FeatureExtractor("efficientnet_lite0", runtime=TENSORFLOW, label_names=["ants", "bees"])
    [note] = notes(caught, CONVERTED_AGAIN)
    assert note == f"cached {weights} does not match its recorded SHA-256 (changed or damaged); converting it again"
    np.testing.assert_allclose(extractor.transform(photos), session_cache["features"], rtol=0, atol=1e-6)
    assert problem(weights) is None and file_sha256(weights) == file_sha256(session_cache["weights"])


@pytest.mark.skipif(not ONNX_RUNTIMES, reason="no ONNX runtime installed")
@pytest.mark.parametrize("damage", ["another valid network", "truncated"])
def test_a_network_file_that_does_not_match_its_sha256_is_converted_again(own_cache, session_cache, photos, damage):
    network = own_cache["network"]
    # This machine's verdicts on the real network, as a run would have stored them: "passed".
    digest = file_sha256(network)
    key = network.name.removesuffix(".onnx")
    passed = {
        name: {"max_abs_diff": 0.0, "passed": True, "network_sha256": digest, "network_key": key}
        for name in ONNX_RUNTIMES
    }
    network.with_suffix(".json").write_text(json.dumps({machine_key(): passed}))
    content = scaled_network(network) if damage == "another valid network" else network.read_bytes()[:1_000_000]
    network.write_bytes(content)

    auto = FeatureExtractor("efficientnet_lite0", label_names=["ants", "bees"])
    with pytest.warns(UserWarning) as caught:
        features = auto.transform(photos)
    [note] = notes(caught, CONVERTED_AGAIN)
    assert note == f"cached {network} does not match its recorded SHA-256 (changed or damaged); converting it again"
    assert not notes(caught, "passed over")
    assert auto.runtime == ONNX_RUNTIMES[0]
    np.testing.assert_allclose(features, session_cache["features"], rtol=0, atol=PARITY_ATOL)
    assert problem(network) is None


@pytest.mark.skipif(not ONNX_RUNTIMES, reason="no ONNX runtime installed")
def test_a_verdict_taken_on_other_content_never_skips_the_parity_check(own_cache, session_cache, photos):
    network = own_cache["network"]
    original = file_sha256(network)
    # Another network under the cached name, its SHA-256 recorded (a converter gone wrong, a cache filled
    # elsewhere): the file is what its record says, but no verdict was taken on it.
    network.write_bytes(scaled_network(network))
    record_sha256(network)
    stale = {"max_abs_diff": 0.0, "passed": True}
    mine = {name: dict(stale, network_sha256=original) for name in ONNX_RUNTIMES}  # on the real network
    mine[ONNX_RUNTIMES[-1]] = stale  # and one stored before verdicts carried the digest
    network.with_suffix(".json").write_text(json.dumps({machine_key(): mine}))

    with pytest.raises(PTLError, match=rf"^{ONNX_RUNTIMES[0]} gives features of efficientnet_lite0 .* refused"):
        FeatureExtractor("efficientnet_lite0", runtime=ONNX_RUNTIMES[0], label_names=["a"]).transform(photos)
    auto = FeatureExtractor("efficientnet_lite0", label_names=["ants", "bees"])
    with pytest.warns(UserWarning, match="^runtime auto passed over ") as caught:
        features = auto.transform(photos)
    assert all(f"{name}: " in notes(caught, "passed over")[0] for name in ONNX_RUNTIMES)
    assert auto.runtime == TENSORFLOW
    np.testing.assert_allclose(features, session_cache["features"], rtol=0, atol=1e-6)
    stored = json.loads(network.with_suffix(".json").read_text())[machine_key()]
    assert {name: (v["passed"], v["network_sha256"]) for name, v in stored.items()} == {
        name: (False, file_sha256(network)) for name in ONNX_RUNTIMES
    }


@pytest.mark.skipif(not ONNX_RUNTIMES, reason="no ONNX runtime installed")
def test_a_corrupt_verdict_file_is_checked_again_and_rewritten(own_cache, session_cache, photos):
    verdicts = own_cache["network"].with_suffix(".json")
    verdicts.write_bytes(b'{"' + machine_key().encode() + b'": {"openvino": {"passed": tr')  # cut off mid-write
    auto = FeatureExtractor("efficientnet_lite0", label_names=["ants", "bees"])
    features = auto.transform(photos)
    assert auto.runtime == ONNX_RUNTIMES[0]
    np.testing.assert_allclose(features, session_cache["features"], rtol=0, atol=PARITY_ATOL)
    stored = json.loads(verdicts.read_text())[machine_key()][auto.runtime]
    assert stored["passed"] and stored["network_sha256"] == file_sha256(own_cache["network"])


# --- a cache that cannot be written ----------------------------------------------------------------


@contextlib.contextmanager
def mounted(point: Path, *steps: list[str]):
    """``point`` mounted by the ``mount`` commands ``steps`` (as root), unmounted afterwards; skips where
    this machine does not allow it."""
    if os.geteuid() != 0 or not shutil.which("mount"):
        pytest.skip("mounting a read-only or full cache needs root and mount(8)")
    done = 0
    try:
        for step in steps:
            result = subprocess.run(["mount", *step], capture_output=True, text=True, timeout=30)
            if result.returncode:
                pytest.skip(f"cannot mount here: {result.stderr.strip() or result.returncode}")
            done += 1
        yield point
    finally:
        if done:
            subprocess.run(["umount", str(point)], capture_output=True, timeout=30, check=True)


@pytest.mark.skipif(not ONNX_RUNTIMES, reason="no ONNX runtime installed")
def test_an_empty_read_only_cache_gives_way_to_a_temporary_one(tmp_path, monkeypatch, session_cache, photos):
    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    with mounted(xdg, ["--bind", str(xdg), str(xdg)], ["-o", "remount,bind,ro", str(xdg)]):
        with pytest.warns(UserWarning) as caught:  # the weights, then the network: converted in a temporary cache
            auto = FeatureExtractor("efficientnet_lite0", label_names=["ants", "bees"])
            features = auto.transform(photos)
        assert not list(xdg.iterdir())
    [note] = notes(caught, "^cannot write the cache ")
    assert re.match(
        rf"^cannot write the cache {re.escape(str(xdg))}/pyimagesearch_tl \(Read-only file system\); "
        r"this run caches in \S+, removed when it ends$",
        note,
    )
    assert auto.runtime == ONNX_RUNTIMES[0]
    np.testing.assert_allclose(features, session_cache["features"], rtol=0, atol=PARITY_ATOL)


def test_a_full_cache_gives_way_to_a_temporary_one(tmp_path, monkeypatch, session_cache, photos):
    from click.testing import CliRunner

    from pyimagesearch_tl.cli import cli

    xdg = tmp_path / "xdg"
    xdg.mkdir()
    monkeypatch.setenv("XDG_CACHE_HOME", str(xdg))
    size = session_cache["network"].stat().st_size + (1 << 20)
    with mounted(xdg, ["-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(xdg)]):
        fill(cache_dir(), session_cache["network"])  # the network fits; the weights will not
        with contextlib.suppress(OSError), open(xdg / "filler", "wb", buffering=0) as filler:
            while True:
                filler.write(b"\0" * 4096)
        with pytest.raises(OSError) as full:
            (xdg / "one more").write_bytes(b"\0" * 4096)
        assert full.value.errno == errno.ENOSPC
        result = CliRunner().invoke(cli, ["runtimes"])
    assert result.exit_code == 0, result.output
    [note] = [line for line in result.output.splitlines() if line.startswith("warning: ")]
    assert re.match(
        rf"^warning: cannot write the cache {re.escape(str(xdg))}/pyimagesearch_tl \(No space left on device\); "
        r"this run caches in \S+, removed when it ends$",
        note,
    )
    assert "Traceback" not in result.output
    for name in ONNX_RUNTIMES:
        assert re.search(rf"^{name} +yes +passed \(", result.output, re.M), result.output


def three_wide_network() -> bytes:
    """A valid ONNX network of the extractor's input, but 3 features wide (the mean of each colour)."""
    from onnx import TensorProto, helper

    graph = helper.make_graph(
        [
            helper.make_node("Cast", ["pixels"], ["floats"], to=TensorProto.FLOAT),
            helper.make_node("ReduceMean", ["floats"], ["features"], axes=[1, 2], keepdims=0),
        ],
        "three_wide",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, [None, 224, 224, 3])],
        [helper.make_tensor_value_info("features", TensorProto.FLOAT, [None, 3])],
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 13)]).SerializeToString()


@pytest.mark.skipif(not ONNX_RUNTIMES, reason="no ONNX runtime installed")
@pytest.mark.parametrize("verdict", ["none", "copied from another network"])
def test_a_network_of_another_width_under_the_key_never_sets_the_layout(own_cache, session_cache, photos, verdict):
    """Another network put under the key with its SHA-256 recorded (and, at worst, the verdicts it had under
    its own key copied along): the extractor learns its width from the Keras model, not from that file, and
    the parity check refuses the file: the features are TensorFlow's, 1,280 wide."""
    network = own_cache["network"]
    network.write_bytes(three_wide_network())
    record_sha256(network)
    if verdict != "none":
        copied = {"max_abs_diff": 0.0, "passed": True, "network_sha256": file_sha256(network), "network_key": "other"}
        network.with_suffix(".json").write_text(json.dumps({machine_key(): dict.fromkeys(ONNX_RUNTIMES, copied)}))
    auto = FeatureExtractor("efficientnet_lite0", label_names=["ants", "bees"])
    assert auto.meta.feature_dim == 1280
    with pytest.warns(UserWarning, match="^runtime auto passed over "):
        features = auto.transform(photos)
    assert auto.runtime == TENSORFLOW
    np.testing.assert_allclose(features, session_cache["features"], rtol=0, atol=1e-6)


def test_reading_a_verdict_never_waits_behind_a_parity_check_in_progress(default_network):
    """Another process checking parity holds the verdicts' lock for seconds (it builds the Keras network):
    a job that only reads them (an extractor learning its width, ``ptl export``) does not wait for it."""
    import threading

    from filelock import FileLock

    from pyimagesearch_tl.runtimes import checked_network

    key = default_network.name.removesuffix(".onnx")
    held = FileLock(str(default_network.with_suffix(".json")) + ".lock")
    with held:  # as a parity check elsewhere holds it
        found = []
        reader = threading.Thread(target=lambda: found.append(checked_network(key)), daemon=True)
        reader.start()
        reader.join(timeout=20)
        assert not reader.is_alive(), "checked_network waited for the verdicts' lock"
    assert found == [default_network]
