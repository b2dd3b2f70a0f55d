"""`ptl predict` on archives: shards, part files and resume, CSV / Parquet / JSON, globs and list files,
the Python API. The Ray engine is checked in test_ray_engine.py, the output file's lock in test_locks.py."""

import csv
import json
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import PTL

from pyimagesearch_tl.bulk_prediction import COLUMNS, PredictionRun, predict_files
from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.images import sha256_file
from pyimagesearch_tl.prediction import Predictor

SHARD = 8
PHOTOS = 31  # the 30 validation photos of the shared pipeline and one cut short
SHARDS = -(-PHOTOS // SHARD)


@pytest.fixture(scope="module")
def model(pipeline_run, tmp_path_factory):
    """A logreg bundle trained on the shared pipeline's features (one C: quick)."""
    from pyimagesearch_tl.training import train

    [report] = train(
        pipeline_run["features"],
        tmp_path_factory.mktemp("bulk-model"),
        training_split="training",
        validation_split="validation",
        grids={"logreg": {"C": [0.1]}},
    )
    return report.path


@pytest.fixture(scope="module")
def photos(pipeline_run, tmp_path_factory):
    """The pipeline's validation photos and a photo cut short (:data:`PHOTOS`)."""
    folder = tmp_path_factory.mktemp("bulk-photos")
    for path in sorted(pipeline_run["dataset"].glob("validation/*/*.jpg")):
        target = folder / path.parent.parent.name / path.parent.name / path.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(path, target)
    whole = next(folder.rglob("*.jpg")).read_bytes()
    (folder / "validation" / "cats" / "zz_cut.jpg").write_bytes(whole[:1500])
    return folder


@pytest.fixture(scope="module")
def reference(model, photos, tmp_path_factory):
    """An uninterrupted run to CSV, in TensorFlow, in shards of :data:`SHARD`: its rows."""
    output = tmp_path_factory.mktemp("bulk-reference") / "r.csv"
    predict_files(model, [photos], output, shard_size=SHARD, runtime="tensorflow")
    with output.open(newline="") as handle:
        return list(csv.DictReader(handle))


def test_every_photo_gets_the_row_the_predictor_gives_it_in_input_order(model, photos, reference):
    """One row per file, in order, with the columns every engine writes: label, score, top-k and
    familiarity as Predictor.predict gives them, the file's SHA-256, the cut photo skipped with its reason."""
    files = sorted(p for p in photos.rglob("*") if p.is_file())
    expected = Predictor(Bundle.load(model), runtime="tensorflow").predict(files)
    assert [row["path"] for row in reference] == [str(p) for p in files] and len(files) == PHOTOS
    assert list(reference[0]) == list(COLUMNS)
    for row, want, path in zip(reference, expected, files):
        if want.error:
            assert (row["label"], row["error"], row["unknown"]) == ("", want.error, "")
            continue
        assert row["label"] == want.label and row["error"] == ""
        assert row["sha256"] == sha256_file(path)
        assert row["unknown"] == str(want.label == "unknown")
        np.testing.assert_allclose(float(row["score"]), want.score, rtol=0, atol=1e-6)
        np.testing.assert_allclose(float(row["familiarity"]), want.similarity, rtol=0, atol=1e-6)
        assert [name for name, _ in json.loads(row["top"])] == [name for name, _ in want.top]
    assert sum(row["error"] != "" for row in reference) == 1
    assert "corrupt image" in next(row["error"] for row in reference if row["path"].endswith("zz_cut.jpg"))


def test_parquet_and_json_hold_the_same_rows_as_csv(model, photos, reference, tmp_path):
    import pyarrow.parquet as pq

    predict_files(model, [photos], tmp_path / "r.parquet", shard_size=SHARD, runtime="tensorflow")
    table = pq.read_table(tmp_path / "r.parquet").to_pylist()
    predict_files(model, [photos], tmp_path / "r.json", shard_size=SHARD, runtime="tensorflow")
    listed = json.loads((tmp_path / "r.json").read_text())
    for parquet, js, row in zip(table, listed, reference, strict=True):
        assert parquet["path"] == js["path"] == row["path"] and parquet["label"] == js["label"] == row["label"]
        assert parquet["sha256"] == js["sha256"] == row["sha256"]
        if row["error"]:
            assert parquet["score"] is None and js["score"] is None and parquet["error"] == js["error"] == row["error"]
        else:
            assert parquet["score"] == js["score"] == pytest.approx(float(row["score"]), abs=1e-6)
            assert [t["label"] for t in parquet["top"]] == [name for name, _ in js["top"]]


def test_globs_and_a_list_file_name_the_same_photos(model, photos, reference, tmp_path):
    """A pattern, and a list file (relative paths from its folder, comments and blank lines skipped)."""
    files = [row["path"] for row in reference]
    listing = tmp_path / "photos.txt"
    relative = [str(p.relative_to(photos)) for p in map(type(photos), files)]
    listing.write_text("# the archive\n\n" + "\n".join(relative) + "\n")
    (tmp_path / "validation").symlink_to(photos / "validation")
    by_list = PredictionRun(model, [], file_list=listing, runtime="tensorflow").files
    by_glob = PredictionRun(model, [str(photos / "*" / "*" / "*.jpg")], runtime="tensorflow").files
    assert [p.name for p in by_list] == [p.name for p in by_glob] == [p.rsplit("/", 1)[1] for p in files]
    result = CliRunner().invoke(cli, ["predict", "--model", str(model), str(photos / "nothing*.jpg")])
    assert result.exit_code == 1 and "the pattern matches no file or folder" in result.output


def test_ctrl_c_then_a_kill_resume_without_redoing_finished_shards_and_redo_a_cut_one(model, photos, tmp_path):
    """Ctrl-C once a part file is written: exit 1, one line saying how to resume, no traceback. The same
    command again, SIGKILLed once it has written two more; one part file then cut short: the same
    command once more says how many shards were done, warns about the cut one, and writes what an
    uninterrupted run wrote.

    The runs take the network the session converted and checked (runtime auto), as a user's runs after
    their first large job do: no process imports TensorFlow. Shards of one photo (31 of them) leave each
    signal many shards to land in."""
    output, shard = tmp_path / "r.csv", 1
    shards = -(-PHOTOS // shard)
    command = [*PTL, "predict", "--model", str(model), str(photos), "--output", str(output)]
    command += ["--shard-size", str(shard), "--runtime", "auto", "--batch-size", "2"]
    whole = tmp_path / "whole" / "r.csv"
    predict_files(model, [photos], whole, shard_size=shard, runtime="auto", batch_size=2)
    with whole.open(newline="") as handle:
        reference = list(csv.DictReader(handle))
    parts = tmp_path / ".r.csv.parts"

    def finished_parts() -> list:
        return sorted(parts.glob("[!.]*.json"))  # not the temporary file of a part being written

    def run_until(count: int, signal_number: int) -> subprocess.Popen:
        process = subprocess.Popen(
            command,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),  # as a terminal's foreground job
        )
        deadline = time.monotonic() + 120
        while len(finished_parts()) < count:
            assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1]
            time.sleep(0.01)
        process.send_signal(signal_number)
        return process

    interrupted = run_until(1, signal.SIGINT)
    _, stderr = interrupted.communicate(timeout=120)
    assert interrupted.returncode == 1 and "Traceback" not in stderr
    assert stderr.strip().splitlines()[-1] == (
        "Error: interrupted; finished shards are saved: rerun the same command to resume"
    )
    before = len(finished_parts())
    killed = run_until(before + 2, signal.SIGKILL)
    killed.communicate()
    finished = finished_parts()
    assert before + 2 <= len(finished) < shards and not output.exists()
    finished[0].write_text(finished[0].read_text()[:100])

    rerun = CliRunner().invoke(cli, command[len(PTL) :])  # the same command again, in this process
    assert rerun.exit_code == 0, rerun.output
    assert f"resumed: {len(finished) - 1} of {shards} shards were already done" in rerun.stdout
    assert f"part file {finished[0]} is unreadable" in rerun.stderr
    with output.open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    assert [(r["path"], r["label"], r["sha256"], r["error"]) for r in rows] == [
        (r["path"], r["label"], r["sha256"], r["error"]) for r in reference
    ]
    np.testing.assert_allclose(
        [float(r["score"] or 0) for r in rows], [float(r["score"] or 0) for r in reference], atol=1e-6
    )
    assert not parts.exists()


