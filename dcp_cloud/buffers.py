"""Bounded memory: reusable part buffers for uploads, a byte budget for downloads."""

from __future__ import annotations

import io
import mmap
import threading
from typing import Any


class BufferPool:
    """At most ``count`` writable buffers of ``size`` bytes, handed out and given back.

    ``get`` blocks while all buffers are in use: that is the back-pressure that keeps an upload
    within its memory budget. Each buffer is an anonymous memory map, so it costs memory only
    for the pages written into it: a part that copies a few KiB of records into a 16 MiB buffer
    holds a few KiB, not 16 MiB. Buffers are reused.
    """

    def __init__(self, size: int, count: int) -> None:
        if count < 1:
            raise ValueError("a buffer pool needs at least one buffer")
        self.size = size
        self.count = count
        self._free: list[mmap.mmap] = []
        self._allocated = 0
        self._cond = threading.Condition()

    def get(self) -> mmap.mmap:
        with self._cond:
            while not self._free and self._allocated >= self.count:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._allocated += 1
        return mmap.mmap(-1, self.size)

    def put(self, buffer: mmap.mmap) -> None:
        with self._cond:
            self._free.append(buffer)
            self._cond.notify()


class ByteBudget:
    """A count of bytes in use, never above ``limit`` (a single request larger than the limit
    is admitted alone)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._lock = threading.Lock()

    def try_acquire(self, n: int) -> bool:
        with self._lock:
            if self.used and self.used + n > self.limit:
                return False
            self.used += n
            return True

    def release(self, n: int) -> None:
        with self._lock:
            self.used -= n


class ReadBuffers:
    """Fetch buffers for one load, reused by capacity, never more than ``limit`` bytes in all.

    Each buffer is an anonymous memory map: the kernel supplies zeroed pages on first touch, so
    there is no extra zero-fill pass, and a reused buffer costs no page faults at all. Capacities
    are rounded up to ``granule`` so ranges of similar size share buffers. When a new buffer
    would take the total past ``limit``, free buffers are dropped first (a single range larger
    than the limit still gets its buffer: it cannot be decoded in pieces).
    """

    def __init__(self, granule: int, limit: int) -> None:
        self.granule = granule
        self.limit = limit
        self._free: dict[int, list[mmap.mmap]] = {}
        self._allocated = 0
        self._lock = threading.Lock()

    def capacity(self, size: int) -> int:
        """Bytes a buffer for ``size`` bytes occupies."""
        return max(self.granule, -(-size // self.granule) * self.granule)

    def get(self, size: int) -> tuple[mmap.mmap, memoryview]:
        """A buffer of at least ``size`` bytes, and a view of exactly ``size`` bytes of it."""
        capacity = self.capacity(size)
        with self._lock:
            free = self._free.get(capacity)
            if free:
                buffer = free.pop()
                return buffer, memoryview(buffer)[:size]
            for other in list(self._free):
                if self._allocated + capacity <= self.limit:
                    break
                for dropped in self._free.pop(other):
                    self._allocated -= len(dropped)  # unmapped once the last view is gone
            self._allocated += capacity
        buffer = mmap.mmap(-1, capacity)
        return buffer, memoryview(buffer)[:size]

    def put(self, buffer: mmap.mmap) -> None:
        """Give a buffer back for reuse."""
        with self._lock:
            self._free.setdefault(len(buffer), []).append(buffer)


class ViewReader(io.RawIOBase):
    """A seekable, read-only file over a memoryview: bytes are copied out only when read."""

    def __init__(self, data: bytes | bytearray | memoryview) -> None:
        super().__init__()
        self._view = memoryview(data).cast("B")
        self._pos = 0

    def __len__(self) -> int:
        return len(self._view)

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, buffer: Any) -> int:
        n = max(0, min(len(buffer), len(self._view) - self._pos))
        memoryview(buffer).cast("B")[:n] = self._view[self._pos : self._pos + n]
        self._pos += n
        return n

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: len(self._view)}[whence]
        self._pos = base + offset
        return self._pos

    def tell(self) -> int:
        return self._pos
