"""ptl audit on real photos: planted near-duplicates, flipped labels, flowers' cross-class duplicates, --exclude."""

import csv
import re
import shutil

import numpy as np
import pytest
from click.testing import CliRunner
from conftest import shared

from pyimagesearch_tl.audit import edited_copies
from pyimagesearch_tl.cli import cli
from pyimagesearch_tl.images import sha256_file

SPLITS = ["training", "validation", "evaluation"]


def run(*args: str) -> str:
    result = CliRunner().invoke(cli, list(args))
    assert result.exit_code == 0, result.output
    return result.output


def _planted_copies(photo, folder, stem):
    """The photo as the audit's calibration edits it (half size, JPEG quality 40, 10% crop), and as it is."""
    for kind, copy in zip(("half", "q40", "crop"), edited_copies(photo)):
        (folder / f"{stem}_{kind}.jpg").write_bytes(copy.getvalue())
    shutil.copy(photo, folder / f"{stem}_orig.jpg")
    return [f"{stem}_{kind}.jpg" for kind in ("half", "q40", "crop", "orig")]


@pytest.fixture(scope="module")
def audited(tmp_path_factory):
    """cats_and_dogs_filtered: 100 training photos per class with 6% of the labels flipped (seeded), 10
    validation photos per class, and 10 training photos planted into validation as 4 copies each (260 in all)."""
    work = tmp_path_factory.mktemp("audit")
    source, rng = work / "photos", np.random.default_rng(7)
    train = {
        label: sorted(shared("cats_and_dogs_filtered", "train", label).glob("*.jpg"))[:100]
        for label in ("cats", "dogs")
    }
    every = [(label, p) for label, paths in train.items() for p in paths]
    flipped = {every[i][1].name for i in rng.choice(len(every), size=12, replace=False)}
    for label, paths in train.items():
        other = "dogs" if label == "cats" else "cats"
        for p in paths:
            target = source / "train" / (other if p.name in flipped else label)
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, target)
    planted = {}  # planted file name -> the training photo it copies
    clean = [(label, p) for label, p in every if p.name not in flipped]
    for label, photo in [clean[i] for i in rng.choice(len(clean), size=10, replace=False)]:
        folder = source / "validation" / label
        folder.mkdir(parents=True, exist_ok=True)
        for name in _planted_copies(photo, folder, f"planted_{photo.stem}"):
            planted[name] = photo.name
    for label in ("cats", "dogs"):
        for p in sorted(shared("cats_and_dogs_filtered", "validation", label).glob("*.jpg"))[:10]:
            shutil.copy(p, source / "validation" / label)
    run("build-dataset", "--input", str(source), "--output", str(work / "dataset"))
    run("extract", "--dataset", str(work / "dataset"), "--output", str(work / "features"))
    output = run("audit", "--features", str(work / "features"), "--dataset", str(work / "dataset"), "--output",
                 str(work / "audit"))  # fmt: skip
    with (work / "audit" / "audit.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return dict(work=work, rows=rows, output=output, flipped=flipped, planted=planted, source=source)


def test_planted_near_duplicates_are_found_as_leaks(audited):
    leaks = [r for r in audited["rows"] if r["kind"] == "leak"]
    found = {(r["path"].split("/")[-1], r["partner_path"].split("/")[-1]) for r in leaks}
    planted = set(audited["planted"].items())
    recall = len(found & planted) / len(planted)
    unplanted = [pair for pair in found if pair not in planted]
    assert recall >= 0.95, sorted(planted - found)[:10]
    assert len(unplanted) <= 0.025 * len(found), unplanted
    assert "near-duplicates: feature similarity >=" in audited["output"]


def test_flipped_labels_are_found_with_their_true_label(audited):
    issues = {r["path"].split("/")[-1]: r for r in audited["rows"] if r["kind"] == "label" and r["split"] == "training"}
    flipped = audited["flipped"]
    hits = set(issues) & flipped
    precision, recall = len(hits) / max(1, len(issues)), len(hits) / len(flipped)
    assert precision >= 0.8 and recall >= 0.8, (precision, recall)
    for name in hits:  # the suggested label is the photo's true class (the one it was taken from)
        assert issues[name]["suggested_label"] == ("cats" if name.startswith("cat.") else "dogs")


def test_outputs_summary_and_contact_sheets(audited):
    """audit.json counts the images per split and the leaks, records both calibrated thresholds, and the
    leak and label contact sheets are PNG files."""
    import json

    audit = audited["work"] / "audit"
    summary = json.loads((audit / "audit.json").read_text())
    assert summary["images"] == {"training": 200, "validation": 60}
    assert summary["counts"]["leak"]["validation"] == len([r for r in audited["rows"] if r["kind"] == "leak"])
    assert 0.5 < summary["duplicate_threshold"] < 1.0 and 0.5 < summary["pixel_threshold"] < 1.0
    for kind in ("leak", "label"):
        assert (audit / f"audit_{kind}.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_build_dataset_excludes_the_rows_kept_in_the_audit_file(audited, tmp_path):
    rows = [r for r in audited["rows"] if r["kind"] == "leak"]
    kept = tmp_path / "confirmed.csv"
    with kept.open("w", newline="") as handle:
        writer = csv.DictWriter(handle, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    output = run("build-dataset", "--input", str(audited["source"]), "--output", str(tmp_path / "clean"), "--exclude",
                 str(kept))  # fmt: skip
    manifest = (tmp_path / "clean" / "manifest.csv").read_text()
    assert all(r["path"] not in manifest for r in rows)  # the listed copies are gone
    assert all(r["partner_path"] in manifest for r in rows)  # their training originals are kept
    assert f"skipped {len(rows)}" in output
    assert list(audited["source"].rglob("*.jpg"))  # nothing deleted from the input


def test_flowers_files_under_two_labels_are_conflicts(tmp_path):
    """The flowers set files a few photos under both rose and tulip: each is a conflict ("identical files"),
    found among 15 ordinary photos per class (each file hashed once)."""
    source = tmp_path / "flowers"
    by_hash, hashes = {}, {}
    for label in ("rose", "tulip"):
        for p in sorted(shared("flowers", label).glob("*.jpg")):
            hashes[p] = sha256_file(p)
            by_hash.setdefault(hashes[p], []).append((label, p))
    duplicated = [copies for copies in by_hash.values() if {label for label, _ in copies} == {"rose", "tulip"}]
    assert len(duplicated) >= 4
    for label in ("rose", "tulip"):  # the duplicated files and 15 ordinary photos per class
        (source / label).mkdir(parents=True)
        ordinary = [p for p in sorted(shared("flowers", label).glob("*.jpg")) if len(by_hash[hashes[p]]) == 1]
        for p in ordinary[:15] + [p for copies in duplicated for lab, p in copies if lab == label]:
            shutil.copy(p, source / label)
    run("build-dataset", "--input", str(source), "--output", str(tmp_path / "dataset"), "--split-fractions",
        "0.75,0.25,0.0")  # fmt: skip
    run("extract", "--dataset", str(tmp_path / "dataset"), "--output", str(tmp_path / "features"))
    run("audit", "--features", str(tmp_path / "features"), "--dataset", str(tmp_path / "dataset"), "--output",
        str(tmp_path / "audit"))  # fmt: skip
    with (tmp_path / "audit" / "audit.csv").open() as handle:
        conflicts = [r for r in csv.DictReader(handle) if r["kind"] == "conflict"]
    reported = {r["sha256"] for r in conflicts}
    assert {sha256_file(copies[0][1]) for copies in duplicated} <= reported
    assert all("identical files" in r["reason"] for r in conflicts if r["sha256"] in reported)
    assert {(r["label"], r["suggested_label"]) for r in conflicts} <= {("rose", "tulip"), ("tulip", "rose")}


def test_without_cleanlab_the_audit_says_how_to_install_it(audited, tmp_path, monkeypatch):
    import sys

    monkeypatch.setitem(sys.modules, "cleanlab", None)
    monkeypatch.setitem(sys.modules, "cleanlab.filter", None)
    result = CliRunner().invoke(cli, ["audit", "--features", str(audited["work"] / "features"), "--dataset",
                                      str(audited["work"] / "dataset"), "--output", str(tmp_path / "a")])  # fmt: skip
    assert result.exit_code == 1 and "pip install 'pyimagesearch_tl[audit]'" in result.output


def _audit_small(tmp_path, photos: dict[str, list]) -> dict:
    """build-dataset (split folders kept) + extract + audit of ``{"train/cats": [photo, ...], ...}``; the
    rows of audit.csv and audit.json."""
    import json

    from pyimagesearch_tl.audit import audit
    from pyimagesearch_tl.extraction import extract_dataset
    from pyimagesearch_tl.layouts import build_dataset

    for folder, files in photos.items():
        (tmp_path / "photos" / folder).mkdir(parents=True)
        for n, photo in enumerate(files):
            shutil.copy(photo, tmp_path / "photos" / folder / f"{n:02d}_{photo.name}")
    build_dataset(tmp_path / "photos", tmp_path / "dataset", splits=SPLITS, fractions=[0.75, 0.15, 0.10])
    extract_dataset(tmp_path / "dataset", tmp_path / "features", splits=SPLITS, backbone="efficientnet_lite0",
                    batch_size=16, progress=False)  # fmt: skip
    audit(tmp_path / "features", tmp_path / "dataset", tmp_path / "audit", splits=SPLITS, n_jobs=1, sheet_size=4)
    with (tmp_path / "audit" / "audit.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    return dict(rows=rows, summary=json.loads((tmp_path / "audit" / "audit.json").read_text()))


def _photos(label: str, start: int, count: int) -> list:
    return sorted(shared("cats_and_dogs_filtered", "train", label).glob("*.jpg"))[start : start + count]


def test_a_folder_of_photos_given_as_the_dataset_is_a_clear_error(pipeline_run, cats_dogs, tmp_path):
    from pyimagesearch_tl.audit import audit
    from pyimagesearch_tl.errors import DatasetError

    with pytest.raises(DatasetError, match=r"not a dataset built by ptl build-dataset .*ptl build-dataset"):
        audit(pipeline_run["features"], cats_dogs, tmp_path / "a", splits=SPLITS, n_jobs=1)
    result = CliRunner().invoke(cli, ["audit", "--features", str(pipeline_run["features"]), "--dataset",
                                      str(cats_dogs), "--output", str(tmp_path / "b")])  # fmt: skip
    assert result.exit_code == 1, result.output
    assert "Traceback" not in result.output and not isinstance(result.exception, FileNotFoundError)
    errors = [line for line in result.output.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1 and "ptl build-dataset" in errors[0], result.output


def test_a_class_with_one_training_photo_gets_no_label_verdict_but_the_audit_runs(tmp_path):
    roses = sorted(shared("flowers", "rose").glob("*.jpg"))
    with pytest.warns(UserWarning, match=r"no out-of-fold label verdict .*roses \(1 training photo\)"):
        report = _audit_small(tmp_path, {
            "train/cats": _photos("cats", 0, 6), "train/dogs": _photos("dogs", 0, 3), "train/roses": roses[:1],
            "validation/cats": _photos("cats", 6, 2), "validation/dogs": _photos("dogs", 6, 2),
            "validation/roses": roses[1:3],
        })  # fmt: skip
    issues = report["summary"]["label_issues"]
    assert issues["folds"] == 3  # as many as the smallest class that takes part allows
    assert issues["unchecked_classes"] == {"roses": 1}
    assert "fewer than 2 training photos" in issues["note"] and "roses" in issues["note"]
    assert not [r for r in report["rows"] if r["kind"] == "label" and r["label"] == "roses"]
    assert report["summary"]["outlier_thresholds"]["own_class"]["roses"] is None


def test_a_group_of_copies_is_reported_once_per_copy_against_its_first_member(tmp_path):
    cats, dogs = _photos("cats", 0, 8), _photos("dogs", 0, 8)
    triple, leaked, conflicted = cats[0], dogs[0], cats[1]
    report = _audit_small(tmp_path, {
        "train/cats": cats + [triple, triple],  # three identical files in one split: redundant
        "train/dogs": dogs + [conflicted, conflicted],  # one cat photo also filed twice as a dog: conflicts
        "validation/cats": _photos("cats", 8, 3),
        "validation/dogs": _photos("dogs", 8, 3) + [leaked, leaked],  # a training photo twice in validation
    })  # fmt: skip
    copies = [r for r in report["rows"] if r["kind"] in ("leak", "conflict", "redundant")]
    by_name = {}
    for r in copies:
        by_name.setdefault(r["path"].split("/")[-1][3:], []).append(r)
    assert sorted(by_name) == sorted({triple.name, leaked.name, conflicted.name}), copies
    for name, kind in ((triple.name, "redundant"), (leaked.name, "leak"), (conflicted.name, "conflict")):
        rows = by_name[name]
        assert len(rows) == 2 and {r["kind"] for r in rows} == {kind}, rows  # n - 1 rows for n copies
        assert len({r["partner_path"] for r in rows}) == 1  # all paired with the group's first member
        assert rows[0]["partner_path"] not in {r["path"] for r in rows}
        assert all("identical files" in r["reason"] and "group of 3" in r["reason"] for r in rows)
    assert {r["partner_split"] for r in by_name[leaked.name]} == {"training"}
    assert {r["partner_path"].split("/")[1] for r in by_name[conflicted.name]} == {"cats"}


def test_the_approximate_search_finds_what_the_exact_one_finds(audited, tmp_path):
    """The planted copies and everything else the exact search reported, found through the faiss index;
    each candidate image decoded once for its pixel check, however many pairs it is in."""
    import json

    work = audited["work"]
    output = run("audit", "--features", str(work / "features"), "--dataset", str(work / "dataset"),
                 "--output", str(tmp_path / "audit"), "--neighbour-search", "approximate")  # fmt: skip
    with (tmp_path / "audit" / "audit.csv").open() as handle:
        rows = list(csv.DictReader(handle))
    copies = ("leak", "conflict", "redundant")

    def pairs(found):
        return sorted((r["kind"], r["path"], r["partner_path"]) for r in found if r["kind"] in copies)

    assert pairs(rows) == pairs(audited["rows"]) and len(pairs(rows)) >= len(audited["planted"])
    assert "near-duplicates: feature similarity >=" in output
    calibration = json.loads((tmp_path / "audit" / "audit.json").read_text())["duplicate_calibration"]
    # a few hundred rows train a few lists, all of them probed (the description said "16 probed" of 1)
    described = calibration["neighbour_search"]
    assert re.fullmatch(r"approximate \(faiss IndexIVFFlat, (\d+) of \1 lists probed\)", described), described
    exact = json.loads((work / "audit" / "audit.json").read_text())["duplicate_calibration"]
    assert exact["neighbour_search"] == "exact" and exact["candidate_pairs"] == calibration["candidate_pairs"]
    assert calibration["images_decoded"] < calibration["candidate_pairs"]  # 40 planted copies make 60 pairs


def test_approximate_pairs_equal_the_exact_ones_on_real_features_grown_with_noise(audited):
    """10,000 rows: the audit's 260 real feature vectors, each repeated with noise that keeps the copies
    below the threshold, the planted near-duplicates (real features of edited photos) among them, and a
    group of 30 identical rows: the index probes a fraction of its lists and still finds the pairs, at the
    threshold the audit calibrated."""
    import json

    from pyimagesearch_tl.audit import _unit, approximate_pairs, similar_pairs
    from pyimagesearch_tl.store import read_features

    features = audited["work"] / "features"
    real = _unit(np.concatenate([read_features(features / f"{s}.h5").features for s in ("training", "validation")]))
    rng = np.random.default_rng(0)
    noisy = real[rng.integers(0, len(real), 10_000 - len(real) - 30)]
    noisy = _unit(noisy + rng.normal(size=noisy.shape).astype(np.float32) * 0.03)
    unit = np.concatenate([real, noisy, np.repeat(real[:1], 30, axis=0)])
    threshold = json.loads((audited["work"] / "audit" / "audit.json").read_text())["duplicate_threshold"]
    exact = similar_pairs(unit, threshold, "exact")
    approximate = approximate_pairs(unit, threshold)
    assert len(exact) >= 30 * 29 // 2 + 40
    found = {(i, j) for i, j, _ in approximate}
    assert len(found & {(i, j) for i, j, _ in exact}) >= 0.99 * len(exact)
    assert all(similarity >= threshold for _, _, similarity in approximate)
    group = range(len(unit) - 30, len(unit))
    assert {(i, j) for i in group for j in group if i < j} <= found  # a group larger than any k: found whole


@pytest.mark.parametrize("threshold", [1.5, 1.0, 0.99, 0.0, -0.5])
def test_both_searches_find_the_same_pairs_at_any_threshold_even_of_copies_scaled_apart(threshold):
    """20 copies of one real-sized vector at different scales (similarity 1 up to float32 rounding) among 30
    others: the same pairs from both searches, and none from fewer than two rows."""
    from pyimagesearch_tl.audit import _unit, similar_pairs

    rng = np.random.default_rng(0)
    vector = rng.normal(size=1280).astype(np.float32)
    unit = _unit(np.stack([vector * (1 + k) for k in range(20)] + list(rng.normal(size=(30, 1280)).astype(np.float32))))
    exact, approximate = (similar_pairs(unit, threshold, search) for search in ("exact", "approximate"))
    assert [(i, j) for i, j, _ in exact] == [(i, j) for i, j, _ in approximate]
    assert {(i, j) for i in range(20) for j in range(i + 1, 20)} <= {(i, j) for i, j, _ in approximate}
    assert similar_pairs(unit[:1], threshold, "approximate") == similar_pairs(unit[:0], threshold, "approximate") == []
