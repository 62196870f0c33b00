"""A part's bytes as an HTTP request body that neither botocore nor aiohttp copies."""

from __future__ import annotations

from collections.abc import AsyncIterator


class PartBody:
    """A part's bytes as botocore, gcsfs and aiohttp take them without copying.

    botocore hashes and checksums it through ``read``, which hands out slices of the part buffer;
    aiohttp sends it as an async iterable of 1 MiB slices, waiting for the socket between them.
    (A bytes body would be copied whole into the transport's write buffer, doubling the memory in
    flight; a file object would be read 64 KiB at a time through a thread pool and copied twice
    per read, on the event loop that every transfer shares.) ``seek(0)`` rewinds it for a retry,
    and every iteration sends the whole part. Deliberately not an ``io.IOBase``: aiobotocore and
    aiohttp would treat that as a file.

    aiohttp cannot tell an iterable's length: send ``Content-Length: len(body)`` with it.
    """

    _SEND_CHUNK = 1024 * 1024

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        self._view = memoryview(data).cast("B")
        self._position = 0

    def __len__(self) -> int:
        return len(self._view)

    def read(self, size: int | None = -1) -> memoryview:
        end = len(self._view) if size is None or size < 0 else min(len(self._view), self._position + size)
        chunk = self._view[self._position : end]
        self._position = max(self._position, end)
        return chunk

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: len(self._view)}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        # each send is of the whole part (retries included), whatever was read before
        for start in range(0, len(self._view), self._SEND_CHUNK):
            yield self._view[start : start + self._SEND_CHUNK]
