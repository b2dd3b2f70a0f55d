"""Nothing read is trusted, and a failed write is one line (issue 23).

Feature files from elsewhere are checked where they are read: every hostile file here is a copy of a
real feature file of ``pipeline_run``, edited with h5py or as text, and must be refused with a
:class:`FeatureFileError` naming the file and the problem before any training. A full disk is played
by a file-size limit (``RLIMIT_FSIZE``: a write past it fails, EFBIG, as one on a full disk, ENOSPC).
"""

import contextlib
import json
import re
import resource
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import h5py
import numpy as np
import pytest
from click.testing import CliRunner

from pyimagesearch_tl.atomic import TEMPORARY, atomic_path
from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import FeatureFileError
from pyimagesearch_tl.extraction import extract_dataset, plan_shards
from pyimagesearch_tl.features import dataset_rows
from pyimagesearch_tl.store import (
    SHARD_SIZE,
    SHARDS,
    CSVFeatureWriter,
    Shard,
    read_features,
    read_meta,
    write_shard,
)
from pyimagesearch_tl.training import train, train_streaming

SPLITS = ["training", "validation"]


# --- hostile feature files -------------------------------------------------------------------------


def _replace(name, values):
    def edit(f):
        data = values(f) if callable(values) else values
        del f[name]
        f.create_dataset(name, data=data)

    return edit


def _set(name, index, value):
    def edit(f):
        column = f[name][:]
        column[index] = value
        f[name][...] = column

    return edit


def _features(f):
    return f["features"][:]


#: What is wrong: (the split whose file is edited, the edit of the open HDF5 file, the message after the file's name).
HDF5_CASES = {
    "NaN": ("training", _set("features", (3, 17), np.nan), "row 3 has NaN or infinite values"),
    "infinity": ("training", _set("features", (5, 0), -np.inf), "row 5 has NaN or infinite values"),
    "NaN in the validation file": ("validation", _set("features", (9, 1), np.nan), "row 9 has NaN or infinite values"),
    "text features": (
        "training",
        _replace("features", lambda f: _features(f).astype("S12")),
        r"its features are stored as \|S12, not as numbers",
    ),
    "1-D features": (
        "training",
        _replace("features", lambda f: _features(f)[:, 0]),
        r"its features have shape \(30,\), not one row of 1280 values per image",
    ),
    "narrower than feature_dim": (
        "training",
        _replace("features", lambda f: _features(f)[:, :-1]),
        "its features have 1279 values per image but its metadata says feature_dim=1280",
    ),
    "wider than feature_dim": (
        "training",
        _replace("features", lambda f: np.hstack([_features(f), _features(f)[:, :1]])),
        "its features have 1281 values per image but its metadata says feature_dim=1280",
    ),
    "label 7 of 2 classes": (
        "training",
        _set("labels", 2, 7),
        r"row 2 has label 7, not a class index \(0 to 1: cats, dogs\)",
    ),
    "label -3": ("training", _set("labels", 4, -3), r"row 4 has label -3, not a class index \(0 to 1: cats, dogs\)"),
    "paths that are numbers": (
        "training",
        _replace("paths", np.arange(30)),
        r"its paths are int64 of shape \(30,\), not text",
    ),
    "label names that are not a list": (
        "training",
        lambda f: f.attrs.__setitem__("label_names", '"cats"'),
        "its metadata is incomplete or unreadable \\(label_names='\"cats\"' is not a list of class names\\)",
    ),
}


def _hostile_copy(features: Path, tmp_path: Path) -> Path:
    return shutil.copytree(features, tmp_path / "features")


def _train_both_ways(features: Path, output: Path, validation_split: str | None = "validation"):
    """Train in memory and streaming; return the two FeatureFileErrors' messages."""
    messages = []
    for run in (
        lambda: train(features, output, training_split="training", validation_split=validation_split, cv="2"),
        lambda: train_streaming(features, output, training_split="training", validation_split=validation_split),
    ):
        with pytest.raises(FeatureFileError) as refused:
            run()
        messages.append(str(refused.value))
    assert not list(output.glob("*.*")), "a bundle was saved from a hostile file"
    return messages


