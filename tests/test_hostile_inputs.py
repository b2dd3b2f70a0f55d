"""Trust nothing read: labels, split names and manifests never lead outside the output folder; every
file named like an image either decodes or is reported with the reason, whatever it holds or is."""

import csv
import json
import os
import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import PTL, shared
from fuzz_cases import SEED_FORMATS, decode_case, mutate, write_seeds
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import DatasetError, ImageError
from pyimagesearch_tl.features import dataset_rows
from pyimagesearch_tl.images import load_image, probe_image, sha256_file
from pyimagesearch_tl.layouts import build_dataset, read_manifest
from pyimagesearch_tl.prediction import expand_paths

# Pillow warns about the damage it works around in the files below (TIFF tags past the end, ...).
pytestmark = pytest.mark.filterwarnings("ignore::UserWarning:PIL")

SPLITS = ["training", "validation", "evaluation"]
FRACTIONS = [0.5, 0.5, 0.0]

#: Labels that are not one folder name, as a hostile labels file or list would hold them.
HOSTILE_LABELS = {
    "parent-escape": "../../../../../../elsewhere",
    "parent-escape-near": "../../../escaped",  # would land in tmp_path, where the test looks
    "absolute": "/an/absolute/path",
    "dot-dot": "..",
    "dot": ".",
    "backslash": "..\\..\\elsewhere",
    "drive": "C:",
    "control": "bell\x07",
    "right-to-left-override": "be\u202ees",  # shown as a look-alike of another class
    "zero-width-space": "b\u200bees",
    "too-long": "a" * 300,  # no file system takes a 300-byte name: refused with the line, not at the copy
}


@pytest.fixture(scope="module")
def photos():
    """Four real cat and four real dog photos."""
    root = shared("cats_and_dogs_filtered", "train")
    return {name: sorted((root / name).glob("*.jpg"))[:4] for name in ("cats", "dogs")}


def _flat_folder(folder: Path, photos) -> Path:
    folder.mkdir(parents=True)
    for number, path in enumerate(photos["cats"] + photos["dogs"], 1):
        shutil.copy(path, folder / f"photo_{number}.jpg")
    return folder


def _class_folders(folder: Path, photos) -> Path:
    for name, paths in photos.items():
        (folder / name).mkdir(parents=True)
        for path in paths:
            shutil.copy(path, folder / name / path.name)
    return folder


def _files_below(folder: Path) -> set[Path]:
    """Everything below ``folder`` but the lock files of ptl's output folders (left beside them by design)."""
    return {p for p in folder.rglob("*") if not p.name.endswith(".ptl-lock")}


def _run_cli(args: list[str]):
    result = CliRunner().invoke(cli, args)
    assert result.exit_code == 1 and "Traceback" not in result.output, result.output
    return result.output.strip()


# --- labels and split names are one safe path component --------------------------------------------


@pytest.mark.parametrize("label", HOSTILE_LABELS.values(), ids=HOSTILE_LABELS.keys())
def test_a_labels_file_label_that_is_not_one_folder_name_is_an_error_naming_file_and_line(tmp_path, photos, label):
    source = _flat_folder(tmp_path / "work" / "in", photos)
    labels = source / "labels.txt"
    labels.write_text("cat\ncat\n" + label + "\n" + "dog\n" * 5, encoding="utf-8")
    before = _files_below(tmp_path)
    output = _run_cli(["build-dataset", "--input", str(source), "--output", str(tmp_path / "work" / "out")])
    assert output.startswith("Error:") and len(output.splitlines()) == 1
    assert f"{labels} line 3: label {label!r} cannot be a class folder name" in output
    assert _files_below(tmp_path) == before  # nothing written anywhere, inside or outside --output


def test_a_single_line_labels_file_with_a_slash_is_refused(tmp_path, photos):
    source = _flat_folder(tmp_path / "in", photos)
    (source / "labels.txt").write_text("\n\nCC/CDDDD\n")
    with pytest.raises(DatasetError, match=r"labels.txt line 3: label '/' cannot be .*path separator"):
        build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=FRACTIONS)


