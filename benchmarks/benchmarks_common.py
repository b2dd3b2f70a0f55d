"""Helpers shared by the benchmark scripts (run them as ``python benchmarks/NAME.py``)."""

from __future__ import annotations

import itertools
from pathlib import Path

import click

#: The real photos beside the checkout (see ../shared/datasets/README.md).
SHARED = Path(__file__).resolve().parents[2] / "shared" / "datasets"


def real_photos(data: Path, count: int) -> list[Path]:
    """``count`` real JPEGs, taken round-robin from the class folders below ``data``."""
    folders = sorted({p.parent for p in Path(data).rglob("*.jpg")})
    if not folders:
        raise click.ClickException(f"no JPEG photos under {data}")
    streams = [iter(sorted(f.glob("*.jpg"))) for f in folders]
    photos = [p for p in itertools.chain.from_iterable(itertools.zip_longest(*streams)) if p is not None]
    if len(photos) < count:
        raise click.ClickException(f"only {len(photos)} photos under {data}, asked for {count}")
    return photos[:count]