@pytest.mark.parametrize("case", list(HDF5_CASES))
def test_a_hostile_hdf5_file_is_refused_naming_it_and_the_problem(pipeline_run, tmp_path, case):
    split, edit, problem = HDF5_CASES[case]
    features = _hostile_copy(pipeline_run["features"], tmp_path)
    with h5py.File(features / f"{split}.h5", "a") as f:
        edit(f)
    for message in _train_both_ways(features, tmp_path / "models"):
        assert re.fullmatch(f"{re.escape(str(features / split))}.h5: {problem}", message), message


def test_a_bad_row_in_a_held_out_block_is_found_before_streaming_trains(pipeline_run, tmp_path):
    """Without a validation split, streaming holds every fifth block out to select on after the epochs: the first
    pass reads (and checks) those blocks too."""
    features = _hostile_copy(pipeline_run["features"], tmp_path)
    with h5py.File(features / "training.h5", "a") as f:
        _set("features", (27, 3), np.nan)(f)  # blocks of 6 rows: block 4, held out
    messages = _train_both_ways(features, tmp_path / "models", validation_split=None)
    assert messages == [f"{features / 'training.h5'}: row 27 has NaN or infinite values"] * 2


@pytest.fixture(scope="module")
def csv_features(pipeline_run, tmp_path_factory) -> Path:
    """The features of ``pipeline_run`` in CSV files (written by the CSV writer, values and all)."""
    folder = tmp_path_factory.mktemp("csv") / "features"
    folder.mkdir()
    for split in SPLITS:
        loaded = read_features(pipeline_run["features"] / f"{split}.h5")
        writer = CSVFeatureWriter(folder / f"{split}.csv", loaded.meta, "fp")
        writer.append(loaded.features, loaded.labels, loaded.paths, loaded.sha256, [])
        writer.finish()
    return folder


def _cell(row: int, column: int, text: str):
    def edit(lines):
        values = lines[row].split(",")
        values[column] = text
        lines[row] = ",".join(values)

    return edit


#: What is wrong: (what is edited, "rows" (a list of lines) or "sidecar" (a dict), the edit, the file named, the
#: message after its name).
CSV_CASES = {
    "NaN": ("rows", _cell(3, 6, "nan"), "csv", "row 3 has NaN or infinite values"),
    "infinity": ("rows", _cell(4, 1, "inf"), "csv", "row 4 has NaN or infinite values"),
    "a value too large for float32": ("rows", _cell(4, 1, "1e39"), "csv", "row 4 has NaN or infinite values"),
    "text": (
        "rows",
        _cell(3, 5, "abc"),
        "csv",
        r"not rows of a label and 1280 numbers \(could not convert string 'abc' to float64 at row 3, column 6.\)",
    ),
    "a row one value short": (
        "rows",
        lambda lines: lines.__setitem__(2, lines[2].rsplit(",", 1)[0]),
        "csv",
        r"not rows of a label and 1280 numbers \(the number of columns changed from 1281 to 1280 at row 3\)",
    ),
    "narrower than feature_dim": (
        "rows",
        lambda lines: lines.__setitem__(slice(None), [line.rsplit(",", 1)[0] for line in lines]),
        "csv",
        "its features have 1279 values per image but its metadata says feature_dim=1280",
    ),
    "label 7 of 2 classes": (
        "rows",
        _cell(2, 0, "7"),
        "csv",
        r"row 2 has label 7, not a class index \(0 to 1: cats, dogs\)",
    ),
    "label -3": ("rows", _cell(2, 0, "-3"), "csv", r"row 2 has label -3, not a class index \(0 to 1: cats, dogs\)"),
    "label 0.5": ("rows", _cell(6, 0, "0.5"), "csv", r"row 6 has label 0.5, not a class index \(0 to 1: cats, dogs\)"),
    "rows a list": (
        "sidecar",
        lambda s: s.__setitem__("rows", [1, 2]),
        "csv.meta.json",
        r"'rows' is list \[1, 2\], not a whole number of rows",
    ),
    "rows a string": (
        "sidecar",
        lambda s: s.__setitem__("rows", "30"),
        "csv.meta.json",
        "'rows' is str '30', not a whole number of rows",
    ),
    "a path that is a number": (
        "sidecar",
        lambda s: s["paths"].__setitem__(0, 5),
        "csv.meta.json",
        r"'paths' is list \[5, .*\.\.\., not a list of file paths",
    ),
    "hashes a string": (
        "sidecar",
        lambda s: s.__setitem__("sha256", "x" * 30),
        "csv.meta.json",
        "'sha256' is str 'x{30}', not a list of content hashes",
    ),
    "skipped not pairs": (
        "sidecar",
        lambda s: s.__setitem__("skipped", [5]),
        "csv.meta.json",
        r"'skipped' is list \[5\], not a list of \[path, reason\] pairs",
    ),
    "label names not JSON": (
        "sidecar",
        lambda s: s.__setitem__("label_names", "cats"),
        "csv.meta.json",
        r"its metadata is incomplete or unreadable \(label_names='cats' is not a list of class names\)",
    ),
}


