"""A simulated inspection line: three products through ``anomalens watch`` and ``anomalens serve --models`` at once,
an inspector working the review queue from ground truth, and the counts reconciled.

Products (PatchCore on TAEF2, real weights; each fitted with ``anomalens fit --product`` and a split-conformal
threshold at ``--alpha``):

- ``bottle``: MVTec AD bottle; the first 40 ``train/good`` images are the references, the other 169 go down the
  line as good parts with the test set (20 good, 63 defective).
- ``metal_plate``: MPDD metal_plate; 30 references, 24 good parts left over, the test set (26 good, 71 defective).
- ``metal_plate_gray``: a third product built from metal_plate by a transform (rotated 90 degrees, grey), with
  the same split.

Every part goes down the line ``--copies`` times, each copy a distinct file (one pixel changed by one grey level,
so its content hash is new while its truth is the same). The paths, all running together:

- a camera drops bottle parts into a hot folder watched by ``anomalens watch --product bottle`` (written as
  ``.part`` and renamed, at ``--rate`` files per second), and metal_plate parts into a second watched folder;
- a client posts metal_plate_gray parts and a quarter of the bottle parts to ``POST /v1/detectors/NAME/predict``
  (one image per request, at ``--rate`` per second);
- along the way the camera also drops exact duplicates of parts already taken and a few corrupt files.

At the end an inspector (the oracle: the truth of each file by its hash) works each product's review queue through
the HTTP API until it is empty, and the server's statistics give the false-alarm rate measured on the reviewed
audit sample against the promised alpha; the oracle also counts the false alarms on every good part, for
comparison. Reconciled: database rows == distinct files seen (no loss, no duplicate), duplicates not re-scored,
corrupt files in ``failed/`` with a reason.

The run is made twice: with the history on SQLite, then on a PostgreSQL server this script starts (Debian's
binaries, as the tests do) where the bottle watcher is killed with SIGKILL halfway and restarted, and the database
is stopped for ``--outage-s`` seconds mid-run (the client's 503 answers are retried; nothing may be lost). Last,
the server's peak memory with ``--max-loaded 1`` against every product loaded, each serving the same round-robin
requests.

    python3 benchmarks/station_line.py [--shared ../shared] [--work /tmp/station-line] \
        [--out benchmarks/results/station-line.json]
"""

from __future__ import annotations

import argparse
import collections
import datetime as dt
import hashlib
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
from PIL import Image

from anomalens.evaluation.profiling import process_memory_mib, write_benchmark_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
from postgres_server import PostgresServer  # noqa: E402 - the tests' throw-away server

PRODUCTS = ("bottle", "metal_plate", "metal_plate_gray")


# ---------------------------------------------------------------------------------------------------- the data
def _gray_rotated(path: Path, target: Path) -> None:
    image = Image.open(path).convert("L").rotate(90, expand=True).convert("RGB")
    target.parent.mkdir(parents=True, exist_ok=True)
    image.save(target)


def _split(shared: Path, work: Path) -> dict[str, dict]:
    """Each product's references and line parts ``(path, truth)``."""
    bottle = shared / "datasets" / "mvtec" / "bottle"
    plate = shared / "datasets" / "mpdd" / "metal_plate"
    train_bottle = sorted((bottle / "train" / "good").glob("*.png"))
    train_plate = sorted((plate / "train" / "good").glob("*.png"))

    def test(root: Path) -> list[tuple[Path, str]]:
        return [(path, "normal" if path.parent.name == "good" else "anomalous")
                for path in sorted((root / "test").rglob("*.png"))]  # fmt: skip

    products = {
        "bottle": {"references": train_bottle[:40],
                   "parts": [(path, "normal") for path in train_bottle[40:]] + test(bottle)},
        "metal_plate": {"references": train_plate[:30],
                        "parts": [(path, "normal") for path in train_plate[30:]] + test(plate)},
    }  # fmt: skip
    gray = work / "data" / "metal_plate_gray"
    converted = {}
    for path in products["metal_plate"]["references"] + [path for path, _ in products["metal_plate"]["parts"]]:
        target = gray / path.relative_to(plate)
        if not target.exists():
            _gray_rotated(path, target)
        converted[path] = target
    products["metal_plate_gray"] = {
        "references": [converted[path] for path in products["metal_plate"]["references"]],
        "parts": [(converted[path], truth) for path, truth in products["metal_plate"]["parts"]],
    }
    return products


