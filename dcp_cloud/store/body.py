"""A part's bytes as an HTTP request body that neither botocore nor aiohttp copies."""

from __future__ import annotations

import bisect
from collections.abc import AsyncIterator, Sequence
from typing import cast


class PartBody:
    """A part's bytes as botocore, gcsfs and aiohttp take them without copying.

    botocore hashes and checksums it through ``read``, which hands out slices of the part buffer;
    aiohttp sends it as an async iterable of 1 MiB slices, waiting for the socket between them.
    (A bytes body would be copied whole into the transport's write buffer, doubling the memory in
    flight; a file object would be read 64 KiB at a time through a thread pool and copied twice
    per read, on the event loop that every transfer shares.) ``seek(0)`` rewinds it for a retry,
    and every iteration sends the whole part. Deliberately not an ``io.IOBase``: aiobotocore and
    aiohttp would treat that as a file.

    The bytes may come in several pieces (buffers sent one after the other as one body, or another
    ``PartBody``, whose pieces it shares): ``read``
    then never crosses a piece's end, as a stream may return fewer bytes than asked for, except
    ``read()`` of everything left, which joins them (a copy).

    aiohttp cannot tell an iterable's length: send ``Content-Length: len(body)`` with it.
    """

    _SEND_CHUNK = 1024 * 1024

    def __init__(
        self,
        data: bytes | bytearray | memoryview | Sequence[bytes | bytearray | memoryview] | PartBody,
    ) -> None:
        pieces: list[bytes | bytearray | memoryview]
        if isinstance(data, PartBody):  # the same pieces, read from the start
            pieces = list(data._pieces)
        elif isinstance(data, (list, tuple)):
            pieces = list(data)
        else:
            pieces = [cast("bytes | bytearray | memoryview", data)]
        self._pieces: list[memoryview] = [
            view for view in (memoryview(piece).cast("B") for piece in pieces) if len(view)
        ]
        self._starts: list[int] = []
        total = 0
        for view in self._pieces:
            self._starts.append(total)
            total += len(view)
        self._length = total
        self._position = 0

    def __len__(self) -> int:
        return self._length

    def read(self, size: int | None = -1) -> memoryview:
        start = min(self._position, self._length)
        end = self._length if size is None or size < 0 else min(self._length, start + size)
        self._position = max(self._position, end)
        if end <= start:
            return memoryview(b"")
        index = bisect.bisect_right(self._starts, start) - 1
        view, offset = self._pieces[index], self._starts[index]
        if end <= offset + len(view):
            return view[start - offset : end - offset]
        if size is None or size < 0:  # everything left, across pieces: one joined copy
            rest = [view[start - offset :], *self._pieces[index + 1 :]]
            return memoryview(b"".join(rest))
        self._position = offset + len(view)
        return view[start - offset :]

    def seek(self, offset: int, whence: int = 0) -> int:
        base = {0: 0, 1: self._position, 2: self._length}[whence]
        self._position = base + offset
        return self._position

    def tell(self) -> int:
        return self._position

    async def __aiter__(self) -> AsyncIterator[memoryview]:
        # each send is of the whole part (retries included), whatever was read before
        for view in self._pieces:
            for start in range(0, len(view), self._SEND_CHUNK):
                yield view[start : start + self._SEND_CHUNK]