@pytest.mark.parametrize("case", list(CSV_CASES))
def test_a_hostile_csv_file_is_refused_naming_it_and_the_problem(csv_features, tmp_path, case):
    part, edit, named, problem = CSV_CASES[case]
    features = _hostile_copy(csv_features, tmp_path)
    rows, sidecar_path = features / "training.csv", features / "training.csv.meta.json"
    sidecar = json.loads(sidecar_path.read_text())
    if part == "rows":
        lines = rows.read_text().splitlines()
        edit(lines)
        rows.write_text("\n".join(lines) + "\n")
        sidecar["csv_bytes"] = rows.stat().st_size  # the edit is the only thing wrong
    else:
        edit(sidecar)
    sidecar_path.write_text(json.dumps(sidecar))
    with pytest.raises(FeatureFileError) as refused:
        train(features, tmp_path / "models", training_split="training", validation_split="validation", cv="2")
    assert re.fullmatch(f"{re.escape(str(features))}/training.{re.escape(named)}: {problem}", str(refused.value))
    assert not (tmp_path / "models").exists() or not list((tmp_path / "models").glob("*.*"))


def test_the_command_line_says_it_in_one_line(pipeline_run, tmp_path):
    features = _hostile_copy(pipeline_run["features"], tmp_path)
    with h5py.File(features / "training.h5", "a") as f:
        _set("labels", 2, 7)(f)
    result = CliRunner().invoke(cli, ["train", "--features", str(features), "--output", str(tmp_path / "m")])
    assert result.exit_code == 1 and not isinstance(result.exception, FeatureFileError), result.output
    assert result.output == (
        f"Error: {features / 'training.h5'}: row 2 has label 7, not a class index (0 to 1: cats, dogs)\n"
    )


@pytest.mark.parametrize("plant", ["short vectors", "folder"])
def test_a_shard_that_is_not_what_it_should_hold_is_extracted_again(pipeline_run, tmp_path, plant):
    """A shard file of the right identity whose vectors are one value short (a file from elsewhere, or a
    bug), or a folder (with a file in it) where the shard file belongs: a warning, and it is extracted again."""
    features = _hostile_copy(pipeline_run["features"], tmp_path)
    (features / "training.h5").unlink()
    meta = read_meta(features / "validation.h5")
    rows = dataset_rows(pipeline_run["dataset"])["training"]
    [planned] = plan_shards(rows, meta, set(), SHARD_SIZE, features / SHARDS / "training")
    vectors = read_features(pipeline_run["features"] / "training.h5").features
    if plant == "folder":
        planned.path.mkdir(parents=True)
        (planned.path / "inside").write_text("x")
        problem = "is unreadable (cut short?)"
    else:
        write_shard(planned.path, planned.identity, Shard(vectors[:, :-1], np.arange(len(rows)), []))
        problem = ": its features have 1279 values per image but its metadata says feature_dim=1280;"
    with pytest.warns(UserWarning) as warned:
        extract_dataset(pipeline_run["dataset"], features, splits=SPLITS, backbone="efficientnet_lite0", progress=False)
    assert [str(w.message) for w in warned if "shard" in str(w.message)] == [
        f"shard file {planned.path}{' ' if plant == 'folder' else ''}{problem}"
        f"{';' if plant == 'folder' else ''} its images are extracted again"
    ]
    np.testing.assert_allclose(read_features(features / "training.h5").features, vectors, atol=1e-4)


