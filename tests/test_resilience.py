"""Interrupted runs, incremental extraction, bad images during extraction, bundles from elsewhere."""

import contextlib
import dataclasses
import shutil
import signal
import subprocess
import sys
import threading
import time
import warnings
import zipfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PTL, copy_subset, shared

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import BundleError, DatasetError
from pyimagesearch_tl.extraction import extract_dataset, settings_meta
from pyimagesearch_tl.layouts import build_dataset
from pyimagesearch_tl.locks import lock_path, output_lock
from pyimagesearch_tl.store import read_features

SPLITS = ["training", "validation", "evaluation"]
# The same, saying at exit whether it imported TensorFlow.
PTL_SAYING_TF = [
    sys.executable,
    "-c",
    "import atexit, sys; atexit.register(lambda: print('imported tensorflow:', 'tensorflow' in sys.modules)); "
    "from pyimagesearch_tl.cli import main; main()",
]


PHOTOS, SHARD = 64, 8  # all in the training split (one feature file to interrupt): 8 shards of 8
SHARDS = PHOTOS // SHARD


@pytest.fixture(scope="module")
def big_dataset(tmp_path_factory):
    """64 real photos, all in the training split."""
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


def _wait_for_lock_holder(process: subprocess.Popen, output: Path) -> None:
    """Until ``process`` holds the lock of ``output`` and has finished a shard, then stop it (SIGSTOP)."""
    _wait_for_shards(process, output, 1)
    assert str(process.pid) in lock_path(output).with_name(lock_path(output).name + ".owner").read_text()
    process.send_signal(signal.SIGSTOP)  # it holds the folder for as long as the test needs


def _read_until(process: subprocess.Popen, text: str, timeout: float = 120) -> str:
    """What ``process`` writes to its stdout up to the first line holding ``text`` (all of it if none does)."""
    watchdog = threading.Timer(timeout, process.kill)  # a run that neither prints it nor ends is stopped
    watchdog.start()
    try:
        lines = []
        for line in iter(process.stdout.readline, ""):
            lines.append(line)
            if text in line:
                break
        return "".join(lines)
    finally:
        watchdog.cancel()