@pytest.mark.parametrize(
    "line, label",
    [
        ("photo_1.jpg ../../../../../../elsewhere", "../../../../../../elsewhere"),
        ("photo_1.jpg /an/absolute/path", "/an/absolute/path"),
        ("../photo_1", ".."),  # a Food-101-style line: the class is the first folder
        ("/photo_1", ""),
    ],
    ids=["relative-escape", "absolute", "food101-dot-dot", "food101-root"],
)
def test_a_split_list_label_that_is_not_one_folder_name_is_an_error_naming_file_and_line(tmp_path, photos, line, label):
    source = _flat_folder(tmp_path / "in", photos)
    lists = tmp_path / "lists"
    lists.mkdir()
    (lists / "train.txt").write_text("photo_2.jpg cats\n" + line + "\n")
    (lists / "val.txt").write_text("photo_3.jpg cats\nphoto_6.jpg dogs\n")
    args = ["build-dataset", "--input", str(source), "--output", str(tmp_path / "out")]
    output = _run_cli(
        args + ["--split-file", f"train={lists / 'train.txt'}", "--split-file", f"val={lists / 'val.txt'}"]
    )
    assert f"Error: {lists / 'train.txt'} line 2: label {label!r} cannot be a class folder name" in output
    assert not (tmp_path / "out").exists() and not Path("/an").exists()


def test_a_split_name_from_the_command_line_follows_the_split_name_rule(tmp_path, photos):
    source = _flat_folder(tmp_path / "in", photos)
    (tmp_path / "list.txt").write_text("photo_1.jpg cats\n")
    args = ["build-dataset", "--input", str(source), "--output", str(tmp_path / "out")]
    output = _run_cli(args + ["--split-file", f"../train={tmp_path / 'list.txt'}"])
    assert "split name '../train'" in output and "letters, digits, '_' and '-'" in output


@pytest.mark.parametrize("name", ["back\\slash", "tab\there"], ids=["backslash", "control"])
def test_a_class_folder_whose_name_is_not_a_safe_label_is_an_error_naming_it(tmp_path, photos, name):
    source = _class_folders(tmp_path / "in", photos)
    os.rename(source / "dogs", source / name)
    with pytest.raises(DatasetError, match="class folder .* cannot be a class folder name"):
        build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=FRACTIONS)
    with pytest.raises(DatasetError, match=r"the classes given \(--classes\): label '\.\./cats'"):
        build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=FRACTIONS, classes=["../cats"])


def test_every_destination_is_checked_inside_the_output_folder_before_anything_is_written(tmp_path, photos):
    """The second line of defence: a split name that leaves the folder (the Python API takes any)."""
    source = _class_folders(tmp_path / "in", photos)
    before = _files_below(tmp_path)
    with pytest.raises(DatasetError, match=r"would be written to .*escaped.*, outside .*out; nothing was written"):
        build_dataset(source, tmp_path / "out", splits=["../../escaped", "validation"], fractions=[0.5, 0.5])
    assert not (tmp_path / "escaped").exists() and not (tmp_path.parent / "escaped").exists()
    assert _files_below(tmp_path) == before


