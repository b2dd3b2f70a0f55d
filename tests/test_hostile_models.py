"""Model files and data an attacker shapes to pass the first checks: bundles whose insides disagree with
their layout, zip bombs, ONNX graphs that disagree with their metadata, an icon that hides a huge PNG,
and a link planted where build-dataset stages its output. Each is refused in one line, nothing decoded,
loaded or written where it should not be."""

import dataclasses
import io
import json
import shutil
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import copy_subset, shared

from pyimagesearch_tl.bundle import Bundle
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import BundleError


def _cli(*args: str):
    return CliRunner().invoke(cli, list(args))


@pytest.fixture(scope="module")
def model(pipeline_run, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("hostile-models")
    result = _cli("train", "--features", str(pipeline_run["features"]), "--output", str(out), "--cv", "2")
    assert result.exit_code == 0, result.output
    return out / "logreg.skops"


@pytest.fixture(scope="module")
def photo(pipeline_run) -> Path:
    return next((pipeline_run["dataset"] / "validation").rglob("*.jpg"))


def _refused(path: Path, photo: Path, message: str) -> None:
    result = _cli("predict", "--model", str(path), str(photo))
    assert result.exit_code == 1, result.output
    assert result.output.strip().splitlines() == [result.output.strip()] and "Traceback" not in result.output
    assert message in result.output, result.output


def _saved(bundle: Bundle, path: Path, **changes) -> Path:
    return dataclasses.replace(bundle, **changes).save(path)


def test_a_bundle_whose_insides_disagree_with_its_layout_is_refused_in_one_line(model, photo, tmp_path):
    """A huge input size (would allocate gigabytes), a label encoder of other classes, a detector threshold
    that is text, a classifier of another width: each one line before any photo is decoded."""
    from sklearn.preprocessing import LabelEncoder

    bundle = Bundle.load(model)
    huge = _saved(bundle, tmp_path / "huge.skops", meta=dataclasses.replace(bundle.meta, input_size=200000))
    _refused(huge, photo, "input_size=200000 is not a whole number from 1 to 1024")
    other = _saved(bundle, tmp_path / "classes.skops", label_encoder=LabelEncoder().fit(["only"]))
    _refused(other, photo, "its label encoder names ['only'] but its feature layout ['cats', 'dogs']")
    detector = Bundle.load(model).novelty
    detector.threshold = "abc"
    _refused(_saved(bundle, tmp_path / "threshold.skops", novelty=detector), photo, "cannot score a feature vector")
    narrow = Bundle.load(model).classifier
    narrow.steps[-1][1].coef_ = np.zeros((1, 10))
    _refused(_saved(bundle, tmp_path / "narrow.skops", classifier=narrow), photo, "cannot score a feature vector")


def test_a_zip_bomb_is_refused_before_it_is_unpacked(model, photo, tmp_path):
    bomb = tmp_path / "bomb.skops"
    with zipfile.ZipFile(model) as source, zipfile.ZipFile(bomb, "w", zipfile.ZIP_DEFLATED) as target:
        for member in source.infolist():
            data = source.read(member.filename)
            if member.filename == "schema.json":
                data = data[:-1] + b" " * (256 * 2**20) + data[-1:]  # 256 MiB of blanks: ~250 KB packed
            target.writestr(member.filename, data)
    assert bomb.stat().st_size < model.stat().st_size + 2**20  # the bomb adds under 1 MiB on disk
    _refused(bomb, photo, "far more than a model bundle holds (a zip bomb?); nothing in it was loaded")


def test_an_old_pickle_bundle_without_the_newer_fields_still_converts(model, tmp_path):
    """Pickle bundles saved before the "unknown" detector and fine-tuning existed lack those fields: with
    --trust-pickle they load with the fields' defaults (no detector, no backbone weights)."""
    import joblib

    fields = {f.name: getattr(Bundle.load(model), f.name) for f in dataclasses.fields(Bundle)}
    del fields["novelty"], fields["backbone_weights"]
    joblib.dump({"pyimagesearch_tl_bundle": fields}, tmp_path / "old.joblib")
    result = _cli("convert-bundle", "--model", str(tmp_path / "old.joblib"), "--trust-pickle",
                  "--output", str(tmp_path / "new.skops"))  # fmt: skip
    assert result.exit_code == 0, result.output
    converted = Bundle.load(tmp_path / "new.skops")
    assert converted.novelty is None and converted.backbone_weights is None


def _graph(path: Path, metadata: dict, inputs: list, columns: int) -> Path:
    """A small valid graph (pixels -> their mean, repeated) named as ptl export names things."""
    import onnx
    from onnx import TensorProto, helper

    nodes = [
        helper.make_node("Cast", ["pixels"], ["f"], to=TensorProto.FLOAT),
        helper.make_node("ReduceMean", ["f", "axes"], ["r"], keepdims=0),
        helper.make_node("Unsqueeze", ["r", "one"], ["r1"]),
        helper.make_node("Tile", ["r1", "reps"], ["probabilities"]),
    ]
    constants = [
        helper.make_tensor("axes", TensorProto.INT64, [3], [1, 2, 3]),
        helper.make_tensor("one", TensorProto.INT64, [1], [1]),
        helper.make_tensor("reps", TensorProto.INT64, [2], [1, columns]),
    ]
    graph = helper.make_graph(
        nodes,
        "g",
        [helper.make_tensor_value_info("pixels", TensorProto.UINT8, inputs)],
        [helper.make_tensor_value_info("probabilities", TensorProto.FLOAT, ["N", columns])],
        constants,
    )
    network = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 18)])
    network.ir_version = 8
    helper.set_model_props(network, metadata)
    onnx.save(network, path)
    return path


