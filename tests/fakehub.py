"""A local stand-in for the Hugging Face hub: serves model repositories over HTTP the way
huggingface.co does, for the endpoints `elmd pull` (through huggingface_hub) calls.

- GET /api/models/{repo}[/revision/{rev}][?blobs=true]: repo info with `sha` (the commit) and
  `siblings` (rfilename, size, blobId, and for LFS files lfs.sha256/size/pointerSize).
- GET /{repo}/resolve/{rev}/{path}: the file, with ETag, X-Repo-Commit, X-Linked-Etag and
  X-Linked-Size (LFS), Accept-Ranges and `Range: bytes=N-` answered with 206.
- Unknown repos and revisions: 404 with the hub's X-Error-Code header.

Faults for tests: `corrupt` (serve other bytes than the metadata describes), `drop_after`
(close the connection after N bytes of a file, a given number of times) and `stall_after`
(send N bytes, then hold the connection open until `release()`).
"""

from __future__ import annotations

import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

LFS_SUFFIXES = (".safetensors", ".model", ".bin", ".gguf")

_INFO = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)(?:/revision/(?P<rev>[^/]+))?$")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<path>.+)$")


@dataclass
class Repo:
    files: dict[str, bytes]
    commit: str = ""

    def __post_init__(self):
        if not self.commit:
            digest = hashlib.sha1()
            for name in sorted(self.files):
                digest.update(name.encode() + b"\0" + self.files[name])
            self.commit = digest.hexdigest()


@dataclass
class Request:
    method: str
    path: str
    range: str | None
    authorization: str | None = None
    bytes_sent: int = 0


@dataclass
class Fault:
    after: int
    times: int = 1


@dataclass
class FakeHub:
    repos: dict[str, Repo]
    corrupt: set[tuple[str, str]] = field(default_factory=set)
    drop_after: dict[tuple[str, str], Fault] = field(default_factory=dict)
    stall_after: dict[tuple[str, str], int] = field(default_factory=dict)
    log: list[Request] = field(default_factory=list)

    def __post_init__(self):
        self._released = threading.Event()
        self.stalled = threading.Event()  # set once a stalled transfer has sent its bytes
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        host, port = self._server.server_address[:2]
        return f"http://{host}:{port}"

    def __enter__(self) -> "FakeHub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
        self._server.shutdown()
        self._server.server_close()

    def release(self) -> None:
        """Let stalled transfers finish (their client is usually gone by then)."""
        self._released.set()

    def downloads(self, path: str) -> list[Request]:
        return [r for r in self.log if r.method == "GET" and "/resolve/" in r.path and r.path.endswith("/" + path)]

    def sibling(self, repo: Repo, name: str) -> dict:
        data = repo.files[name]
        entry = {"rfilename": name, "size": len(data), "blobId": git_blob_id(data)}
        if name.endswith(LFS_SUFFIXES):
            entry["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return entry


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(f"blob {len(data)}\0".encode() + data).hexdigest()


def _handler(hub: FakeHub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # quiet: the hub's own log is `hub.log`
            pass

        def do_GET(self):
            request = Request(self.command, unquote(urlsplit(self.path).path), self.headers.get("Range"),
                              self.headers.get("Authorization"))
            hub.log.append(request)
            self._request = request
            if m := _INFO.match(request.path):
                return self._info(m["repo"], m["rev"] or "main")
            if m := _RESOLVE.match(request.path):
                return self._file(request, m["repo"], m["rev"], m["path"])
            self._error(404, "EntryNotFound", "not found")

        def _repo(self, repo_id: str, rev: str) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None:
                self._error(404, "RepoNotFound", f"Repository {repo_id} not found")
            elif rev not in ("main", repo.commit):
                self._error(404, "RevisionNotFound", f"Invalid rev id: {rev}")
                repo = None
            return repo

        def _info(self, repo_id: str, rev: str):
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            info = {"id": repo_id, "modelId": repo_id, "sha": repo.commit, "private": False,
                    "siblings": [hub.sibling(repo, name) for name in sorted(repo.files)]}
            self._send(200, json.dumps(info).encode(), {"Content-Type": "application/json"})

        def _file(self, request: Request, repo_id: str, rev: str, path: str):
            repo = self._repo(repo_id, rev)
            if repo is None:
                return
            if path not in repo.files:
                return self._error(404, "EntryNotFound", f"{path} does not exist")
            data = repo.files[path]
            meta = hub.sibling(repo, path)
            etag = meta["lfs"]["sha256"] if "lfs" in meta else meta["blobId"]
            headers = {"ETag": f'"{etag}"', "X-Repo-Commit": repo.commit, "Accept-Ranges": "bytes",
                       "Content-Type": "application/octet-stream"}
            if "lfs" in meta:
                headers["X-Linked-Etag"] = f'"{etag}"'
                headers["X-Linked-Size"] = str(len(data))
            if (repo_id, path) in hub.corrupt:
                data = bytes([data[0] ^ 0xFF]) + data[1:]
            start = _range_start(request.range)
            status = 200
            if start is not None:
                if start >= len(data):
                    return self._send(416, b"", {"Content-Range": f"bytes */{len(data)}"})
                status = 206
                headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
                data = data[start:]
            self._stream(request, (repo_id, path), status, data, headers)

        def _stream(self, request: Request, key, status: int, data: bytes, headers: dict):
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(data))}.items():
                self.send_header(name, value)
            self.end_headers()
            cut = len(data)
            fault = hub.drop_after.get(key)
            if fault and fault.times > 0:
                fault.times -= 1
                cut = min(cut, fault.after)
            stall = hub.stall_after.get(key)
            if stall is not None:
                cut = min(cut, stall)
            self.wfile.write(data[:cut])
            self.wfile.flush()
            request.bytes_sent = cut
            if cut == len(data):
                return
            if stall is not None:
                hub.stalled.set()
                hub._released.wait(timeout=60)
            self.close_connection = True
            self.connection.close()

        def _error(self, status: int, code: str, message: str):
            payload = json.dumps({"error": message}).encode()
            self._send(status, payload, {"Content-Type": "application/json", "X-Error-Code": code,
                                         "X-Error-Message": message})

        def _send(self, status: int, payload: bytes, headers: dict):
            self.send_response(status)
            for name, value in {**headers, "Content-Length": str(len(payload))}.items():
                self.send_header(name, value)
            self.end_headers()
            self.wfile.write(payload)
            self._request.bytes_sent = len(payload)

    return Handler


def _range_start(header: str | None) -> int | None:
    """The N of `bytes=N-`, the only form huggingface_hub sends when resuming."""
    if not header:
        return None
    m = re.fullmatch(r"bytes=(\d+)-", header.strip())
    if not m:
        return None
    return int(m.group(1))
