"""The Ray engine on a real 2-node Ray cluster started here (one CPU per node), on real photos.

Its output must equal the local engine's, whatever dies: a worker process (Ray restarts it and
retries its shards) or the driver (the same command again resumes from the finished shards).
"""

import math
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from conftest import PTL, copy_subset, shared

from pyimagesearch_tl.store import read_features, read_skipped

pytestmark = pytest.mark.usefixtures("whole_machine")  # two one-CPU nodes: two CPUs, not a test worker's share

SPLITS = ["training", "validation", "evaluation"]
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


class LocalRun:
    """The local engine's extraction of the dataset, in a fresh Python process that then prints whether
    it imported Ray. It starts at once (so it runs while the cluster starts); :meth:`wait` awaits it."""

    def __init__(self, dataset: Path, output: Path):
        self.output, self.imported_ray = output, None
        script = (
            "import sys; from pyimagesearch_tl.extraction import extract_dataset; "
            f"extract_dataset({str(dataset)!r}, {str(output)!r}, splits={SPLITS!r}, backbone='efficientnet_lite0', "
            f"batch_size=8, shard_size={SHARD}, progress=False); print('ray' in sys.modules)"
        )
        self.process = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, stderr=subprocess.PIPE)

    def wait(self) -> Path:
        """The output folder, once the extraction has ended well."""
        if self.imported_ray is None:
            stdout, stderr = self.process.communicate(timeout=300)
            assert self.process.returncode == 0, stderr.decode()
            self.imported_ray = stdout.decode().strip().splitlines()[-1]
        return self.output


@pytest.fixture(scope="module")
def local_reference(whole_machine, dataset, tmp_path_factory, default_network):
    """What the Ray runs must equal: the local engine's output (see :class:`LocalRun`). The default network is
    converted and checked in the session's cache first, as a user's first large job leaves it: every run here
    then uses it, and no Ray worker imports TensorFlow to build the backbone (run alone, the module spent
    58 s of CPU in the workers' TensorFlow starts)."""
    run = LocalRun(dataset, tmp_path_factory.mktemp("local"))
    yield run
    if run.process.poll() is None:  # a test failed before it was needed
        run.process.kill()
        run.process.communicate()


@pytest.fixture(scope="module")
def cluster_address(local_reference):
    """A head and one more node, one CPU each: two Ray nodes on this machine.

    Started while the local reference runs, and returned once that has ended."""
    from ray.cluster_utils import Cluster

    cluster = Cluster(
        initialize_head=True, head_node_args=dict(num_cpus=1, object_store_memory=100 * 2**20, include_dashboard=False)
    )
    try:
        cluster.add_node(num_cpus=1, object_store_memory=100 * 2**20)
        cluster.wait_for_nodes()
        local_reference.wait()
        yield cluster.address
    finally:
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


