#!/usr/bin/env python
"""Extraction throughput: the classic PyImageSearch loop vs this project's pipeline vs the ceiling.

On the same real photos, in one process, with one model built once:

(a) classic: one ``keras.utils.load_img`` per image, ``img_to_array``, the backbone's
    ``preprocess_input`` in NumPy, ``model.predict`` per batch, CSV rows of ``",".join``;
(b) pipeline: ``pyimagesearch_tl.extraction.extract_split`` (local engine) into HDF5 (thread-pool decoding ahead of
    batched ``tf.function`` inference, chunked writes);
(c) ceiling: the backbone alone on uint8 batches already decoded into memory.

(b) and (c) run once per runtime (TensorFlow, each installed ONNX runtime, and ``auto``, the
default, which takes the first of a fixed order). Printed: ``speedup vs classic`` (the default pipeline / classic),
``auto vs fastest named runtime`` (auto's pipeline / the fastest runtime's pipeline, same run),
``efficiency vs ceiling`` (the default pipeline / its own ceiling) and ``runtime speedup vs
tensorflow`` (the default runtime's ceiling / TensorFlow's). Figures also go to
``benchmarks/results/bench_extract.json``.

    python benchmarks/bench_extract.py [--backbone efficientnet_lite0] [--images 500] [--data DIR] [--repeats 3]
        [--precision float32|bfloat16] [--weights imagenet|none|PATH]
"""

from __future__ import annotations

import tempfile
import time
from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, real_photos


def classic(model, record, photos: list[Path], batch_size: int, out: Path) -> float:
    import keras

    from pyimagesearch_tl.backbones import preprocess_input

    size = record.input_size
    started = time.perf_counter()
    with open(out, "w") as handle:
        for start in range(0, len(photos), batch_size):
            batch = []
            for path in photos[start : start + batch_size]:
                image = keras.utils.load_img(path, target_size=(size, size))
                batch.append(keras.utils.img_to_array(image))
            batch = preprocess_input(np.array(batch, dtype="float32"), record.preprocessing)
            features = model.predict(batch, batch_size=batch_size, verbose=0)
            for vector in features:
                handle.write(",".join(["0"] + [str(v) for v in vector]) + "\n")
    return time.perf_counter() - started


def pipeline(extractor, photos: list[Path], out: Path) -> float:
    from pyimagesearch_tl.engines import LocalEngine
    from pyimagesearch_tl.extraction import extract_split

    rows = [dict(path=str(p), label=extractor.meta.label_names[0], sha256=f"{i:064x}") for i, p in enumerate(photos)]
    started = time.perf_counter()
    report = extract_split(
        LocalEngine(extractor), Path("/"), rows, "bench", out, "hdf5", chunk_rows=extractor.batch_size, progress=False
    )
    elapsed = time.perf_counter() - started
    assert report.extracted == len(photos), report
    return elapsed


def ceiling(extractor, photos: list[Path]) -> float:
    batches = [
        np.stack([extractor.decode(p) for p in photos[s : s + extractor.batch_size]])
        for s in range(0, len(photos), extractor.batch_size)
    ]
    started = time.perf_counter()
    for batch in batches:
        extractor.transform(batch)
    return time.perf_counter() - started


@click.command()
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--images", default=500, show_default=True)
@click.option("--batch-size", default=32, show_default=True)
@click.option("--data", default=str(SHARED / "cats_and_dogs_filtered"), show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Runs of each; the median is reported.")
@click.option("--precision", type=click.Choice(["float32", "bfloat16"]), default="float32", show_default=True)
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="'none' times a keras.applications backbone offline (speed does not depend on the values).",
)
def main(backbone, images, batch_size, data, repeats, precision, weights):
    from benchmarks_common import save_results

    from pyimagesearch_tl.backbones import get_backbone, preprocess_input
    from pyimagesearch_tl.features import FeatureExtractor
    from pyimagesearch_tl.runtimes import AUTO, RUNTIMES, TENSORFLOW, installed, requested_runtime

    photos = real_photos(Path(data), images)
    record = get_backbone(backbone)
    runtimes = [name for name in RUNTIMES if installed(name)] if precision == "float32" else []
    runtimes = [requested_runtime(AUTO, precision)] if not runtimes else runtimes + [AUTO]
    extractors = {
        name: FeatureExtractor(
            backbone, weights, batch_size=batch_size, label_names=["photo"], precision=precision, runtime=name
        )
        for name in runtimes
    }
    # Warm up every call path (graph tracing, conversion, sessions, caches) on one batch, untimed.
    warm = np.stack([extractors[runtimes[0]].decode(p) for p in photos[:batch_size]])
    for extractor in extractors.values():
        extractor.transform(warm)
    reference = next(iter(extractors.values()))
    reference.model.predict(preprocess_input(warm.astype("float32"), record.preprocessing), verbose=0)

    runs: dict[str, list[float]] = {"classic": []}
    for _ in range(repeats):  # interleaved, so drifts of the machine hit all alike
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            runs["classic"].append(classic(reference.model, record, photos, batch_size, scratch / "classic.csv"))
            for name, extractor in extractors.items():
                runs.setdefault(f"pipeline {name}", []).append(pipeline(extractor, photos, scratch / name))
                runs.setdefault(f"ceiling {name}", []).append(ceiling(extractor, photos))
    rates = {name: len(photos) / float(np.median(seconds)) for name, seconds in runs.items()}
    default = runtimes[-1]
    chosen = extractors[default].runtime
    print(
        f"backbone: {backbone} ({precision}), images: {len(photos)} real photos from {data}, batch size {batch_size}, "
        f"median of {repeats} runs; default runtime {default} -> {chosen}"
    )
    for name, rate in rates.items():
        print(f"{name + ' img/s:':<32} {rate:7.1f}  ({len(photos) / rate:.2f} s)")
    figures = {
        "speedup vs classic": rates[f"pipeline {default}"] / rates["classic"],
        "efficiency vs ceiling": rates[f"pipeline {default}"] / rates[f"ceiling {default}"],
    }
    named = [rates[f"pipeline {name}"] for name in runtimes if name != AUTO]
    if default == AUTO and named:  # what auto's fixed order costs against the fastest runtime measured here
        figures["auto vs fastest named runtime"] = rates[f"pipeline {AUTO}"] / max(named)
    if f"ceiling {TENSORFLOW}" in rates:
        figures["runtime speedup vs tensorflow"] = rates[f"ceiling {default}"] / rates[f"ceiling {TENSORFLOW}"]
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")
    save_results(
        "bench_extract" if precision == "float32" else f"bench_extract_{precision}",
        dict(
            backbone=backbone,
            precision=precision,
            images=len(photos),
            batch_size=batch_size,
            repeats=repeats,
            default_runtime=chosen,
            img_per_s={k: round(v, 1) for k, v in rates.items()},
            **{k: round(v, 3) for k, v in figures.items()},
        ),
    )


if __name__ == "__main__":
    main()
