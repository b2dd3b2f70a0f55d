"""ptl audit on real photos: planted near-duplicates, flipped labels, flowers' cross-class duplicates, --exclude."""

import csv
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
    """cats_and_dogs_filtered: 300 training photos per class with 5% of the labels flipped (seeded), 100
    validation photos per class, and 50 training photos planted into validation as 4 copies each."""
    work = tmp_path_factory.mktemp("audit")
    source, rng = work / "photos", np.random.default_rng(7)
    train = {
        label: sorted(shared("cats_and_dogs_filtered", "train", label).glob("*.jpg"))[:300]
        for label in ("cats", "dogs")
    }
    every = [(label, p) for label, paths in train.items() for p in paths]
    flipped = {every[i][1].name for i in rng.choice(len(every), size=30, replace=False)}
    for label, paths in train.items():
        other = "dogs" if label == "cats" else "cats"
        for p in paths:
            target = source / "train" / (other if p.name in flipped else label)
            target.mkdir(parents=True, exist_ok=True)
            shutil.copy(p, target)
    planted = {}  # planted file name -> the training photo it copies
    clean = [(label, p) for label, p in every if p.name not in flipped]
    for label, photo in [clean[i] for i in rng.choice(len(clean), size=50, replace=False)]:
        folder = source / "validation" / label
        folder.mkdir(parents=True, exist_ok=True)
        for name in _planted_copies(photo, folder, f"planted_{photo.stem}"):
            planted[name] = photo.name
    for label in ("cats", "dogs"):
        for p in sorted(shared("cats_and_dogs_filtered", "validation", label).glob("*.jpg"))[:100]:
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
    assert len(unplanted) < 0.01 * len(found), unplanted
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
    import json

    audit = audited["work"] / "audit"
    summary = json.loads((audit / "audit.json").read_text())
    assert summary["images"] == {"training": 600, "validation": 400}
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
    source = tmp_path / "flowers"
    by_hash = {}
    for label in ("rose", "tulip"):
        for p in shared("flowers", label).glob("*.jpg"):
            by_hash.setdefault(sha256_file(p), []).append((label, p))
    duplicated = [copies for copies in by_hash.values() if {label for label, _ in copies} == {"rose", "tulip"}]
    assert len(duplicated) >= 4
    for label in ("rose", "tulip"):  # the duplicated files and 40 ordinary photos per class
        (source / label).mkdir(parents=True)
        ordinary = [p for p in sorted(shared("flowers", label).glob("*.jpg")) if len(by_hash[sha256_file(p)]) == 1]
        for p in ordinary[:40] + [p for copies in duplicated for lab, p in copies if lab == label]:
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
