"""PartBody: a part sent by aiohttp in slices of the part's own memory, rewound for retries."""

from __future__ import annotations

import asyncio
import os

import aiohttp
from aiohttp import web

from dcp_cloud.store.body import PartBody

MiB = 1024 * 1024


def test_read_seek_and_tell_hand_out_slices_of_the_part() -> None:
    data = bytearray(os.urandom(3 * MiB + 5))
    body = PartBody(data)
    assert len(body) == len(data)
    first = body.read(MiB)
    assert bytes(first) == data[:MiB] and body.tell() == MiB
    assert first.obj is memoryview(data).obj  # a view of the part, not a copy
    assert bytes(body.read()) == data[MiB:] and body.tell() == len(data)
    assert body.read(10) == b""
    assert body.seek(0) == 0
    assert bytes(body.read(-1)) == data
    assert body.seek(-5, 2) == len(data) - 5 and bytes(body.read()) == data[-5:]


def test_every_iteration_yields_the_whole_part_in_one_mib_slices() -> None:
    data = os.urandom(2 * MiB + 1)
    body = PartBody(data)
    body.read(MiB)  # what a checksum pass read first does not shorten a send

    async def collect() -> list[bytes]:
        return [bytes(chunk) async for chunk in body]

    for _ in range(2):  # a retry sends it again
        chunks = asyncio.run(collect())
        assert [len(c) for c in chunks] == [MiB, MiB, 1]
        assert b"".join(chunks) == data


def test_aiohttp_sends_it_with_a_length_and_no_chunked_encoding() -> None:
    data = os.urandom(3 * MiB + 7)
    seen: dict[str, object] = {}

    async def receive(request: web.Request) -> web.Response:
        seen["headers"] = dict(request.headers)
        seen["body"] = await request.read()
        return web.Response(text="ok")

    async def exchange() -> None:
        app = web.Application(client_max_size=8 * MiB)
        app.router.add_post("/upload", receive)
        runner = web.AppRunner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        try:
            async with aiohttp.ClientSession() as session:
                async with session.post(
                    f"http://127.0.0.1:{port}/upload",
                    data=PartBody(data),
                    headers={"Content-Length": str(len(data))},
                ) as response:
                    assert response.status == 200
        finally:
            await runner.cleanup()

    asyncio.run(exchange())
    headers = seen["headers"]
    assert isinstance(headers, dict)
    assert headers.get("Content-Length") == str(len(data))
    assert "Transfer-Encoding" not in headers
    assert seen["body"] == data
