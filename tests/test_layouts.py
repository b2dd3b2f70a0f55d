"""build-dataset on each layout, built from real photos."""

import csv
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner
from conftest import copy_subset, shared
from hypothesis import given
from hypothesis import strategies as st

from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.errors import DatasetError
from pyimagesearch_tl.layouts import (
    build_dataset,
    detect_layout,
    natural_key,
    parse_food5k_name,
    parse_labels,
    parse_list_line,
    read_layout,
    stratified_split,
)

SPLITS = ["training", "validation", "evaluation"]
FRACTIONS = [0.6, 0.2, 0.2]


def manifest(dataset: Path) -> list[dict]:
    with (dataset / "manifest.csv").open() as handle:
        return list(csv.DictReader(handle))


@pytest.fixture(scope="module")
def photos():
    """Ten real cat photos and ten real dog photos."""
    root = shared("cats_and_dogs_filtered", "train")
    return {"cats": sorted((root / "cats").glob("*.jpg"))[:10], "dogs": sorted((root / "dogs").glob("*.jpg"))[:10]}


def test_class_folders_with_splits_keep_them_and_map_names(tmp_path):
    source = copy_subset(shared("hymenoptera_data"), tmp_path / "hymenoptera", 6)
    report = build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=FRACTIONS)
    assert report.layout == "class-folders"
    rows = manifest(tmp_path / "out")
    assert {r["split"] for r in rows} == {"training", "validation"}  # train -> training, val -> validation
    assert sum(r["split"] == "training" for r in rows) == 12 and sum(r["split"] == "validation" for r in rows) == 12
    for row in rows:
        assert (tmp_path / "out" / row["path"]).is_file()
        assert row["path"].startswith(f"{row['split']}/{row['label']}/")
        assert len(row["sha256"]) == 64 and int(row["width"]) > 0 and int(row["height"]) > 0


def test_class_folders_without_splits_are_split_stratified_and_reproducibly(tmp_path):
    source = tmp_path / "flowers"
    for name in ("daisy", "rose", "tulip"):
        copy_subset(shared("flowers", name), source / name, 10)
    first = build_dataset(source, tmp_path / "a", splits=SPLITS, fractions=FRACTIONS, seed=7)
    build_dataset(source, tmp_path / "b", splits=SPLITS, fractions=FRACTIONS, seed=7)
    build_dataset(source, tmp_path / "c", splits=SPLITS, fractions=FRACTIONS, seed=8)
    for split, share in zip(SPLITS, FRACTIONS):
        assert dict(first.counts[split]) == {name: round(10 * share) for name in ("daisy", "rose", "tulip")}
    key = lambda rows: sorted((r["path"], r["split"]) for r in rows)  # noqa: E731
    assert key(manifest(tmp_path / "a")) == key(manifest(tmp_path / "b"))
    assert key(manifest(tmp_path / "a")) != key(manifest(tmp_path / "c"))


def test_food5k_layout(tmp_path, photos):
    source = tmp_path / "Food-5K"
    for split, count in (("training", 6), ("validation", 2), ("evaluation", 2)):
        (source / split).mkdir(parents=True)
        for index, name in enumerate(("cats", "dogs")):
            for n, path in enumerate(photos[name][:count]):
                shutil.copy(path, source / split / f"{index}_{n}.jpg")
    assert detect_layout(source) == "food5k"
    report = build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=FRACTIONS, classes=["non_food", "food"])
    assert report.layout == "food5k"
    for split, count in (("training", 6), ("validation", 2), ("evaluation", 2)):
        assert dict(report.counts[split]) == {"non_food": count, "food": count}
    rows = manifest(tmp_path / "out")
    for row in rows:  # every file kept its split and got the class its name's index gives
        split, label, name = row["path"].split("/")
        assert (row["split"], row["label"]) == (split, ["non_food", "food"][int(name[0])])
        assert (source / split / name).read_bytes() == (tmp_path / "out" / row["path"]).read_bytes()
    assert len(rows) == 20
    with pytest.raises(DatasetError, match="class index 1 but only 1 classes"):
        read_layout(source, "food5k", classes=["non_food"])


