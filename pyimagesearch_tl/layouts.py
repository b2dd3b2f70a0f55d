"""Dataset layouts: turn a folder of photos into labelled items, and build ``dataset/<split>/<class>/``.

Four layouts are read, each by one function registered in :data:`LAYOUTS`:

``food5k``
    Split folders whose files are named ``<class index>_<n>.jpg`` (Food-5K); class names come
    from ``classes`` in index order.
``class-folders``
    ``DIR/<class>/*`` or ``DIR/<split>/<class>/*``; pre-existing split folders are kept and mapped
    onto the configured split names (``train`` -> training, ``val``/``validation`` -> validation,
    ``test`` -> evaluation).
``labels-file``
    One flat folder of images plus a labels file: one label per line, or a single line with one
    character per image (``MOOM...``). Images are matched to labels in natural order of the
    integers in their names (bed_1, bed_2, ..., bed_10); images beyond the labels are unlabelled.
``split-lists``
    A folder of images (``DIR/images/`` or ``DIR``) plus one list file per split, as public datasets
    ship them: Food-101's ``meta/train.txt`` and ``meta/test.txt`` (``class/name`` lines, no
    extension), Oxford-IIIT Pet's ``annotations/trainval.txt`` and ``test.txt`` (``Name_12 1 1 1``
    lines, the class is the name without its number), or any ``--split-file NAME=PATH`` whose lines
    are ``path [label]`` (without a label, the path's first folder is the class). A listed file that
    is not there is skipped and reported; a file in two lists lands in two splits and is reported as
    a leak.

:func:`build_dataset` writes the chosen split layout plus ``manifest.csv`` (path, split, label,
sha256, width, height), lists undecodable images in ``skipped.csv`` and reports exact duplicates
that land in two splits or under two labels.

Nothing read leads outside the output folder: every label, wherever it comes from, must be one folder
name (:func:`check_label`; else a :class:`DatasetError` naming the file and line), split names follow
:data:`SPLIT_NAME`, every destination is resolved and checked to be inside the output folder before
anything is written, and :func:`read_manifest` refuses rows that are absolute or climb out with ``..``.
Every entry named like an image, whatever it is, is either in the manifest or in ``skipped.csv`` with
the reason the decoder gave.
"""

from __future__ import annotations

import csv
import dataclasses
import os
import re
import shutil
import unicodedata
from collections import Counter, defaultdict
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path, PureWindowsPath
from typing import Callable, Iterable, Sequence

import numpy as np

from .atomic import atomic_write_csv, remove_entry
from .cpus import available_cpus
from .engines import ShardTask, create_engine
from .errors import DatasetError, ImageError
from .images import MAX_PIXELS, is_image_name, probe_image, sha256_file
from .locks import locks_output

#: Role of each configured split, by position: the first trains, the second validates,
#: the third is held out for the final evaluation (PyImageSearch's names by default).
SPLIT_ROLES = ("training", "validation", "evaluation")

#: Folder names recognised as pre-existing splits, mapped to their role.
SPLIT_ALIASES = {
    "train": "training",
    "trainval": "training",
    "training": "training",
    "val": "validation",
    "valid": "validation",
    "validation": "validation",
    "dev": "validation",
    "test": "evaluation",
    "testing": "evaluation",
    "eval": "evaluation",
    "evaluation": "evaluation",
}

#: A split name becomes a folder and a file name: letters, digits, '_' and '-', nothing that leaves a folder.
SPLIT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")

MANIFEST = "manifest.csv"
MANIFEST_FIELDS = ["path", "split", "label", "sha256", "width", "height"]
DEFAULT_LABELS_FILE = "labels.txt"

_FOOD5K_NAME = re.compile(r"^(\d+)_(\d+)\.[A-Za-z0-9]+$")


@dataclasses.dataclass(frozen=True)
class Item:
    """One labelled photo before the split is written. ``role`` is a split role or None."""

    source: Path
    label: str
    role: str | None = None


