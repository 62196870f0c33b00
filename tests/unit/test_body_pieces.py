"""PartBody over several pieces: one body, sent and hashed without joining the pieces."""

from __future__ import annotations

import asyncio
import hashlib
import os

from dcp_cloud.store.body import PartBody

MiB = 1024 * 1024


def test_reads_stop_at_piece_ends_and_cover_every_byte_in_order() -> None:
    first, second = bytearray(os.urandom(MiB + 3)), os.urandom(2 * MiB + 1)
    body = PartBody([memoryview(first), second])
    assert len(body) == len(first) + len(second)
    chunks = list(iter(lambda: body.read(MiB), b""))
    assert [len(c) for c in chunks] == [MiB, 3, MiB, MiB, 1]
    assert chunks[0].obj is first  # views of the pieces, not copies
    assert b"".join(bytes(c) for c in chunks) == bytes(first) + second
    assert body.tell() == len(body) and body.read(5) == b""


def test_seek_and_read_everything_left_across_pieces() -> None:
    first, second = os.urandom(100), os.urandom(50)
    body = PartBody([first, b"", second])
    body.seek(90)
    assert bytes(body.read()) == first[90:] + second
    body.seek(-10, 2)
    assert bytes(body.read(100)) == second[-10:]
    body.seek(0)
    digest = hashlib.sha256()
    for chunk in iter(lambda: body.read(64), b""):  # how botocore hashes a body
        digest.update(chunk)
    assert digest.hexdigest() == hashlib.sha256(first + second).hexdigest()


def test_each_iteration_sends_all_pieces_in_slices() -> None:
    first, second = os.urandom(MiB + 1), os.urandom(5)
    body = PartBody([first, second])
    body.read(MiB)

    async def collect() -> list[bytes]:
        return [bytes(chunk) async for chunk in body]

    for _ in range(2):  # a retry sends it again
        chunks = asyncio.run(collect())
        assert [len(c) for c in chunks] == [MiB, 1, 5]
        assert b"".join(chunks) == first + second
