"""The Ray engine on a real 2-node Ray cluster started here (one CPU per node), on real photos.

Its output must equal the local engine's, whatever dies: a worker process (Ray restarts it and
retries its shards) or the driver (the same command again resumes from the finished shards).
"""

import math
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import copy_subset, shared

from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.store import read_features, read_skipped

SPLITS = ["training", "validation", "evaluation"]
PTL = [sys.executable, "-c", "from pyimagesearch_tl.cli import main; main()"]
SHARD = 8
TRAINING = 65  # 32 cats + 32 dogs + one truncated JPEG: 9 shards


@pytest.fixture(scope="module")
def dataset(tmp_path_factory) -> Path:
    """65 training photos (one of them cut short) and 10 validation photos of cats_and_dogs_filtered."""
    root = tmp_path_factory.mktemp("ray") / "dataset"
    copy_subset(shared("cats_and_dogs_filtered", "train"), root / "training", 32)
    copy_subset(shared("cats_and_dogs_filtered", "validation"), root / "validation", 5)
    whole = sorted((root / "training" / "dogs").glob("*.jpg"))[0].read_bytes()
    (root / "training" / "dogs" / "cut.jpg").write_bytes(whole[:1500])
    return root


@pytest.fixture(scope="module")
def local_reference(dataset, tmp_path_factory) -> Path:
    output = tmp_path_factory.mktemp("local")
    extract_dataset(
        dataset, output, splits=SPLITS, backbone="efficientnet_lite0", batch_size=8, shard_size=SHARD, progress=False
    )
    return output


@pytest.fixture(scope="module")
def cluster_address():
    """A head and one more node, one CPU each: two Ray nodes on this machine."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=100 * 2**20, include_dashboard=False)
    )
    cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
    cluster.wait_for_nodes()
    yield cluster.address
    cluster.shutdown()


def _command(dataset: Path, output: Path, address: str) -> list[str]:
    return PTL + [
        "extract",
        "--dataset",
        str(dataset),
        "--output",
        str(output),
        "--engine",
        "ray",
        "--ray-address",
        address,
        "--shard-size",
        str(SHARD),
        "--batch-size",
        "8",
    ]


def _finished_shards(output: Path) -> list[Path]:
    return sorted((output / ".shards" / "training").glob("[!.]*.h5"))  # not the temporary file of a shard being written


def _start_and_wait_for_shards(command: list[str], output: Path, count: int) -> subprocess.Popen:
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    deadline = time.monotonic() + 180
    while len(_finished_shards(output)) < count:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"extract ended or stalled before {count} shards were done:\n{process.communicate()[0]}")
        time.sleep(0.01)
    return process


def assert_same_as_local(output: Path, reference: Path) -> None:
    for split in ("training", "validation"):
        got, expected = read_features(output / f"{split}.h5"), read_features(reference / f"{split}.h5")
        assert got.paths == expected.paths and got.sha256 == expected.sha256
        assert got.labels.tolist() == expected.labels.tolist()
        assert got.meta == expected.meta
        np.testing.assert_allclose(got.features, expected.features, rtol=0, atol=1e-5)
        assert read_skipped(output / f"{split}.h5") == read_skipped(reference / f"{split}.h5")
        assert (output / f"{split}.skipped.csv").read_text() == (reference / f"{split}.skipped.csv").read_text()
    assert len(read_features(output / "training.h5").paths) == TRAINING - 1
    assert [p for p, _ in read_skipped(output / "training.h5")] == ["training/dogs/cut.jpg"]


def test_ray_on_two_nodes_equals_the_local_engine(dataset, local_reference, cluster_address, tmp_path):
    result = subprocess.run(_command(dataset, tmp_path, cluster_address), capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ray: 2 workers" in result.stdout
    shards_per_node = re.search(r"training: extracted .*\n  shards per node: (.*)\n", result.stdout).group(1)
    counts = [int(part.split()[1]) for part in shards_per_node.split(", ")]
    assert len(counts) == 2 and min(counts) > 0, result.stdout  # both nodes did work
    assert sum(counts) == math.ceil(TRAINING / SHARD)
    assert "skipped training/dogs/cut.jpg: corrupt image" in result.stderr
    assert_same_as_local(tmp_path, local_reference)
    assert not (tmp_path / ".shards").exists()


def test_a_worker_killed_mid_run_is_restarted_and_the_output_is_identical(
    dataset, local_reference, cluster_address, tmp_path
):
    process = _start_and_wait_for_shards(_command(dataset, tmp_path, cluster_address), tmp_path, 2)
    workers = subprocess.run(["pgrep", "-f", "ray::ShardWorker"], capture_output=True, text=True).stdout.split()
    assert workers, "no Ray worker process found"
    subprocess.run(["kill", "-KILL", workers[0]], check=True)
    assert process.poll() is None and len(_finished_shards(tmp_path)) < math.ceil(TRAINING / SHARD)  # mid-run
    output = process.communicate(timeout=300)[0]
    assert process.returncode == 0, output
    assert_same_as_local(tmp_path, local_reference)


def test_a_killed_driver_resumes_without_recomputing_finished_shards(
    dataset, local_reference, cluster_address, tmp_path
):
    command = _command(dataset, tmp_path, cluster_address)
    process = _start_and_wait_for_shards(command, tmp_path, 3)
    process.send_signal(signal.SIGKILL)
    process.communicate()
    finished = _finished_shards(tmp_path)  # the driver writes shard files, so none can appear after its death
    assert not (tmp_path / "training.h5").exists() and 3 <= len(finished) < math.ceil(TRAINING / SHARD)
    done_images = sum(_rows_in_shard(path) for path in finished)

    rerun = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stdout + rerun.stderr
    total = math.ceil(TRAINING / SHARD)
    assert f"resumed: {len(finished)} of {total} shards were already done" in rerun.stdout, rerun.stdout
    assert f"training: extracted {TRAINING - 1 - done_images}, skipped 1, resumed" in rerun.stdout, rerun.stdout
    assert_same_as_local(tmp_path, local_reference)


def _rows_in_shard(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return len(f["positions"])


def test_without_ray_installed_the_error_says_how_to_install_it(dataset, tmp_path):
    blocked = [
        sys.executable,
        "-c",
        "import sys; sys.modules['ray'] = None; from pyimagesearch_tl.cli import main; main()",
    ]
    result = subprocess.run(
        blocked + ["extract", "--dataset", str(dataset), "--output", str(tmp_path), "--engine", "ray"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        "Error: the ray engine needs Ray, an optional extra: pip install 'pyimagesearch_tl[ray]'"
    ]


def test_the_local_engine_never_imports_ray(dataset, tmp_path):
    script = (
        f"from pyimagesearch_tl.extraction import extract_dataset; import sys; "
        f"extract_dataset({str(dataset)!r}, {str(tmp_path)!r}, splits=['validation'], "
        f"backbone='efficientnet_lite0', progress=False); print('ray' in sys.modules)"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip().splitlines()[-1] == "False"


def test_a_worker_that_cannot_build_the_backbone_says_why_in_one_line(dataset, cluster_address, tmp_path):
    junk = tmp_path / "junk.weights.h5"
    junk.write_bytes(b"not an HDF5 file")  # exists, so only the workers find out
    result = subprocess.run(
        _command(dataset, tmp_path / "out", cluster_address) + ["--weights", str(junk)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 1
    [line] = result.stderr.strip().splitlines()
    assert line.startswith(f"Error: weights file {str(junk)!r} cannot be loaded into efficientnet_lite0: ")
    assert "(on node " in line
