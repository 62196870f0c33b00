"""Entry point of the local S3 server process: moto's S3 app, with a server-side request log
and fault injection.

Run as ``python -m dcp_cloud.testing.moto_server --port P [--log FILE]``. Every request is
appended to FILE as one JSON line ``{"method", "path", "query", "status", "checksums",
"body_signed"}`` (``checksums``: the integrity headers the client sent; ``body_signed``: whether
``x-amz-content-sha256`` carried the body's SHA-256 rather than ``UNSIGNED-PAYLOAD`` or a
streaming marker), written when the
response starts, so tests can prove from the server's side what a client sent, and in what order.

Faults are switched on at run time with ``GET /__faults?rate=0.1&kinds=503,500,reset&seed=1``
(``rate=0`` switches them off; ``methods=PUT`` limits them to some methods; ``GET /__faults``
returns the counts so far as JSON); kind ``403`` answers AccessDenied. With ``--access-key``,
requests signed with any other key get ``403 InvalidAccessKeyId``, as S3 answers them. A faulted
request gets a ``503 SlowDown`` or ``500 InternalError`` answer without reaching the store, or
its connection is cut: before the request is processed for uploads, halfway through the body
for downloads. What the clients see is what real S3 sends under load.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import random
import socket
import threading
import urllib.parse
from collections.abc import Callable, Iterable
from typing import Any

from werkzeug.serving import run_simple

WsgiApp = Callable[[dict[str, Any], Callable[..., Any]], Iterable[bytes]]


class RequestLog:
    """WSGI middleware that records each request to a JSON-lines file."""

    def __init__(self, app: WsgiApp, path: str) -> None:
        self.app = app
        self.path = path
        self._lock = threading.Lock()

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "")
        path = environ.get("PATH_INFO", "")
        if path == "/__faults":  # the test harness talking to the fault injector
            return self.app(environ, start_response)
        query = environ.get("QUERY_STRING", "")
        # which integrity headers the client sent (x-amz-checksum-crc32, content-md5, ...)
        checksums = sorted(
            name[5:].lower().replace("_", "-")
            for name in environ
            if name.startswith("HTTP_X_AMZ_CHECKSUM_") or name == "HTTP_CONTENT_MD5"
        )
        content_sha256 = environ.get("HTTP_X_AMZ_CONTENT_SHA256", "")
        body_signed = len(content_sha256) == 64 and all(c in "0123456789abcdef" for c in content_sha256)

        def logged_start(status: str, headers: list[Any], *args: Any) -> Any:
            record = {
                "method": method,
                "path": path,
                "query": query,
                "status": int(status[:3]),
                "checksums": checksums,
                "body_signed": body_signed,
            }
            with self._lock, open(self.path, "a") as log:
                log.write(json.dumps(record) + "\n")
            return start_response(status, headers, *args)

        return self.app(environ, logged_start)


_ERROR_BODY = (
    '<?xml version="1.0" encoding="UTF-8"?>\n<Error><Code>{code}</Code><Message>{message}</Message>'
    "<RequestId>injected</RequestId></Error>"
)
_STATUS = {
    "503": ("503 Slow Down", "SlowDown", "Please reduce your request rate."),
    "500": (
        "500 Internal Server Error",
        "InternalError",
        "We encountered an internal error. Please try again.",
    ),
    "403": ("403 Forbidden", "AccessDenied", "Access Denied"),
}
_BAD_KEY = (
    "403 Forbidden",
    "InvalidAccessKeyId",
    "The AWS Access Key Id you provided does not exist in our records.",
)


def _error_response(start_response: Callable[..., Any], status: str, code: str, message: str) -> list[bytes]:
    body = _ERROR_BODY.format(code=code, message=message).encode()
    start_response(status, [("Content-Type", "application/xml"), ("Content-Length", str(len(body)))])
    return [body]


class FaultInjector:
    """WSGI middleware that fails a chosen fraction of requests, as an overloaded S3 would."""

    def __init__(self, app: WsgiApp, access_key: str | None = None) -> None:
        self.app = app
        self.access_key = access_key
        self.methods: set[str] = set()
        self.rate = 0.0
        self.kinds = ["503", "500", "reset"]
        self.random = random.Random(0)
        self.counts: dict[str, int] = {"requests": 0}
        self._lock = threading.Lock()

    def _configure(self, query: str) -> None:
        params = urllib.parse.parse_qs(query)
        with self._lock:
            if "rate" in params:
                self.rate = float(params["rate"][0])
            if "kinds" in params:
                self.kinds = [k for k in params["kinds"][0].split(",") if k]
            if "methods" in params:
                self.methods = {m for m in params["methods"][0].upper().split(",") if m}
            if "seed" in params:
                self.random = random.Random(int(params["seed"][0]))
            if "reset_counts" in params:
                self.counts = {"requests": 0}

    def _draw(self, method: str) -> str | None:
        with self._lock:
            self.counts["requests"] += 1
            if self.methods and method not in self.methods:
                return None
            if self.rate <= 0 or self.random.random() >= self.rate:
                return None
            kind = self.random.choice(self.kinds)
            self.counts[kind] = self.counts.get(kind, 0) + 1
            return kind

    def __call__(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        if environ.get("PATH_INFO") == "/__faults":
            self._configure(environ.get("QUERY_STRING", ""))
            with self._lock:
                body = json.dumps({"rate": self.rate, "kinds": self.kinds, **self.counts}).encode()
            start_response("200 OK", [("Content-Type", "application/json")])
            return [body]
        if self.access_key and f"Credential={self.access_key}/" not in environ.get("HTTP_AUTHORIZATION", ""):
            return _error_response(start_response, *_BAD_KEY)
        kind = self._draw(environ.get("REQUEST_METHOD", ""))
        if kind in _STATUS:
            return _error_response(start_response, *_STATUS[kind])
        if kind == "reset":
            if environ.get("REQUEST_METHOD") == "GET":
                return self._cut_midway(environ, start_response)
            _drop(environ)
            return []
        return self.app(environ, start_response)

    def _cut_midway(self, environ: dict[str, Any], start_response: Callable[..., Any]) -> Iterable[bytes]:
        body = b"".join(self.app(environ, start_response))
        yield body[: len(body) // 2]
        _drop(environ)


def _drop(environ: dict[str, Any]) -> None:
    """Cut the client's connection, as a reset or a dying load balancer would."""
    sock = environ.get("werkzeug.socket")
    if sock is not None:
        try:
            sock.shutdown(socket.SHUT_RDWR)
        except OSError:
            pass
    raise ConnectionAbortedError("injected connection reset")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", default=None, help="JSON-lines request log")
    parser.add_argument("--access-key", default=None, help="refuse requests signed with another key")
    args = parser.parse_args(argv)

    os.environ.setdefault("MOTO_PORT", str(args.port))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    app: WsgiApp = DomainDispatcherApplication(create_backend_app)
    # The log sits outside the fault injector: refused and failed requests are recorded too.
    app = FaultInjector(app, access_key=args.access_key)
    if args.log:
        app = RequestLog(app, args.log)
    run_simple(args.host, args.port, app, threaded=True)


if __name__ == "__main__":
    main()
