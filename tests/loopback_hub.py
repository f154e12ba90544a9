"""A folder served on 127.0.0.1 the way the Hugging Face hub serves one repository, for tests that cannot reach the
hub: ``/<owner>/<name>/resolve/<revision>/<path>`` (HEAD and GET, with the ETag and commit headers huggingface_hub
reads) and ``/api/models/<owner>/<name>/revision/<revision>`` (the commit and each file with its hashes: a git blob
id, and a Git LFS sha256 for weights files, as the hub lists them)."""

from __future__ import annotations

import hashlib
import http.server
import json
import threading
import urllib.parse
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

COMMIT = "c0ffee" + "0" * 34  # the commit every revision of the served repository resolves to
LFS_SUFFIXES = (".safetensors", ".pt", ".bin", ".npz")


def listing(folder: Path, repo: str, lies: dict[str, str]) -> dict:
    """What the hub's model_info API answers for the folder's files; ``lies`` lists another sha256 for a file."""
    siblings = []
    for path in sorted(p for p in folder.rglob("*") if p.is_file()):
        data, name = path.read_bytes(), path.relative_to(folder).as_posix()
        sibling = {"rfilename": name, "size": len(data),
                   "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()}
        if path.suffix in LFS_SUFFIXES:
            sibling["lfs"] = {"size": len(data), "sha256": lies.get(name, hashlib.sha256(data).hexdigest()),
                              "pointerSize": 134}
        siblings.append(sibling)
    return {"id": repo, "modelId": repo, "sha": COMMIT, "private": False, "siblings": siblings}


class LoopbackHub(http.server.BaseHTTPRequestHandler):
    folder: Path
    lies: dict[str, str]
    asked: list[str]  # every path requested, in order

    def log_message(self, *args) -> None:  # keep the test output clean
        pass

    def _parts(self) -> list[str]:
        self.asked.append(urllib.parse.unquote(urllib.parse.urlsplit(self.path).path))
        return urllib.parse.unquote(urllib.parse.urlsplit(self.path).path).strip("/").split("/")

    def _resolve(self) -> tuple[bytes, str] | None:
        parts = self._parts()
        path = self.folder.joinpath(*parts[4:])
        if len(parts) < 5 or parts[2] != "resolve" or ".." in parts or not path.is_file():
            self.send_error(404)
            return None
        return path.read_bytes(), COMMIT if parts[3] == "main" else parts[3]

    def _headers(self, body: bytes, revision: str, content_type: str = "application/octet-stream") -> None:
        self.send_response(200)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("ETag", f'"{hashlib.sha256(body).hexdigest()}"')
        self.send_header("X-Repo-Commit", revision)
        self.end_headers()

    def do_HEAD(self) -> None:
        found = self._resolve()
        if found:
            self._headers(*found)

    def do_GET(self) -> None:
        parts = self._parts()
        if parts[:2] == ["api", "models"] and len(parts) == 6 and parts[4] == "revision":
            body = json.dumps(listing(self.folder, "/".join(parts[2:4]), self.lies)).encode()
            self._headers(body, COMMIT, "application/json")
            self.wfile.write(body)
            return
        found = self._resolve()
        if found:
            self._headers(*found)
            self.wfile.write(found[0])


@contextmanager
def serve(folder: Path, lies: dict[str, str] | None = None, asked: list[str] | None = None) -> Iterator[str]:
    """``folder`` served as the hub at a free port on 127.0.0.1; yields the endpoint URL. ``asked``, if given,
    receives every path requested."""
    handler = type("Hub", (LoopbackHub,), {"folder": folder, "lies": lies if lies is not None else {},
                                           "asked": asked if asked is not None else []})
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
