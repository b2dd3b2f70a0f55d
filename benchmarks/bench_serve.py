#!/usr/bin/env python
"""The prediction server under load: requests/s and latency of real photos, then a pixel flood.

Starts ``ptl serve`` on 127.0.0.1 (a free port) with a bundle, waits for ``/health``, then

1. sends a bounded number of ``POST /api/predict`` requests, each one real photo, from a fixed number
   of concurrent clients (requests/s, latency percentiles, errors);
2. floods it with pixels, as issue 23 found: ``--flood-requests`` requests at once, each of
   ``--flood-files`` PNGs of ``--flood-side`` x ``--flood-side`` pixels of one colour (a few hundred KB
   each, since they compress very well, but 88 million pixels once decoded); the server process's
   peak resident memory (``VmHWM``) and its resident memory once idle again (``VmRSS``, after
   ``--settle`` seconds) are read from ``/proc``, with what the server answered for each file;
3. measures the photos' requests/s again, to show the server is as fast after the flood.

Every request has a time limit. The server is stopped at the end.

    python benchmarks/bench_serve.py --model output/models/logreg.skops [--requests 200] [--concurrency 8]
"""

from __future__ import annotations

import contextlib
import io
import json
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import click
import numpy as np
from benchmarks_common import SHARED, real_photos, save_results


def multipart(files: list[tuple[str, bytes]]) -> tuple[bytes, str]:
    """A ``multipart/form-data`` body with each ``(name, content)`` in the field ``file``."""
    boundary = uuid.uuid4().hex
    body = b"".join(
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="{name}"\r\n'
        f"Content-Type: application/octet-stream\r\n\r\n".encode()
        + content
        + b"\r\n"
        for name, content in files
    )
    return body + f"--{boundary}--\r\n".encode(), f"multipart/form-data; boundary={boundary}"


def post(url: str, payload: tuple[bytes, str], timeout: float = 60) -> tuple[float, int, dict]:
    """``(seconds, HTTP status, JSON answer)`` of one ``POST /api/predict``; status 0 when it failed."""
    body, content_type = payload
    request = urllib.request.Request(f"{url}/api/predict", data=body, headers={"Content-Type": content_type})
    started = time.perf_counter()
    try:
        with urllib.request.urlopen(request, timeout=timeout) as response:
            status, answer = response.status, json.loads(response.read())
    except urllib.error.HTTPError as error:
        status, answer = error.code, {}
    except OSError:
        status, answer = 0, {}
    return time.perf_counter() - started, status, answer


def memory_mib(pid: int) -> dict[str, float]:
    """The process's resident memory now (``VmRSS``) and its peak so far (``VmHWM``), in MiB."""
    fields = dict(line.split(":", 1) for line in Path(f"/proc/{pid}/status").read_text().splitlines() if ":" in line)
    return {key: int(fields[key].split()[0]) / 1024 for key in ("VmRSS", "VmHWM")}


@contextlib.contextmanager
def running_server(model: str):
    """``(url, pid)`` of ``ptl serve --model model`` on a free port, once ``/health`` answers."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    url = f"http://127.0.0.1:{port}"
    server = subprocess.Popen(
        [sys.executable, "-c", "from pyimagesearch_tl.cli import main; main()", "serve", "--model", model]
        + ["--port", str(port)],
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
        yield url, server.pid
    finally:
        server.terminate()
        server.wait(timeout=30)


def photo_load(url: str, payloads: list, count: int, concurrency: int) -> dict:
    """``count`` requests of one photo each from ``concurrency`` clients: requests/s, latency, errors."""
    started = time.perf_counter()
    with ThreadPoolExecutor(concurrency) as pool:
        results = list(pool.map(lambda i: post(url, payloads[i % len(payloads)]), range(count)))
    elapsed = time.perf_counter() - started
    latencies = np.array([seconds for seconds, _, _ in results]) * 1000
    return dict(
        requests_per_s=round(count / elapsed, 1),
        latency_p50_ms=round(float(np.percentile(latencies, 50))),
        latency_p95_ms=round(float(np.percentile(latencies, 95))),
        errors=sum(status != 200 or "predictions" not in answer for _, status, answer in results),
    )


def flood_png(side: int, mode: str) -> bytes:
    """A ``side`` x ``side`` PNG of one colour (``RGB``, or ``RGBA`` half transparent): a few hundred KB."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.new(mode, (side, side), (200, 120, 40, 128)[: len(mode)]).save(buffer, format="PNG", compress_level=9)
    return buffer.getvalue()