def _start_and_wait_for_shards(command: list[str], output: Path, count: int, **pipes) -> subprocess.Popen:
    """Start ``command`` (its stdout and stderr as ``pipes`` says: by default both in one pipe) and
    return once ``count`` shard files of the training split are finished."""
    pipes = pipes or dict(stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    process = subprocess.Popen(command, text=True, **pipes)
    deadline = time.monotonic() + 180
    while len(_finished_shards(output)) < count:
        if process.poll() is not None or time.monotonic() > deadline:
            process.kill()
            pytest.fail(f"extract ended or stalled before {count} shards were done:\n{process.communicate()}")
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


@pytest.fixture(scope="module")
def worker_killed_run(dataset, cluster_address, tmp_path_factory) -> SimpleNamespace:
    """One extraction on the two nodes, one of whose Ray worker processes is killed (SIGKILL) once two
    shards are finished: what the tests check of it (workers found, the run's state at the kill, its
    exit status, stdout and stderr, its output folder)."""
    output = tmp_path_factory.mktemp("worker-killed")
    command = _command(dataset, output, cluster_address)
    process = _start_and_wait_for_shards(command, output, 2, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    workers = subprocess.run(["pgrep", "-f", "ray::ShardWorker"], capture_output=True, text=True).stdout.split()
    if workers:
        subprocess.run(["kill", "-KILL", workers[0]], check=True)
    running, shards = process.poll() is None, len(_finished_shards(output))
    stdout, stderr = process.communicate(timeout=300)
    return SimpleNamespace(
        output=output,
        workers=workers,
        running_at_kill=running,
        shards_at_kill=shards,
        returncode=process.returncode,
        stdout=stdout,
        stderr=stderr,
    )


def test_ray_on_two_nodes_equals_the_local_engine(worker_killed_run, local_reference):
    """A run on the two nodes (``worker_killed_run``: a worker is killed during it) says it has two
    workers, both nodes extract shards, all 9 shards once, the cut photo is skipped and said so on
    stderr, the output equals the local engine's and no shard file is left."""
    run = worker_killed_run
    assert run.returncode == 0, run.stdout + run.stderr
    assert "ray: 2 workers" in run.stdout
    # Ray's own notes on the killed worker ("(raylet) ...") come on stdout whenever they arrive: not ours.
    ours = "".join(line for line in run.stdout.splitlines(keepends=True) if "(raylet)" not in line)
    shards_per_node = re.search(r"training: extracted .*\n  shards per node: (.*)\n", ours).group(1)
    counts = [int(part.split()[1]) for part in shards_per_node.split(", ")]
    assert len(counts) == 2 and min(counts) > 0, run.stdout  # both nodes did work
    assert sum(counts) == math.ceil(TRAINING / SHARD)
    assert "skipped training/dogs/cut.jpg: corrupt image" in run.stderr
    assert_same_as_local(run.output, local_reference.wait())
    assert not (run.output / ".shards").exists()


def test_a_worker_killed_mid_run_is_restarted_and_the_output_is_identical(worker_killed_run, local_reference):
    """A Ray worker process killed mid-run (the driver still running, shards still to do): Ray restarts
    it, the run ends well and its output equals the local engine's."""
    run = worker_killed_run
    assert run.workers, "no Ray worker process found"
    assert run.running_at_kill and run.shards_at_kill < math.ceil(TRAINING / SHARD)  # mid-run
    assert run.returncode == 0, run.stdout + run.stderr
    assert_same_as_local(run.output, local_reference.wait())


def test_a_killed_driver_resumes_without_recomputing_finished_shards(
    dataset, local_reference, cluster_address, tmp_path
):
    """The driver killed (SIGKILL) once 3 shards are finished: the same command again says how many
    shards were done, extracts only the other images, and its output equals the local engine's."""
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
    assert_same_as_local(tmp_path, local_reference.wait())


def _rows_in_shard(path: Path) -> int:
    import h5py

    with h5py.File(path, "r") as f:
        return len(f["positions"])


def test_without_ray_installed_the_error_says_how_to_install_it(dataset, tmp_path):
    """``--engine ray`` where Ray cannot be imported: exit 1, one line saying how to install it."""
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


def test_the_local_engine_never_imports_ray(local_reference):
    """A whole extraction with the local engine (the reference, in a process of its own) imports no Ray."""
    local_reference.wait()
    assert local_reference.imported_ray == "False"


def test_a_worker_that_cannot_build_the_backbone_says_why_in_one_line(dataset, cluster_address, tmp_path):
    """A weights file only the workers find unloadable: exit 1 with one line saying why, naming the node."""
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


def test_ray_predict_on_two_nodes_equals_local_predict_row_for_row(dataset, local_reference, cluster_address, tmp_path):
    """``ptl predict --engine ray`` on the two nodes (workers open the bundle once each) writes the rows
    the local engine writes: same photos, order, labels, hashes and skips; scores within 1e-5."""
    import csv

    from pyimagesearch_tl.bulk_prediction import predict_files
    from pyimagesearch_tl.training import train

    [model] = train(local_reference.wait(), tmp_path / "models", training_split="training",
                    validation_split="validation", grids={"logreg": {"C": [0.1]}})  # fmt: skip
    photos = [str(dataset / "validation"), str(dataset / "training" / "dogs" / "cut.jpg")]
    ray_csv = tmp_path / "ray.csv"
    command = PTL + ["predict", "--model", str(model.path), *photos, "--output", str(ray_csv), "--shard-size", "3"]
    result = subprocess.run(command + ["--engine", "ray", "--ray-address", cluster_address],
                            capture_output=True, text=True, timeout=300)  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    assert "ray: 2 workers" in result.stdout
    predict_files(model.path, photos, tmp_path / "local.csv", shard_size=3)
    rows = {}
    for name in ("ray", "local"):
        with (tmp_path / f"{name}.csv").open(newline="") as handle:
            rows[name] = list(csv.DictReader(handle))
    keys = ("path", "sha256", "label", "unknown", "error")
    assert [[r[k] for k in keys] for r in rows["ray"]] == [[r[k] for k in keys] for r in rows["local"]]
    assert len(rows["ray"]) == 11 and rows["ray"][-1]["error"].startswith("corrupt image")
    scores = {name: [float(r["score"] or 0) for r in table] for name, table in rows.items()}
    np.testing.assert_allclose(scores["ray"], scores["local"], rtol=0, atol=1e-5)


def test_build_dataset_on_two_nodes_equals_the_local_build(dataset, cluster_address, tmp_path):
    """build-dataset's decode checks and hashes as Ray tasks on the two nodes (no backbone: no TensorFlow on
    the workers): manifest, skipped and duplicates are those of the local build, byte for byte."""
    from pyimagesearch_tl.layouts import build_dataset

    source = tmp_path / "photos"
    shutil.copytree(dataset, source)
    leaked = sorted((source / "training" / "cats").glob("*.jpg"))[0]
    shutil.copy(leaked, source / "validation" / "cats" / "leaked.jpg")  # a duplicate across splits
    built = {"local": tmp_path / "local", "ray": tmp_path / "ray"}
    build_dataset(source, built["local"], splits=SPLITS, fractions=[0.8, 0.2, 0.0], shard_size=16)
    # The Ray driver in a process of its own, as in every test here: this test process never joins the cluster
    # (a driver left connected when the cluster shuts down can be sent a KeyboardInterrupt by Ray).
    result = subprocess.run(
        PTL + ["build-dataset", "--input", str(source), "--output", str(built["ray"]), "--split-fractions",
               "0.8,0.2,0.0", "--engine", "ray", "--ray-address", cluster_address, "--shard-size", "16"],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout + result.stderr
    for name in ("manifest.csv", "skipped.csv", "duplicates.csv", "unlabelled.csv"):
        assert (built["ray"] / name).read_text() == (built["local"] / name).read_text(), name
    assert "cut.jpg" in (built["ray"] / "skipped.csv").read_text()
    assert "leaked.jpg" in (built["ray"] / "duplicates.csv").read_text()