def _copies(products: dict[str, dict], work: Path, copies: dict[str, int]) -> dict[str, list[dict]]:
    """The line's files: each part ``copies[product]`` times, each copy distinct by one grey level in one pixel."""
    line: dict[str, list[dict]] = {}
    rng = np.random.default_rng(0)
    for product, split in products.items():
        folder = work / "line" / product
        folder.mkdir(parents=True, exist_ok=True)
        items = []
        for copy in range(copies[product]):
            for index, (path, truth) in enumerate(split["parts"]):
                target = folder / f"{product}-{copy}-{index:04d}-{truth}.png"
                if not target.exists():
                    array = np.array(Image.open(path).convert("RGB"))
                    if copy:
                        row, column = rng.integers(0, array.shape[0]), rng.integers(0, array.shape[1])
                        array[row, column, 0] = array[row, column, 0] ^ 1
                    Image.fromarray(array).save(target)
                data = target.read_bytes()
                items.append({"path": target, "truth": truth, "sha256": hashlib.sha256(data).hexdigest()})
        order = rng.permutation(len(items))
        line[product] = [items[position] for position in order]
    return line


# ---------------------------------------------------------------------------------------------------- processes
def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def _anomalens(*args: str, log: Path | None = None, env: dict | None = None) -> subprocess.Popen:
    output = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen([sys.executable, "-m", "anomalens", *args], stdout=output, stderr=subprocess.STDOUT,
                            env={**os.environ, **(env or {})})  # fmt: skip


def _fit_products(products: dict[str, dict], models: Path, alpha: float, weights: Path) -> dict[str, float]:
    seconds = {}
    for product, split in products.items():
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "anomalens", "fit", "--method", "patchcore", "--backbone", "taef2",
                        "--reference", *map(str, split["references"]), "--false-alarm-rate", str(alpha),
                        "--calibration", "split", "--product", product, "--models", str(models), "--note",
                        "station_line.py"], check=True, capture_output=True, env={
                            **os.environ, "ANOMALENS_WEIGHTS_DIR": str(weights)})  # fmt: skip
        seconds[product] = round(time.perf_counter() - started, 1)
    return seconds


def _wait_http(url: str, process: subprocess.Popen, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"the server exited with {process.returncode}")
        try:
            if httpx.get(f"{url}/healthz", timeout=2).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.3)
    raise RuntimeError("the server did not start")


def _percentiles(values: list[float]) -> dict[str, float | int | None]:
    if not values:
        return {"count": 0, "p50_s": None, "p95_s": None, "max_s": None}
    array = np.asarray(values)
    return {"count": len(values), "p50_s": round(float(np.percentile(array, 50)), 3),
            "p95_s": round(float(np.percentile(array, 95)), 3), "max_s": round(float(array.max()), 3)}  # fmt: skip


