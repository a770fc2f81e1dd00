"""A real HTTP server on loopback that serves files the way the Hugging Face Hub does
(`/{repo}/resolve/{revision}/{filename}`), with switchable faults, for the download tests."""
from __future__ import annotations

import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubServer:
    """`files`: filename -> bytes. `faults`: filename -> list of faults consumed one per GET:
    "truncate" (send half the body, then drop the connection), "corrupt" (send other bytes),
    "error" (HTTP 500). `requests` records every path asked for."""

    def __init__(self, repo: str = "si-pbc/hertz-dev"):
        self.repo = repo
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[str] = []
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                server.requests.append(self.path)
                prefix = f"/{server.repo}/resolve/main/"
                name = self.path[len(prefix):] if self.path.startswith(prefix) else None
                if name not in server.files:
                    self.send_response(404)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                body = server.files[name]
                fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
                if fault == "error":
                    self.send_response(500)
                    self.send_header("Content-Length", "0")
                    self.end_headers()
                    return
                if fault == "corrupt":
                    body = bytes(b ^ 0xFF for b in body)
                self.send_response(200)
                self.send_header("Content-Type", "application/octet-stream")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                if fault == "truncate":
                    self.wfile.write(body[: len(body) // 2])
                    self.wfile.flush()
                    self.close_connection = True
                    self.connection.shutdown(2)
                    return
                self.wfile.write(body)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.endpoint = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def add(self, filename: str, path_or_bytes) -> bytes:
        data = Path(path_or_bytes).read_bytes() if not isinstance(path_or_bytes, bytes) else path_or_bytes
        self.files[filename] = data
        return data

    def __enter__(self) -> "HubServer":
        self.thread.start()
        return self

    def __exit__(self, *exc):
        self.httpd.shutdown()
        self.httpd.server_close()
