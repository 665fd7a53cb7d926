"""The station as a line runs it: ``anomalens watch`` as real processes (killed with SIGKILL, two on one folder, the
database stopped under them), webhooks to a real HTTP receiver that checks the signatures, and ``history``'s
exports read back by a second library. Oracles: hashlib for contents, the files on disk for what was taken, the
receiver's own HMAC check, pyarrow and the csv module for exports."""

from __future__ import annotations

import csv
import hashlib
import hmac
import io
import json
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from anomalens.station.history import History
from anomalens.station.models import ModelStore

from conftest import textured_image, tiny_detector

pytest.importorskip("sqlalchemy")


def _models(tmp_path: Path, product: str = "part") -> Path:
    rng = np.random.default_rng(0)
    detector = tiny_detector("patchcore").fit([textured_image(rng, 40, 48) for _ in range(6)])
    root = tmp_path / "models"
    ModelStore(root).add(product, detector.save(tmp_path / "saved"))
    return root


def _drop(folder: Path, count: int, start: int = 0, *, via_part: bool = True) -> dict[str, str]:
    """Write ``count`` distinct PNGs the way a camera does (under ``.part``, then renamed); name -> sha256."""
    written = {}
    for index in range(start, start + count):
        image = textured_image(np.random.default_rng(1000 + index), 40, 48)
        buffer = io.BytesIO()
        Image.fromarray(image).save(buffer, format="PNG")
        data = buffer.getvalue()
        name = f"img{index:04d}.png"
        target = folder / name
        if via_part:
            (folder / f"{name}.part").write_bytes(data)
            os.replace(folder / f"{name}.part", target)
        else:
            target.write_bytes(data)
        written[name] = hashlib.sha256(data).hexdigest()
    return written


def _watch(models: Path, folder: Path, *extra: str, db: str | None = None, log: Path | None = None):
    command = [sys.executable, "-m", "anomalens", "watch", str(folder), "--product", "part", "--models", str(models),
               "--settle-s", "0.2", "--poll-s", "0.05", "--audit-rate", "0", *extra]  # fmt: skip
    if db:
        command += ["--db", db]
    output = open(log, "ab") if log else subprocess.DEVNULL
    return subprocess.Popen(command, stdout=output, stderr=subprocess.STDOUT)