# ---------------------------------------------------------------------------------------------------- one run
class Line:
    """One run of the line against one models directory and history database."""

    def __init__(self, args, work: Path, models: Path, db: str, line: dict[str, list[dict]], label: str):
        self.args, self.work, self.models, self.db, self.line, self.label = args, work, models, db, line, label
        self.run_dir = work / f"run-{label}"
        shutil.rmtree(self.run_dir, ignore_errors=True)
        self.run_dir.mkdir(parents=True)
        self.folders = {product: self.run_dir / f"hot-{product}" for product in ("bottle", "metal_plate")}
        for folder in self.folders.values():
            folder.mkdir()
        self.dropped: dict[str, float] = {}  # sha256 -> drop time (watch path)
        self.truth: dict[tuple[str, str], str] = {}  # (product, sha256) -> truth
        self.serve_latency: list[float] = []
        self.serve_ids: list[int] = []
        self.serve_503 = 0
        self.duplicates = 0
        self.corrupt = 0
        self.events: list[str] = []
        self.lock = threading.Lock()

    def _watch(self, product: str) -> subprocess.Popen:
        return _anomalens("watch", str(self.folders[product]), "--product", product, "--models", str(self.models),
                          "--db", self.db, "--settle-s", str(self.args.settle_s), "--poll-s", "0.1",
                          "--audit-rate", str(self.args.audit_rate), "--station", "line-sim",
                          log=self.run_dir / f"watch-{product}.log")  # fmt: skip

    def run(self, kill_watch: bool, outage_s: float, postgres: PostgresServer | None) -> dict:
        args = self.args
        port = _free_port()
        url = f"http://127.0.0.1:{port}"
        server = _anomalens("serve", "--models", str(self.models), "--db", self.db, "--port", str(port),
                            "--audit-rate", str(args.audit_rate), log=self.run_dir / "serve.log")  # fmt: skip
        watchers = {product: self._watch(product) for product in self.folders}
        _wait_http(url, server)
        serve_items = self.line["metal_plate_gray"] + self.line["bottle"][::4]
        watch_items = {"bottle": [item for index, item in enumerate(self.line["bottle"]) if index % 4],
                       "metal_plate": self.line["metal_plate"]}  # fmt: skip
        for product, items in (("metal_plate_gray", self.line["metal_plate_gray"]), *watch_items.items(),
                               ("bottle", self.line["bottle"][::4])):  # fmt: skip
            for item in items:
                self.truth[(product, item["sha256"])] = item["truth"]
        started = time.time()
        threads = [threading.Thread(target=self._camera, args=(product, items), name=f"camera-{product}")
                   for product, items in watch_items.items()]  # fmt: skip
        threads.append(threading.Thread(target=self._client, args=(url, serve_items), name="client"))
        if outage_s and postgres is not None:
            threads.append(threading.Thread(target=self._outage, args=(postgres, started, outage_s), name="outage"))
        for thread in threads:
            thread.start()
        if kill_watch:  # SIGKILL the bottle watcher once half its files were dropped, restart it at once
            half = len(watch_items["bottle"]) // 2
            while sum(1 for item in watch_items["bottle"] if item["sha256"] in self.dropped) < half:
                time.sleep(0.2)
            watchers["bottle"].send_signal(signal.SIGKILL)
            watchers["bottle"].wait()
            self.events.append(f"{time.time() - started:.1f} s: bottle watcher killed (SIGKILL), restarted")
            watchers["bottle"] = self._watch("bottle")
        for thread in threads:
            thread.join()
        expected_watch = {product: len(items) for product, items in watch_items.items()}
        deadline = time.monotonic() + 600
        while time.monotonic() < deadline:  # until every watched file was moved out of the hot folders
            if all(not any(path.suffix == ".png" for path in folder.iterdir()) for folder in self.folders.values()):
                break
            time.sleep(0.5)
        finished = time.time()
        if self.args.screenshots and self.label == "sqlite":
            _screenshots(url, Path(self.args.screenshots))
        review = self._review(url)
        if self.args.screenshots and self.label == "sqlite":
            _screenshots(url, Path(self.args.screenshots), after_review=True)
        stats = {product: httpx.get(f"{url}/v1/detectors/{product}/stats", timeout=60).json()
                 for product in PRODUCTS}  # fmt: skip
        server.send_signal(signal.SIGTERM)
        for watcher in watchers.values():
            watcher.send_signal(signal.SIGTERM)
        for process in (server, *watchers.values()):
            process.wait(60)
        return self._report(started, finished, expected_watch, len(serve_items), review, stats)

    def _outage(self, postgres: PostgresServer, started: float, outage_s: float) -> None:
        """Take the database away for ``outage_s`` seconds, ``--outage-at-s`` into the run."""
        time.sleep(max(0.0, self.args.outage_at_s - (time.time() - started)))
        postgres.stop()
        self.events.append(f"{time.time() - started:.1f} s: PostgreSQL stopped for {outage_s:g} s")
        time.sleep(outage_s)
        postgres.start()
        self.events.append(f"{time.time() - started:.1f} s: PostgreSQL started again")

    def _camera(self, product: str, items: list[dict]) -> None:
        """Drop files as a camera does (``.part``, then renamed), with a duplicate and a corrupt file now and then."""
        folder = self.folders[product]
        interval = 1.0 / self.args.rate
        for index, item in enumerate(items):
            began = time.monotonic()
            data = item["path"].read_bytes()
            target = folder / item["path"].name
            (folder / f"{target.name}.part").write_bytes(data)
            os.replace(folder / f"{target.name}.part", target)
            self.dropped[item["sha256"]] = time.time()
            if index % 50 == 25:  # an exact duplicate of a part dropped before, under another name
                earlier = items[index - 20]
                shutil.copyfile(earlier["path"], folder / f"again-{earlier['path'].name}")
                with self.lock:
                    self.duplicates += 1
            if index % 200 == 100:  # a truncated file
                (folder / f"corrupt-{index}.png").write_bytes(data[:100])
                with self.lock:
                    self.corrupt += 1
            time.sleep(max(0.0, interval - (time.monotonic() - began)))

    def _client(self, url: str, items: list[dict]) -> None:
        interval = 1.0 / self.args.rate
        with httpx.Client(timeout=120) as client:
            for item in items:
                began = time.monotonic()
                product = "metal_plate_gray" if "metal_plate_gray" in item["path"].name else "bottle"
                data = item["path"].read_bytes()
                while True:  # a 503 (the history cannot be written) is retried: the part is not lost
                    sent = time.perf_counter()
                    answer = client.post(f"{url}/v1/detectors/{product}/predict", data={"source": "client-1"},
                                         files=[("files", (item["path"].name, data, "image/png"))])  # fmt: skip
                    if answer.status_code == 503:
                        self.serve_503 += 1
                        time.sleep(2.0)
                        continue
                    answer.raise_for_status()
                    break
                self.serve_latency.append(time.perf_counter() - sent)
                self.serve_ids.append(answer.json()["results"][0]["id"])
                time.sleep(max(0.0, interval - (time.monotonic() - began)))

    def _review(self, url: str) -> dict:
        """The inspector: work every product's queue until it is empty, verdicts from the truth."""
        reviewed = collections.Counter()
        started = time.perf_counter()
        with httpx.Client(timeout=60) as client:
            for product in PRODUCTS:
                while True:
                    queue = client.get(f"{url}/v1/detectors/{product}/queue", params={"limit": 500}).json()["queue"]
                    if not queue:
                        break
                    for item in queue:
                        truth = self.truth[(product, item["image_sha256"])]
                        client.post(f"{url}/v1/inspections/{item['id']}/review",
                                    data={"verdict": truth, "reviewer": "oracle"}).raise_for_status()  # fmt: skip
                        reviewed[(product, "audit" if item["audit"] else "band")] += 1
        return {"seconds": round(time.perf_counter() - started, 1),
                "reviews": {f"{product}/{kind}": count for (product, kind), count in sorted(reviewed.items())}}

    def _report(self, started: float, finished: float, expected_watch: dict[str, int], expected_serve: int,
                review: dict, stats: dict) -> dict:  # fmt: skip
        from anomalens.station.history import History

        history = History(self.db)
        rows = history.inspections(limit=None, newest_first=False)
        distinct = {(row["product"], row["image_sha256"]) for row in rows}
        watch_rows = [row for row in rows if row["source"].startswith("watch:")]
        serve_rows = [row for row in rows if row["source"].startswith("serve:")]
        watch_latency = collections.defaultdict(list)
        for row in watch_rows:
            dropped = self.dropped.get(row["image_sha256"])
            if dropped is not None:
                watch_latency[row["product"]].append(row["created_at"].timestamp() - dropped)
        done = {product: sum(1 for path in (folder / "done").iterdir() if not path.name.startswith("again-"))
                for product, folder in self.folders.items()}  # fmt: skip
        again = sum(1 for folder in self.folders.values() for path in (folder / "done").glob("again-*"))
        failed = sum(1 for folder in self.folders.values() for path in (folder / "failed").glob("*.png"))
        reasons = sum(1 for folder in self.folders.values() for path in (folder / "failed").glob("*.reason.txt"))
        oracle = {}
        for product in PRODUCTS:
            good = [row for row in rows if row["product"] == product and self.truth[(product,
                                                                                     row["image_sha256"])] == "normal"]
            oracle[product] = {"good_parts": len(good), "flagged": sum(row["label"] == "anomalous" for row in good)}
            oracle[product]["rate"] = round(oracle[product]["flagged"] / max(1, len(good)), 4)
        seconds = finished - started
        return {
            "rows": len(rows),
            "distinct_files": len(distinct),
            "files_seen": {"watch": sum(expected_watch.values()), "serve": expected_serve,
                           "total": sum(expected_watch.values()) + expected_serve},
            "no_loss_no_duplicate": len(rows) == len(distinct) == sum(expected_watch.values()) + expected_serve,
            "watch": {"rows": len(watch_rows), "expected": expected_watch, "moved_to_done": done,
                      "duplicates_dropped": self.duplicates, "duplicates_moved_to_done_unscored": again,
                      "corrupt_dropped": self.corrupt, "corrupt_in_failed": failed, "reasons_written": reasons,
                      "latency_drop_to_row": {product: _percentiles(values)
                                              for product, values in sorted(watch_latency.items())},
                      "settle_s": self.args.settle_s},
            "serve": {"rows": len(serve_rows), "answered_ids_recorded": sorted(self.serve_ids) == sorted(
                row["id"] for row in serve_rows), "latency_request": _percentiles(self.serve_latency),
                "answers_503_retried": self.serve_503},
            "throughput": {"seconds": round(seconds, 1), "inspections_per_s": round(len(rows) / seconds, 2),
                           "per_path_per_s": {"watch": round(len(watch_rows) / seconds, 2),
                                              "serve": round(len(serve_rows) / seconds, 2)},
                           "offered_rate_per_path_per_s": self.args.rate},
            "review": review,
            "false_alarms": {product: {"review_measured": stats[product]["false_alarms"],
                                       "oracle_all_good_parts": oracle[product]} for product in PRODUCTS},
            "events": self.events,
        }  # fmt: skip