def pixel_flood(url: str, pid: int, side: int, mode: str, files: int, requests: int, settle: float) -> dict:
    """``requests`` requests at once of ``files`` PNGs of ``side`` x ``side``: the server's memory and answers."""
    png = flood_png(side, mode)
    payload = multipart([(f"flood-{i}.png", png) for i in range(files)])
    before = memory_mib(pid)
    started = time.perf_counter()
    with ThreadPoolExecutor(requests) as pool:
        results = list(pool.map(lambda _: post(url, payload, timeout=600), range(requests)))
    seconds = time.perf_counter() - started
    peak = memory_mib(pid)["VmHWM"]
    time.sleep(settle)
    answers = [p for _, status, answer in results if status == 200 for p in answer.get("predictions", [])]
    return dict(
        side=side,
        mode=mode,
        files_per_request=files,
        requests=requests,
        png_kib=round(len(png) / 1024),
        request_mib=round(len(payload[0]) / 2**20, 1),
        statuses=sorted(status for _, status, _ in results),
        files_predicted=sum(a.get("error") is None and "label" in a for a in answers),
        files_refused=sorted({a["error"] for a in answers if a.get("error")}),
        seconds=round(seconds, 1),
        slowest_request_s=round(max(s for s, _, _ in results), 1),
        rss_before_mib=round(before["VmRSS"]),
        peak_rss_mib=round(peak),
        peak_before_flood_mib=round(before["VmHWM"]),
        settled_rss_mib=round(memory_mib(pid)["VmRSS"]),
        settle_s=settle,
    )


@click.command()
@click.option("--model", required=True, type=click.Path(exists=True, dir_okay=False))
@click.option("--requests", "count", default=200, show_default=True)
@click.option("--concurrency", default=8, show_default=True)
@click.option("--data", default=str(SHARED / "cats_and_dogs_filtered" / "validation"), show_default=True)
@click.option("--flood-side", default=9400, show_default=True, help="Side of each flood PNG, in pixels.")
@click.option("--flood-mode", type=click.Choice(["RGB", "RGBA"]), default="RGB", show_default=True)
@click.option("--flood-files", default=8, show_default=True, help="PNGs per flood request.")
@click.option("--flood-requests", default=4, show_default=True, help="Flood requests sent at once.")
@click.option("--settle", default=5.0, show_default=True, help="Seconds idle before the settled memory is read.")
def main(model, count, concurrency, data, flood_side, flood_mode, flood_files, flood_requests, settle):
    payloads = [multipart([(p.name, p.read_bytes())]) for p in real_photos(Path(data), min(count, 100))]
    with running_server(model) as (url, pid):
        post(url, payloads[0])  # warm-up (graph tracing, runtime choice), untimed
        before = photo_load(url, payloads, count, concurrency)
        flood = pixel_flood(url, pid, flood_side, flood_mode, flood_files, flood_requests, settle)
        after = photo_load(url, payloads, count, concurrency)
    print(f"{count} requests, concurrency {concurrency}, one real photo each")
    for name, run in (("before the flood", before), ("after the flood", after)):
        print(
            f"  {name}: {run['requests_per_s']} requests/s, p50 {run['latency_p50_ms']} ms, "
            f"p95 {run['latency_p95_ms']} ms, errors {run['errors']}"
        )
    print(
        f"pixel flood: {flood['requests']} requests at once of {flood['files_per_request']} PNGs of "
        f"{flood['side']}x{flood['side']} {flood['mode']} ({flood['png_kib']} KiB each, "
        f"{flood['request_mib']} MiB a request)"
    )
    print(
        f"  statuses {flood['statuses']}, {flood['files_predicted']} files predicted, refused: "
        f"{flood['files_refused'] or 'none'}; {flood['seconds']} s"
    )
    print(
        f"  server RSS: {flood['rss_before_mib']} MiB before, peak {flood['peak_rss_mib']} MiB, "
        f"{flood['settled_rss_mib']} MiB after {settle:g} s idle"
    )
    save_results(
        "bench_serve",
        dict(requests=count, concurrency=concurrency, **before, after_flood=after, flood=flood),
    )


if __name__ == "__main__":
    main()