def test_labels_file_layout_matches_in_natural_order_and_lists_unlabelled(tmp_path, photos):
    folder = tmp_path / "rooms" / "Bedroom"
    folder.mkdir(parents=True)
    images = photos["cats"][:6] + photos["dogs"][:6]
    for n, path in enumerate(images, start=1):  # bed_1 ... bed_12: bed_10 sorts after bed_9
        shutil.copy(path, folder / f"bed_{n}.jpg")
    (tmp_path / "rooms" / "labels.txt").write_text("MMMMMMOOOO")  # 10 labels, 12 images
    assert detect_layout(tmp_path / "rooms") == "labels-file"
    report = build_dataset(tmp_path / "rooms", tmp_path / "out", splits=SPLITS, fractions=FRACTIONS)
    labels = {Path(r["path"]).name: r["label"] for r in manifest(tmp_path / "out")}
    assert labels["bed_6.jpg"] == "M" and labels["bed_7.jpg"] == "O" and labels["bed_10.jpg"] == "O"
    assert [p.name for p in report.unlabelled] == ["bed_11.jpg", "bed_12.jpg"]
    assert "bed_11.jpg" not in labels
    (tmp_path / "rooms" / "labels.txt").write_text("M" * 13)
    with pytest.raises(DatasetError, match="13 labels but there are only 12 images"):
        read_layout(tmp_path / "rooms")


def test_real_house_rooms_labels_file(tmp_path):
    source = shared("house_rooms")
    result = read_layout(source)
    assert result.layout == "labels-file"
    assert len(result.items) == len((source / "labels.txt").read_text().strip())
    assert {item.label for item in result.items} == {"M", "O"}
    assert [item.source.name for item in result.items[:5]] == [
        "bed_1.jpg",
        "bed_2.jpg",
        "bed_3.jpg",
        "bed_4.jpg",
        "bed_8.jpg",
    ]
    assert len(result.unlabelled) == len(list((source / "Bedroom").glob("*.jpg"))) - len(result.items)


def test_duplicates_across_labels_are_reported(tmp_path, photos):
    source = tmp_path / "dups"
    for name in ("cats", "dogs"):
        (source / name).mkdir(parents=True)
        for path in photos[name][:5]:
            shutil.copy(path, source / name / path.name)
    shutil.copy(photos["cats"][0], source / "dogs" / "copy_of_a_cat.jpg")  # same bytes, another label
    report = build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=FRACTIONS)
    assert {row["label"] for row in report.duplicates} == {"cats", "dogs"}
    assert len(report.duplicates) == 2
    assert (tmp_path / "out" / "duplicates.csv").read_text().count("\n") == 3


def test_real_flowers_duplicates_under_two_labels_are_found(tmp_path):
    from pyimagesearch_tl.images import sha256_file
    from pyimagesearch_tl.layouts import find_leaks

    rows = [
        dict(path=str(p), split="training", label=label, sha256=sha256_file(p))
        for label in ("rose", "tulip")
        for p in shared("flowers", label).glob("*.jpg")
    ]
    leaks = find_leaks(rows)
    assert len({r["sha256"] for r in leaks}) >= 4
    assert all(
        {r["label"] for r in leaks if r["sha256"] == s} == {"rose", "tulip"} for s in {r["sha256"] for r in leaks}
    )


def test_undecodable_images_are_skipped_and_listed(tmp_path, photos):
    source = tmp_path / "messy"
    for name in ("cats", "dogs"):
        (source / name).mkdir(parents=True)
        for path in photos[name][:4]:
            shutil.copy(path, source / name / path.name)
    (source / "cats" / "empty.jpg").write_bytes(b"")
    (source / "dogs" / "half.jpg").write_bytes(photos["dogs"][5].read_bytes()[:3000])
    report = build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=[0.5, 0.5, 0.0])
    assert sorted(Path(p).name for p, _ in report.skipped) == ["empty.jpg", "half.jpg"]
    assert len(manifest(tmp_path / "out")) == 8
    assert "empty file" in (tmp_path / "out" / "skipped.csv").read_text()


