"""How the emulated-cloud proxy (``benchmarks.proxy``) sees and shapes one connection's bytes.

- ``RequestFramer`` follows HTTP/1.1 request framing on the client side (request line, headers,
  a Content-Length or chunked body) to find where each request starts, so the proxy can hold a
  request's first byte for the latency and count requests.
- ``request_kind`` names a request's S3 operation (``dcp_cloud.testing.ServerRequest.kind``):
  request counts for servers that keep no log (SeaweedFS, any ``--endpoint-url``).
- ``Pacer`` caps one direction of one connection at a byte rate, by a token bucket.

No sockets here: the proxy feeds these the bytes it reads.
"""

from __future__ import annotations

import asyncio
import sys
import time
import urllib.parse
from pathlib import Path
from typing import Any

MAX_HEAD_BYTES = 64 * 1024
# The token bucket lets a connection run ahead of its rate by this long (a burst) at most.
BURST_S = 0.005


def _server_request_class() -> Any:
    """``dcp_cloud.testing.ServerRequest``, loaded from its file: importing the package would
    import torch (seconds, and hundreds of MiB) into the proxy."""
    import importlib.util

    path = Path(__file__).resolve().parent.parent / "dcp_cloud" / "testing" / "__init__.py"
    spec = importlib.util.spec_from_file_location("_bench_dcp_cloud_testing", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module.ServerRequest


_ServerRequest: Any = None


def request_kind(method: str, target: str) -> str:
    """The S3 operation of a request, as the moto server's log names it."""
    global _ServerRequest
    if _ServerRequest is None:
        _ServerRequest = _server_request_class()
    parts = urllib.parse.urlsplit(target)
    return str(_ServerRequest(method, parts.path or "/", parts.query, 0).kind)


class Pacer:
    """A token bucket of ``rate`` bytes per second (None: unlimited) for one direction of one
    connection, as a virtual clock: each chunk may leave once the clock has reached it."""

    def __init__(self, rate: float | None) -> None:
        self.rate = rate
        self.clock = 0.0

    async def pace(self, nbytes: int) -> None:
        if not self.rate:
            return
        now = time.monotonic()
        self.clock = max(self.clock, now - BURST_S) + nbytes / self.rate
        delay = self.clock - now
        if delay > 0:
            await asyncio.sleep(delay)


class RequestFramer:
    """Splits a client's byte stream into HTTP/1.1 requests: calls ``on_request(method,
    target)`` when a request head is complete, and ``feed`` returns the bytes to forward, each
    piece marked whether it starts a new request (the latency is applied before it)."""

    def __init__(self) -> None:
        self.state = "head"
        self.head = bytearray()
        self.body_left = 0  # bytes of a Content-Length body, or of the current chunk (+CRLF)
        self.line = bytearray()  # a chunk-size or trailer line being read
        self.broken = False  # unparseable: forward the rest as is, count nothing more
        self.requests: list[tuple[str, str]] = []

    def feed(self, data: bytes) -> list[tuple[bool, bytes]]:
        """Pieces of ``data`` to forward, in order; (True, piece) starts a request."""
        out: list[tuple[bool, bytes]] = []
        view = memoryview(data)
        while view:
            if self.broken:
                out.append((False, bytes(view)))
                break
            if self.state == "head":
                self.head += view
                end = self.head.find(b"\r\n\r\n")
                if end < 0:
                    if len(self.head) > MAX_HEAD_BYTES:
                        self.broken = True
                        out.append((False, bytes(self.head)))
                        self.head.clear()
                    break
                head = bytes(self.head[: end + 4])
                rest = bytes(self.head[end + 4 :])
                self.head.clear()
                out.append((self._start(head), head))
                view = memoryview(rest)
                continue
            if self.state == "body":
                n = min(len(view), self.body_left)
                out.append((False, bytes(view[:n])))
                self.body_left -= n
                view = view[n:]
                if self.body_left == 0:
                    self.state = "head"
                continue
            if self.state == "chunk-data":
                n = min(len(view), self.body_left)
                out.append((False, bytes(view[:n])))
                self.body_left -= n
                view = view[n:]
                if self.body_left == 0:
                    self.state = "chunk-size"
                continue
            # chunk-size or trailer lines: byte by byte up to the next CRLF
            newline = bytes(view).find(b"\n")
            if newline < 0:
                self.line += view
                out.append((False, bytes(view)))
                break
            self.line += view[: newline + 1]
            out.append((False, bytes(view[: newline + 1])))
            view = view[newline + 1 :]
            line = bytes(self.line).strip()
            self.line.clear()
            if self.state == "chunk-size":
                try:
                    size = int(line.split(b";")[0], 16)
                except ValueError:
                    self.broken = True
                    continue
                if size == 0:
                    self.state = "trailer"
                else:
                    self.body_left = size + 2  # the chunk and its CRLF
                    self.state = "chunk-data"
            elif self.state == "trailer" and not line:
                self.state = "head"
        return out

    def _start(self, head: bytes) -> bool:
        """Take in a request head; False when it is not one (the stream is then passed on as is)."""
        lines = head.decode("latin-1").split("\r\n")
        parts = lines[0].split(" ")
        if len(parts) < 3 or not parts[2].startswith("HTTP/"):
            self.broken = True
            return False
        method, target = parts[0], parts[1]
        headers = {}
        for line in lines[1:]:
            name, sep, value = line.partition(":")
            if sep:
                headers[name.strip().lower()] = value.strip()
        self.requests.append((method, target))
        if "chunked" in headers.get("transfer-encoding", "").lower():
            self.state = "chunk-size"
        elif int(headers.get("content-length", "0") or 0) > 0:
            self.body_left = int(headers["content-length"])
            self.state = "body"
        else:
            self.state = "head"
        return True