def test_a_second_run_on_the_same_output_file_is_refused_in_one_line(model, photos, tmp_path):
    output = tmp_path / "r.csv"
    hold = "import sys, time\nfrom pyimagesearch_tl.locks import output_lock\nwith output_lock(sys.argv[1]):\n"
    hold += "    print('held', flush=True)\n    time.sleep(60)\n"
    holder = subprocess.Popen([sys.executable, "-c", hold, str(output)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "held"
        result = CliRunner().invoke(cli, ["predict", "--model", str(model), str(photos), "--output", str(output)])
    finally:
        holder.kill()
        holder.communicate()
    assert result.exit_code == 1
    assert f"Error: {output} is in use by " in result.output and "Traceback" not in result.output


def test_a_hostile_part_file_is_classified_again_never_copied(model, photos, reference, tmp_path):
    """A part file of the right name whose rows are not this module's (a label that is a dict, a path
    of another photo): a warning, and the shard's photos are classified again."""
    output = tmp_path / "r.csv"
    run = PredictionRun(model, [photos], output, shard_size=SHARD, runtime="tensorflow")
    from pyimagesearch_tl.bulk_prediction import plan_parts

    first = plan_parts(run.files, run.job.settings(), SHARD, None)[0]
    parts = tmp_path / ".r.csv.parts"
    parts.mkdir()
    rows = [dict.fromkeys(COLUMNS) | dict(path=str(p), sha256="", label={"x": 1}, top=[]) for p in run.files[:SHARD]]
    (parts / f"0000000-{first.identity[:16]}.json").write_text(json.dumps(dict(identity=first.identity, rows=rows)))
    with pytest.warns(UserWarning, match="does not hold this shard's rows; its photos are classified again"):
        report = run.execute()
    assert report.shards_resumed == 0
    with output.open(newline="") as handle:
        assert [r["label"] for r in csv.DictReader(handle)] == [r["label"] for r in reference]


def test_the_api_predicts_many_like_the_command(model, photos, reference, tmp_path):
    import pyimagesearch_tl as ptl

    report = ptl.load_model(model, runtime="tensorflow", shard_size=SHARD).predict_many(photos, tmp_path / "r.csv")
    assert (report.images, report.predicted, report.shards, report.shards_resumed) == (PHOTOS, PHOTOS - 1, SHARDS, 0)
    assert [path for path, _ in report.skipped] == [r["path"] for r in reference if r["error"]]
    with (tmp_path / "r.csv").open(newline="") as handle:
        assert [r["label"] for r in csv.DictReader(handle)] == [r["label"] for r in reference]


def test_entries_that_are_not_photos_are_skipped_rows_never_a_failed_run(model, photos, tmp_path):
    """A folder named like a photo, a dangling link and a pipe among the inputs: a row each with the
    reason, the photo beside them classified (they made the whole run fail before)."""
    import os

    folder = tmp_path / "odd"
    folder.mkdir()
    shutil.copy(next(photos.rglob("cat*.jpg")), folder / "a.jpg")
    (folder / "b.jpg").mkdir()
    (folder / "c.jpg").symlink_to(tmp_path / "gone.jpg")
    os.mkfifo(folder / "d.jpg")
    report = predict_files(model, [folder], tmp_path / "r.csv", runtime="tensorflow")
    assert (report.images, report.predicted) == (4, 1)
    with (tmp_path / "r.csv").open(newline="") as handle:
        rows = {Path(r["path"]).name: r for r in csv.DictReader(handle)}
    assert rows["a.jpg"]["label"] in ("cats", "dogs", "unknown") and rows["a.jpg"]["error"] == ""
    for name in ("b.jpg", "c.jpg", "d.jpg"):
        assert rows[name]["label"] == "" and rows[name]["error"] and rows[name]["sha256"] == "", rows[name]


def test_what_would_go_wrong_is_refused_before_any_work(model, photos, tmp_path):
    """top-k below 1, an output that is one of the inputs (however spelled), an empty input path (the
    working folder, as an unset shell variable gives), no input at all, a parts folder that is a link
    (part files would be written elsewhere): one clear error each, nothing classified."""
    from pyimagesearch_tl.atomic import OutputError
    from pyimagesearch_tl.errors import ConfigError, DatasetError

    with pytest.raises(ConfigError, match="top_k must be a whole number, at least 1, got 0"):
        PredictionRun(model, [photos], top_k=0)
    listing = tmp_path / "list.json"
    listing.write_text(str(next(photos.rglob("*.jpg"))) + "\n")
    (tmp_path / "sub").mkdir()
    for spelling in (listing, tmp_path / "sub" / ".." / "list.json"):
        with pytest.raises(ConfigError, match="is one of the inputs: it would be overwritten"):
            PredictionRun(model, [], spelling, file_list=listing)
    assert listing.read_text() == str(next(photos.rglob("*.jpg"))) + "\n"
    with pytest.raises(DatasetError, match="an input path is empty"):
        PredictionRun(model, [""])
    with pytest.raises(ConfigError, match="^no image given$"):
        PredictionRun(model, [])
    (tmp_path / "elsewhere").mkdir()
    (tmp_path / ".r.csv.parts").symlink_to(tmp_path / "elsewhere")
    with pytest.raises(OutputError, match="is not a folder of part files"):
        PredictionRun(model, [photos], tmp_path / "r.csv", runtime="tensorflow").execute()
    assert not list((tmp_path / "elsewhere").iterdir()) and not (tmp_path / "r.csv").exists()


@pytest.mark.parametrize(
    "plant",
    ["nested", "nan", "not my class", "link", "folder"],
)
def test_a_planted_part_file_is_never_trusted(model, photos, reference, tmp_path, plant):
    """Part files no run wrote: deep nesting, NaN scores, a label the model does not have, a link to a file
    elsewhere, a folder: each is a warning and its shard is classified again."""
    output = tmp_path / "r.csv"
    run = PredictionRun(model, [photos], output, shard_size=SHARD, runtime="tensorflow")
    from pyimagesearch_tl.bulk_prediction import plan_parts

    first = plan_parts(run.files, run.job.settings(), SHARD, None)[0]
    parts = tmp_path / ".r.csv.parts"
    parts.mkdir()
    target = parts / f"0000000-{first.identity[:16]}.json"
    good = [dict(path=str(p), sha256="", label="cats", score=0.9, unknown=False, familiarity=0.5,
                 top=[["cats", 0.9]], error=None) for p in run.files[:SHARD]]  # fmt: skip
    if plant == "nested":
        target.write_text("[" * 100_000 + "]" * 100_000)
    elif plant == "nan":
        target.write_text(json.dumps(dict(identity=first.identity, rows=[dict(r, score=float("nan")) for r in good])))
    elif plant == "not my class":
        target.write_text(json.dumps(dict(identity=first.identity, rows=[dict(r, label="wolves") for r in good])))
    elif plant == "folder":  # every rerun failed on unlinking it ("Is a directory")
        target.mkdir()
        (target / "inside.json").write_text("{}")
    else:
        (tmp_path / "elsewhere.json").write_text(json.dumps(dict(identity=first.identity, rows=good)))
        target.symlink_to(tmp_path / "elsewhere.json")
    with pytest.warns(UserWarning, match="its photos are classified again"):
        report = run.execute()
    assert report.shards_resumed == 0
    with output.open(newline="") as handle:
        assert [r["label"] for r in csv.DictReader(handle)] == [r["label"] for r in reference]
