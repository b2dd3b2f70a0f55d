"""Damaged image files, one mutation strategy for tests/test_hostile_inputs.py and benchmarks/bench_fuzz.py.

A case is a seed -- a real photo written by Pillow in one of :data:`SEED_FORMATS` -- with a few
mutations: bytes overwritten (with a random or a boundary value), a 16- or 32-bit field set to a
boundary value (sizes, offsets, counts), a slice cut out, repeated or filled with random bytes, or the
file cut short. Half the positions fall in the first :data:`HEADER` bytes, where the parsers are.

:func:`mutate` takes every integer it needs from ``draw(low, high)`` (both ends included): the test
passes hypothesis's ``data.draw(st.integers(low, high))``, so a failure shrinks to the fewest and
smallest mutations; the benchmark passes a seeded ``random.Random().randint``. Both explore the same
cases, and :func:`decode_case` is the one check both run.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Callable

from PIL import Image

from pyimagesearch_tl.errors import ImageError
from pyimagesearch_tl.images import load_image, probe_image

#: Seed name -> (Pillow format, save options): every format this project's Pillow writes.
SEED_FORMATS = {
    "jpeg": ("JPEG", {}),
    "progressive-jpeg": ("JPEG", {"progressive": True}),
    "png": ("PNG", {}),
    "gif": ("GIF", {}),
    "tiff": ("TIFF", {}),
    "bmp": ("BMP", {}),
    "webp": ("WEBP", {}),
    "ico": ("ICO", {}),
    "ppm": ("PPM", {}),
    "tga": ("TGA", {}),
    "jpeg2000": ("JPEG2000", {}),
    "sgi": ("SGI", {}),
    "pcx": ("PCX", {}),
    "dds": ("DDS", {}),
    "qoi": ("QOI", {}),
}

#: Longest side of the seeds: small, so a case decodes in about a millisecond.
SEED_SIDE = 48
#: Bytes at the start of a file where half the mutations fall.
HEADER = 64
#: Decompression-bomb limit while fuzzing: a header mutated to claim a large image is decoded (and
#: found short) in milliseconds, while the default limit would spend seconds filling 89 megapixels.
FUZZ_MAX_PIXELS = 1 << 20
#: Values that sit on the boundaries parsers get wrong.
BOUNDARY_BYTES = (0x00, 0x01, 0x7F, 0x80, 0xFE, 0xFF)
BOUNDARY_WORDS = (0, 1, 0x7FFF, 0x8000, 0xFFFF, 0x7FFFFFFF, 0x80000000, 0xFFFFFFFF)
MUTATIONS = ("byte", "boundary-byte", "word", "cut", "repeat", "random-fill", "truncate")

Draw = Callable[[int, int], int]


def write_seeds(photo: Path, side: int = SEED_SIDE) -> tuple[dict[str, bytes], dict[str, str]]:
    """The seed files of ``photo``, and the formats this Pillow cannot write with the reason.

    Returns
    -------
    seeds : dict
        Seed name -> file bytes.
    unwritable : dict
        Seed name -> why Pillow could not write it.
    """
    with Image.open(photo) as image:
        image = image.convert("RGB")
    image.thumbnail((side, side))
    seeds, unwritable = {}, {}
    for name, (fmt, options) in SEED_FORMATS.items():
        buffer = io.BytesIO()
        try:
            image.save(buffer, format=fmt, **options)
        except (KeyError, OSError, ValueError) as exc:  # an unknown format, or a missing codec library
            unwritable[name] = f"{type(exc).__name__}: {exc}"
        else:
            seeds[name] = buffer.getvalue()
    return seeds, unwritable


def _position(data: bytearray, draw: Draw) -> int:
    end = len(data) if draw(0, 1) else min(len(data), HEADER)
    return draw(0, max(0, end - 1))


def mutate(seed: bytes, draw: Draw) -> bytes:
    """``seed`` with one to four of :data:`MUTATIONS`, every choice taken from ``draw``."""
    data = bytearray(seed)
    for _ in range(draw(1, 4)):
        kind = MUTATIONS[draw(0, len(MUTATIONS) - 1)]
        at = _position(data, draw)
        if kind == "byte":
            data[at : at + 1] = bytes([draw(0, 255)])
        elif kind == "boundary-byte":
            data[at : at + 1] = bytes([BOUNDARY_BYTES[draw(0, len(BOUNDARY_BYTES) - 1)]])
        elif kind == "word":
            width = 2 if draw(0, 1) else 4
            value = BOUNDARY_WORDS[draw(0, len(BOUNDARY_WORDS) - 1)] & ((1 << 8 * width) - 1)
            data[at : at + width] = value.to_bytes(width, "big" if draw(0, 1) else "little")
        elif kind == "cut":
            del data[at : at + draw(1, 64)]
        elif kind == "repeat":
            data[at:at] = data[at : at + draw(1, 64)]
        elif kind == "random-fill":
            data[at : at + draw(1, 16)] = bytes(draw(0, 255) for _ in range(draw(1, 16)))
        else:  # truncate
            del data[at:]
    return bytes(data)


def decode_case(data: bytes, path: Path) -> list[str]:
    """Write ``data`` to ``path`` and decode it as every stage does; only :class:`ImageError` is caught.

    The file is decoded by :func:`load_image` (extract, predict), by :func:`probe_image` (the check
    build-dataset makes of every image) and, held in memory, by :func:`load_image` again (a web upload).
    Any other exception escapes to the caller.

    Returns
    -------
    list of str
        The reasons the decoders gave for refusing the file (empty when it decoded every way).
    """
    path.write_bytes(data)
    reasons = []
    for decode in (
        lambda: load_image(path, 32, FUZZ_MAX_PIXELS),
        lambda: probe_image(path, FUZZ_MAX_PIXELS),
        lambda: load_image(io.BytesIO(data), 32, FUZZ_MAX_PIXELS),
    ):
        try:
            decode()
        except ImageError as exc:
            reasons.append(str(exc))
    return reasons