def test_an_onnx_graph_that_disagrees_with_its_metadata_is_refused(model, photo, tmp_path):
    exported = tmp_path / "model.onnx"
    assert _cli("export", "--model", str(model), "--output", str(exported)).exit_code == 0
    import onnx

    metadata = {p.key: p.value for p in onnx.load(exported).metadata_props}
    wide = _graph(tmp_path / "wide.onnx", metadata, ["N", 224, 224, 3], 5)
    _refused(wide, photo, "gives ['N', 5], not what its metadata says ([n, 224, 224, 3] pixels, [n, 2] scores)")
    fixed = _graph(tmp_path / "fixed.onnx", metadata, [1, 100, 100, 3], 2)
    _refused(fixed, photo, "its graph takes [1, 100, 100, 3]")
    layout = dict(json.loads(metadata["feature_layout"]), input_size=150000)
    huge = _graph(tmp_path / "huge.onnx", dict(metadata, feature_layout=json.dumps(layout)), ["N", "H", "W", 3], 2)
    _refused(huge, photo, "input_size=150000 is not a whole number from 1 to 1024")


def test_an_icon_hiding_a_huge_png_is_refused_without_decoding_it(tmp_path):
    """Pillow decodes an ICO's embedded PNG inside Image.open, before any size check: ICO is not a format
    the decoder reads, so a 1x1 icon holding an 8000x8000 PNG costs nothing (peak memory of the process)."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new("RGB", (8000, 8000), (200, 30, 30)).save(buffer, "PNG")
    png = buffer.getvalue()
    icon = struct.pack("<HHH", 0, 1, 1) + struct.pack("<BBBBHHII", 1, 1, 0, 0, 1, 32, len(png), 22) + png
    (tmp_path / "icon.jpg").write_bytes(icon)
    code = (
        "import resource, sys; from pyimagesearch_tl.images import load_image, declared_cost; "
        "from pyimagesearch_tl.errors import ImageError\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)\n"
        "for read in (lambda: load_image(sys.argv[1], 224), lambda: declared_cost(open(sys.argv[1], 'rb'))):\n"
        "    try: read(); print('read')\n"
        "    except ImageError as exc: print('refused', exc)\n"
        "print(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss // 1024)"
    )
    result = subprocess.run([sys.executable, "-c", code, str(tmp_path / "icon.jpg")], capture_output=True, text=True)
    before, *answers, after = result.stdout.split("\n")[:-1]
    assert answers == ["refused not an image (unrecognised file content)"] * 2, result.stdout + result.stderr
    assert int(after) - int(before) < 100  # the decoded PNG alone would be 8000 * 8000 * 4 bytes = 244 MiB


def test_a_link_planted_where_build_dataset_stages_its_output_is_never_written_through(tmp_path):
    source = copy_subset(shared("cats_and_dogs_filtered", "train"), tmp_path / "photos", 4)
    victim = tmp_path / "victim"
    victim.mkdir()
    (tmp_path / "out.partial").symlink_to(victim)
    (tmp_path / "out.old").symlink_to(victim)
    result = _cli("build-dataset", "--input", str(source), "--output", str(tmp_path / "out"))
    assert result.exit_code == 0, result.output
    assert list(victim.iterdir()) == []
    out = tmp_path / "out"
    assert not out.is_symlink() and (out / "manifest.csv").is_file()
    assert not (tmp_path / "out.partial").exists() and not (tmp_path / "out.old").exists()


def test_a_verdict_file_nested_too_deep_is_checked_again(tmp_path):
    from pyimagesearch_tl.runtimes import verdicts

    network = tmp_path / "net.onnx"
    network.write_bytes(b"x")
    network.with_suffix(".json").write_text("[" * 100_000)
    with verdicts(network) as mine:
        assert mine == {}
    shutil.rmtree(tmp_path)


def test_bundle_error_is_what_a_hostile_bundle_raises_in_python(model, tmp_path):
    bundle = Bundle.load(model)
    path = _saved(bundle, tmp_path / "views.skops", meta=dataclasses.replace(bundle.meta, views=True))
    with pytest.raises(BundleError, match="views=True is not a whole number from 1 to 2"):
        Bundle.load(path)


def test_file_names_can_neither_forge_a_result_line_nor_drive_the_terminal(model, photo, tmp_path):
    """A name holding a tab and a newline printed a forged ``dogs probability=1.0000`` line; escape sequences
    (a window title, a colour, a screen clear) reached the terminal as they were. Shown escaped now; the
    output file keeps every name as it is."""
    import os

    folder = tmp_path / "names"
    folder.mkdir()
    names = ["x.jpg\tdogs\tprobability=1.0000\ny.jpg", "esc\x1b]0;pwned\x07\x1b[31mred.jpg", "bidi\u202egpj.jpg"]
    names.append(os.fsdecode(b"caf\xff.jpg"))  # a byte that is not UTF-8
    names.append("shot 10.00\u202fAM \U0001f469\u200d\U0001f4bb \u5199\u3000.jpg")  # ordinary: shown as it is
    for name in names:
        shutil.copy(photo, os.path.join(folder, name))
    (folder / "cut\x1b[2J.jpg").write_bytes(b"\xff\xd8 not an image")  # skipped: its line is escaped too
    (folder / "link.jpg").symlink_to("/nowhere\x1b]0;title\x07\nforged.jpg\trose\tprobability=1.0000")  # in the reason
    result = _cli("predict", "--model", str(model), "--output", str(tmp_path / "p.json"), str(folder))
    assert result.exit_code == 0, result.output
    lines = result.output.strip().splitlines()
    assert len(lines) == len(names) + 4, lines  # a line per photo, the two skipped, "wrote", the summary
    assert not any(c in result.output for c in "\x1b\x07\u202e")
    results = [line.split("\t") for line in lines if line.startswith(str(folder))]
    assert sorted(len(fields) for fields in results) == [2, 2] + [3] * len(names)  # skipped lines: path, reason
    shown = {fields[0].removeprefix(f"{folder}/") for fields in results}
    assert shown == {
        "x.jpg\\tdogs\\tprobability=1.0000\\ny.jpg",
        "esc\\x1b]0;pwned\\x07\\x1b[31mred.jpg",
        "bidi\\u202egpj.jpg",
        "caf\\xff.jpg",
        "shot 10.00\u202fAM \U0001f469\u200d\U0001f4bb \u5199\u3000.jpg",
        "cut\\x1b[2J.jpg",
        "link.jpg",
    }
    assert "(to /nowhere\\x1b]0;title\\x07\\nforged.jpg\\trose\\tprobability=1.0000, which" in result.output
    written = {Path(row["path"]).name for row in json.loads((tmp_path / "p.json").read_text())}
    assert written == {*names, "cut\x1b[2J.jpg", "link.jpg"}
    # an error message names a class folder from outside: one line, escaped
    (tmp_path / "classes" / "daisy\x1b]0;title\x07").mkdir(parents=True)
    shutil.copy(photo, tmp_path / "classes" / "daisy\x1b]0;title\x07" / "a.jpg")
    result = _cli("build-dataset", "--input", str(tmp_path / "classes"), "--output", str(tmp_path / "dataset"))
    assert result.exit_code == 1 and "\x1b" not in result.output and "\x07" not in result.output, result.output
    assert f"Error: class folder {tmp_path}/classes/daisy\\x1b]0;title\\x07: label" in result.output


def test_compare_shows_model_and_split_names_from_metrics_files_escaped(model, pipeline_run, tmp_path):
    """metrics.json is read back from disk: a model file or split named to forge a table row or drive the
    terminal came out as it was."""
    run = tmp_path / "run"
    result = _cli("evaluate", "--model", str(model), "--features", str(pipeline_run["features"]),
                  "--output", str(run / "evaluation"))  # fmt: skip
    assert result.exit_code == 0, result.output
    metrics_file = next(run.rglob("metrics.json"))
    metrics = json.loads(metrics_file.read_text())
    metrics.update(model_file="models/evil\x1b[31m\nlogreg  fake 1.0000.skops", split="test\x1b[2K\rforged")
    metrics_file.write_text(json.dumps(metrics))
    shutil.copytree(metrics_file.parent, run / "evaluation" / "other")  # two splits: the comparison warns
    other = json.loads((run / "evaluation" / "other" / "metrics.json").read_text())
    (run / "evaluation" / "other" / "metrics.json").write_text(json.dumps(dict(other, split="validation")))
    result = _cli("compare", "--output", str(run))
    assert result.exit_code == 0, result.output
    assert not any(c in result.output for c in "\x1b\r") and "\nlogreg  fake" not in result.output
    assert "evil\\x1b[31m\\nlogreg  fake 1.0000" in result.output and "test\\x1b[2K\\rforged" in result.output
