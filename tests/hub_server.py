"""A real HTTP server on loopback that serves files the way the Hugging Face Hub does
(`/{repo}/resolve/{revision}/{filename}`, `Range: bytes=N-` answered with 206), with switchable
faults and a throttle, for the download tests."""
from __future__ import annotations

import gzip
import re
import socket
import struct
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


class HubServer:
    """`files`: filename -> bytes. `faults`: filename -> list of faults consumed one per GET:
    "truncate" (send half the body, then drop the connection), "drop@F" (send the file up to the
    fraction F of its length, then drop the connection; "reset@F" resets it), "corrupt" (send other bytes), "error"
    (HTTP 500), "ignore-range" (answer 200 with the whole file to a Range request;
    "ignore-range+drop@F" with a drop), "always-206" (answer every request with 206 and a Content-Range,
    one without Range too, from byte 0: "always-206+drop@F", "always-206+piece@F"), "bad-range"
    (answer a Range request with 206 and the whole file, `Content-Range: bytes 0-...`), "unsized"
    (no Content-Length: the body ends when the connection closes; "unsized+drop@F" with a drop),
    "page" (HTTP 200 with a small text/html page, as a captive portal or a proxy's login gives),
    "short-length" (a Content-Length of half the body, then the whole body), "long-length" (a
    Content-Length 1000 bytes more than the body, which is sent, then the connection closes), "stall@F" (send up to
    the fraction F, then nothing until the server stops), "piece@F" (answer a Range request with 206
    and the bytes up to the fraction F only, as its Content-Range says), "gzip" (the body gzipped,
    `Content-Encoding: gzip`), "redirect:LOCATION" (302 to LOCATION; `aliases` maps a path asked for
    to the file it serves), "status:N" (an answer of status N, no Location, no body).
    `rate`: bytes per second of every body (None: as fast as it goes). `requests` records every
    path asked for, `ranges` the Range header of each (None without), `encodings` its
    Accept-Encoding, `sent` the body bytes sent."""

    def __init__(self, repo: str = "si-pbc/hertz-dev"):
        self.repo = repo
        self.files: dict[str, bytes] = {}
        self.faults: dict[str, list[str]] = {}
        self.requests: list[str] = []
        self.ranges: list[str | None] = []
        self.encodings: list[str | None] = []
        self.sent = 0
        self.rate: float | None = None
        self.aliases: dict[str, str] = {}
        self.stopping = threading.Event()
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def whole(self, status: int, body: bytes = b"", headers: dict | None = None):
                """One answer of `status` holding all of `body`, with its Content-Length."""
                self.send_response(status)
                for k, v in (headers or {}).items():
                    self.send_header(k, v)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def empty(self, status: int, headers: dict | None = None):
                self.whole(status, b"", headers)

            def do_GET(self):
                server.requests.append(self.path)
                asked = self.headers.get("Range")
                server.ranges.append(asked)
                server.encodings.append(self.headers.get("Accept-Encoding"))
                prefix = f"/{server.repo}/resolve/main/"
                name = self.path[len(prefix):] if self.path.startswith(prefix) else server.aliases.get(self.path)
                if name not in server.files:
                    return self.empty(404)
                data = server.files[name]
                fault = server.faults.get(name, []).pop(0) if server.faults.get(name) else None
                unsized = fault is not None and fault.startswith("unsized")  # (the body ends at the close)
                if unsized:
                    fault = fault[len("unsized"):].lstrip("+") or None
                ignore = fault is not None and fault.startswith("ignore-range")  # (a 200 to a Range request)
                if ignore:
                    fault = fault[len("ignore-range"):].lstrip("+") or None
                always = fault is not None and fault.startswith("always-206")  # (a 206 to a request without Range)
                if always:
                    fault = fault[len("always-206"):].lstrip("+") or None
                if fault == "error":
                    return self.empty(500)
                if fault and fault.startswith("status:"):  # (an answer of that status, with no body)
                    return self.empty(int(fault[len("status:"):]))
                if fault and fault.startswith("redirect:"):
                    return self.empty(302, {"Location": fault[len("redirect:"):]})
                if fault == "gzip":
                    return self.whole(200, gzip.compress(data), {"Content-Type": "application/octet-stream",
                                                                 "Content-Encoding": "gzip"})
                if fault == "page":
                    return self.whole(200, b"<!DOCTYPE html><html><body>Sign in to continue</body></html>",
                                      {"Content-Type": "text/html; charset=utf-8"})
                if fault == "corrupt":
                    data = bytes(b ^ 0xFF for b in data)
                start = 0
                m = re.fullmatch(r"bytes=(\d+)-", asked or "")
                if m and not ignore and fault != "bad-range":
                    start = int(m.group(1))
                    if start >= len(data):
                        return self.empty(416, {"Content-Range": f"bytes */{len(data)}"})
                ranged = bool(m) and not ignore or always  # (answered with 206 and a Content-Range)
                last = len(data)  # (the end of what this answer says it holds)
                if ranged and fault and fault.startswith("piece@"):
                    last = max(start + 1, int(len(data) * float(fault.split("@")[1])))
                self.send_response(206 if ranged else 200)
                self.send_header("Content-Type", "application/octet-stream")
                if unsized:
                    self.close_connection = True
                elif fault == "short-length":
                    self.send_header("Content-Length", str((last - start) // 2))
                    self.close_connection = True
                elif fault == "long-length":
                    self.send_header("Content-Length", str(last - start + 1000))
                    self.close_connection = True
                else:
                    self.send_header("Content-Length", str(last - start))
                if ranged:
                    self.send_header("Content-Range", f"bytes {start}-{last - 1}/{len(data)}")
                self.end_headers()
                end = last
                if fault == "truncate":
                    end = start + (len(data) - start) // 2
                elif fault and fault.startswith(("drop@", "reset@", "stall@")):
                    end = max(start, int(len(data) * float(fault.split("@")[1])))
                try:
                    self.send_body(data, start, end)
                    if fault and fault.startswith("stall@"):
                        server.stopping.wait()  # (headers and what was sent, then nothing)
                    if end < last:
                        self.close_connection = True
                        if fault.startswith("reset@"):  # (a reset, not an orderly close: the client sees an error)
                            self.connection.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
                            self.connection.close()
                        else:
                            self.connection.shutdown(2)
                except OSError:  # the client went away (a killed download)
                    self.close_connection = True

            def send_body(self, data: bytes, start: int, end: int):
                step = 1 << 16
                for i in range(start, end, step):
                    block = data[i:min(i + step, end)]
                    self.wfile.write(block)
                    self.wfile.flush()
                    with server.lock:
                        server.sent += len(block)
                    if server.rate:
                        time.sleep(len(block) / server.rate)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
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
        self.stopping.set()
        self.httpd.shutdown()
        self.httpd.server_close()
