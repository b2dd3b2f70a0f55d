#!/usr/bin/env python
"""Extraction throughput per runtime and precision: the classic PyImageSearch loop vs this project's pipeline,
against the ceiling and against what the CPUs could do at best.

On the same real photos, in one process, each model built once:

(a) classic: one ``keras.utils.load_img`` per image, ``img_to_array``, the backbone's
    ``preprocess_input`` in NumPy, ``model.predict`` per batch, CSV rows of ``",".join``;
(b) pipeline: ``pyimagesearch_tl.extraction.extract_split`` (local engine) into HDF5 (thread-pool decoding ahead of
    batched inference, chunked writes);
(c) ceiling: the network alone on uint8 batches already decoded into memory;
(d) decode: every photo decoded by ``extractor.decode`` in ONE thread (what decoding costs a core).

(b) and (c) run once per row, a runtime at a precision: float32 in every installed runtime and in
``auto`` (the default, the first of a fixed order); bfloat16 in the runtime ``auto`` takes for it
(OpenVINO where the CPU has AVX512-BF16 or AMX, else TensorFlow), and in TensorFlow too when that is
another one and, on one warm batch, runs at least half as fast as TensorFlow's float32 (else it would
only make the run longer; ``--tensorflow-bfloat16 yes|no`` decides instead); int8 in OpenVINO, on the
network quantized by NNCF on a seeded sample of up to 300 photos of the same folder that are NOT among
the timed ones (untimed). All are timed interleaved, ``--repeats`` times; medians are reported.

Per row: pipeline and ceiling img/s, ``speedup vs classic`` (pipeline / classic) and ``efficiency
vs limit`` (pipeline / limit), where the limit is what the CPUs could do if they did nothing but
decode and run the network::

    limit = cores / (decode core-seconds per photo + network core-seconds per photo)

decode core-seconds from (d), network core-seconds = the CPU time (every thread of the process) the
ceiling (c) took per photo. Also printed: the decode ms per photo of one core; for the
float32 default, as before, ``speedup vs classic``, ``auto vs fastest named runtime`` (auto's
pipeline / the fastest named runtime's, same run), ``efficiency vs ceiling`` (pipeline / its own
ceiling) and ``runtime speedup vs tensorflow`` (the default runtime's ceiling / TensorFlow's); for
the fastest int8 pipeline, ``int8 speedup vs classic`` and ``int8 efficiency vs limit``. Figures
also go to ``benchmarks/results/bench_extract.json``.

    python benchmarks/bench_extract.py [--backbone efficientnet_lite0] [--images 500] [--data DIR] [--repeats 3]
        [--calibration 300] [--tensorflow-bfloat16 auto|yes|no] [--weights imagenet|none|PATH]
"""

from __future__ import annotations

import os
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
    from pyimagesearch_tl.features import ExtractionJob

    rows = [dict(path=str(p), label=extractor.meta.label_names[0], sha256=f"{i:064x}") for i, p in enumerate(photos)]
    started = time.perf_counter()
    report = extract_split(
        LocalEngine(ExtractionJob(extractor=extractor)),
        Path("/"),
        rows,
        "bench",
        out,
        "hdf5",
        chunk_rows=extractor.batch_size,
        progress=False,
    )
    elapsed = time.perf_counter() - started
    assert report.extracted == len(photos), report
    return elapsed


def decode(extractor, photos: list[Path]) -> tuple[float, list[np.ndarray]]:
    """Seconds to decode ``photos`` in this one thread, and the batches they make (for :func:`ceiling`)."""
    started = time.perf_counter()
    images = [extractor.decode(p) for p in photos]
    elapsed = time.perf_counter() - started
    size = extractor.batch_size
    return elapsed, [np.stack(images[s : s + size]) for s in range(0, len(images), size)]


def ceiling(extractor, batches: list[np.ndarray]) -> tuple[float, float]:
    """Wall seconds and core-seconds (this process's CPU time, every thread) of the network alone on ``batches``."""
    started, cpu = time.perf_counter(), time.process_time()
    for batch in batches:
        extractor.transform(batch)
    return time.perf_counter() - started, time.process_time() - cpu


def calibration_photos(data: Path, timed: list[Path], count: int) -> list[Path]:
    """A seeded sample of up to ``count`` photos of ``data`` that are not among the ``timed`` ones."""
    from pyimagesearch_tl.quantization import sample_rows

    everything = real_photos(data, sum(1 for _ in data.rglob("*.jpg")))  # the timed ones first, in the same order
    spare = everything[len(timed) :]
    assert not set(spare) & set(timed)
    if not spare:
        raise click.ClickException(f"no photos under {data} beyond the {len(timed)} timed ones to calibrate int8 on")
    return sample_rows(spare, count)


def label(precision: str, runtime: str) -> str:
    """A row's name in the runs: the runtime for float32 (as before), ``runtime precision`` for the others."""
    return runtime if precision == "float32" else f"{runtime} {precision}"


