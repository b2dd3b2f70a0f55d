#!/usr/bin/env python
"""The prediction server under load: requests/s, latency percentiles and errors.

Starts ``ptl serve`` on 127.0.0.1 (a free port) with a bundle, waits for ``/health``, then sends a
bounded number of ``POST /api/predict`` requests, each one real photo, from a fixed number of
concurrent clients, and stops the server. Every request has a time limit.

    python benchmarks/bench_serve.py --model output/models/logreg.joblib [--requests 200] [--concurrency 8]
"""

from __future__ import annotations

import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, real_photos, save_results


def multipart(path: Path) -> tuple[bytes, str]:
    boundary = uuid.uuid4().hex
    body = (
        (
            f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{path.name}"\r\n'
            f"Content-Type: image/jpeg\r\n\r\n"
        ).encode()
        + path.read_bytes()
        + f"\r\n--{boundary}--\r\n".encode()
    )
    return body, f"multipart/form-data; boundary={boundary}"


def one_request(url: str, payload: tuple[bytes, str]) -> tuple[float, bool]:
    body, content_type = payload
    request = urllib.request.Request(f"{url}/api/predict", data=body, headers={"Content-Type": content_type})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=60) as response:
            ok = response.status == 200 and b'"predictions"' in response.read()
    except OSError:
        ok = False
    return time.perf_counter() - started, ok


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--requests", "count", default=200, show_default=True)
@click.option("--concurrency", default=8, show_default=True)
@click.option("--data", default=str(SHARED / "cats_and_dogs_filtered" / "validation"), show_default=True)
def main(model, count, concurrency, data):
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [
            sys.executable,
            "-c",
            "from pyimagesearch_tl.cli import main; main()",
            "serve",
            "--model",
            model,
            "--port",
            str(port),
        ],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{url}/health", timeout=2):
                    break
            except OSError:
                if server.poll() is not None or time.monotonic() > deadline:
                    raise click.ClickException("the server did not start")
                time.sleep(0.3)
        payloads = [multipart(p) for p in real_photos(Path(data), min(count, 100))]
        one_request(url, payloads[0])  # warm-up (graph tracing), untimed
        started = time.perf_counter()
        with ThreadPoolExecutor(concurrency) as pool:
            results = list(pool.map(lambda i: one_request(url, payloads[i % len(payloads)]), range(count)))
        elapsed = time.perf_counter() - started
    finally:
        server.terminate()
        server.wait(timeout=30)
    latencies = np.array([seconds for seconds, _ in results]) * 1000
    errors = sum(not ok for _, ok in results)
    print(f"{count} requests, concurrency {concurrency}, one real photo each")
    print(f"requests/s: {count / elapsed:.1f}")
    print(f"latency p50: {np.percentile(latencies, 50):.0f} ms, p95: {np.percentile(latencies, 95):.0f} ms")
    print(f"errors: {errors}")
    save_results(
        "bench_serve",
        dict(
            requests=count,
            concurrency=concurrency,
            requests_per_s=round(count / elapsed, 1),
            latency_p50_ms=round(float(np.percentile(latencies, 50))),
            latency_p95_ms=round(float(np.percentile(latencies, 95))),
            errors=errors,
        ),
    )


if __name__ == "__main__":
    main()