@dataclasses.dataclass(frozen=True)
class Annotations:
    """Files that say what the images are, beside the images: a labels file, split list files."""

    labels_file: Path | None = None
    split_files: dict[str, Path] = dataclasses.field(default_factory=dict)  # split name or alias -> list file


@dataclasses.dataclass
class LayoutResult:
    layout: str
    items: list[Item]
    unlabelled: list[Path] = dataclasses.field(default_factory=list)
    declared: list[str] = dataclasses.field(default_factory=list)  # classes the layout names (folders)
    missing: list[tuple[str, str]] = dataclasses.field(default_factory=list)  # (listed path, reason)


# --- parsers (pure functions, property-tested) -------------------------------------------------


def parse_food5k_name(name: str) -> int | None:
    """Class index of a Food-5K-style file name ``<class index>_<n>.<ext>``, else None."""
    match = _FOOD5K_NAME.match(name)
    return int(match.group(1)) if match else None


def natural_key(name: str) -> tuple:
    """Sort key ordering names by the integers in them: bed_2 before bed_10."""
    parts = re.split(r"(\d+)", name)
    return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts if p != "")


def parse_labels(text: str) -> list[tuple[int, str]]:
    """``(line number, label)`` of each label of a labels file's text, in order.

    A file with a single non-empty line is one label character per image (``MOOM...``);
    otherwise each non-empty line is one label.
    """
    lines = [(number, line.strip()) for number, line in enumerate(text.splitlines(), 1) if line.strip()]
    if len(lines) == 1:
        number, line = lines[0]
        return [(number, char) for char in line if not char.isspace()]
    return lines


#: The longest file name most file systems take, in bytes.
MAX_NAME_BYTES = 255


#: Bidirectional marks, embeddings, overrides and isolates: they reorder what follows them on a line.
BIDI_CONTROLS = frozenset("\u061c\u200e\u200f\u202a\u202b\u202c\u202d\u202e\u2066\u2067\u2068\u2069")


def breaks_a_line(character: str) -> bool:
    """Whether ``character`` changes how a line of text reads: a control character (tab, newline, escape), a
    line or paragraph separator, or a bidirectional control. A file name holding one cannot be a manifest
    row's, and a terminal shows it escaped."""
    return unicodedata.category(character) in ("Cc", "Zl", "Zp") or character in BIDI_CONTROLS


def component_problem(name: str, file_name: bool = False) -> str | None:
    """Why ``name`` cannot be one folder or file name inside the dataset folder; None when it can.

    A label becomes a folder (``<split>/<label>/``), so it must name exactly one new folder there:
    not empty, not ``.`` or ``..``, without a path separator (``/`` or ``\\``), a drive (``C:``), a
    control character or an invisible format character (U+202E, U+200B...: a look-alike of another
    name), and short enough to be a file name (:data:`MAX_NAME_BYTES` in UTF-8). A photo's own
    ``file_name`` is no class, so only characters that break a line (:func:`breaks_a_line`) are refused
    among those: the zero-width joiners of emoji and Persian names are kept.
    """
    if not name:
        return "it is empty"
    if name in (".", ".."):
        return f"{name!r} names {'the folder itself' if name == '.' else 'the parent folder'}"
    if "/" in name or "\\" in name:
        return "it holds a path separator"
    if PureWindowsPath(name).drive:
        return "it names a drive"
    control = next((char for char in name if unicodedata.category(char) == "Cc"), None)
    if control is not None:
        return f"it holds the control character {control!r}"
    refused = breaks_a_line if file_name else (lambda char: unicodedata.category(char) in ("Cf", "Zl", "Zp"))
    invisible = next((char for char in name if refused(char)), None)
    if invisible is not None:  # a right-to-left override or a zero-width space makes a look-alike of a class
        return f"it holds the invisible format character U+{ord(invisible):04X} ({unicodedata.name(invisible, '?')})"
    if len(os.fsencode(name)) > MAX_NAME_BYTES:
        return f"it is longer than a file name may be ({len(os.fsencode(name))} bytes, at most {MAX_NAME_BYTES})"
    return None


