"""`anomalens serve` under load with attacks mixed in, on loopback.

The real command runs in its own process: PatchCore on TAEF2 (real weights), fitted on 4 MVTec AD bottle
train/good images, with an API key. Clients send 200 requests at 4 and then at 8 concurrent clients. Each good
request carries one bottle test image and asks for the heatmap overlay, as the page does (``--maps``: also the
lossless PNG overlay, or no map, each run in turn, for the cost of the maps). Every 10th request is an attack from
the issue's list, in turn:

- a 9.8 KB 1 x 2,500,000 PNG;
- a 109 KB 30000 x 30000 1-bit PNG;
- a truncated PNG;
- a GIF named .png;
- a cross-origin refit with threshold 1e9;
- a DNS-rebinding Host header;
- a request without the key;
- a refit with threshold=nan;
- a 300 MiB chunked upload;
- a good image and a bomb in one request.

Recorded: p50/p95 latency of the good requests, their errors (must be 0), each attack's answer (which must be
the expected refusal), and the server's resident memory (VmRSS) before and after, and its peak (VmHWM). At the
end the detector must be unchanged: generation 0 and the original threshold.

    python3 benchmarks/serve_load.py [--shared ../shared] [--out benchmarks/results/serve-load-attacks.json]
    python3 benchmarks/serve_load.py --clients 4 --maps none heatmap heatmap-png --requests 120 \
        --out benchmarks/results/serve-load-heatmaps.json
"""

from __future__ import annotations

import argparse
import concurrent.futures
import io
import json
import os
import secrets
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from anomalens.evaluation.profiling import process_memory_mib, write_benchmark_json


def _png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return buffer.getvalue()


def _attacks(url: str, key: str, good: bytes) -> list[tuple[str, dict, set[int]]]:
    """``(name, httpx request arguments, accepted status codes)`` for each attack."""
    noise = np.random.default_rng(0).integers(0, 255, (40, 48, 3), dtype=np.uint8)
    rgb = Image.fromarray(noise)  # incompressible, so cutting its PNG cuts the pixel data
    bomb = _png(Image.new("1", (30000, 30000)))
    tall = _png(Image.new("RGB", (1, 2_500_000)))
    multipart = "multipart/form-data; boundary=x"
    auth = {"X-API-Key": key}
    refs = [("files", ("r.png", good, "image/png"))]

    def chunks():  # a well-formed multipart upload whose one file grows to 300 MiB, sent without Content-Length
        yield b'--x\r\nContent-Disposition: form-data; name="files"; filename="big.png"\r\n\r\n'
        for _ in range(300 * 16):
            yield bytes(65536)
        yield b"\r\n--x--\r\n"

    return [
        ("tall-strip-1x2500000", {"files": [("files", ("tall.png", tall, "image/png"))], "headers": auth}, {413}),
        ("bomb-30000x30000-1bit", {"files": [("files", ("bomb.png", bomb, "image/png"))], "headers": auth}, {413}),
        ("truncated-png", {"files": [("files", ("cut.png", _png(rgb)[:200], "image/png"))], "headers": auth}, {422}),
        ("gif-named-png", {"files": [("files", ("x.png", _gif(rgb), "image/png"))], "headers": auth}, {415}),
        (
            "cross-origin-refit",
            {
                "url": f"{url}/v1/references",
                "files": refs,
                "data": {"threshold": "1e9"},
                "headers": {**auth, "Origin": "http://evil.example"},
            },
            {403},
        ),  # fmt: skip
        ("dns-rebinding-host", {"files": refs, "headers": {**auth, "Host": "evil.example"}}, {421}),
        ("no-api-key", {"files": refs, "headers": {}}, {401}),
        (
            "nan-threshold-refit",
            {"url": f"{url}/v1/references", "files": refs, "data": {"threshold": "nan"}, "headers": auth},
            {422},
        ),  # fmt: skip
        # -1: the server answered and closed the connection while the client was still sending
        ("chunked-300MiB", {"content": chunks, "headers": {**auth, "Content-Type": multipart}}, {413, -1}),
        (
            "good-plus-bomb",
            {
                "files": [("files", ("good.png", good, "image/png")), ("files", ("bomb.png", bomb, "image/png"))],
                "headers": auth,
            },
            {200},
        ),  # fmt: skip
    ]


def _gif(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="GIF")
    return buffer.getvalue()


MAP_MODES = {  # what each good request asks for: form fields, and the payload key that must come back
    "heatmap": ({"include_maps": "true"}, "heatmap_jpeg"),  # the page's request (JPEG overlay, the default)
    "heatmap-png": ({"include_maps": "true", "heatmap_format": "png"}, "heatmap_png"),  # lossless overlay
    "none": ({"include_maps": "false"}, None),  # scores and labels only
}


