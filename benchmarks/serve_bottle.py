"""anomalens serve on real data: a screenshot of the page, then a small load test, both on loopback.

PatchCore on TAEF2 (real weights) behind `anomalens serve`'s app on 127.0.0.1. The page is driven by
Playwright with Debian's chromium: 4 bottle train/good images as references, 12 test images to check; the
screenshot goes to docs/serve-screenshot.png. Then 200 POST /v1/predict requests (one bottle test image
each) from 8 concurrent clients, bounded in count and time; throughput, p50/p95 latency and errors go to
benchmarks/results/serve-load-bottle.json.

    python3 benchmarks/serve_bottle.py [--shared ../shared]
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import shutil
import sys
import time
from pathlib import Path

import httpx
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))

from test_serve_browser import BROWSER_ARGS, ServerThread  # noqa: E402

import anomalens  # noqa: E402
from anomalens.engines.serve import ServerSettings, create_app  # noqa: E402
from anomalens.evaluation.profiling import write_benchmark_json  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, default=8)
    parser.add_argument("--time-limit", type=float, default=300.0, help="stop sending after this many seconds")
    parser.add_argument("--screenshot", default="docs/serve-screenshot.png")
    parser.add_argument("--out", default="benchmarks/results/serve-load-bottle.json")
    args = parser.parse_args()
    bottle = Path(args.shared) / "datasets" / "mvtec" / "bottle"
    references = sorted((bottle / "train" / "good").glob("*.png"))[:4]
    tests = sorted((bottle / "test").rglob("*.png"))
    shown = [tests[i] for i in np.linspace(0, len(tests) - 1, 12).astype(int)]
    detector = anomalens.create("patchcore", backbone="taef2", weights_dir=Path(args.shared) / "weights")
    settings = ServerSettings(max_batch=8, max_wait_ms=20)
    with ServerThread(create_app(detector, settings)) as url:
        from playwright.sync_api import expect, sync_playwright

        with sync_playwright() as playwright:
            browser = playwright.chromium.launch(executable_path=shutil.which("chromium"), args=BROWSER_ARGS)
            page = browser.new_page(viewport={"width": 1400, "height": 1100})
            page.set_default_timeout(120_000)
            page.goto(url)
            page.set_input_files("#reference-input", [str(path) for path in references])
            expect(page.locator("#reference-status")).to_contain_text("fitted on 4", timeout=300_000)
            page.set_input_files("#test-input", [str(path) for path in shown])
            expect(page.locator("#results .card")).to_have_count(len(shown), timeout=300_000)
            page.wait_for_timeout(500)
            Path(args.screenshot).parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=args.screenshot, full_page=True)
            browser.close()
        payloads = [(path.name, path.read_bytes()) for path in tests]
        latencies, errors = [], []
        started = time.perf_counter()

        def one(index: int) -> None:
            if time.perf_counter() - started > args.time_limit:
                return
            name, data = payloads[index % len(payloads)]
            began = time.perf_counter()
            try:
                response = client.post(f"{url}/v1/predict", files=[("files", (name, data, "image/png"))],
                                       data={"include_maps": "false"}, timeout=120)  # fmt: skip
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    return
            except httpx.HTTPError as error:
                errors.append(repr(error))
                return
            latencies.append(time.perf_counter() - began)

        with httpx.Client() as client, concurrent.futures.ThreadPoolExecutor(args.clients) as pool:
            list(pool.map(one, range(args.requests)))
        elapsed = time.perf_counter() - started
    result = {
        "benchmark": "anomalens serve load test on loopback, PatchCore-TAEF2, one bottle image per request",
        "requests": args.requests,
        "clients": args.clients,
        "completed": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "seconds": elapsed,
        "throughput_requests_per_second": len(latencies) / elapsed,
        "latency_p50_ms": float(np.percentile(latencies, 50) * 1000),
        "latency_p95_ms": float(np.percentile(latencies, 95) * 1000),
        "server": {"max_batch": settings.max_batch, "max_wait_ms": settings.max_wait_ms, "include_maps": False},
    }
    write_benchmark_json(args.out, result)
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