def check_label(label: str, where: str) -> str:
    """``label`` when it is one safe folder name (:func:`component_problem`), else a :class:`DatasetError`
    naming ``where`` it was read (a file and line, or a folder)."""
    problem = component_problem(label)
    if problem:
        raise DatasetError(f"{where}: label {label!r} cannot be a class folder name ({problem})")
    return label


# --- the layouts -------------------------------------------------------------------------------


def _image_files(folder: Path) -> list[Path]:
    """Entries of ``folder`` named like images, whatever they are: the decoder reports those that are not."""
    return sorted((p for p in folder.iterdir() if is_image_name(p.name)), key=lambda p: natural_key(p.name))


def _subdirs(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def _split_folders(folder: Path) -> dict[str, Path] | None:
    """{role: folder} when every subfolder of ``folder`` is a recognised split name."""
    subdirs = _subdirs(folder)
    if not subdirs or not all(d.name.lower() in SPLIT_ALIASES for d in subdirs):
        return None
    roles: dict[str, Path] = {}
    for d in subdirs:
        role = SPLIT_ALIASES[d.name.lower()]
        if role in roles:
            raise DatasetError(f"{folder}: both {roles[role].name!r} and {d.name!r} look like the {role} split")
        roles[role] = d
    return roles


def _food5k(input_dir: Path, classes: Sequence[str], annotations: Annotations) -> LayoutResult:
    folders = _split_folders(input_dir) or {None: input_dir}
    items = []
    for role, folder in folders.items():
        for path in _image_files(folder):
            index = parse_food5k_name(path.name)
            if index is None:
                raise DatasetError(f"{path}: not a Food-5K name '<class index>_<n>.<ext>'")
            if classes and index >= len(classes):
                raise DatasetError(
                    f"{path}: class index {index} but only {len(classes)} classes given ({', '.join(classes)})"
                )
            items.append(Item(path, classes[index] if classes else str(index), role))
    return LayoutResult("food5k", items)


def _class_folders(input_dir: Path, classes: Sequence[str], annotations: Annotations) -> LayoutResult:
    folders = _split_folders(input_dir) or {None: input_dir}
    items, declared = [], set()
    for role, folder in folders.items():
        for class_dir in _subdirs(folder):
            if classes and class_dir.name not in classes:
                continue
            label = check_label(class_dir.name, f"class folder {class_dir}")
            declared.add(label)
            items += [Item(path, label, role) for path in _image_files(class_dir)]
    return LayoutResult("class-folders", items, declared=sorted(declared))


def _labels_file(input_dir: Path, classes: Sequence[str], annotations: Annotations) -> LayoutResult:
    labels_path = annotations.labels_file or input_dir / DEFAULT_LABELS_FILE
    if not labels_path.is_file():
        raise DatasetError(f"labels file {str(labels_path)!r} does not exist (give one with --labels FILE)")
    labels = parse_labels(labels_path.read_text(encoding="utf-8", errors="replace"))
    images = _image_files(input_dir)
    if not images:
        holders = [d for d in _subdirs(input_dir) if _image_files(d)]
        if len(holders) != 1:
            raise DatasetError(f"{input_dir}: the labels-file layout needs one flat folder of images")
        images = _image_files(holders[0])
    if len(labels) > len(images):
        raise DatasetError(
            f"labels file {str(labels_path)!r} has {len(labels)} labels but there are only {len(images)} images"
        )
    for number, label in labels:
        check_label(label, f"{labels_path} line {number}")
    items = [Item(path, label) for path, (_, label) in zip(images, labels) if not classes or label in classes]
    return LayoutResult("labels-file", items, unlabelled=images[len(labels) :])


#: Where list files are looked for when none is given: Food-101 (meta/), Oxford-IIIT Pet (annotations/).
LIST_FOLDERS = ("meta", "annotations", "")
_NUMBERED = re.compile(r"_\d+$")


def parse_list_line(line: str) -> tuple[str, str] | None:
    """``(path, label)`` of one list-file line, or None for a blank or ``#`` comment line.

    ``class/name`` (Food-101): the class is the first folder. ``Name_12 1 1 1`` (Oxford-IIIT Pet: a
    name and numeric columns): the class is the name without its ``_<number>``. ``path label``: as
    given.
    """
    parts = line.split()
    if not parts or parts[0].startswith("#"):
        return None
    path = parts[0]
    if len(parts) > 1 and not parts[1].isdigit():
        return path, parts[1]
    if "/" in path:
        return path, path.split("/", 1)[0]
    label = _NUMBERED.sub("", Path(path).stem)
    if label == Path(path).stem:
        raise DatasetError(f"list line {line.strip()!r}: no class (expected class/name, Name_<n> or 'path label')")
    return path, label


def find_split_lists(input_dir: Path) -> dict[str, Path]:
    """``{split role: list file}`` found in ``input_dir``'s meta/, annotations/ or top folder."""
    found: dict[str, Path] = {}
    for folder in LIST_FOLDERS:
        directory = input_dir / folder
        for path in sorted(directory.glob("*.txt")) if directory.is_dir() else []:
            role = SPLIT_ALIASES.get(path.stem.lower())
            if role is not None and role not in found:
                found[role] = path
        if found:
            return found
    return found


def _split_lists(input_dir: Path, classes: Sequence[str], annotations: Annotations) -> LayoutResult:
    images_dir = input_dir / "images" if (input_dir / "images").is_dir() else input_dir
    if annotations.split_files:
        lists = {}
        for name, path in annotations.split_files.items():
            if not SPLIT_NAME.fullmatch(name):
                raise DatasetError(
                    f"split name {name!r} (of the split list {str(path)!r}) must be letters, digits, '_' and '-'"
                )
            role = SPLIT_ALIASES.get(name.lower(), name)
            if not Path(path).is_file():
                raise DatasetError(f"split list {str(path)!r} (for {name}) does not exist")
            lists[role] = Path(path)
    else:
        lists = find_split_lists(input_dir)
        if not lists:
            raise DatasetError(
                f"{input_dir}: no split list files (meta/train.txt, annotations/trainval.txt, ...; "
                f"or give them with --split-file NAME=PATH)"
            )
    files: dict[str, Path] = {}  # listed name (relative, with and without extension) -> file
    for path in images_dir.rglob("*"):
        if is_image_name(path.name):  # whatever it is: the decoder reports what is not an image file
            relative = path.relative_to(images_dir).as_posix()
            files[relative] = path
            files.setdefault(relative.rsplit(".", 1)[0], path)
    items, missing = [], []
    for role, list_file in lists.items():
        for number, line in enumerate(list_file.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
            parsed = parse_list_line(line)
            if parsed is None:
                continue
            listed, label = parsed
            check_label(label, f"{list_file} line {number}")
            source = files.get(listed)
            if source is None:
                missing.append((f"{images_dir / listed}", f"listed in {list_file.name} line {number} but not found"))
            else:
                items.append(Item(source, label, role))
    if classes:
        unknown = sorted({item.label for item in items} - set(classes))
        if unknown:
            raise DatasetError(
                f"the split lists name classes that are not in --classes: {', '.join(unknown[:10])}"
                + (f" and {len(unknown) - 10} more" if len(unknown) > 10 else "")
            )
    return LayoutResult("split-lists", items, missing=missing)


LAYOUTS: dict[str, Callable[[Path, Sequence[str], Annotations], LayoutResult]] = {
    "food5k": _food5k,
    "class-folders": _class_folders,
    "labels-file": _labels_file,
    "split-lists": _split_lists,
}


def detect_layout(input_dir: Path, annotations: Annotations = Annotations()) -> str:
    """Which of :data:`LAYOUTS` applies to ``input_dir`` (see the module docstring)."""
    if annotations.split_files or find_split_lists(input_dir):
        return "split-lists"
    if annotations.labels_file is not None or (input_dir / DEFAULT_LABELS_FILE).is_file():
        return "labels-file"
    folders = list((_split_folders(input_dir) or {None: input_dir}).values())
    names = [p.name for folder in folders for p in _image_files(folder)]
    if names and sum(parse_food5k_name(n) is not None for n in names) > len(names) / 2:
        return "food5k"
    if any(_image_files(d) for folder in folders for d in _subdirs(folder)):
        return "class-folders"
    raise DatasetError(f"no images found in {input_dir} (expected class folders, Food-5K names or a labels file)")


def read_layout(
    input_dir: str | Path,
    layout: str = "auto",
    classes: Sequence[str] = (),
    labels_file: str | Path | None = None,
    split_files: dict[str, str | Path] | None = None,
) -> LayoutResult:
    """Labelled items of ``input_dir`` under ``layout`` (``auto`` detects it)."""
    input_dir = Path(input_dir)
    if not input_dir.is_dir():
        raise DatasetError(f"input folder {str(input_dir)!r} does not exist")
    if not any(input_dir.iterdir()):
        raise DatasetError(f"input folder {str(input_dir)!r} is empty")
    for name in classes:
        check_label(name, "the classes given (--classes)")
    annotations = Annotations(
        Path(labels_file) if labels_file else None, {k: Path(v) for k, v in (split_files or {}).items()}
    )
    name = detect_layout(input_dir, annotations) if layout == "auto" else layout
    if name not in LAYOUTS:
        raise DatasetError(f"unknown layout {layout!r}; choose one of: auto, {', '.join(LAYOUTS)}")
    result = LAYOUTS[name](input_dir, list(classes), annotations)
    if not result.items:
        raise DatasetError(f"no labelled images found in {input_dir} with the {name} layout")
    _check_classes(classes or result.declared, [item.label for item in result.items], f"in {input_dir}")
    return result


def _check_classes(expected: Sequence[str], labels: Sequence[str], where: str) -> None:
    found = set(labels)
    missing = [c for c in expected if c not in found]
    if missing:
        raise DatasetError(f"class {missing[0]!r} has no images {where}")


# --- splitting ---------------------------------------------------------------------------------


def stratified_split(labels: Sequence[str], fractions: Sequence[float], seed: int) -> list[int]:
    """Split index (0, 1, 2) of each item: per class, a seeded shuffle cut by ``fractions``."""
    rng = np.random.default_rng(seed)
    assignment = [0] * len(labels)
    by_label: dict[str, list[int]] = defaultdict(list)
    for index, label in enumerate(labels):
        by_label[label].append(index)
    for label in sorted(by_label):
        members = np.array(by_label[label])[rng.permutation(len(by_label[label]))]
        bounds = np.round(np.cumsum(fractions) * len(members)).astype(int)
        for split, (start, stop) in enumerate(zip(np.r_[0, bounds[:-1]], bounds)):
            for index in members[start:stop]:
                assignment[index] = split
    return assignment


# --- building the dataset folder -----------------------------------------------------------------


@dataclasses.dataclass
class BuildReport:
    layout: str
    output_dir: Path
    counts: dict[str, Counter]  # split -> label -> images
    skipped: list[tuple[str, str]]  # (source path, reason)
    unlabelled: list[Path]
    duplicates: list[dict[str, str]]  # rows of duplicates.csv


def _place(src: Path, dst: Path, link: str) -> None:
    if link == "copy":
        shutil.copy2(src, dst)
    elif link == "hardlink":
        os.link(src, dst)
    else:
        os.symlink(src.resolve(), dst)


def _inspect(path: Path, max_pixels: int) -> tuple[tuple[int, int] | None, str]:
    """((width, height), sha256) of a decodable image, or (None, reason)."""
    try:
        return probe_image(path, max_pixels), sha256_file(path)
    except ImageError as exc:
        return None, str(exc)
    except OSError as exc:
        return None, f"unreadable file: {exc.strerror or exc}"


@dataclasses.dataclass
class InspectionJob:
    """An engine's job (see :mod:`pyimagesearch_tl.engines`): each worker checks that every photo of a
    shard decodes and hashes it (:func:`_inspect`), ``cpus`` photos at a time; a shard's result is the
    list of ``((width, height), sha256)`` or ``(None, reason)``, in order. No backbone: no TensorFlow."""

    max_pixels: int = MAX_PIXELS
    meta = "decode check and SHA-256"  # what every worker computes (no feature layout)
    runtime = "-"

    def check(self) -> None:
        """Nothing the driver could find out sooner."""

    def start(self, cpus: int | None) -> "InspectionJob":
        self.cpus = cpus or available_cpus()
        return self

    def run(self, tasks) -> Iterable[tuple[int, list]]:
        with ThreadPoolExecutor(self.cpus) as pool:
            for task in tasks:
                yield task.index, list(pool.map(lambda path: _inspect(Path(path), self.max_pixels), task.paths))


def inspect_all(
    paths: Sequence[Path], max_pixels: int, engine: str = "local", shard_size: int = 256, **engine_options
) -> list[tuple[tuple[int, int] | None, str]]:
    """:func:`_inspect` of every path, in order, on ``engine`` (the photos in shards of ``shard_size``, by
    absolute path: a Ray worker's folder is not this one's)."""
    tasks = [ShardTask(i, [str(Path(p).absolute()) for p in paths[start : start + shard_size]])
             for i, start in enumerate(range(0, len(paths), shard_size))]  # fmt: skip
    results: dict[int, list] = {}
    with create_engine(engine, InspectionJob(max_pixels), **engine_options) as runner:
        for index, inspected, _node in runner.run(tasks):
            results[index] = inspected
    return [entry for task in tasks for entry in results[task.index]]


def find_leaks(rows: Iterable[dict[str, str]]) -> list[dict[str, str]]:
    """Rows whose identical content (sha256) appears in more than one split or under two labels."""
    groups: dict[str, list[dict[str, str]]] = defaultdict(list)
    for row in rows:
        groups[row["sha256"]].append(row)
    leaks = []
    for digest, members in groups.items():
        if len({m["split"] for m in members}) > 1 or len({m["label"] for m in members}) > 1:
            leaks += [dict(sha256=digest, path=m["path"], split=m["split"], label=m["label"]) for m in members]
    return leaks


def read_exclusions(path: str | Path) -> set[tuple[str, str]]:
    """``(sha256, file name)`` of every row of an exclusion list (an ``audit.csv`` the user trimmed to the
    rows to drop): the images are matched by content and name, so a copy kept elsewhere survives."""
    path = Path(path)
    try:
        with path.open(newline="") as handle:
            rows = list(csv.DictReader(handle))
    except FileNotFoundError:
        raise DatasetError(f"exclusion list {str(path)!r} does not exist") from None
    if rows and not {"sha256", "path"} <= set(rows[0]):
        raise DatasetError(f"{path} has no sha256 and path columns (expected an audit.csv written by ptl audit)")
    return {(row["sha256"], Path(row["path"]).name) for row in rows}


@locks_output("output_dir", replaces_folder=True)  # it swaps the folder: the lock stays beside
def build_dataset(
    input_dir: str | Path,
    output_dir: str | Path,
    *,
    splits: Sequence[str],
    fractions: Sequence[float],
    layout: str = "auto",
    classes: Sequence[str] = (),
    labels_file: str | Path | None = None,
    split_files: dict[str, str | Path] | None = None,
    exclude: str | Path | None = None,
    seed: int = 42,
    link: str = "copy",
    max_pixels: int = MAX_PIXELS,
    engine: str = "local",
    shard_size: int = 256,
    ray_address: str | None = None,
    ray_cpus_per_worker: int = 1,
) -> BuildReport:
    """Write ``output_dir/<split>/<class>/<file>`` and ``manifest.csv`` from the photos in ``input_dir``.

    Every photo is decoded once (a small decode: a reduced JPEG scale) and hashed, in shards of
    ``shard_size`` on ``engine`` (this process's threads, or the workers of a Ray cluster); the result
    is the same on either. The folder is assembled beside the target and swapped in at the end, so an
    interrupted build never leaves half a dataset; an existing target is replaced only if it holds a
    manifest (it was built here), never a folder of the user's own.
    """
    result = read_layout(input_dir, layout, classes, labels_file, split_files)
    output_dir = Path(output_dir)
    if output_dir.exists() and any(output_dir.iterdir()) and not (output_dir / MANIFEST).exists():
        raise DatasetError(f"output folder {str(output_dir)!r} is not empty and was not built by ptl; choose another")

    inspected = inspect_all(
        [item.source for item in result.items],
        max_pixels,
        engine,
        shard_size,
        address=ray_address,
        cpus_per_worker=ray_cpus_per_worker,
    )
    kept, skipped = [], list(result.missing)
    dropped = read_exclusions(exclude) if exclude else set()
    for item, (size, info) in zip(result.items, inspected):
        unnamable = component_problem(item.source.name, file_name=True)  # a tab, newline or escape in it
        if unnamable:
            skipped.append((str(item.source), f"its file name cannot be a dataset file's ({unnamable}); rename it"))
        elif size and (info, item.source.name) in dropped:
            skipped.append((str(item.source), f"excluded: listed in {Path(exclude).name}"))
        elif size:
            kept.append((item, size, info))
        else:
            skipped.append((str(item.source), info))
    if not kept:
        example = f"e.g. {skipped[0][0]}: {skipped[0][1]}"
        raise DatasetError(f"none of the {len(result.items)} images in {input_dir} can be used ({example})")
    if skipped:
        example = f"{len(skipped)} skipped in all, e.g. {skipped[0][0]}: {skipped[0][1]}"
        _check_classes(
            sorted({item.label for item in result.items}),
            [item.label for item, _, _ in kept],
            f"that can be used ({example})",
        )

    roles = [item.role for item, _, _ in kept]
    if all(role is None for role in roles):
        assignment = [splits[i] for i in stratified_split([item.label for item, _, _ in kept], fractions, seed)]
    else:
        role_to_split = dict(zip(SPLIT_ROLES, splits))
        unknown = sorted({r for r in roles if r not in role_to_split})
        if unknown:
            raise DatasetError(
                f"the input has a {unknown[0]} split but only {len(splits)} splits are configured ({', '.join(splits)})"
            )
        assignment = [role_to_split[role] for role in roles]

    staging = output_dir.with_name(output_dir.name + ".partial")
    remove_entry(staging)
    rows, used = [], set()
    for (item, (width, height), digest), split in zip(kept, assignment):
        relative = Path(split) / item.label / item.source.name
        counter = 1
        while relative.as_posix() in used:  # same file name from two source folders
            relative = relative.with_name(f"{item.source.stem}_{counter}{item.source.suffix}")
            counter += 1
        used.add(relative.as_posix())
        rows.append(
            dict(path=relative.as_posix(), split=split, label=item.label, sha256=digest, width=width, height=height)
        )
    _check_inside(staging, [row["path"] for row in rows], output_dir)
    for (item, _, _), row in zip(kept, rows):
        destination = staging / row["path"]
        destination.parent.mkdir(parents=True, exist_ok=True)
        _place(item.source, destination, link)

    duplicates = find_leaks(rows)
    atomic_write_csv(staging / MANIFEST, MANIFEST_FIELDS, rows)
    atomic_write_csv(staging / "skipped.csv", ["path", "reason"], [dict(path=p, reason=r) for p, r in skipped])
    atomic_write_csv(staging / "unlabelled.csv", ["path"], [dict(path=str(p)) for p in result.unlabelled])
    atomic_write_csv(staging / "duplicates.csv", ["sha256", "path", "split", "label"], duplicates)
    _swap_in(staging, output_dir)

    counts: dict[str, Counter] = {split: Counter() for split in splits}
    for row in rows:
        counts[row["split"]][row["label"]] += 1
    return BuildReport(result.layout, output_dir, counts, skipped, result.unlabelled, duplicates)


def _check_inside(folder: Path, relatives: Sequence[str], shown: Path) -> None:
    """Refuse, before anything is written, any of ``relatives`` that would land outside ``folder`` once resolved.

    The second line of defence behind :func:`check_label` and :data:`SPLIT_NAME`: whatever a label or
    split name holds, nothing is written outside the output folder (``shown`` in the message).
    """
    root = folder.resolve()
    for relative in relatives:
        destination = (folder / relative).resolve()
        if not destination.is_relative_to(root):
            raise DatasetError(f"{relative!r} would be written to {destination}, outside {shown}; nothing was written")


def _swap_in(staging: Path, target: Path) -> None:
    old = target.with_name(target.name + ".old")
    remove_entry(old)
    if target.exists() or target.is_symlink():
        os.replace(target, old)
    os.replace(staging, target)
    remove_entry(old)


def _check_row(row: dict[str, str], where: str) -> None:
    """Refuse a manifest row whose path could leave the dataset folder, or whose split or label is no folder name."""
    path, split, label = row.get("path"), row.get("split"), row.get("label")
    if path is None or split is None or label is None:
        raise DatasetError(f"{where}: no path, split and label (expected a {MANIFEST} written by build-dataset)")
    if not SPLIT_NAME.fullmatch(split):
        raise DatasetError(f"{where}: split {split!r} is not a split name (letters, digits, '_' and '-')")
    check_label(label, where)
    *folders, name = path.split("/")
    if path.startswith("/"):
        problems = ["it is absolute"]
    else:
        problems = [*map(component_problem, folders), component_problem(name, file_name=True)]
    problem = next(filter(None, problems), None)
    if problem:
        raise DatasetError(f"{where}: path {path!r} does not stay inside the dataset folder ({problem})")


def read_manifest(dataset_dir: str | Path) -> list[dict[str, str]]:
    """Rows of ``dataset_dir/manifest.csv``; without one, the ``<split>/<class>/*`` folders scanned.

    Raises
    ------
    DatasetError
        When the folder is missing or holds no images, or a manifest row (named by file and line) has
        a path that is absolute or leaves the folder (``..``), or a split or label that is not one
        folder name.
    """
    dataset_dir = Path(dataset_dir)
    if not dataset_dir.is_dir():
        raise DatasetError(f"dataset folder {str(dataset_dir)!r} does not exist (run build-dataset first)")
    manifest = dataset_dir / MANIFEST
    if manifest.is_file():
        with manifest.open(newline="", encoding="utf-8", errors="surrogateescape") as handle:
            reader = csv.DictReader(handle)
            rows = []
            for row in reader:
                _check_row(row, f"{manifest} line {reader.line_num}")
                rows.append(row)
            return rows
    rows = [
        dict(path=path.relative_to(dataset_dir).as_posix(), split=split_dir.name, label=class_dir.name, sha256="")
        for split_dir in _subdirs(dataset_dir)
        for class_dir in _subdirs(split_dir)
        for path in _image_files(class_dir)
    ]
    if not rows:
        raise DatasetError(f"dataset folder {str(dataset_dir)!r} has no <split>/<class>/<image> files")
    return rows