@pytest.mark.parametrize(
    "field, value, problem",
    [
        ("path", "/etc/passwd", "it is absolute"),
        ("path", "training/../../../outside.jpg", "'..' names the parent folder"),
        ("path", "training//cats.jpg", "it is empty"),
        ("label", "../cats", "cannot be a class folder name"),
        ("split", "../training", "is not a split name"),
    ],
    ids=["absolute-path", "dot-dot-path", "empty-part", "label", "split"],
)
def test_a_manifest_read_back_is_checked_row_by_row(tmp_path, photos, field, value, problem):
    dataset = tmp_path / "dataset"
    build_dataset(_class_folders(tmp_path / "in", photos), dataset, splits=SPLITS, fractions=FRACTIONS)
    assert len(read_manifest(dataset)) == 8
    with (dataset / "manifest.csv").open(newline="") as handle:
        rows = list(csv.DictReader(handle))
    rows[4][field] = value
    with (dataset / "manifest.csv").open("w", newline="") as handle:
        writer = csv.DictWriter(handle, list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    with pytest.raises(DatasetError, match=rf"manifest.csv line 6: .*{problem}"):
        read_manifest(dataset)
    with pytest.raises(DatasetError, match="line 6"):  # what extract reads the dataset with
        dataset_rows(dataset)


# --- every file named like an image decodes or is reported -------------------------------------------


def _special_files(folder: Path) -> dict[str, str]:
    """A folder, FIFO, socket, dangling link and link loop named like images in ``folder``: {name: reason}."""
    (folder / "folder.jpg").mkdir()
    (folder / "folder.jpg" / "inside.txt").write_text("not an image")
    os.mkfifo(folder / "pipe.jpg")
    os.symlink(folder / "gone.png", folder / "dangling.jpg")
    os.symlink(folder / "loop_b.jpg", folder / "loop_a.jpg")
    os.symlink(folder / "loop_a.jpg", folder / "loop_b.jpg")
    here = os.getcwd()
    os.chdir(folder)  # a socket path is limited to about 100 bytes: bind it by its short relative name
    try:
        with socket.socket(socket.AF_UNIX) as server:
            server.bind("socket.jpg")
    finally:
        os.chdir(here)
    return {
        "folder.jpg": "not a regular file: a folder",
        "pipe.jpg": "not a regular file: a named pipe (FIFO)",
        "socket.jpg": "not a regular file: a socket",
        "dangling.jpg": f"dangling symbolic link (to {folder / 'gone.png'}, which does not exist)",
        "loop_a.jpg": "symbolic link loop",
        "loop_b.jpg": "symbolic link loop",
    }


def test_special_files_are_refused_with_the_reason_before_any_open(tmp_path, photos):
    expected = _special_files(tmp_path)
    for name, reason in expected.items():
        for check in (lambda p: load_image(p, 32), probe_image, sha256_file):
            with pytest.raises(ImageError) as caught:
                check(tmp_path / name)
            assert str(caught.value) == reason
    assert load_image(photos["cats"][0], 32).shape == (32, 32, 3)


def test_build_dataset_lists_every_special_file_in_skipped_csv_and_never_blocks(tmp_path, photos):
    source = _class_folders(tmp_path / "in", photos)
    expected = _special_files(source / "cats")
    # In a child with a deadline: before the fix, the FIFO blocked build-dataset for ever.
    result = subprocess.run(
        [*PTL, "build-dataset"]
        + ["--input", str(source), "--output", str(tmp_path / "out"), "--split-fractions", "0.5,0.5,0"],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    with (tmp_path / "out" / "skipped.csv").open() as handle:
        skipped = {Path(row["path"]).name: row["reason"] for row in csv.DictReader(handle)}
    assert skipped == expected
    assert f"wrote 8 images, skipped {len(expected)}" in result.stdout


#: What ``ptl predict`` does with its arguments before the network: expand them, decode in batches.
PREDICT_DECODE = """
import json, sys
from pyimagesearch_tl.features import decode_batches
from pyimagesearch_tl.prediction import expand_paths
paths = expand_paths(sys.argv[1:])
report = {}
for batch in decode_batches(paths, 32, batch_size=4, workers=2):
    report.update({paths[i].name: "decoded" for i in batch.indices})
    report.update({paths[i].name: reason for i, reason in batch.skipped})
print(json.dumps(report))
"""


def test_predict_reports_every_special_file_as_skipped(tmp_path, photos):
    expected = _special_files(tmp_path)
    good = Path(shutil.copy(photos["dogs"][0], tmp_path / "good.jpg"))
    assert {p.name for p in expand_paths([tmp_path])} == set(expected) | {"good.jpg"}
    with pytest.raises(DatasetError, match="no such file or folder"):
        expand_paths([tmp_path / "typo.jpg"])
    # Named one by one (``ptl predict --model M pipe.jpg good.jpg``: the FIFO blocked for ever before; a
    # folder named like an image is then a folder to expand), and as a folder; in a child with a deadline.
    files = {name: reason for name, reason in expected.items() if name != "folder.jpg"}
    named = [str(tmp_path / name) for name in files] + [str(good)]
    for arguments, reasons in ((named, files), ([str(tmp_path)], expected)):
        result = subprocess.run(
            [sys.executable, "-c", PREDICT_DECODE, *arguments], capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == dict(reasons, **{"good.jpg": "decoded"})


def _damaged(seeds: dict[str, bytes]) -> dict[str, bytes]:
    """The seeds damaged the ways that raised ValueError, NotImplementedError or MemoryError before, named .jpg."""
    j2k = bytearray(seeds["jpeg2000"])
    marker = j2k.index(b"\xff\x52")  # the COD marker's length field set below its own size
    j2k[marker + 2 : marker + 4] = b"\x00\x01"
    header = seeds["jpeg2000"].index(b"jp2h")  # the header box's length: 64 bits (1 TiB) instead of 32
    huge = seeds["jpeg2000"][: header - 4] + (1).to_bytes(4, "big") + b"jp2h" + (1 << 40).to_bytes(8, "big")
    dds = bytearray(seeds["dds"])
    dds[80:84] = bytes(4)  # no pixel format flags
    sgi = bytearray(seeds["sgi"])
    sgi[10:12] = (5).to_bytes(2, "big")  # five channels
    return {
        "jpeg2000.jpg": bytes(j2k),
        "jpeg2000_box.jpg": huge + seeds["jpeg2000"][header + 4 :],
        "dds.jpg": bytes(dds),
        "sgi.jpg": bytes(sgi),
        "ppm.jpg": seeds["ppm"].replace(b"255\n", b"25555555555555\n", 1),
    }


@pytest.fixture(scope="module")
def seeds(photos):
    return write_seeds(photos["cats"][0])


@pytest.mark.parametrize(
    "name, reason",
    [
        ("jpeg2000.jpg", "corrupt image: Marker length too small"),
        ("jpeg2000_box.jpg", r"corrupt image: Expected to read 1099511627760 bytes but only got \d+"),
        ("dds.jpg", "corrupt image: Unknown pixel format flags 0"),
        ("sgi.jpg", "corrupt image: Unsupported SGI image mode"),
        ("ppm.jpg", "corrupt image: b'Token too long in file header: 25555555555'"),
    ],
)
def test_other_formats_named_jpg_that_pillow_chokes_on_are_image_errors(tmp_path, seeds, name, reason):
    path = tmp_path / name
    path.write_bytes(_damaged(seeds[0])[name])
    for decode in (lambda: load_image(path, 32), lambda: probe_image(path)):
        with pytest.raises(ImageError, match=rf"^{reason}\.?$"):
            decode()


def test_build_dataset_reports_every_damaged_file_it_is_given(tmp_path, photos, seeds):
    """Every file of the input is in the manifest or in skipped.csv: 5 mutants of every seed format."""
    source = _class_folders(tmp_path / "in", photos)
    rng = random.Random(23)
    for name, seed in seeds[0].items():
        for number in range(5):
            (source / "cats" / f"{name}_{number}.jpg").write_bytes(mutate(seed, rng.randint))
    for name, data in _damaged(seeds[0]).items():
        (source / "dogs" / name).write_bytes(data)
    report = build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=FRACTIONS)
    with (tmp_path / "out" / "skipped.csv").open() as handle:
        skipped = [row["path"] for row in csv.DictReader(handle)]
    written = [row["path"] for row in read_manifest(tmp_path / "out")]
    given = sorted(p.relative_to(source).as_posix() for p in source.rglob("*.jpg"))
    reported = sorted(Path(p).relative_to(source).as_posix() for p in skipped)
    assert sorted(reported + [Path(p).parent.name + "/" + Path(p).name for p in written]) == given
    assert {name for name in _damaged(seeds[0])} <= {Path(p).name for p in skipped}
    assert len(report.skipped) == len(skipped)


@pytest.mark.parametrize("name", SEED_FORMATS)
@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_a_mutated_file_of_any_format_raises_only_image_error(seeds, tmp_path, name, data):
    written, unwritable = seeds
    if name in unwritable:
        pytest.skip(f"this Pillow cannot write {name}: {unwritable[name]}")
    decode_case(mutate(written[name], lambda low, high: data.draw(st.integers(low, high))), tmp_path / "case.jpg")
