"""A local stand-in for the Hugging Face hub: resolve URLs with HTTP Range, the tree API,
gated repos (Bearer token), and a switch to cut a download short (to test resuming)."""

from __future__ import annotations

import hashlib
import json
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class HubServer:
    def __init__(self, token: str | None = None):
        self.files: dict[str, bytes] = {}  # "/repo/resolve/main/path" → bytes
        self.trees: dict[str, list[dict]] = {}
        self.token = token
        self.cut_after: dict[
            str, int
        ] = {}  # path → bytes to send before dropping the connection (once)
        self.requests: list[tuple[str, dict]] = []
        hub = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # quiet
                pass

            def do_GET(self):  # noqa: N802
                hub.requests.append((self.path, dict(self.headers)))
                if hub.token and self.headers.get("Authorization") != f"Bearer {hub.token}":
                    self.send_error(401, "gated")
                    return
                if self.path in hub.trees:
                    body = json.dumps(hub.trees[self.path]).encode()
                    self.send_response(200)
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                    return
                data = hub.files.get(self.path)
                if data is None:
                    self.send_error(404)
                    return
                start = 0
                if rng := self.headers.get("Range"):
                    start = int(rng.removeprefix("bytes=").split("-")[0])
                    if start >= len(data):
                        self.send_error(416)
                        return
                    self.send_response(206)
                    self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
                else:
                    self.send_response(200)
                body = data[start:]
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                cut = hub.cut_after.pop(self.path, None)
                if cut is not None:
                    self.wfile.write(body[:cut])
                    self.wfile.flush()
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def add(self, repo: str, path: str, data: bytes, dataset: bool = False) -> str:
        kind = "/datasets" if dataset else ""
        self.files[f"{kind}/{repo}/resolve/main/{path}"] = data
        return hashlib.sha256(data).hexdigest()

    def add_tree(self, repo: str, folder: str, entries: dict[str, bytes]) -> None:
        listing = []
        for name, data in entries.items():
            path = f"{folder}/{name}"
            self.add(repo, path, data, dataset=True)
            listing.append(
                {
                    "type": "file",
                    "path": path,
                    "size": len(data),
                    "lfs": {"oid": hashlib.sha256(data).hexdigest()},
                }
            )
        self.trees[f"/api/datasets/{repo}/tree/main/{folder}"] = listing

    def __enter__(self) -> HubServer:
        self.thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()