def test_photos_whose_names_no_manifest_takes_are_skipped_with_the_reason(tmp_path, photos):
    """A photo named with a tab, a newline or a right-to-left override was copied in, and the next read of the
    manifest refused the whole dataset ('does not stay inside the dataset folder'): skipped at build now."""
    from pyimagesearch_tl.layouts import read_manifest

    source = tmp_path / "odd"
    for name in ("cats", "dogs"):
        (source / name).mkdir(parents=True)
        for path in photos[name][:3]:
            shutil.copy(path, source / name / path.name)
    odd = ["a\tb.jpg", "c\nd.jpg", "e\u202egpj.jpg", "f\u2028g.jpg"]
    persian = "\u0645\u06cc\u200c\u062e\u0648\u0627\u0647\u0645.jpg"
    fine = ["\U0001f469\u200d\U0001f4bb coder.jpg", persian, "shot 10.00\u202fAM.jpg"]
    for index, name in enumerate(odd + fine):  # joiners of emoji and Persian, a narrow space: ordinary names
        shutil.copy(photos["cats"][3 + index], source / "cats" / name)
    report = build_dataset(source, tmp_path / "out", splits=SPLITS, fractions=[0.5, 0.5, 0.0])
    assert sorted(Path(p).name for p, _ in report.skipped) == sorted(odd)
    reasons = [reason for _, reason in report.skipped]
    assert all(r.startswith("its file name cannot be a dataset file's (it holds the ") for r in reasons), reasons
    assert all(r.endswith("); rename it") for r in reasons)
    rows = read_manifest(tmp_path / "out")  # read back without an error
    assert len(rows) == 6 + len(fine) and {Path(row["path"]).name for row in rows} >= set(fine)
    only_odd = tmp_path / "only-odd" / "cats"
    only_odd.mkdir(parents=True)
    shutil.copy(photos["cats"][0], only_odd / odd[0])
    with pytest.raises(DatasetError, match=r"none of the 1 images in .* can be used \(e\.g\. .*its file name cannot"):
        build_dataset(only_odd.parent, tmp_path / "out2", splits=SPLITS, fractions=[0.5, 0.5, 0.0])


@pytest.mark.parametrize(
    "setup, message",
    [
        (lambda d: None, "does not exist"),
        (lambda d: d.mkdir(), "is empty"),
        (lambda d: (d / "cats").mkdir(parents=True) or (d / "cats" / "notes.txt").write_text("x"), "no images found"),
    ],
    ids=["missing", "empty", "no-images"],
)
def test_bad_input_folders_get_clear_errors(tmp_path, setup, message):
    folder = tmp_path / "input"
    setup(folder)
    result = CliRunner().invoke(cli, ["build-dataset", "--input", str(folder), "--output", str(tmp_path / "out")])
    assert result.exit_code == 1
    assert message in result.output and "Traceback" not in result.output


def test_requested_class_without_images_is_an_error(tmp_path, photos):
    source = tmp_path / "two"
    for name in ("cats", "dogs"):
        (source / name).mkdir(parents=True)
        shutil.copy(photos[name][0], source / name)
    with pytest.raises(DatasetError, match="class 'birds' has no images"):
        read_layout(source, classes=["cats", "birds"])


def test_existing_foreign_output_folder_is_not_replaced(tmp_path, photos):
    source = tmp_path / "src"
    (source / "cats").mkdir(parents=True)
    shutil.copy(photos["cats"][0], source / "cats")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "thesis.tex").write_text("precious")
    with pytest.raises(DatasetError, match="not empty and was not built by ptl"):
        build_dataset(source, tmp_path / "mine", splits=SPLITS, fractions=FRACTIONS)
    assert (tmp_path / "mine" / "thesis.tex").read_text() == "precious"


# --- property-based tests of the parsers --------------------------------------------------------