@click.command()
@click.option("--backbone", default="efficientnet_lite0", show_default=True)
@click.option("--images", default=500, show_default=True, help="Timed photos.")
@click.option("--batch-size", default=32, show_default=True)
@click.option("--data", default=str(SHARED / "cats_and_dogs_filtered"), show_default=True)
@click.option("--repeats", default=3, show_default=True, help="Runs of each; the median is reported.")
@click.option(
    "--calibration", default=300, show_default=True, help="int8: calibration photos (not among the timed ones)."
)
@click.option(
    "--tensorflow-bfloat16",
    type=click.Choice(["auto", "yes", "no"]),
    default="auto",
    show_default=True,
    help="A bfloat16 row in TensorFlow too, where bfloat16 runs elsewhere (auto: when at least half as fast as "
    "TensorFlow's float32 on a warm batch).",
)
@click.option(
    "--weights",
    default="imagenet",
    show_default=True,
    help="'none' times a keras.applications backbone offline (speed does not depend on the values).",
)
def main(backbone, images, batch_size, data, repeats, calibration, tensorflow_bfloat16, weights):
    from benchmarks_common import save_results

    from pyimagesearch_tl.backbones import get_backbone, preprocess_input
    from pyimagesearch_tl.features import FeatureExtractor
    from pyimagesearch_tl.quantization import calibration_key
    from pyimagesearch_tl.runtimes import (
        AUTO,
        OPENVINO,
        RUNTIMES,
        TENSORFLOW,
        bfloat16_arithmetic,
        installed,
        requested_runtime,
    )

    data = Path(data)
    photos = real_photos(data, images)
    record = get_backbone(backbone)
    cores = os.cpu_count() or 1  # the threads every runtime runs the network on (FeatureExtractor.workers)
    bfloat16_runtime = requested_runtime(AUTO, "bfloat16")
    rows = [("float32", name) for name in RUNTIMES if installed(name)] + [("float32", AUTO)]
    rows.append(("bfloat16", bfloat16_runtime))
    if bfloat16_runtime != TENSORFLOW and tensorflow_bfloat16 != "no":
        rows.append(("bfloat16", TENSORFLOW))
    if installed(OPENVINO):
        rows.append(("int8", OPENVINO))
    else:
        print(f"int8: skipped, it runs in OpenVINO, which is not installed ({RUNTIMES[OPENVINO].install})")
    extractors = {
        label(precision, name): FeatureExtractor(
            backbone, weights, batch_size=batch_size, label_names=["photo"], precision=precision, runtime=name
        )
        for precision, name in rows
    }
    precisions = {label(precision, name): precision for precision, name in rows}
    reference = extractors[AUTO]
    calibrated = []
    if installed(OPENVINO):  # untimed: NNCF on photos that are not timed (cached after the first run)
        calibrated = calibration_photos(data, photos, calibration)
        started = time.perf_counter()
        images = np.stack([reference.decode(p) for p in calibrated])
        int8 = extractors[label("int8", OPENVINO)]
        int8.quantize(images, calibration_key(int8.meta, images))
        seconds = time.perf_counter() - started
        print(f"int8: quantized, calibrated on {len(calibrated)} photos that are not timed, in {seconds:.1f} s")
    # Warm up every call path (graph tracing, conversion, parity checks, sessions, caches) on one batch, untimed.
    warm = np.stack([reference.decode(p) for p in photos[:batch_size]])
    for extractor in extractors.values():
        extractor.transform(warm)
    reference.model.predict(preprocess_input(warm.astype("float32"), record.preprocessing), verbose=0)
    skipped = {}
    tensorflow_bf16 = label("bfloat16", TENSORFLOW)
    if tensorflow_bf16 in extractors and bfloat16_runtime != TENSORFLOW and tensorflow_bfloat16 == "auto":
        f32, bf16 = (ceiling(extractors[name], [warm])[0] for name in (TENSORFLOW, tensorflow_bf16))
        if bf16 > 2 * f32:  # too slow to be worth its time here: skip it
            skipped[tensorflow_bf16] = f"{len(warm) / bf16:.0f} img/s on a warm batch, float32 {len(warm) / f32:.0f}"
            del extractors[tensorflow_bf16]
            print(f"bfloat16 in tensorflow: skipped ({skipped[tensorflow_bf16]}; --tensorflow-bfloat16 yes times it)")

    runs: dict[str, list[float]] = {"classic": [], "decode (one thread)": []}
    core_seconds: dict[str, list[float]] = {}  # the network's, per photo, measured alone
    for _ in range(repeats):  # interleaved, so drifts of the machine hit all alike
        seconds, batches = decode(reference, photos)
        runs["decode (one thread)"].append(seconds)
        with tempfile.TemporaryDirectory() as scratch:
            scratch = Path(scratch)
            runs["classic"].append(classic(reference.model, record, photos, batch_size, scratch / "classic.csv"))
            for name, extractor in extractors.items():
                runs.setdefault(f"pipeline {name}", []).append(
                    pipeline(extractor, photos, scratch / name.replace(" ", "_"))
                )
                wall, cpu = ceiling(extractor, batches)
                runs.setdefault(f"ceiling {name}", []).append(wall)
                core_seconds.setdefault(name, []).append(cpu / len(photos))
    rates = {name: len(photos) / float(np.median(seconds)) for name, seconds in runs.items()}
    default = AUTO
    chosen = extractors[default].runtime
    decode_core_s = 1 / rates["decode (one thread)"]  # core-seconds per photo: one thread, alone
    table = {}
    for name in extractors:
        network_core_s = float(np.median(core_seconds[name]))  # the CPU time the network alone took per photo
        limit = cores / (decode_core_s + network_core_s)
        table[name] = {
            "precision": precisions[name],
            "runtime": extractors[name].runtime,
            "pipeline img/s": rates[f"pipeline {name}"],
            "ceiling img/s": rates[f"ceiling {name}"],
            "limit img/s": limit,
            "network core ms per photo": 1000 * network_core_s,
            "speedup vs classic": rates[f"pipeline {name}"] / rates["classic"],
            "efficiency vs limit": rates[f"pipeline {name}"] / limit,
            "efficiency vs ceiling": rates[f"pipeline {name}"] / rates[f"ceiling {name}"],
        }
    print(
        f"backbone: {backbone}, images: {len(photos)} real photos from {data}, batch size {batch_size}, "
        f"median of {repeats} runs, {cores} cores; default runtime {default} -> {chosen}; bfloat16 runs in "
        f"{bfloat16_runtime} (bfloat16 arithmetic: {installed(OPENVINO) and bfloat16_arithmetic()})"
    )
    print(f"classic img/s: {rates['classic']:.1f}  ({len(photos) / rates['classic']:.2f} s)")
    print(f"decode, one core: {1000 * decode_core_s:.2f} ms per photo ({rates['decode (one thread)']:.1f} img/s)")
    print(
        f"{'precision':<10} {'runtime':<22} {'pipeline img/s':>14} {'ceiling img/s':>13} {'limit img/s':>11} "
        f"{'net core ms':>11} {'speedup vs classic':>18} {'efficiency vs limit':>19}"
    )
    for name, row in table.items():
        where = name.split(" ")[0] + ("" if row["runtime"] == name.split(" ")[0] else f" -> {row['runtime']}")
        print(
            f"{row['precision']:<10} {where:<22} {row['pipeline img/s']:>14.1f} {row['ceiling img/s']:>13.1f} "
            f"{row['limit img/s']:>11.1f} {row['network core ms per photo']:>11.2f} "
            f"{row['speedup vs classic']:>18.2f} {row['efficiency vs limit']:>19.2f}"
        )
    figures = {
        "speedup vs classic": table[default]["speedup vs classic"],
        "efficiency vs ceiling": table[default]["efficiency vs ceiling"],
    }
    named = [rates[f"pipeline {name}"] for precision, name in rows if precision == "float32" and name != AUTO]
    if named:  # what auto's fixed order costs against the fastest runtime measured here
        figures["auto vs fastest named runtime"] = rates[f"pipeline {AUTO}"] / max(named)
    if f"ceiling {TENSORFLOW}" in rates:
        figures["runtime speedup vs tensorflow"] = rates[f"ceiling {default}"] / rates[f"ceiling {TENSORFLOW}"]
    int8 = [name for name in table if table[name]["precision"] == "int8"]
    if int8:
        fastest = max(int8, key=lambda name: table[name]["pipeline img/s"])
        figures["int8 speedup vs classic"] = table[fastest]["speedup vs classic"]
        figures["int8 efficiency vs limit"] = table[fastest]["efficiency vs limit"]
    for name, value in figures.items():
        print(f"{name}: {value:.2f}")
    save_results(
        "bench_extract",
        dict(
            backbone=backbone,
            precision="float32",  # the default's, which the figures above without a precision are of
            precisions=sorted(set(precisions.values()), key=["float32", "bfloat16", "int8"].index),
            images=len(photos),
            batch_size=batch_size,
            repeats=repeats,
            cores=cores,
            default_runtime=chosen,
            bfloat16_runtime=bfloat16_runtime,
            calibration_images=len(calibrated),
            skipped=skipped,
            img_per_s={k: round(v, 1) for k, v in rates.items()},
            decode_ms_per_photo=round(1000 * decode_core_s, 3),
            rows={
                name: {k: v if isinstance(v, str) else round(v, 3) for k, v in row.items()}
                for name, row in table.items()
            },
            **{k: round(v, 3) for k, v in figures.items()},
        ),
    )


if __name__ == "__main__":
    main()