def _wait(condition, timeout: float, what: str, process: subprocess.Popen | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        if process is not None and process.poll() is not None:
            raise AssertionError(f"the watcher exited ({process.returncode}) before {what}")
        time.sleep(0.1)
    raise AssertionError(f"timed out waiting for {what}")


def _rows(url: str) -> list[dict]:
    return History(url).inspections(limit=None)


def _settled(folder: Path) -> list[str]:
    return sorted(path.name for path in (folder / "done").glob("*.png")) if (folder / "done").is_dir() else []


def test_watch_scores_each_file_once_and_moves_refused_files_aside(tmp_path):
    models = _models(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    url = f"sqlite:///{models / 'history.db'}"
    written = _drop(folder, 4)
    (folder / "notes.png").write_bytes(b"this is not an image")  # refused: corrupt
    (folder / "camera.tmp").write_bytes(b"half")  # never taken: a writer's temporary name
    watcher = _watch(models, folder, log=tmp_path / "watch.log")
    try:
        _wait(lambda: len(_settled(folder)) == 4 and (folder / "failed" / "notes.png").exists(), 90, "the first files",
              watcher)  # fmt: skip
        again = _drop(folder, 1, start=0, via_part=False)  # the same content again, under the same name
        (folder / "copy.png").write_bytes((folder / "done" / "img0000.png").read_bytes())  # and under another name
        _wait(lambda: len(_settled(folder)) == 6, 60, "the duplicates", watcher)
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(30)
    rows = _rows(url)
    assert sorted(row["image_sha256"] for row in rows) == sorted(written.values())  # once each, the copies not again
    assert again["img0000.png"] == written["img0000.png"]
    assert (folder / "camera.tmp").exists() and not (folder / "notes.png").exists()
    assert "not an image" in (folder / "failed" / "notes.png.reason.txt").read_text() or \
        "cannot" in (folder / "failed" / "notes.png.reason.txt").read_text()  # fmt: skip
    assert "scored 4, duplicates 2, failed 1" in (tmp_path / "watch.log").read_text()
    assert all(row["source"].startswith("watch:") and row["source"].endswith(":in") for row in rows)


def test_a_half_written_file_is_not_taken_until_it_settles(tmp_path):
    models = _models(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    buffer = io.BytesIO()
    Image.fromarray(textured_image(np.random.default_rng(5), 40, 48)).save(buffer, format="PNG")
    data = buffer.getvalue()
    target = folder / "slow.png"
    watcher = _watch(models, folder, "--settle-s", "1.5", log=tmp_path / "watch.log")
    try:
        with open(target, "wb") as handle:  # a slow writer: a third, a pause, the rest
            handle.write(data[: len(data) // 3])
            handle.flush()
            time.sleep(1.0)
            assert target.exists()  # not taken while still growing
            handle.write(data[len(data) // 3:])
        _wait(lambda: _settled(folder) == ["slow.png"], 60, "the settled file", watcher)
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(30)
    rows = _rows(f"sqlite:///{models / 'history.db'}")
    assert [row["image_sha256"] for row in rows] == [hashlib.sha256(data).hexdigest()]  # the whole file was scored


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_kill_9_halfway_then_restart_loses_and_doubles_nothing(tmp_path, backend, request):
    models = _models(tmp_path)
    if backend == "sqlite":
        url = f"sqlite:///{models / 'history.db'}"
    else:
        url = request.getfixturevalue("postgres").database(f"kill{uuid.uuid4().hex[:12]}")
    folder = tmp_path / "in"
    folder.mkdir()
    written = _drop(folder, 24)
    watcher = _watch(models, folder, db=url)
    _wait(lambda: len(_settled(folder)) >= 6, 120, "a quarter of the files", watcher)
    watcher.send_signal(signal.SIGKILL)  # mid-run: perhaps mid-inspection, mid-transaction or mid-move
    watcher.wait(30)
    taken_before = len(_settled(folder))
    assert 6 <= taken_before < 24
    restarted = _watch(models, folder, "--once", db=url, log=tmp_path / "restart.log")
    assert restarted.wait(180) == 0
    rows = _rows(url)
    assert len(rows) == 24 and sorted(row["image_sha256"] for row in rows) == sorted(written.values())
    assert _settled(folder) == sorted(written) and not list(folder.glob("*.png"))
    claims = History(url).claims("part")
    assert len(claims) == 24 and {claim["status"] for claim in claims} == {"done"}
    assert sorted(claim["inspection_id"] for claim in claims) == sorted(row["id"] for row in rows)


def test_two_watchers_of_one_folder_never_score_a_file_twice(tmp_path, db_url):
    models = _models(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    first = _watch(models, folder, db=db_url)
    second = _watch(models, folder, db=db_url)
    try:
        written = {}
        for start in range(0, 30, 5):  # files arrive while both run
            written |= _drop(folder, 5, start=start)
            time.sleep(0.2)
        _wait(lambda: len(_settled(folder)) == 30, 180, "all 30 files", first)
    finally:
        for watcher in (first, second):
            watcher.send_signal(signal.SIGTERM)
        for watcher in (first, second):
            watcher.wait(30)
    rows = _rows(db_url)
    assert sorted(row["image_sha256"] for row in rows) == sorted(written.values())  # 30 rows, no pair


def test_the_database_away_keeps_files_until_it_is_back(tmp_path, postgres):
    models = _models(tmp_path)
    url = postgres.database(f"away{uuid.uuid4().hex[:12]}")
    folder = tmp_path / "in"
    folder.mkdir()
    watcher = _watch(models, folder, db=url, log=tmp_path / "watch.log")
    try:
        _drop(folder, 2)
        _wait(lambda: len(_settled(folder)) == 2, 90, "the first files", watcher)
        postgres.stop()
        try:
            later = _drop(folder, 3, start=2)
            time.sleep(3.0)  # the watcher tries, fails, keeps them
            assert sorted(path.name for path in folder.glob("*.png")) == sorted(later)
            assert "will retry" in (tmp_path / "watch.log").read_text()
        finally:
            postgres.start()
        _wait(lambda: len(_settled(folder)) == 5, 120, "the kept files after the database came back", watcher)
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(30)
    assert len(_rows(url)) == 5


def test_a_watcher_started_before_its_database_waits_for_it(tmp_path, postgres):
    models = _models(tmp_path)
    url = postgres.database(f"late{uuid.uuid4().hex[:12]}")
    folder = tmp_path / "in"
    folder.mkdir()
    written = _drop(folder, 2)
    postgres.stop()
    try:
        watcher = _watch(models, folder, db=url, log=tmp_path / "watch.log")
        time.sleep(4.0)
        assert watcher.poll() is None  # still running, waiting
        assert "cannot be reached" in (tmp_path / "watch.log").read_text()
        refused = subprocess.run([sys.executable, "-m", "anomalens", "history", "--db", url, "--models", str(models)],
                                 capture_output=True, text=True, timeout=60)  # fmt: skip
        assert refused.returncode == 2 and "cannot be reached" in refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1 and "postgres@" not in refused.stderr
    finally:
        postgres.start()
    try:
        _wait(lambda: _settled(folder) == sorted(written), 120, "the files after the database came up", watcher)
    finally:
        watcher.send_signal(signal.SIGTERM)
        watcher.wait(30)
    assert len(_rows(url)) == 2


# ---------------------------------------------------------------------------------------------------- webhooks
class _Receiver:
    """A real HTTP receiver on a loopback port that checks each request's signature with its own HMAC code."""

    def __init__(self, secret: bytes, port: int = 0, fail_first: int = 0) -> None:
        self.secret, self.received, self.bad, self.fail_first = secret, [], [], fail_first
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self):  # noqa: N802 - http.server's name
                body = self.rfile.read(int(self.headers["Content-Length"]))
                timestamp = self.headers["X-Anomalens-Timestamp"]
                expected = "sha256=" + hmac.new(receiver.secret, f"{timestamp}.".encode() + body,
                                                hashlib.sha256).hexdigest()  # fmt: skip
                if receiver.fail_first > 0:
                    receiver.fail_first -= 1
                    self.send_response(503)
                elif hmac.compare_digest(expected, self.headers["X-Anomalens-Signature"]):
                    receiver.received.append((self.headers["X-Anomalens-Event"], json.loads(body),
                                              self.headers["X-Anomalens-Delivery"]))  # fmt: skip
                    self.send_response(204)
                else:
                    receiver.bad.append(body)
                    self.send_response(401)
                self.end_headers()

            def log_message(self, *args):
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", port), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def test_webhooks_are_signed_queued_while_the_receiver_is_down_and_delivered_after(tmp_path, db_url, monkeypatch):
    from anomalens.station.webhooks import Dispatcher

    secret = "a-shared-secret-of-32-characters"
    monkeypatch.setenv("ANOMALENS_WEBHOOK_SECRET", secret)
    models = _models(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    receiver = _Receiver(secret.encode())
    port = receiver.server.server_address[1]
    receiver.close()  # the receiver is down while the line runs
    written = _drop(folder, 3)
    watcher = _watch(models, folder, "--once", "--webhook", f"http://127.0.0.1:{port}/hook", db=db_url,
                     log=tmp_path / "watch.log")  # fmt: skip
    assert watcher.wait(120) == 0
    history = History(db_url)
    pending = history.events(delivered=False)
    assert len(pending) == 3 and not history.events(delivered=True)  # kept while the receiver was down
    assert all(event["attempts"] >= 1 and event["last_error"] for event in pending)  # tried, and said why not
    receiver = _Receiver(secret.encode(), port=port, fail_first=1)  # back up; its first answer is a 503
    try:
        dispatcher = Dispatcher(history, secret.encode(), "test", timeout_s=5, max_backoff_s=1)
        deadline = time.monotonic() + 60  # the watcher's back-off (1, 2, 4 ... s) must pass first
        while history.events(delivered=False) and time.monotonic() < deadline:
            dispatcher.deliver_due()
            time.sleep(0.3)
        assert not history.events(delivered=False) and not receiver.bad
        bodies = [body for event, body, _ in receiver.received if event == "inspection"]
        assert sorted(body["image_sha256"] for body in bodies) == sorted(written.values())
        assert {body["id"] for body in bodies} == {row["id"] for row in history.inspections(limit=None)}
        assert len({delivery for _, _, delivery in receiver.received}) == 3
        inspection = history.inspections(limit=1)[0]  # a review is an event too
        history.review(inspection["id"], "anomalous", "ana", "scratch", webhooks=(receiver.url,))
        dispatcher.deliver_due()
        event, body, _ = receiver.received[-1]
        assert event == "review" and body["review_verdict"] == "anomalous" and body["id"] == inspection["id"]
    finally:
        receiver.close()


def test_a_wrong_secret_is_refused_by_the_receiver(tmp_path, monkeypatch):
    from anomalens.station.webhooks import Dispatcher

    url = f"sqlite:///{tmp_path / 'h.db'}"
    history = History(url)
    receiver = _Receiver(b"the-receivers-own-secret-123456")
    try:
        history.record({"product": "p", "image_sha256": "0" * 64, "image_name": "x.png", "score": 1.0,
                        "label": "normal", "source": "test", "width": 1, "height": 1},
                       webhooks=(receiver.url,))  # fmt: skip
        Dispatcher(history, b"not-the-receivers-secret-000000", "test", timeout_s=5).deliver_due()
        assert len(receiver.bad) == 1 and not receiver.received
        assert len(history.events(delivered=False)) == 1  # a refused delivery stays queued
    finally:
        receiver.close()


def test_watch_refuses_webhooks_without_a_secret(tmp_path, monkeypatch):
    monkeypatch.delenv("ANOMALENS_WEBHOOK_SECRET", raising=False)
    models = _models(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    _drop(folder, 1)
    result = subprocess.run([sys.executable, "-m", "anomalens", "watch", str(folder), "--product", "part", "--models",
                             str(models), "--once", "--webhook", "http://127.0.0.1:9/x"],
                            capture_output=True, text=True, timeout=120)  # fmt: skip
    assert result.returncode != 0 and "ANOMALENS_WEBHOOK_SECRET" in result.stderr
    assert list(folder.glob("*.png"))  # nothing was taken


# ---------------------------------------------------------------------------------------------------- history CLI
def test_history_exports_read_back_by_other_libraries(tmp_path):
    pyarrow_parquet = pytest.importorskip("pyarrow.parquet")
    models = _models(tmp_path)
    folder = tmp_path / "in"
    folder.mkdir()
    written = _drop(folder, 3)
    watcher = _watch(models, folder, "--once")
    assert watcher.wait(120) == 0
    base = [sys.executable, "-m", "anomalens", "history", "--models", str(models)]
    table = subprocess.run(base, capture_output=True, text=True, check=True).stdout
    assert len(table.strip().splitlines()) == 4 and "img0002.png" in table
    exported = subprocess.run([*base, "--format", "csv"], capture_output=True, text=True, check=True).stdout
    rows = list(csv.DictReader(io.StringIO(exported)))
    assert sorted(row["image_sha256"] for row in rows) == sorted(written.values())
    assert all(float(row["score"]) > 0 and row["product"] == "part" for row in rows)
    parquet = tmp_path / "h.parquet"
    subprocess.run([*base, "--format", "parquet", "--out", str(parquet)], check=True, capture_output=True)
    table = pyarrow_parquet.read_table(parquet).to_pylist()
    assert sorted(row["image_sha256"] for row in table) == sorted(written.values())
    assert {row["score"] for row in table} == {float(row["score"]) for row in rows}
    as_json = json.loads(subprocess.run([*base, "--format", "json", "--label", "normal"], capture_output=True,
                                        text=True, check=True).stdout)  # fmt: skip
    assert all(row["label"] == "normal" for row in as_json) and len(as_json) == sum(
        row["label"] == "normal" for row in rows)
    refused = subprocess.run([*base, "--since", "yesterday"], capture_output=True, text=True)
    assert refused.returncode == 2 and "since='yesterday'" in refused.stderr