@given(st.integers(0, 10**6), st.integers(0, 10**9), st.sampled_from(["jpg", "JPG", "jpeg", "png"]))
def test_food5k_names_parse_to_their_class_index(index, n, ext):
    assert parse_food5k_name(f"{index}_{n}.{ext}") == index


@given(st.text(min_size=1, max_size=20))
def test_anything_else_is_rejected_or_parsed_consistently(name):
    index = parse_food5k_name(name)
    stem, dot, extension = name.rpartition(".")
    prefix, underscore, number = stem.partition("_")
    well_formed = bool(
        dot and underscore and prefix.isdecimal() and number.isdecimal() and extension.isalnum() and extension.isascii()
    )
    assert (index is not None) == well_formed
    if well_formed:
        assert index == int(prefix)


@given(st.lists(st.sampled_from("MO"), min_size=2, max_size=500))
def test_character_labels_round_trip(labels):
    assert parse_labels("".join(labels) + "\n") == [(1, label) for label in labels]


@given(st.lists(st.from_regex(r"[a-z][a-z_ ]{0,12}[a-z]", fullmatch=True), min_size=2, max_size=50))
def test_line_labels_round_trip(labels):
    assert parse_labels("\n".join(labels) + "\n\n") == list(enumerate(labels, 1))


@given(st.lists(st.integers(0, 10**6), min_size=1, max_size=50, unique=True))
def test_natural_order_follows_the_integers(numbers):
    names = [f"bed_{n}.jpg" for n in numbers]
    assert sorted(names, key=natural_key) == [f"bed_{n}.jpg" for n in sorted(numbers)]


@given(st.lists(st.sampled_from(["a", "b", "c"]), min_size=1, max_size=200), st.integers(0, 1000))
def test_stratified_split_assigns_every_item_by_the_fractions(labels, seed):
    assignment = stratified_split(labels, [0.75, 0.15, 0.10], seed)
    assert len(assignment) == len(labels) and set(assignment) <= {0, 1, 2}
    for label in set(labels):
        members = [a for a, given in zip(assignment, labels) if given == label]
        assert abs(members.count(0) - 0.75 * len(members)) <= 1


# --- split-lists: an images folder plus one list file per split (Food-101, Oxford-IIIT Pet, generic) ----


@pytest.fixture()
def food101_style(tmp_path):
    """images/<class>/<id>.jpg from real flower photos, meta/train.txt and meta/test.txt of class/id lines."""
    root = tmp_path / "food-101"
    train, test = [], []
    for name in ("daisy", "rose", "tulip"):
        (root / "images" / name).mkdir(parents=True)
        for n, photo in enumerate(sorted(shared("flowers", name).glob("*.jpg"))[:6]):
            shutil.copy(photo, root / "images" / name / f"{1000 + n}.jpg")
            (train if n < 4 else test).append(f"{name}/{1000 + n}")
    (root / "meta").mkdir()
    (root / "meta" / "train.txt").write_text("\n".join(train + ["rose/9999"]) + "\n")  # one listed file is missing
    (root / "meta" / "test.txt").write_text("\n".join(test + ["daisy/1000"]) + "\n")  # and one is in both lists
    return root


def test_food101_style_lists_are_detected_and_read(food101_style, tmp_path):
    assert detect_layout(food101_style) == "split-lists"
    report = build_dataset(food101_style, tmp_path / "out", splits=SPLITS, fractions=FRACTIONS)
    assert report.layout == "split-lists"
    assert dict(report.counts["training"]) == {"daisy": 4, "rose": 4, "tulip": 4}
    assert dict(report.counts["evaluation"]) == {"daisy": 3, "rose": 2, "tulip": 2}
    assert not report.counts["validation"]
    assert [(Path(p).as_posix().split("images/")[1], r) for p, r in report.skipped] == [
        ("rose/9999", "listed in train.txt line 13 but not found")
    ]
    leaked = {(row["split"], row["label"]) for row in report.duplicates}
    assert leaked == {("training", "daisy"), ("evaluation", "daisy")}  # the file listed twice is a leak
    for row in manifest(tmp_path / "out"):
        split, label, name = row["path"].split("/")
        assert (food101_style / "images" / label / name).read_bytes() == (tmp_path / "out" / row["path"]).read_bytes()


