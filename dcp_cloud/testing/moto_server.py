"""Entry point of the local S3 server process: moto's S3 app, with a server-side request log.

Run as ``python -m dcp_cloud.testing.moto_server --port P [--log FILE]``. Every request is
appended to FILE as one JSON line ``{"method", "path", "query", "status"}``, written when the
response starts, so tests can prove from the server's side what a client sent, and in what order.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import threading
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
        query = environ.get("QUERY_STRING", "")

        def logged_start(status: str, headers: list[Any], *args: Any) -> Any:
            record = {"method": method, "path": path, "query": query, "status": int(status[:3])}
            with self._lock, open(self.path, "a") as log:
                log.write(json.dumps(record) + "\n")
            return start_response(status, headers, *args)

        return self.app(environ, logged_start)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--log", default=None, help="JSON-lines request log")
    args = parser.parse_args(argv)

    os.environ.setdefault("MOTO_PORT", str(args.port))
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

    app: WsgiApp = DomainDispatcherApplication(create_backend_app)
    if args.log:
        app = RequestLog(app, args.log)
    run_simple(args.host, args.port, app, threaded=True)


if __name__ == "__main__":
    main()
