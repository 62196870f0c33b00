"""An emulated-cloud TCP proxy on 127.0.0.1: per-request latency, per-connection bandwidth cap.

Real object stores answer each request after tens of milliseconds and serve each connection at a
limited rate (tens of MB/s), while many connections together go much faster. A local server
answers in a millisecond and lets one connection take all the bandwidth. This proxy sits between
the clients and a local server and puts back both costs:

- latency: every HTTP request is held for ``latency_ms`` before its first byte is forwarded to
  the server, so each request's time to first response byte grows by that much (one round trip
  of a distant region; a PUT's body waits behind its head, as it would).
- bandwidth: each connection is capped at ``bandwidth_mbps`` MB/s (1 MB = 1e6 bytes) in each
  direction, by a per-connection, per-direction token bucket; one stream is slow, many streams
  are fast. The cap is per connection, not in total.

It finds where each request starts (``benchmarks.shaping.RequestFramer``), and so it also counts
the requests by S3 operation and by method: request counts for servers that keep no log
(SeaweedFS, any ``--endpoint-url``). ``benchmarks.shaping`` holds the per-connection framing,
classifying and pacing; this module the server and the child process that runs it.

Run by the harness as a child process (``ProxyProcess``) that stops by itself when the harness's
pipe to it closes (the harness exited or died) or after ``--max-seconds``. The parent asks for
counts over that pipe: a line ``counts`` is answered with one JSON line, ``reset`` zeroes them.
Bounded: at most ``--max-connections`` client connections at once; 127.0.0.1 only.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import urllib.parse
from collections import Counter
from typing import Any

from benchmarks.shaping import Pacer, RequestFramer, request_kind

LISTEN_HOST = "127.0.0.1"
READ_CHUNK = 256 * 1024


class Proxy:
    """The proxy server (child side)."""

    def __init__(
        self,
        upstream: tuple[str, int],
        latency_s: float,
        bandwidth_bps: float | None,
        max_connections: int,
    ) -> None:
        self.upstream = upstream
        self.latency_s = latency_s
        self.bandwidth_bps = bandwidth_bps
        self.slots = asyncio.Semaphore(max_connections)
        self.kinds: Counter[str] = Counter()
        self.methods: Counter[str] = Counter()
        self.bytes_up = 0
        self.bytes_down = 0
        self.connections = 0
        self.active = 0
        self.max_active = 0

    def counts(self) -> dict[str, Any]:
        return {
            "kinds": dict(sorted(self.kinds.items())),
            "methods": dict(sorted(self.methods.items())),
            "bytes_up": self.bytes_up,
            "bytes_down": self.bytes_down,
            "connections": self.connections,
            "max_active_connections": self.max_active,
        }

    def reset(self) -> None:
        self.kinds.clear()
        self.methods.clear()
        self.bytes_up = self.bytes_down = self.connections = 0
        self.max_active = self.active

    async def handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        with contextlib.suppress(asyncio.CancelledError):  # cancelled only when the proxy stops
            await self._handle(client_r, client_w)

    async def _handle(self, client_r: asyncio.StreamReader, client_w: asyncio.StreamWriter) -> None:
        async with self.slots:
            self.connections += 1
            self.active += 1
            self.max_active = max(self.max_active, self.active)
            try:
                server_r, server_w = await asyncio.open_connection(*self.upstream)
            except OSError:
                self.active -= 1
                client_w.close()
                return
            up = asyncio.create_task(self._upstream(client_r, server_w))
            down = asyncio.create_task(self._downstream(server_r, client_w))
            try:
                await asyncio.wait({up, down}, return_when=asyncio.FIRST_COMPLETED)
                # A client that half-closes still gets its answer; a server that closes ends it.
                if down.done():
                    up.cancel()
                else:
                    with contextlib.suppress(asyncio.TimeoutError):
                        await asyncio.wait_for(asyncio.shield(down), timeout=600)
            finally:
                for task in (up, down):
                    task.cancel()
                for writer in (server_w, client_w):
                    with contextlib.suppress(Exception):
                        writer.close()
                self.active -= 1

    async def _upstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        framer = RequestFramer()
        pacer = Pacer(self.bandwidth_bps)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    with contextlib.suppress(OSError):
                        writer.write_eof()
                    return
                for starts, piece in framer.feed(data):
                    if starts:
                        method, target = framer.requests.pop(0)
                        self.kinds[request_kind(method, target)] += 1
                        self.methods[method] += 1
                        if self.latency_s:
                            await writer.drain()
                            await asyncio.sleep(self.latency_s)
                    await pacer.pace(len(piece))
                    writer.write(piece)
                    self.bytes_up += len(piece)
                    await writer.drain()

    async def _downstream(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        pacer = Pacer(self.bandwidth_bps)
        with contextlib.suppress(ConnectionError, asyncio.CancelledError):
            while True:
                data = await reader.read(READ_CHUNK)
                if not data:
                    return
                await pacer.pace(len(data))
                writer.write(data)
                self.bytes_down += len(data)
                await writer.drain()


async def _serve(args: argparse.Namespace) -> None:
    host, _, port = args.upstream.rpartition(":")
    proxy = Proxy(
        (host, int(port)),
        args.latency_ms / 1000.0,
        args.bandwidth_mbps * 1e6 if args.bandwidth_mbps else None,
        args.max_connections,
    )
    request_kind("GET", "/")  # load the request classifier before serving
    server = await asyncio.start_server(proxy.handle, LISTEN_HOST, args.port, backlog=256)
    loop = asyncio.get_running_loop()
    stdin = asyncio.StreamReader()
    await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(stdin), sys.stdin)
    print(json.dumps({"port": server.sockets[0].getsockname()[1]}), flush=True)

    async def control() -> None:
        while True:
            line = await stdin.readline()
            if not line:  # the harness is gone
                return
            command = line.decode().strip()
            if command == "counts":
                print(json.dumps(proxy.counts()), flush=True)
            elif command == "reset":
                proxy.reset()
                print("{}", flush=True)
            elif command == "stop":
                return

    try:
        await asyncio.wait_for(control(), timeout=args.max_seconds)
    except asyncio.TimeoutError:
        pass
    server.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.proxy", description=__doc__.split("\n\n")[0])
    parser.add_argument("--upstream", required=True, help="HOST:PORT of the server")
    parser.add_argument("--port", type=int, default=0, help="port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--latency-ms", type=float, default=0.0)
    parser.add_argument("--bandwidth-mbps", type=float, default=0.0, help="MB/s per connection (0: no cap)")
    parser.add_argument("--max-connections", type=int, default=256)
    parser.add_argument("--max-seconds", type=float, default=6 * 3600, help="stop after this long")
    args = parser.parse_args(argv)
    asyncio.run(_serve(args))
    return 0


class ProxyProcess:
    """The proxy in a child process (parent side); a context manager."""

    def __init__(self, upstream_url: str, latency_ms: float, bandwidth_mbps: float) -> None:
        parts = urllib.parse.urlsplit(upstream_url)
        if parts.scheme != "http" or parts.hostname not in ("127.0.0.1", "localhost"):
            raise ValueError(f"the proxy fronts a local http server only, not {upstream_url}")
        self.upstream = f"{parts.hostname}:{parts.port or 80}"
        self.latency_ms = latency_ms
        self.bandwidth_mbps = bandwidth_mbps
        self.port = 0
        self._process: subprocess.Popen[str] | None = None

    @property
    def url(self) -> str:
        return f"http://{LISTEN_HOST}:{self.port}"

    def start(self) -> ProxyProcess:
        self._process = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "benchmarks.proxy",
                "--upstream",
                self.upstream,
                "--latency-ms",
                str(self.latency_ms),
                "--bandwidth-mbps",
                str(self.bandwidth_mbps),
            ],
            cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            text=True,
        )
        assert self._process.stdout is not None
        line = self._process.stdout.readline()
        if not line:
            raise RuntimeError(f"the proxy exited with code {self._process.wait()}")
        self.port = int(json.loads(line)["port"])
        return self

    def _ask(self, command: str) -> dict[str, Any]:
        assert self._process is not None and self._process.stdin and self._process.stdout
        self._process.stdin.write(command + "\n")
        self._process.stdin.flush()
        return dict(json.loads(self._process.stdout.readline()))

    def counts(self) -> dict[str, Any]:
        return self._ask("counts")

    def reset(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        if self._process is None:
            return
        with contextlib.suppress(OSError):
            assert self._process.stdin is not None
            self._process.stdin.close()
        try:
            self._process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self._process.terminate()
            self._process.wait()
        self._process = None

    def __enter__(self) -> ProxyProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


if __name__ == "__main__":
    sys.exit(main())