# --- failed writes ---------------------------------------------------------------------------------


@contextlib.contextmanager
def file_size_limit(size: int):
    """Writes past ``size`` bytes fail with EFBIG, in this process, as they would on a full disk."""
    soft, hard = resource.getrlimit(resource.RLIMIT_FSIZE)
    previous = signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # else the process is killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (size, hard))
    try:
        yield
    finally:
        resource.setrlimit(resource.RLIMIT_FSIZE, (soft, hard))
        signal.signal(signal.SIGXFSZ, previous)


def test_hdf5_writes_on_a_full_disk_raise_one_error_and_never_crash(pipeline_run, tmp_path):
    """HDF5 that fails to write crashed the interpreter at exit (segmentation fault) after chained tracebacks."""
    script = textwrap.dedent(
        """
        import resource, signal, sys
        from pathlib import Path
        from pyimagesearch_tl.store import HDF5FeatureWriter, Shard, read_features, write_shard

        source, folder = Path(sys.argv[1]), Path(sys.argv[2])
        loaded = read_features(source)
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, resource.RLIM_INFINITY))

        def feature_file():
            writer = HDF5FeatureWriter(folder / "training.h5", loaded.meta, "fp", chunk_rows=8)
            try:
                for start in range(0, len(loaded.labels), 8):
                    rows = slice(start, start + 8)
                    writer.append(
                        loaded.features[rows], loaded.labels[rows], loaded.paths[rows], loaded.sha256[rows], []
                    )
                writer.finish()
            finally:
                writer.close()

        def shard_file():
            write_shard(folder / "shard.h5", "id", Shard(loaded.features, list(range(len(loaded.labels))), []))

        for write in (feature_file, shard_file):
            try:
                write()
            except OSError as exc:
                print(type(exc).__name__, exc.filename, exc.strerror, sep=" | ")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(pipeline_run["features"] / "training.h5"), str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stderr == ""
    assert result.stdout.splitlines() == [
        f"OutputError | {tmp_path / 'training.h5'} | File too large",
        f"OutputError | {tmp_path / 'shard.h5'} | File too large",
    ]
    assert list(tmp_path.iterdir()) == []  # no .partial, no temporary shard file


def test_a_full_disk_during_extract_is_one_line_and_keeps_finished_shards(pipeline_run, tmp_path):
    features = tmp_path / "features"
    arguments = ["extract", "--dataset", str(pipeline_run["dataset"]), "--output", str(features)]
    with file_size_limit(250_000):  # a shard file (30 images) fits, the finished feature file does not
        result = CliRunner().invoke(cli, [*arguments, "--batch-size", "16"])
    assert result.exit_code == 1, result.output
    assert result.output.splitlines()[-1] == f"Error: cannot write {features / 'training.h5'}: File too large"
    assert not isinstance(result.exception, OSError)
    shards = list((features / SHARDS / "training").iterdir())
    assert [p.name for p in shards] and not [p for p in shards if p.name.startswith(".")]
    assert not list(features.glob("*.partial"))
    result = CliRunner().invoke(cli, [*arguments, "--batch-size", "16"])  # room again: it resumes
    assert result.exit_code == 0, result.output
    assert "training: extracted 0, skipped 0, resumed: 1 of 1 shards were already done" in result.output


@pytest.fixture(scope="module")
def trained(pipeline_run, tmp_path_factory) -> Path:
    """One bundle trained on ``pipeline_run`` (streaming: quick)."""
    output = tmp_path_factory.mktemp("trained") / "models"
    return train_streaming(
        pipeline_run["features"], output, training_split="training", validation_split="validation"
    ).path


def test_a_full_disk_during_train_is_one_line_and_keeps_the_previous_bundle(pipeline_run, trained, tmp_path):
    models = shutil.copytree(trained.parent, tmp_path / "models")
    before = (models / trained.name).read_bytes()
    arguments = ["train", "--streaming", "--classifier", "sgd"]
    arguments += ["--features", str(pipeline_run["features"]), "--output", str(models)]
    with file_size_limit(len(before) // 2):
        result = CliRunner().invoke(cli, arguments)
    assert result.exit_code == 1 and result.output == f"Error: cannot write {models / trained.name}: File too large\n"
    assert (models / trained.name).read_bytes() == before
    assert sorted(p.name for p in models.iterdir()) == [trained.name]  # no temporary file left


STALE_WRITER = """
import os, signal, sys, time
from pyimagesearch_tl.atomic import atomic_path

with atomic_path(sys.argv[1]) as temporary:
    temporary.write_bytes(b"half a bundle")
    print(temporary, flush=True)
    if sys.argv[2] == "kill":
        os.kill(os.getpid(), signal.SIGKILL)
    time.sleep(120)
"""


def _writer(target: Path, how: str) -> tuple[subprocess.Popen, Path]:
    process = subprocess.Popen(
        [sys.executable, "-c", STALE_WRITER, str(target), how], stdout=subprocess.PIPE, text=True
    )
    return process, Path(process.stdout.readline().strip())


def test_a_save_removes_what_killed_saves_left_and_nothing_else(trained, tmp_path):
    """A bundle save killed half-way leaves its temporary file; the next save into the folder removes it."""
    models = shutil.copytree(trained.parent, tmp_path / "models")
    running, live = _writer(models / "svm.skops", "sleep")
    killed, stale = _writer(models / trained.name, "kill")
    killed.wait(timeout=60)
    theirs = [models / ".notes", models / f".{trained.name}.backup", models / ".x.ptl-tmp-1-00000000-abc.skops"]
    for path in theirs:  # the last: a temporary file of another machine (a shared folder)
        path.write_text("not ours to remove")
    try:
        assert TEMPORARY.match(stale.name) and stale.exists() and live.exists()
        Bundle.load(models / trained.name).save(models / trained.name)
        assert not stale.exists()
        assert live.exists() and all(path.exists() for path in theirs)  # a running save is never disturbed
    finally:
        running.kill()
        running.wait(timeout=60)
    with atomic_path(models / "metrics.json") as temporary:
        temporary.write_text("{}")
    assert not live.exists()  # its writer is gone now
    assert all(path.exists() for path in theirs)


class _Marker:
    """Unpickling this writes a marker file: what a hostile pickle in a features folder would do."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (Path.write_text, (self.marker, "ran"))


def test_a_pickle_left_in_a_features_folder_is_never_loaded(pipeline_run, tmp_path):
    """Older versions wrote ``label_encoder.joblib``; train builds the encoder from the class names the
    feature files record, so a hostile pickle under that name runs nothing."""
    import pickle

    features = shutil.copytree(pipeline_run["features"], tmp_path / "features")
    marker = tmp_path / "marker"
    (features / "label_encoder.joblib").write_bytes(pickle.dumps(_Marker(marker)))
    result = CliRunner().invoke(
        cli, ["train", "--features", str(features), "--output", str(tmp_path / "models"), "--cv", "2"]
    )
    assert result.exit_code == 0, result.output
    assert not marker.exists()
    assert Bundle.load(tmp_path / "models" / "logreg.skops").label_names == ["cats", "dogs"]
