"""Interrupted runs, incremental extraction, bad images during extraction, bundles from elsewhere."""

import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_subset, shared

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import BundleError, DatasetError
from pyimagesearch_tl.extraction import extract_dataset
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.locks import lock_path, output_lock
from pyimagesearch_tl.store import read_features

SPLITS = ["training", "validation", "evaluation"]
PTL = [sys.executable, "-c", "from pyimagesearch_tl.cli import main; main()"]


PHOTOS, SHARD = 96, 8  # all in the training split (one feature file to interrupt): 12 shards of 8
SHARDS = PHOTOS // SHARD


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory):
    """96 real photos, all in the training split."""
    work = tmp_path_factory.mktemp("big")
    source = copy_subset(shared("cats_and_dogs_filtered", "train"), work / "photos", PHOTOS // 2)
    build_dataset(source, work / "dataset", splits=SPLITS, fractions=[1.0, 0.0, 0.0])
    return work / "dataset"


@pytest.fixture(scope="module")
def lone_run(big_dataset, tmp_path_factory):
    """The reference: one uninterrupted extraction of big_dataset, alone on its folder."""
    output = tmp_path_factory.mktemp("lone")
    extract_dataset(big_dataset, output, splits=SPLITS, backbone="efficientnet_lite0", batch_size=8, progress=False)
    return read_features(output / "training.h5")


def assert_same_features(path: Path, reference) -> None:
    got = read_features(path)
    assert got.paths == reference.paths and len(got.paths) == PHOTOS
    assert got.labels.tolist() == reference.labels.tolist()
    assert got.sha256 == reference.sha256
    np.testing.assert_allclose(got.features, reference.features, rtol=0, atol=1e-5)


def _extract_args(dataset: Path, output: Path, *extra: str) -> list[str]:
    return [
        "extract",
        "--dataset",
        str(dataset),
        "--output",
        str(output),
        "--batch-size",
        "8",
        "--shard-size",
        str(SHARD),
        *extra,
    ]


def _start_extract(dataset: Path, output: Path, *extra: str) -> subprocess.Popen:
    # As in a terminal's foreground job: Ctrl-C (SIGINT) delivered, even when these tests run in the background.
    return subprocess.Popen(
        PTL + _extract_args(dataset, output, *extra),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )


def _finished_shards(output: Path) -> list[Path]:
    return sorted((output / ".shards" / "training").glob("[!.]*.h5"))  # not the temporary file of a shard being written


def _wait_for_shards(process: subprocess.Popen, output: Path, count: int, timeout: float = 120) -> None:
    """Until ``count`` shard files of the training split are finished."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(_finished_shards(output)) >= count:
            return
        if process.poll() is not None:
            pytest.fail(f"extract ended before it could be interrupted:\n{process.stdout.read()}")
        time.sleep(0.01)
    process.kill()
    pytest.fail("extract made no progress")


def test_sigkill_then_rerun_recomputes_no_finished_shard_and_a_truncated_one(big_dataset, lone_run, tmp_path):
    output = tmp_path / "killed"
    process = _start_extract(big_dataset, output)
    _wait_for_shards(process, output, 3)
    process.send_signal(signal.SIGKILL)
    killed_output = process.communicate()[0]
    shards = _finished_shards(output)
    assert not (output / "training.h5").exists() and 3 <= len(shards) < SHARDS, killed_output
    cut = shards[1].read_bytes()
    shards[1].write_bytes(cut[: len(cut) // 2])  # a shard file cut short (a full disk, a copy interrupted)

    result = CliRunner().invoke(cli, _extract_args(big_dataset, output))
    assert result.exit_code == 0, result.output
    assert (
        f"warning: shard file {shards[1]} is unreadable (cut short?); its images are extracted again" in result.output
    )
    finished = len(shards) - 1
    assert f"resumed: {finished} of {SHARDS} shards were already done" in result.output, result.output
    assert f"extracted {PHOTOS - SHARD * finished}, skipped 0" in result.output
    assert not (output / ".shards").exists() and not (output / "training.h5.partial").exists()
    assert_same_features(output / "training.h5", lone_run)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(big_dataset, tmp_path):
    output = tmp_path / "interrupted"
    process = _start_extract(big_dataset, output)
    _wait_for_shards(process, output, 1)
    process.send_signal(signal.SIGINT)
    stdout, _ = process.communicate(timeout=60)
    assert process.returncode == 1, stdout
    assert "interrupted; finished shards are saved: rerun the same command to resume" in stdout
    assert "Traceback" not in stdout
    assert _finished_shards(output) and not (output / "training.h5").exists()
    result = CliRunner().invoke(cli, _extract_args(big_dataset, output))
    assert result.exit_code == 0 and "shards were already done" in result.output, result.output


def _wait_for_lock_holder(process: subprocess.Popen, output: Path) -> None:
    """Until ``process`` holds the lock of ``output`` and has finished a shard, then stop it (SIGSTOP)."""
    _wait_for_shards(process, output, 1)
    assert str(process.pid) in lock_path(output).with_name(lock_path(output).name + ".owner").read_text()
    process.send_signal(signal.SIGSTOP)  # it holds the folder for as long as the test needs


def test_a_second_run_on_the_same_folder_refuses_in_one_line(big_dataset, lone_run, tmp_path):
    output = tmp_path / "contended"
    first = _start_extract(big_dataset, output)
    try:
        _wait_for_lock_holder(first, output)
        second = subprocess.run(PTL + _extract_args(big_dataset, output), capture_output=True, text=True, timeout=120)
    finally:
        first.send_signal(signal.SIGCONT)
    assert second.returncode == 1, second.stdout + second.stderr
    assert second.stdout == ""
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"Error: {output} is in use by ")
    assert f"(pid {first.pid} on " in line and "pass --wait" in line
    first_output = first.communicate(timeout=120)[0]
    assert first.returncode == 0, first_output
    assert_same_features(output / "training.h5", lone_run)


def test_wait_queues_behind_the_running_extraction(big_dataset, lone_run, tmp_path):
    output = tmp_path / "queued"
    first = _start_extract(big_dataset, output)
    try:
        _wait_for_lock_holder(first, output)
        second = subprocess.Popen(
            PTL + _extract_args(big_dataset, output, "--wait"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        time.sleep(1)
        assert second.poll() is None  # still waiting for the lock
    finally:
        first.send_signal(signal.SIGCONT)
    assert first.wait(timeout=120) == 0
    second_output = second.communicate(timeout=120)[0]
    assert second.returncode == 0, second_output
    assert "training: up to date, nothing to do" in second_output  # it ran after the first had finished
    assert_same_features(output / "training.h5", lone_run)


@pytest.mark.parametrize("command", ["build-dataset", "train", "evaluate", "finetune"])
def test_every_writing_command_locks_its_output_folder(pipeline_run, tmp_path, command):
    folders = {
        "build-dataset": tmp_path / "dataset",
        "train": tmp_path / "models",
        "evaluate": tmp_path / "evaluation" / "logreg",
        "finetune": tmp_path / "finetune",
    }
    arguments = {
        "build-dataset": ["--input", str(pipeline_run["dataset"]), "--output", str(folders["build-dataset"])],
        "train": ["--features", str(pipeline_run["features"]), "--output", str(folders["train"])],
        "evaluate": [
            "--model",
            str(tmp_path / "logreg.joblib"),
            "--features",
            str(pipeline_run["features"]),
            "--output",
            str(tmp_path / "evaluation"),
        ],
        "finetune": ["--dataset", str(pipeline_run["dataset"]), "--output", str(folders["finetune"])],
    }
    if command == "evaluate":
        trained = CliRunner().invoke(
            cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2"]
        )
        assert trained.exit_code == 0, trained.output
    with output_lock(folders[command]):  # this test process holds the folder, as a running ptl would
        result = subprocess.run(PTL + [command, *arguments[command]], capture_output=True, text=True, timeout=120)
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Error: {folders[command]} is in use by " in result.stderr and "Traceback" not in result.stderr


def test_added_images_are_the_only_ones_extracted(tmp_path):
    photos = shared("cats_and_dogs_filtered", "train")
    source = copy_subset(photos, tmp_path / "photos", 10)
    build_dataset(source, tmp_path / "dataset", splits=SPLITS, fractions=[1.0, 0.0, 0.0])
    [first] = extract_dataset(
        tmp_path / "dataset",
        tmp_path / "features",
        splits=SPLITS,
        backbone="efficientnet_lite0",
        batch_size=8,
        progress=False,
    )
    before = read_features(tmp_path / "features" / "training.h5")
    for name in ("cats", "dogs"):
        for path in sorted((photos / name).glob("*.jpg"))[10:13]:
            shutil.copy(path, source / name)
    build_dataset(source, tmp_path / "dataset", splits=SPLITS, fractions=[1.0, 0.0, 0.0])
    [second] = extract_dataset(
        tmp_path / "dataset",
        tmp_path / "features",
        splits=SPLITS,
        backbone="efficientnet_lite0",
        batch_size=8,
        progress=False,
    )
    assert (first.extracted, second.extracted, second.reused) == (20, 6, 20)
    after = read_features(tmp_path / "features" / "training.h5")
    assert len(after.paths) == 26
    old = dict(zip(before.sha256, before.features))
    for sha, row in zip(after.sha256, after.features):
        if sha in old:
            np.testing.assert_array_equal(row, old[sha])


def test_bad_images_in_the_dataset_are_skipped_and_listed(tmp_path):
    dataset = tmp_path / "dataset"
    copy_subset(shared("cats_and_dogs_filtered", "validation"), dataset / "validation", 4)
    (dataset / "validation" / "cats" / "zero.jpg").write_bytes(b"")
    real = sorted((dataset / "validation" / "dogs").glob("*.jpg"))[0]
    (dataset / "validation" / "dogs" / "cut.jpg").write_bytes(real.read_bytes()[:2000])
    (dataset / "validation" / "dogs" / "page.png").write_text("<!doctype html><title>Moved</title>")
    result = CliRunner().invoke(
        cli, ["extract", "--dataset", str(dataset), "--output", str(tmp_path / "f"), "--batch-size", "4"]
    )
    assert result.exit_code == 0, result.output
    assert "extracted 8, skipped 3" in result.output
    listing = (tmp_path / "f" / "validation.skipped.csv").read_text()
    assert (
        "zero.jpg,empty file (0 bytes)" in listing
        and "cut.jpg,corrupt image" in listing
        and "page.png,not an image" in listing
    )
    assert len(read_features(tmp_path / "f" / "validation.h5").paths) == 8


def test_class_left_without_decodable_images_is_an_error(tmp_path):
    source = tmp_path / "photos"
    copy_subset(shared("cats_and_dogs_filtered", "train", "cats"), source / "cats", 3)
    (source / "dogs").mkdir()
    (source / "dogs" / "a.jpg").write_bytes(b"")
    with pytest.raises(DatasetError, match="class 'dogs' has no images that can be decoded .*a.jpg: empty file"):
        build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=[0.75, 0.15, 0.10])
    (source / "dogs" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match="class 'dogs' has no images in"):
        build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=[0.75, 0.15, 0.10])


def test_bundle_checks(pipeline_run, tmp_path):
    result = CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(tmp_path), "--cv", "2"]
    )
    assert result.exit_code == 0, result.output
    bundle = Bundle.load(tmp_path / "logreg.joblib")
    bundle.versions = dict(bundle.versions, **{"scikit-learn": "0.1.0"})
    bundle.save(tmp_path / "old.joblib")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Bundle.load(tmp_path / "old.joblib")
    assert any("saved with scikit-learn 0.1.0" in str(w.message) for w in caught)
    bundle.format_version = 99
    bundle.save(tmp_path / "future.joblib")
    with pytest.raises(BundleError, match="bundle format 99 is not supported"):
        Bundle.load(tmp_path / "future.joblib")
    (tmp_path / "junk.joblib").write_bytes(b"not a pickle")
    with pytest.raises(BundleError, match="not a readable model bundle"):
        Bundle.load(tmp_path / "junk.joblib")
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(tmp_path / "old.joblib"), str(pipeline_run["dataset"] / "validation")]
    )
    assert result.exit_code == 0 and "warning: old.joblib was saved with scikit-learn 0.1.0" in result.output


def test_odd_file_names_survive_every_stage(tmp_path):
    import os

    source = tmp_path / "photos"
    for name in ("cats", "dogs"):
        copy_subset(shared("cats_and_dogs_filtered", "train", name), source / name, 3)
    cat = sorted((source / "cats").glob("*.jpg"))[0]
    odd = os.fsdecode(os.path.join(os.fsencode(source / "cats"), b"caf\xe9 au lait (2).jpg"))  # Latin-1 byte
    os.rename(cat, odd)
    build_dataset(source, tmp_path / "dataset", splits=SPLITS, fractions=[1.0, 0.0, 0.0])
    extract_dataset(
        tmp_path / "dataset",
        tmp_path / "features",
        splits=SPLITS,
        backbone="efficientnet_lite0",
        batch_size=4,
        progress=False,
    )
    paths = read_features(tmp_path / "features" / "training.h5").paths
    assert "training/cats/" + os.path.basename(odd) in paths
    assert (tmp_path / "dataset" / [p for p in paths if "lait" in p][0]).is_file()
