"""Bounded memory: reusable part buffers for uploads, a byte budget for downloads."""

from __future__ import annotations

import threading


class BufferPool:
    """At most ``count`` bytearrays of ``size`` bytes, handed out and given back.

    ``get`` blocks while all buffers are in use: that is the back-pressure that keeps an upload
    within its memory budget. Buffers are reused, so they are allocated (and zero-filled) once.
    """

    def __init__(self, size: int, count: int) -> None:
        if count < 1:
            raise ValueError("a buffer pool needs at least one buffer")
        self.size = size
        self.count = count
        self._free: list[bytearray] = []
        self._allocated = 0
        self._cond = threading.Condition()

    def get(self) -> bytearray:
        with self._cond:
            while not self._free and self._allocated >= self.count:
                self._cond.wait()
            if self._free:
                return self._free.pop()
            self._allocated += 1
        return bytearray(self.size)

    def put(self, buffer: bytearray) -> None:
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