def test_oxford_pet_style_lists_take_the_class_from_the_name(tmp_path, photos):
    root = tmp_path / "pets"
    (root / "images").mkdir(parents=True)
    (root / "annotations").mkdir()
    lines = {"trainval": ["#Image CLASS-ID SPECIES BREED ID"], "test": []}
    for label, prefix in (("cats", "Bengal"), ("dogs", "american_bulldog")):
        for n, photo in enumerate(photos[label][:5], start=1):
            shutil.copy(photo, root / "images" / f"{prefix}_{n}.jpg")
            lines["trainval" if n <= 3 else "test"].append(f"{prefix}_{n} {1 if label == 'cats' else 2} 1 1")
    for name, rows in lines.items():
        (root / "annotations" / f"{name}.txt").write_text("\n".join(rows) + "\n")
    (root / "annotations" / "list.txt").write_text("not a split list\n")
    report = build_dataset(root, tmp_path / "out", splits=SPLITS, fractions=FRACTIONS)
    assert dict(report.counts["training"]) == {"Bengal": 3, "american_bulldog": 3}
    assert dict(report.counts["evaluation"]) == {"Bengal": 2, "american_bulldog": 2}
    with pytest.raises(DatasetError, match="classes that are not in --classes: american_bulldog"):
        build_dataset(root, tmp_path / "out2", splits=SPLITS, fractions=FRACTIONS, classes=["Bengal"])


def test_generic_split_files_from_the_command_line(tmp_path, photos):
    root = tmp_path / "mine"
    (root / "pics").mkdir(parents=True)
    lists = {"train": [], "val": []}
    for label in ("cats", "dogs"):
        for n, photo in enumerate(photos[label][:4]):
            shutil.copy(photo, root / "pics" / f"{label}{n}.jpg")
            lists["train" if n < 3 else "val"].append(f"pics/{label}{n}.jpg {label[:-1]}")
    (root / "pics" / "corrupt.jpg").write_bytes(b"\xff\xd8\xff not really")
    lists["train"].append("pics/corrupt.jpg cat")
    for name, rows in lists.items():
        (tmp_path / f"{name}.lst").write_text("\n".join(rows) + "\n")
    result = CliRunner().invoke(
        cli,
        ["build-dataset", "--input", str(root), "--output", str(tmp_path / "out"), "--layout", "split-lists",
         "--split-file", f"train={tmp_path / 'train.lst'}", "--split-file", f"val={tmp_path / 'val.lst'}"],
    )  # fmt: skip
    assert result.exit_code == 0, result.output
    assert "training: 6 images (cat 3, dog 3)" in result.output
    assert "validation: 2 images (cat 1, dog 1)" in result.output
    assert "skipped" in result.output and "corrupt.jpg" in result.output
    result = CliRunner().invoke(
        cli, ["build-dataset", "--input", str(root), "--output", str(tmp_path / "o2"), "--split-file", "train"]
    )
    assert result.exit_code != 0 and "expected NAME=PATH, got 'train'" in result.output


@pytest.mark.parametrize(
    "line, parsed",
    [
        ("apple_pie/1005649", ("apple_pie/1005649", "apple_pie")),
        ("Abyssinian_100 1 1 1", ("Abyssinian_100", "Abyssinian")),
        ("american_pit_bull_terrier_12 2 2 3", ("american_pit_bull_terrier_12", "american_pit_bull_terrier")),
        ("photos/a.jpg dog", ("photos/a.jpg", "dog")),
        ("# comment", None),
        ("   ", None),
    ],
)
def test_list_lines(line, parsed):
    assert parse_list_line(line) == parsed


def test_a_list_line_without_a_class_is_an_error():
    with pytest.raises(DatasetError, match="no class"):
        parse_list_line("image.jpg")
