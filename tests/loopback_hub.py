"""A Hugging Face hub and file hosts on loopback, for the weight-source tests: it serves, withholds, moves and breaks
repos and files the way the real hosts answer (the hub's model API, its resolve endpoint, plain file servers behind
``$ANOMALENS_URL_MIRROR``), and records every request it was asked."""

from __future__ import annotations

import hashlib
import json
import threading
import urllib.parse
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


@dataclass
class HubState:
    """What the loopback hosts hold; tests change it between requests."""

    repos: dict[str, dict[str, bytes]] = field(default_factory=dict)  # repo id -> {file name: content}
    commits: dict[str, str] = field(default_factory=dict)  # repo id -> the commit its API reports
    withheld: set[str] = field(default_factory=set)  # repo ids answered as the hub answers a deleted repo (401)
    renamed: dict[str, str] = field(default_factory=dict)  # old repo id -> new one (the API redirects, 307)
    files: dict[str, bytes] = field(default_factory=dict)  # "HOST/PATH" -> content, behind the URL mirror
    moved: dict[str, str] = field(default_factory=dict)  # "HOST/PATH" -> "HOST/PATH" it permanently moved to (301)
    temporary: dict[str, str] = field(default_factory=dict)  # "HOST/PATH" -> where it redirects for now (302)
    broken: set[str] = field(default_factory=set)  # repo ids or "HOST/PATH" answered 500
    requests: list[tuple[str, str]] = field(default_factory=list)  # (method, path) in arrival order


class _Handler(BaseHTTPRequestHandler):
    state: HubState

    def log_message(self, *args) -> None:  # quiet
        return

    def _send(self, code: int, body: bytes = b"", headers: dict[str, str] | None = None) -> None:
        self.send_response(code)
        for key, value in (headers or {}).items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def do_HEAD(self) -> None:  # noqa: N802 - http.server's naming
        self._answer()

    def do_GET(self) -> None:  # noqa: N802
        self._answer()

    def _answer(self) -> None:
        state = self.state
        path = urllib.parse.unquote(urllib.parse.urlsplit(self.path).path)
        state.requests.append((self.command, path))
        parts = path.strip("/").split("/")
        if parts[:2] == ["api", "models"] and len(parts) >= 6 and parts[4] in ("revision", "tree"):
            return self._model_api("/".join(parts[2:4]), "/".join(parts[5:]), listing=parts[4] == "tree")
        if len(parts) >= 5 and parts[2] == "resolve":
            return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]))
        if parts[0] == "files":
            return self._file("/".join(parts[1:]))
        self._send(404)

    def _gone(self) -> None:  # what huggingface.co answers for a deleted or never-existing repo
        self._send(401, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound",
                                                             "X-Error-Message": "Repository not found"})  # fmt: skip

    def _model_api(self, repo: str, revision: str, listing: bool = False) -> None:
        state = self.state
        if repo in state.renamed:
            return self._send(307, b"", {"Location": f"/api/models/{state.renamed[repo]}/revision/{revision}"})
        if repo in state.broken:
            return self._send(500, b"internal error")
        if repo in state.withheld or repo not in state.repos:
            return self._gone()
        commit = state.commits.get(repo, revision)
        if revision not in (commit, "main"):
            return self._send(404, b"", {"X-Error-Code": "RevisionNotFound", "X-Error-Message": "Invalid rev id"})
        files = state.repos[repo]
        if listing:  # the tree API, as huggingface_hub's snapshot_download lists a pinned commit
            body = json.dumps([{"type": "file", "path": name, "size": len(content),
                                "oid": hashlib.sha1(content).hexdigest()} for name, content in files.items()]).encode()
        else:  # the model API, at a revision
            body = json.dumps({"id": repo, "sha": commit, "siblings": [{"rfilename": name} for name in files]}).encode()
        self._send(200, body, {"Content-Type": "application/json"})

    def _resolve(self, repo: str, revision: str, name: str) -> None:
        state = self.state
        if repo in state.withheld or repo not in state.repos:
            return self._gone()
        if name not in state.repos[repo]:
            return self._send(404, b"", {"X-Error-Code": "EntryNotFound", "X-Error-Message": "Entry not found"})
        content = state.repos[repo][name]
        etag = hashlib.sha256(content).hexdigest()
        self._send(200, content, {"X-Repo-Commit": state.commits.get(repo, revision), "ETag": f'"{etag}"',
                                  "Content-Type": "application/octet-stream"})  # fmt: skip

    def _file(self, key: str) -> None:
        state = self.state
        if key in state.broken:
            return self._send(500, b"internal error")
        if key in state.moved:
            return self._send(301, b"", {"Location": f"/files/{state.moved[key]}"})
        if key in state.temporary:
            return self._send(302, b"", {"Location": f"/files/{state.temporary[key]}"})
        if key not in state.files:
            return self._send(404, b"not found")
        self._send(200, state.files[key], {"Content-Type": "application/octet-stream"})


class LoopbackHub:
    """The hosts on 127.0.0.1 at a free port, in a daemon thread; ``endpoint`` is ``$HF_ENDPOINT``, ``mirror``
    ``$ANOMALENS_URL_MIRROR``."""

    def __init__(self) -> None:
        self.state = HubState()
        handler = type("Handler", (_Handler,), {"state": self.state})
        self.server = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.mirror = f"{self.endpoint}/files"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> LoopbackHub:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def serve_table(self) -> None:
        """Serve every default source of anomalens' table as pinned (small stand-in contents)."""
        from anomalens.backbones.sources import SOURCES

        for source in SOURCES.values():
            if source.repo:
                names = source.files or ("open_clip_pytorch_model.bin",)
                self.state.repos[source.repo] = {name: f"{source.repo}/{name}".encode() for name in names}
                self.state.commits[source.repo] = source.revision or "0" * 40
            else:
                parts = urllib.parse.urlsplit(source.url)
                self.state.files[f"{parts.netloc}{parts.path}"] = source.component.encode()
