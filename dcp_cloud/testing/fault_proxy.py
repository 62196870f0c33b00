"""An HTTP proxy on 127.0.0.1 that fails some requests, in front of any local store server.

moto's S3 server injects faults itself (``S3Server.set_faults``); this proxy does the same for
servers that cannot, such as fake-gcs-server and Azurite. Point the client at ``proxy.endpoint_url``
instead of the server's; each request is forwarded unchanged (signatures stay valid), unless the
draw picks a fault:

- ``503`` / ``500``: answered by the proxy, never reaching the server;
- ``reset``: the connection is closed: before forwarding for requests with a body (the server
  never sees them), halfway through the response body otherwise (a download cut off midway).

The proxy runs its own event loop in a daemon thread. Counts of requests and faults are kept per
kind, as the S3 server's injector keeps them. ``stop()`` and a later ``start()`` take the proxy
off its port and put it back (a server that goes away and returns).

:class:`Blackhole` is the other kind of dead endpoint: it accepts connections and never answers.
"""

from __future__ import annotations

import asyncio
import random
import socket
import threading
from collections import Counter
from typing import Any

from .process import free_port

# hop-by-hop headers, and those aiohttp computes itself, are not forwarded
_SKIPPED_HEADERS = {"host", "content-length", "transfer-encoding", "connection", "keep-alive"}


class FaultProxy:
    """Forwards HTTP requests to ``upstream`` and fails a chosen share of them."""

    def __init__(self, upstream: str, port: int | None = None) -> None:
        self.upstream = upstream.rstrip("/")
        self.port = port or free_port()
        self.rate = 0.0
        self.kinds: list[str] = ["503", "500", "reset"]
        self.methods: set[str] = set()
        self._random = random.Random(0)
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._runner: Any = None
        self._session: Any = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # -- control, from the test's thread ------------------------------------------------------

    def set_faults(self, rate: float, kinds: str = "503,500,reset", seed: int = 0, methods: str = "") -> None:
        """Fail ``rate`` of the requests from now on (``rate=0`` stops), optionally only those
        with some HTTP ``methods``; the counts start again from zero."""
        with self._lock:
            self.rate = rate
            self.kinds = [k for k in kinds.split(",") if k]
            self.methods = {m.strip().upper() for m in methods.split(",") if m.strip()}
            self._random = random.Random(seed)
            self._counts = Counter()

    def fault_counts(self) -> dict[str, int]:
        """Requests seen and faults injected, by kind, since the last ``set_faults``."""
        with self._lock:
            return dict(self._counts)

    def _draw(self, method: str) -> str | None:
        with self._lock:
            self._counts["requests"] += 1
            if self.methods and method not in self.methods:
                return None
            if self.rate <= 0 or self._random.random() >= self.rate:
                return None
            kind = self._random.choice(self.kinds)
            self._counts[kind] += 1
            return kind

    # -- life cycle ---------------------------------------------------------------------------

    def start(self) -> FaultProxy:
        ready = threading.Event()
        failure: list[BaseException] = []

        def serve() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self._open())
            except BaseException as exc:  # reported to start()
                failure.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(self._close())
            loop.close()

        self._thread = threading.Thread(target=serve, name="dcp-cloud-fault-proxy", daemon=True)
        self._thread.start()
        ready.wait(30)
        if failure:
            raise RuntimeError(f"the fault proxy could not listen on {self.endpoint_url}: {failure[0]}")
        return self

    def stop(self) -> None:
        if self._loop is not None and self._thread is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
            self._thread.join(30)
        self._loop = None
        self._thread = None

    def __enter__(self) -> FaultProxy:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    # -- the proxy ----------------------------------------------------------------------------

    async def _open(self) -> None:
        import aiohttp
        from aiohttp import web

        self._session = aiohttp.ClientSession(auto_decompress=False)
        app = web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = web.AppRunner(app, access_log=None)
        await self._runner.setup()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()

    async def _close(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
        if self._session is not None:
            await self._session.close()

    async def _handle(self, request: Any) -> Any:
        from aiohttp import web

        fault = self._draw(request.method)
        has_body = request.can_read_body
        if fault in ("503", "500"):
            await request.read()
            status = int(fault)
            return web.Response(
                status=status,
                text=f'{{"error": {{"code": {status}, "message": "injected by the fault proxy"}}}}',
                content_type="application/json",
            )
        if fault == "reset" and has_body:
            _cut(request)
            return web.Response(status=500)  # never reaches the client
        body = await request.read()
        headers = {k: v for k, v in request.headers.items() if k.lower() not in _SKIPPED_HEADERS}
        async with self._session.request(
            request.method,
            self.upstream + request.path_qs,
            headers=headers,
            data=body if has_body else None,
            skip_auto_headers=("Content-Type", "Accept-Encoding", "User-Agent", "Accept"),
            allow_redirects=False,
        ) as upstream:
            payload = await upstream.read()
            reply_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in _SKIPPED_HEADERS}
        if fault == "reset" and len(payload) > 1:
            response = web.StreamResponse(status=upstream.status, headers=reply_headers)
            response.content_length = len(payload)
            await response.prepare(request)
            await response.write(payload[: len(payload) // 2])
            _cut(request)
            return response
        return web.Response(status=upstream.status, headers=reply_headers, body=payload)


def _cut(request: Any) -> None:
    """Drop the client's connection without a proper end."""
    transport = request.transport
    if transport is not None:
        transport.abort() if hasattr(transport, "abort") else transport.close()


class Blackhole:
    """A TCP server on 127.0.0.1 that accepts every connection and never answers: a hung server,
    or a network path that drops the replies."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self._server: socket.socket | None = None
        self._accepted: list[socket.socket] = []
        self._thread: threading.Thread | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> Blackhole:
        server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        server.bind(("127.0.0.1", self.port))
        server.listen(256)
        self._server = server
        self._thread = threading.Thread(target=self._accept, name="dcp-cloud-blackhole", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        while self._server is not None:
            try:
                connection, _ = self._server.accept()
            except OSError:  # closed by stop()
                return
            self._accepted.append(connection)

    def stop(self) -> None:
        server, self._server = self._server, None
        if server is not None:
            server.close()
        for connection in self._accepted:
            connection.close()
        self._accepted.clear()

    def __enter__(self) -> Blackhole:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
