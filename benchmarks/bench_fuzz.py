#!/usr/bin/env python
"""Fuzz the decoder: damaged files of every format Pillow writes, for a given time; only ImageError may escape.

The cases are tests/fuzz_cases.py's (the seeds: a real photo written by Pillow in each format; the
mutations: the same strategy the property test draws from hypothesis, here from a seeded random
generator), and so is the check: :func:`~pyimagesearch_tl.images.load_image` from a file and from
memory, and :func:`~pyimagesearch_tl.images.probe_image` (build-dataset's check). Formats are taken
in turn. Prints cases per second, the cases of each format (and how many the decoder refused with an
:class:`ImageError`, as it should for most), and every other exception: its type, message, where it
was raised and a reproducer file written under ``output/bench_fuzz/``.

    python benchmarks/bench_fuzz.py [--seconds 180] [--seed 0]
"""

from __future__ import annotations

import os
import random
import sys
import time
import traceback
import warnings
from collections import Counter
from pathlib import Path

import click
from benchmarks_common import ROOT, SHARED, save_results

sys.path.insert(0, str(ROOT / "tests"))  # the mutation strategy is shared with the property test

from fuzz_cases import decode_case, mutate, write_seeds  # noqa: E402


def _where(exc: BaseException) -> str:
    """``file:line`` of the innermost frame that raised ``exc``."""
    frame = traceback.extract_tb(exc.__traceback__)[-1]
    return f"{Path(frame.filename).name}:{frame.lineno}"


@click.command()
@click.option("--seconds", default=180.0, show_default=True, help="How long to fuzz.")
@click.option("--seed", default=0, show_default=True, help="Seed of the mutations (a run is reproducible).")
def main(seconds, seed):
    work = ROOT / "output" / "bench_fuzz"
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("failure_*"):  # reproducers of an earlier run
        stale.unlink()
    photo = sorted((SHARED / "cats_and_dogs_filtered" / "train" / "cats").glob("*.jpg"))[0]
    seeds, unwritable = write_seeds(photo)
    for name, reason in unwritable.items():
        print(f"skipped {name}: this Pillow cannot write it ({reason})")
    rng = random.Random(seed)
    cases, refused = Counter(), Counter()
    failures: dict[tuple[str, str, str], dict] = {}  # (format, type, where) -> first case
    names = list(seeds)
    # Pillow warns about damage it works around, and libtiff prints to the C stderr: both to a log.
    log = open(work / "stderr.log", "w")
    saved_stderr = os.dup(2)
    os.dup2(log.fileno(), 2)
    started = time.perf_counter()
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            while time.perf_counter() - started < seconds:
                name = names[sum(cases.values()) % len(names)]
                data = mutate(seeds[name], rng.randint)
                cases[name] += 1
                try:
                    refused[name] += bool(decode_case(data, work / "case.jpg"))
                except Exception as exc:  # anything but ImageError escaped: a finding
                    key = (name, type(exc).__name__, _where(exc))
                    if key not in failures:
                        reproducer = work / f"failure_{len(failures) + 1}_{name}.jpg"
                        reproducer.write_bytes(data)
                        failures[key] = dict(message=str(exc)[:200], reproducer=str(reproducer.relative_to(ROOT)))
                    failures[key]["count"] = failures[key].get("count", 0) + 1
    except KeyboardInterrupt:
        pass
    finally:
        elapsed = time.perf_counter() - started
        os.dup2(saved_stderr, 2)
        log.close()
    total = sum(cases.values())
    print(f"{total} cases in {elapsed:.0f} s: {total / elapsed:.0f} cases/s (3 decodes each)")
    print(f"{'format':<18} {'cases':>7} {'refused':>8}")
    for name in names:
        print(f"{name:<18} {cases[name]:>7} {refused[name] / max(1, cases[name]):>8.0%}")
    print(f"failures (exceptions other than ImageError): {sum(f['count'] for f in failures.values())}")
    for (name, kind, where), failure in failures.items():
        print(f"  {name}: {kind} at {where} x{failure['count']}: {failure['message']}  -> {failure['reproducer']}")
    save_results(
        "bench_fuzz",
        {
            "seconds": round(elapsed, 1),
            "seed": seed,
            "cases": total,
            "cases_per_second": round(total / elapsed, 1),
            "per_format": {name: {"cases": cases[name], "refused": refused[name]} for name in names},
            "unwritable": unwritable,
            "failures": [dict(format=key[0], type=key[1], where=key[2], **found) for key, found in failures.items()],
        },
    )
    sys.exit(1 if failures else 0)


if __name__ == "__main__":
    main()
