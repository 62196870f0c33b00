"""Cutting an object's byte stream into multipart parts made of pieces.

A part is a list of pieces sent one after the other as one request body: slices of pooled
*segment* buffers that hold copied bytes (torch.save's zip records, alignment padding, small
tensors, pickled objects), and read-only views of large tensors' own memory, which are never
copied. A segment is shared by every part that holds a slice of it and goes back to the pool
once it is full (or its object closed) and the last of those parts has been sent; the pool's
size is what bounds the copied bytes in memory. When nothing is referenced, parts and segments
line up: each part is exactly one segment, one piece.
"""

from __future__ import annotations

import mmap
import threading
from collections.abc import Callable

from ..buffers import BufferPool


class _Segment:
    """A pool buffer that copied bytes go into, and how many unsent parts hold slices of it."""

    __slots__ = ("buffer", "fill", "holders", "retired")

    def __init__(self, buffer: mmap.mmap) -> None:
        self.buffer = buffer
        self.fill = 0
        self.holders = 0
        self.retired = False  # no more bytes go in: back to the pool when no part holds it


class Part:
    """One part's bytes, as pieces; valid until :meth:`PartBuilder.release`."""

    __slots__ = ("pieces", "size", "_segments", "_last", "_last_start", "_last_end")

    def __init__(self) -> None:
        self.pieces: list[memoryview] = []
        self.size = 0
        self._segments: list[_Segment] = []
        self._last: _Segment | None = None  # the segment the last piece is a slice of
        self._last_start = 0
        self._last_end = 0


class PartBuilder:
    """Fills parts of ``part_size`` bytes from copied and referenced bytes.

    ``copy`` and ``reference`` hand each part to ``full`` as soon as it is complete (so that it
    can be sent while they go on); ``take`` hands over the unfinished last part; ``release``
    gives a sent part's segment slices back. ``copy`` blocks while every pool buffer is held by
    unsent parts. Only the writing thread calls ``copy``,
    ``reference``, ``take`` and ``close``; ``release`` may come from any thread.
    """

    def __init__(self, pool: BufferPool, part_size: int, full: Callable[[Part], None]) -> None:
        self.pool = pool
        self.part_size = part_size
        self._full = full
        self._part = Part()
        self._segment: _Segment | None = None
        self._lock = threading.Lock()

    def copy(self, view: memoryview) -> None:
        """Copy ``view`` (valid only during this call) into segment buffers."""
        while view:
            segment = self._segment
            if segment is None or segment.fill == len(segment.buffer):
                if segment is not None:
                    self._retire(segment)
                    self._segment = None
                segment = self._segment = _Segment(self.pool.get())
            part = self._part
            n = min(len(view), self.part_size - part.size, len(segment.buffer) - segment.fill)
            start = segment.fill
            segment.buffer[start : start + n] = view[:n]
            segment.fill += n
            self._add_copied(part, segment, start, start + n)
            view = view[n:]
            if part.size == self.part_size:
                self._full(self._next())

    def reference(self, view: memoryview) -> None:
        """Add ``view`` as it is: its memory must stay valid and unchanged until every part
        holding a slice of it is released."""
        while view:
            part = self._part
            n = min(len(view), self.part_size - part.size)
            part.pieces.append(view[:n])
            part.size += n
            part._last = None
            view = view[n:]
            if part.size == self.part_size:
                self._full(self._next())

    def take(self) -> Part | None:
        """The unfinished last part (None if empty); the builder starts a new one."""
        if self._part.size == 0:
            return None
        return self._next()

    def close(self) -> None:
        """No more bytes: the current segment goes back to the pool once its parts are sent."""
        if self._segment is not None:
            self._retire(self._segment)
            self._segment = None

    def release(self, part: Part) -> None:
        """``part`` was sent (or dropped): its pieces must no longer be used."""
        part.pieces.clear()
        with self._lock:
            for segment in part._segments:
                segment.holders -= 1
                if segment.holders == 0 and segment.retired:
                    self.pool.put(segment.buffer)
        part._segments.clear()

    # -- internals -----------------------------------------------------------------------------

    def _next(self) -> Part:
        part, self._part = self._part, Part()
        return part

    def _add_copied(self, part: Part, segment: _Segment, start: int, end: int) -> None:
        if part._last is segment and part._last_end == start:  # extends the last piece
            part.pieces[-1] = memoryview(segment.buffer)[part._last_start : end]
        else:
            part.pieces.append(memoryview(segment.buffer)[start:end])
            part._last_start = start
            if not part._segments or part._segments[-1] is not segment:
                with self._lock:
                    segment.holders += 1
                part._segments.append(segment)
        part._last = segment
        part._last_end = end
        part.size += end - start

    def _retire(self, segment: _Segment) -> None:
        with self._lock:
            segment.retired = True
            if segment.holders == 0:
                self.pool.put(segment.buffer)