def _screenshots(url: str, folder: Path, after_review: bool = False) -> None:
    """The review page on the line's real parts: the bottle queue before review, the statistics after."""
    from playwright.sync_api import sync_playwright

    folder.mkdir(parents=True, exist_ok=True)
    chromium = shutil.which("chromium") or shutil.which("chromium-browser")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=chromium, headless=True, args=["--no-sandbox"])
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        page.goto(url)
        page.wait_for_selector("#product option", state="attached")
        page.select_option("#product", "bottle")
        page.fill("#reviewer", "inspector")
        if after_review:
            page.click("#tab-stats")
            page.wait_for_function("document.querySelector('#false-alarms').textContent.length > 0")
            page.screenshot(path=str(folder / "station-statistics.png"), full_page=True)
        else:
            page.wait_for_selector("#viewer:not([hidden])")
            page.wait_for_function("document.querySelector('#viewer-overlay').complete")
            page.screenshot(path=str(folder / "station-queue.png"), full_page=True)
        browser.close()


# ---------------------------------------------------------------------------------------------------- memory
def _memory_phase(models: Path, work: Path, line: dict[str, list[dict]], max_loaded: int | None) -> dict:
    port = _free_port()
    url = f"http://127.0.0.1:{port}"
    db = f"sqlite:///{work / f'memory-{max_loaded}.db'}"
    extra = ["--max-loaded", str(max_loaded)] if max_loaded else []
    server = _anomalens("serve", "--models", str(models), "--db", db, "--port", str(port), "--no-keep-images",
                        *extra, log=work / f"memory-{max_loaded}.log")  # fmt: skip
    try:
        _wait_http(url, server)
        idle = process_memory_mib(server.pid)
        with httpx.Client(timeout=120) as client:
            for round_ in range(5):
                for product in PRODUCTS:
                    item = line[product][round_]
                    client.post(f"{url}/v1/detectors/{product}/predict", files=[
                        ("files", (item["path"].name, item["path"].read_bytes(), "image/png"))]).raise_for_status()
            loaded = client.get(f"{url}/healthz").json()["loaded"]
        return {"max_loaded": max_loaded or "all", "idle": idle, "after": process_memory_mib(server.pid),
                "loaded_at_end": loaded, "requests": 15}  # fmt: skip
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(60)


