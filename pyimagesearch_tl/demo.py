"""Where the demo's photos come from: a given folder, the shared datasets, or a one-time download."""

from __future__ import annotations

import urllib.request
import zipfile
from pathlib import Path

from .cache import cache_dir
from .errors import DatasetError

DEMO_DATASET = "cats_and_dogs_filtered"
DEMO_URL = "https://storage.googleapis.com/mledu-datasets/cats_and_dogs_filtered.zip"
#: Folders searched for an already available copy, relative to the current directory.
SHARED_LOCATIONS = ("../shared/datasets", "shared/datasets")


def resolve_demo_data(data: str | Path | None = None, download: bool = True) -> Path:
    """The demo's photo folder: ``data`` if given, else a shared copy, else a cached download."""
    if data:
        path = Path(data)
        if not path.is_dir():
            raise DatasetError(f"demo data folder {str(path)!r} does not exist")
        return path
    for location in SHARED_LOCATIONS:
        candidate = Path(location) / DEMO_DATASET
        if candidate.is_dir():
            return candidate
    target = cache_dir() / "datasets" / DEMO_DATASET
    if target.is_dir():
        return target
    if not download:
        raise DatasetError(f"no copy of {DEMO_DATASET} found; give one with DATA=DIR")
    return _download(target)


def _download(target: Path) -> Path:
    from tqdm.auto import tqdm

    archive = target.parent / f"{DEMO_DATASET}.zip"
    archive.parent.mkdir(parents=True, exist_ok=True)
    partial = archive.with_suffix(".zip.partial")
    try:
        with urllib.request.urlopen(DEMO_URL, timeout=60) as response, open(partial, "wb") as out:
            total = int(response.headers.get("Content-Length") or 0) or None
            with tqdm(total=total, unit="B", unit_scale=True, desc=f"downloading {DEMO_DATASET}") as bar:
                for block in iter(lambda: response.read(1 << 20), b""):
                    out.write(block)
                    bar.update(len(block))
        partial.replace(archive)
    except OSError as exc:
        partial.unlink(missing_ok=True)
        raise DatasetError(f"could not download {DEMO_URL} ({exc}); give a local copy with DATA=DIR") from None
    staging = target.with_name(target.name + ".partial")
    with zipfile.ZipFile(archive) as zipped:
        zipped.extractall(staging)
    (staging / DEMO_DATASET).replace(target)
    staging.rmdir()
    archive.unlink()
    return target