def _run(url: str, key: str, payloads: list[tuple[str, bytes]], requests: int, clients: int,
         maps: str = "heatmap") -> dict:  # fmt: skip
    fields, expected_key = MAP_MODES[maps]
    attacks = _attacks(url, key, payloads[0][1])
    latencies, errors, attack_results = [], [], []

    def one(index: int) -> None:
        with httpx.Client(timeout=300) as client:
            if index % 10 == 9:
                name, arguments, accepted = attacks[(index // 10) % len(attacks)]
                arguments = dict(arguments)
                target = arguments.pop("url", f"{url}/v1/predict")
                if callable(arguments.get("content")):
                    arguments["content"] = arguments["content"]()  # a fresh stream each time
                try:
                    response = client.post(target, **arguments)
                    status, text = response.status_code, response.text[:160]
                except httpx.HTTPError as error:
                    status, text = -1, type(error).__name__
                ok = status in accepted and (
                    name != "good-plus-bomb"
                    or (len(response.json()["results"]) == 1 and len(response.json()["rejected"]) == 1)
                )
                attack_results.append({"attack": name, "status": status, "as_expected": ok, "answer": text})
                return
            name, data = payloads[index % len(payloads)]
            began = time.perf_counter()
            try:
                response = client.post(f"{url}/v1/predict", files=[("files", (name, data, "image/png"))],
                                       data=fields, headers={"X-API-Key": key})  # fmt: skip
                body = response.json()
                if response.status_code != 200 or (expected_key and not body["results"][0].get(expected_key)):
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    return
            except (httpx.HTTPError, ValueError, KeyError) as error:
                errors.append(repr(error))
                return
            latencies.append(time.perf_counter() - began)

    started = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        list(pool.map(one, range(requests)))
    elapsed = time.perf_counter() - started
    return {
        "maps": maps,
        "request_fields": fields,
        "clients": clients,
        "requests": requests,
        "good_requests": len(latencies) + len(errors),
        "good_completed": len(latencies),
        "errors": len(errors),
        "error_samples": errors[:5],
        "attacks": len(attack_results),
        "attacks_refused_as_expected": sum(item["as_expected"] for item in attack_results),
        "attack_results": attack_results,
        "seconds": round(elapsed, 2),
        "throughput_good_requests_per_second": round(len(latencies) / elapsed, 3),
        "latency_p50_ms": round(float(np.percentile(latencies, 50) * 1000), 1),
        "latency_p95_ms": round(float(np.percentile(latencies, 95) * 1000), 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--requests", type=int, default=200)
    parser.add_argument("--clients", type=int, nargs="+", default=[4, 8])
    parser.add_argument("--maps", nargs="+", choices=list(MAP_MODES), default=["heatmap"],
                        help="what good requests ask for; each mode is run at each client count, in turn")
    parser.add_argument("--out", default="benchmarks/results/serve-load-attacks.json")
    args = parser.parse_args()
    bottle = Path(args.shared) / "datasets" / "mvtec" / "bottle"
    references = [str(path) for path in sorted((bottle / "train" / "good").glob("*.png"))[:4]]
    tests = sorted((bottle / "test").rglob("*.png"))
    payloads = [(path.name, path.read_bytes()) for path in tests]
    key = secrets.token_urlsafe(24)
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    command = [sys.executable, "-m", "anomalens.cli", "-q", "serve", "--method", "patchcore", "--backbone", "taef2",
               "--weights-dir", str(Path(args.shared) / "weights"), "--class-name", "bottle", "--port", str(port),
               "--reference", *references]  # fmt: skip
    server = subprocess.Popen(command, env={**os.environ, "ANOMALENS_API_KEY": key}, stdout=subprocess.DEVNULL,
                              stderr=subprocess.PIPE, text=True)  # fmt: skip
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 300
        while True:
            try:
                if httpx.get(f"{url}/healthz", headers={"X-API-Key": key}, timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if server.poll() is not None or time.time() > deadline:
                raise RuntimeError(f"server did not start: {server.stderr.read()[-2000:]}")
            time.sleep(0.5)
        before_detector = httpx.get(f"{url}/v1/detector", headers={"X-API-Key": key}).json()
        memory_before = process_memory_mib(server.pid)
        runs = [_run(url, key, payloads, args.requests, clients, maps)
                for clients in args.clients for maps in args.maps]  # fmt: skip
        memory_after = process_memory_mib(server.pid)
        after_detector = httpx.get(f"{url}/v1/detector", headers={"X-API-Key": key}).json()
    finally:
        server.terminate()
        server.wait(timeout=60)
    baseline = {run["clients"]: run["latency_p95_ms"] for run in runs if run["maps"] == "none"}
    for run in runs:
        if run["clients"] in baseline:
            run["p95_vs_no_maps"] = round(run["latency_p95_ms"] / baseline[run["clients"]], 3)
    result = {
        "benchmark": "anomalens serve on loopback with attacks mixed in: PatchCore-TAEF2 (real weights), 4 bottle "
        "references, one bottle test image per good request, asking for what each run's maps mode says",
        "server_command": " ".join(command[1:]) + " (API key from ANOMALENS_API_KEY)",
        "runs": runs,
        "server_memory_before": memory_before,
        "server_memory_after": memory_after,
        "detector_unchanged": before_detector["generation"] == after_detector["generation"] == 0
        and before_detector["threshold"] == after_detector["threshold"],
        "threshold": after_detector["threshold"],
        "threshold_source": after_detector["threshold_source"],
    }
    write_benchmark_json(args.out, result)
    print(json.dumps({key: value for key, value in result.items() if key != "runs"}, indent=2))
    for run in runs:
        print({key: value for key, value in run.items() if key not in ("attack_results", "error_samples")})


if __name__ == "__main__":
    main()
