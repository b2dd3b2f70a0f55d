#!/usr/bin/env python
"""Decoding cost per photo on one core: the project's decoder (Pillow, reduced DCT scale via ``draft``, box
filter) against simplejpeg's libjpeg-turbo decode with DCT-domain scaling (``min_width``/``min_height``)
followed by the same box resize, on the same JPEG bytes held in memory, alternated ``--repeats`` times.

Prints each one's CPU ms per photo (median), the ratio, and how far simplejpeg's pixels are from the
decoder's (mean and largest absolute difference, 0-255): a faster decoder is worth adopting only when it
is measurably faster AND its pixels match, since the decoder is part of every feature layout (another
recipe extracts every folder again). simplejpeg is not a dependency: ``pip install simplejpeg`` to run it.

    python benchmarks/bench_decode.py [--data DIR] [--images 500] [--repeats 3]
"""

from __future__ import annotations

import io
import resource

import click
import numpy as np
from benchmarks_common import SHARED, real_photos, save_results
from PIL import Image

from pyimagesearch_tl.images import load_image

SIZE = 224


def _cpu() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def pillow(data: bytes) -> np.ndarray:
    return load_image(io.BytesIO(data), SIZE)


def simplejpeg_decode(data: bytes) -> np.ndarray:
    import simplejpeg

    pixels = simplejpeg.decode_jpeg(data, colorspace="RGB", min_width=SIZE, min_height=SIZE)
    return np.asarray(Image.fromarray(pixels).resize((SIZE, SIZE), Image.Resampling.BOX))


@click.command()
@click.option("--data", default=str(SHARED / "cats_and_dogs_filtered"), show_default=True)
@click.option("--images", default=500, show_default=True)
@click.option("--repeats", default=3, show_default=True)
def main(data, images, repeats):
    try:
        import simplejpeg  # noqa: F401
    except ImportError:
        raise SystemExit("simplejpeg is not installed: pip install simplejpeg") from None
    photos = [p.read_bytes() for p in real_photos(data, images) if p.suffix.lower() in (".jpg", ".jpeg")]
    timings = {"pillow": [], "simplejpeg": []}
    for _ in range(repeats):
        for name, decode in (("pillow", pillow), ("simplejpeg", simplejpeg_decode)):
            started = _cpu()
            for data_ in photos:
                decode(data_)
            timings[name].append((_cpu() - started) / len(photos) * 1e3)
    ms = {name: float(np.median(values)) for name, values in timings.items()}
    difference = np.abs(
        np.stack([pillow(d) for d in photos]).astype(np.int16) - np.stack([simplejpeg_decode(d) for d in photos])
    )
    figures = dict(
        photos=len(photos),
        ms_per_photo=ms,
        simplejpeg_vs_pillow=round(ms["simplejpeg"] / ms["pillow"], 3),
        mean_abs_pixel_difference=round(float(difference.mean()), 2),
        max_abs_pixel_difference=int(difference.max()),
    )
    print(f"{len(photos)} JPEGs from {data}, one core, {SIZE} px, median of {repeats}")
    print(f"pillow (the decoder): {ms['pillow']:.3f} ms per photo; simplejpeg: {ms['simplejpeg']:.3f} ms per photo")
    print(f"simplejpeg vs pillow: {figures['simplejpeg_vs_pillow']}")
    print(
        f"pixels against the decoder's: mean abs difference {figures['mean_abs_pixel_difference']}, largest "
        f"{figures['max_abs_pixel_difference']}"
    )
    save_results("bench_decode", figures)


if __name__ == "__main__":
    main()