# ---------------------------------------------------------------------------------------------------- main
def _markdown(result: dict) -> str:
    parts = ", ".join(f"{name} {item['files']} files ({item['parts']} parts, {item['references']} references)"
                      for name, item in result["parts_per_product"].items())  # fmt: skip
    lines = ["# Station line simulation", "", f"`{result['command']}`", "",
             f"Machine: {result['machine'].get('cpu', '')}, {result['machine'].get('cores', '')} cores. "
             f"Products: {parts}. "
             f"Promised false-alarm rate {result['alpha']}, audit sample {result['audit_rate']}.", "",
             "| history | rows | distinct files | files seen | no loss, no duplicate | inspections / s "
             "| watch, drop to row: p50 / p95 (s) | serve, request: p50 / p95 (s) | 503s retried "
             "| duplicates not re-scored | corrupt to failed/ | events |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, run in result["runs"].items():
        watch = "; ".join(f"{product} {item['p50_s']} / {item['p95_s']}"
                          for product, item in sorted(run["watch"]["latency_drop_to_row"].items()))  # fmt: skip
        serve = run["serve"]["latency_request"]
        lines.append(f"| {name} | {run['rows']} | {run['distinct_files']} | {run['files_seen']['total']} | "
                     f"{run['no_loss_no_duplicate']} | {run['throughput']['inspections_per_s']} | {watch} | "
                     f"{serve['p50_s']} / {serve['p95_s']} | {run['serve']['answers_503_retried']} | "
                     f"{run['watch']['duplicates_moved_to_done_unscored']} of {run['watch']['duplicates_dropped']} | "
                     f"{run['watch']['corrupt_in_failed']} of {run['watch']['corrupt_dropped']} | "
                     f"{'; '.join(run['events']) or '-'} |")  # fmt: skip
    lines += ["", "False alarms: measured by the inspector on the reviewed audit sample (what the review page shows), "
              "and counted by the oracle on every good part.", "",
              "| history | product | promised alpha | reviewed audit normals | flagged | measured (95% CI) | "
              "oracle on every good part |", "|---|---|---|---|---|---|---|"]  # fmt: skip
    for name, run in result["runs"].items():
        for product, alarms in run["false_alarms"].items():
            measured, oracle = alarms["review_measured"], alarms["oracle_all_good_parts"]
            interval = (f"{measured['rate']:.3f} ({measured['low']:.3f}-{measured['high']:.3f})"
                        if measured["rate"] is not None else "-")  # fmt: skip
            lines.append(f"| {name} | {product} | {measured['alpha']} | {measured['normal']} | {measured['flagged']} | "
                         f"{interval} | {oracle['flagged']}/{oracle['good_parts']} = {oracle['rate']} |")
    lines += ["", "`serve --models` alone, 15 requests round-robin over the three products:", "",
              "| serve | RSS idle (MiB) | peak RSS (MiB) | RSS after (MiB) | loaded at the end |",
              "|---|---|---|---|---|"]
    for phase in result["memory"]:
        lines.append(f"| --max-loaded {phase['max_loaded']} | {phase['idle']['rss_mib']} | "
                     f"{phase['after']['peak_rss_mib']} | {phase['after']['rss_mib']} | "
                     f"{', '.join(phase['loaded_at_end'])} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shared", default=os.environ.get("ANOMALENS_SHARED", "../shared"))
    parser.add_argument("--work", default="/tmp/station-line")
    parser.add_argument("--out", default="benchmarks/results/station-line.json")
    parser.add_argument("--alpha", type=float, default=0.1, help="the promised false-alarm rate")
    parser.add_argument("--audit-rate", type=float, default=0.1, help="share of inspections in the audit sample")
    parser.add_argument("--rate", type=float, default=0.7, help="files (or requests) per second on each path")
    parser.add_argument("--settle-s", type=float, default=0.3)
    parser.add_argument("--copies", type=int, nargs=3, default=(2, 3, 2), metavar=("BOTTLE", "PLATE", "GRAY"))
    parser.add_argument("--outage-s", type=float, default=60.0, help="PostgreSQL stopped this long mid-run")
    parser.add_argument("--outage-at-s", type=float, default=120.0, help="... this many seconds into the run")
    parser.add_argument("--only", choices=("sqlite", "postgresql"), default=None)
    parser.add_argument("--screenshots", default=None, help="keep the review page's screenshots in this folder")
    parser.add_argument("--render", default=None, help="only write the Markdown table of this JSON record")
    args = parser.parse_args()
    if args.render:
        Path(args.render).with_suffix(".md").write_text(_markdown(json.loads(Path(args.render).read_text())))
        return
    shared, work = Path(args.shared).resolve(), Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    products = _split(shared, work)
    line = _copies(products, work, dict(zip(PRODUCTS, args.copies, strict=True)))
    models = work / "models"
    shutil.rmtree(models, ignore_errors=True)
    fit_seconds = _fit_products(products, models, args.alpha, shared / "weights")
    result: dict = {
        "parts_per_product": {product: {"references": len(products[product]["references"]),
                                        "parts": len(products[product]["parts"]), "files": len(line[product])}
                              for product in PRODUCTS},
        "fit_seconds": fit_seconds, "alpha": args.alpha, "audit_rate": args.audit_rate, "runs": {},
    }  # fmt: skip
    if args.only in (None, "sqlite"):
        db = f"sqlite:///{work / 'history-sqlite.db'}"
        Path(work / "history-sqlite.db").unlink(missing_ok=True)
        result["runs"]["sqlite"] = Line(args, work, models, db, line, "sqlite").run(False, 0.0, None)
        print(json.dumps(result["runs"]["sqlite"], indent=1, default=str), flush=True)
    if args.only in (None, "postgresql"):
        postgres = PostgresServer()
        try:
            db = postgres.database("line")
            result["runs"]["postgresql, watcher killed, database stopped"] = Line(
                args, work, models, db, line, "postgresql").run(True, args.outage_s, postgres)
        finally:
            postgres.close()
    if args.only and Path(args.out).exists():  # one run made again: keep the other run of the earlier record
        earlier = json.loads(Path(args.out).read_text())
        result["runs"] = {**{name: run for name, run in earlier["runs"].items() if name not in result["runs"]},
                          **result["runs"]}  # fmt: skip
        result["earlier_command"] = earlier.get("command")
    result["memory"] = [_memory_phase(models, work, line, 1), _memory_phase(models, work, line, None)]
    written = write_benchmark_json(args.out, {**result, "when": dt.datetime.now(dt.timezone.utc).isoformat()})
    Path(args.out).with_suffix(".md").write_text(_markdown(written))
    print(_markdown(written))


if __name__ == "__main__":
    main()