def _contend(dataset: Path, output: Path) -> SimpleNamespace:
    """Three runs of the same command on one folder: ``first`` is stopped (SIGSTOP) while it holds the
    folder; ``refused`` is started without --wait and ``queued`` with it, and once ``queued`` says it is
    waiting (``waiting``: then still running), ``first`` is resumed (SIGCONT); all run to their end."""
    first = _start_extract(dataset, output)
    queued = None
    try:
        _wait_for_lock_holder(first, output)
        refused = subprocess.run(PTL + _extract_args(dataset, output), capture_output=True, text=True, timeout=120)
        queued = subprocess.Popen(
            PTL_SAYING_TF + _extract_args(dataset, output, "--wait"),
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        said = _read_until(queued, f"waiting for {output}: in use by ")
        waiting = queued.poll() is None
    except BaseException:
        for process in (first, queued):
            if process is not None:
                process.kill()
        raise
    finally:
        first.send_signal(signal.SIGCONT)
    first_output = first.communicate(timeout=120)[0]
    queued_output = said + queued.communicate(timeout=120)[0]
    return SimpleNamespace(
        output_dir=output,
        first=SimpleNamespace(pid=first.pid, returncode=first.returncode, output=first_output),
        refused=refused,
        queued=SimpleNamespace(waiting=waiting, said=said, returncode=queued.returncode, output=queued_output),
    )


@pytest.fixture(scope="module")
def contention(big_dataset, lone_run, tmp_path_factory):
    """:func:`_contend` started in a thread of its own: its runs, mostly a process importing TensorFlow
    on one CPU, take turns with those of ``interrupted_runs`` (which starts it) on the machine's CPUs.
    (After ``lone_run``, which leaves the network converted in the session cache for all of them.)"""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(_contend, big_dataset, tmp_path_factory.mktemp("contended") / "features")


@pytest.fixture(scope="module")
def contended(contention) -> SimpleNamespace:
    """What the three runs of :func:`_contend` did."""
    return contention.result(timeout=600)


@pytest.fixture(scope="module")
def interrupted_runs(big_dataset, contention, tmp_path_factory) -> SimpleNamespace:
    """One output folder through a Ctrl-C, a SIGKILL and a rerun to the end, each time the same command
    (while the runs of ``contention``, started first, use the other CPU).

    1. ``ctrl_c``: a run sent SIGINT once it has finished a shard (it stops at the next shard boundary);
    2. ``killed``: the same command again, sent SIGKILL once it has finished two more shards; one of
       the finished shard files is then cut short (a full disk, a copy interrupted);
    3. ``rerun``: the same command once more, here (``CliRunner``), to the end.

    Each step records what the tests check: exit status, output, finished shards, feature file or not.
    """
    output = tmp_path_factory.mktemp("interrupted") / "features"
    process = _start_extract(big_dataset, output)
    _wait_for_shards(process, output, 1)
    process.send_signal(signal.SIGINT)
    stdout = process.communicate(timeout=60)[0]
    ctrl_c = SimpleNamespace(
        returncode=process.returncode,
        output=stdout,
        shards=_finished_shards(output),
        feature_file=(output / "training.h5").exists(),
    )

    process = _start_extract(big_dataset, output)
    _wait_for_shards(process, output, len(ctrl_c.shards) + 2)  # this run has done work of its own
    process.send_signal(signal.SIGKILL)
    stdout = process.communicate()[0]
    shards = _finished_shards(output)
    killed = SimpleNamespace(output=stdout, shards=shards, feature_file=(output / "training.h5").exists())
    if 2 <= len(shards) < SHARDS:  # else the test says what went wrong
        cut = shards[1].read_bytes()
        shards[1].write_bytes(cut[: len(cut) // 2])

    rerun = CliRunner().invoke(cli, _extract_args(big_dataset, output))
    return SimpleNamespace(output_dir=output, ctrl_c=ctrl_c, killed=killed, rerun=rerun)


def test_ctrl_c_stops_cleanly_and_says_how_to_resume(interrupted_runs):
    """Ctrl-C: exit 1 with one message saying how to resume and no traceback; the finished shards are
    kept, with no feature file; the same command resumes from them (after a SIGKILLed run as well, see
    ``interrupted_runs``) and ends well."""
    ctrl_c = interrupted_runs.ctrl_c
    assert ctrl_c.returncode == 1, ctrl_c.output
    assert "interrupted; finished shards are saved: rerun the same command to resume" in ctrl_c.output
    assert "Traceback" not in ctrl_c.output
    assert ctrl_c.shards and not ctrl_c.feature_file
    rerun = interrupted_runs.rerun
    assert rerun.exit_code == 0 and "shards were already done" in rerun.output, rerun.output


def test_sigkill_then_rerun_recomputes_no_finished_shard_and_a_truncated_one(interrupted_runs, lone_run):
    """A SIGKILLed run leaves finished shards and no feature file; the rerun extracts again exactly the
    images of the shards not finished and of the one cut short (with a warning naming it), tidies up,
    and its features are those of an uninterrupted run."""
    killed, rerun, output = interrupted_runs.killed, interrupted_runs.rerun, interrupted_runs.output_dir
    assert not killed.feature_file and 3 <= len(killed.shards) < SHARDS, killed.output
    assert rerun.exit_code == 0, rerun.output
    assert (
        f"warning: shard file {killed.shards[1]} is unreadable (cut short?); its images are extracted again"
        in rerun.output
    )
    finished = len(killed.shards) - 1
    assert f"resumed: {finished} of {SHARDS} shards were already done" in rerun.output, rerun.output
    assert f"extracted {PHOTOS - SHARD * finished}, skipped 0" in rerun.output
    assert not (output / ".shards").exists() and not (output / "training.h5.partial").exists()
    assert_same_features(output / "training.h5", lone_run)


def test_a_second_run_on_the_same_folder_refuses_in_one_line(contended, lone_run):
    """A run on a folder another run holds exits 1 with one line on stderr naming the holder's pid and
    saying --wait queues; the holder is not disturbed: it ends well with the features of a lone run."""
    second, first = contended.refused, contended.first
    assert second.returncode == 1, second.stdout + second.stderr
    assert second.stdout == ""
    [line] = second.stderr.strip().splitlines()
    assert line.startswith(f"Error: {contended.output_dir} is in use by ")
    assert f"(pid {first.pid} on " in line and "pass --wait" in line
    assert first.returncode == 0, first.output
    assert_same_features(contended.output_dir / "training.h5", lone_run)


def test_wait_queues_behind_the_running_extraction(contended, lone_run):
    """With --wait, a run on a held folder says it waits and keeps waiting while the holder is stopped;
    once the holder has ended well, it runs, finds the folder up to date and ends well, without having
    imported TensorFlow (nothing to do: no backbone is built)."""
    queued = contended.queued
    assert queued.waiting, queued.said  # still waiting for the lock, the holder being stopped
    assert contended.first.returncode == 0, contended.first.output
    assert queued.returncode == 0, queued.output
    assert "training: up to date, nothing to do" in queued.output  # it ran after the first had finished
    assert "imported tensorflow: False" in queued.output
    assert_same_features(contended.output_dir / "training.h5", lone_run)


def test_the_meta_known_without_the_backbone_is_the_extractors(lone_run):
    """What finds a folder up to date without building the backbone (``settings_meta``) knows the meta
    the extractor records, all of it but feature_dim (the architecture's)."""
    options = dict(
        backbone="efficientnet_lite0",
        weights="imagenet",
        pooling="avg",
        dtype="float32",
        precision="float32",
        runtime="auto",
        views=1,
        resize=None,
        label_names=["cats", "dogs"],
    )
    assert settings_meta(options) == dataclasses.replace(lone_run.meta, feature_dim=0)


@pytest.fixture(scope="module")
def trained_bundle(pipeline_run, tmp_path_factory) -> Path:
    """``ptl train --cv 2`` on the shared pipeline's features: the logreg bundle it says it saved."""
    output = tmp_path_factory.mktemp("trained")
    result = CliRunner().invoke(
        cli, ["train", "--features", str(pipeline_run["features"]), "--output", str(output), "--cv", "2"]
    )
    assert result.exit_code == 0, result.output
    [saved] = [line.removeprefix("saved ") for line in result.output.splitlines() if line.startswith("saved ")]
    return Path(saved)


WRITING_COMMANDS = ["build-dataset", "train", "evaluate", "finetune"]


@pytest.fixture(scope="module")
def run_on_held_folders(pipeline_run, tmp_path_factory, request) -> dict[str, SimpleNamespace]:
    """Each writing command run, as ``ptl`` in a process of its own, on an output folder this test
    process holds (as a running ptl would): by command, the folder and how the run ended.

    The four run side by side, and the bundle ``evaluate`` needs is trained while the other three start."""
    work = tmp_path_factory.mktemp("held")
    folders = {
        "build-dataset": work / "dataset",
        "train": work / "models",
        "evaluate": work / "evaluation" / "logreg",
        "finetune": work / "finetune",
    }
    arguments = {
        "build-dataset": ["--input", str(pipeline_run["dataset"]), "--output", str(folders["build-dataset"])],
        "train": ["--features", str(pipeline_run["features"]), "--output", str(folders["train"])],
        "evaluate": ["--features", str(pipeline_run["features"]), "--output", str(work / "evaluation")],
        "finetune": ["--dataset", str(pipeline_run["dataset"]), "--output", str(folders["finetune"])],
    }
    with contextlib.ExitStack() as held:
        for folder in folders.values():
            held.enter_context(output_lock(folder))

        def start(command, *extra):
            return subprocess.Popen(
                PTL_SAYING_TF + [command, *arguments[command], *extra],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )

        processes = {command: start(command) for command in WRITING_COMMANDS if command != "evaluate"}
        try:
            processes["evaluate"] = start("evaluate", "--model", str(request.getfixturevalue("trained_bundle")))
            ended = {command: (process, *process.communicate(timeout=120)) for command, process in processes.items()}
        except BaseException:  # none may run on once the folders are let go
            for process in processes.values():
                process.kill()
            raise
    return {
        command: SimpleNamespace(folder=folders[command], returncode=process.returncode, stdout=stdout, stderr=stderr)
        for command, (process, stdout, stderr) in ended.items()
    }


@pytest.mark.parametrize("command", WRITING_COMMANDS)
def test_every_writing_command_locks_its_output_folder(run_on_held_folders, command):
    """A writing command on a folder another process holds exits 1 with an error naming the folder and
    saying it is in use, without a traceback, and before any work: TensorFlow is not even imported."""
    result = run_on_held_folders[command]
    assert result.returncode == 1, result.stdout + result.stderr
    assert f"Error: {result.folder} is in use by " in result.stderr and "Traceback" not in result.stderr
    assert "imported tensorflow: False" in result.stdout


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
    with pytest.raises(DatasetError, match="class 'dogs' has no images that can be used .*a.jpg: empty file"):
        build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=[0.75, 0.15, 0.10])
    (source / "dogs" / "a.jpg").unlink()
    with pytest.raises(DatasetError, match="class 'dogs' has no images in"):
        build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=[0.75, 0.15, 0.10])


def test_bundle_checks(pipeline_run, trained_bundle, tmp_path):
    """A bundle saved with another scikit-learn loads with a warning (predict says it too); a bundle of
    a future format and a file that is no bundle are refused, each with one clear error."""
    bundle = Bundle.load(trained_bundle)
    bundle.versions = dict(bundle.versions, **{"scikit-learn": "0.1.0"})
    bundle.save(tmp_path / "old.skops")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        Bundle.load(tmp_path / "old.skops")
    assert any("saved with scikit-learn 0.1.0" in str(w.message) for w in caught)
    bundle.format_version = 99
    bundle.save(tmp_path / "future.skops")
    with pytest.raises(BundleError, match="bundle format 99 is not supported"):
        Bundle.load(tmp_path / "future.skops")
    (tmp_path / "junk.joblib").write_bytes(b"not a pickle")
    with pytest.raises(BundleError, match="not a model bundle"):
        Bundle.load(tmp_path / "junk.joblib", trust_pickle=True)
    with zipfile.ZipFile(tmp_path / "junk.skops", "w") as archive:  # a zip, but not what skops writes
        archive.writestr("schema.json", "[")
    with pytest.raises(BundleError, match="not a readable model bundle"):
        Bundle.load(tmp_path / "junk.skops")
    result = CliRunner().invoke(
        cli, ["predict", "--model", str(tmp_path / "old.skops"), str(pipeline_run["dataset"] / "validation")]
    )
    assert result.exit_code == 0 and "warning: old.skops was saved with scikit-learn 0.1.0" in result.output


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
