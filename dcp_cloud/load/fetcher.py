"""Executing a load's planned fetches within the memory budget.

Data flow: the planned :class:`~dcp_cloud.load.plan.FetchRange` s go in, in plan order. A
buffered range takes a pooled fetch buffer (its size counted against the budget) and is read
into it whole; a direct range is read straight into its destination tensor's memory (counted
against the budget only on stores whose client library buffers downloads). A range with landed
payloads is read with one request whose body is streamed piece by piece: each landed payload
into its destination, the bytes between them into a scratch buffer (counted against the
budget). Each other read is cut into concurrent ranged requests of at most ``part_size`` bytes.
As each range lands it is handed to the caller's callback (the reader commits or decodes it),
then its buffer and budget are released and the next ranges start. A failure cancels what is in
flight and raises :class:`~dcp_cloud.errors.CorruptCheckpointError` naming the object and its
tensors when the object is missing or short.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from ..buffers import ByteBudget, ReadBuffers
from ..errors import CorruptCheckpointError
from ..options import MiB, TransferOptions
from ..store.base import ObjectStore
from .direct import tensor_memory
from .plan import FetchRange, item_names, split_range

#: called with each landed range and its bytes (the fetch buffer, or the destination's memory)
OnFetched = Callable[[FetchRange, memoryview], None]


class Fetcher:
    """Runs planned fetches against ``store`` within ``options.memory_budget``."""

    def __init__(self, store: ObjectStore, options: TransferOptions) -> None:
        self.store = store
        self.options = options

    def run(self, ranges: list[FetchRange], on_fetched: OnFetched) -> int:
        """Fetch every range, handing each to ``on_fetched`` as it lands; the bytes requested.

        Direct reads hold no buffer of ours, so the budget bounds buffered ranges only (and
        direct ones where the client library buffers each download); a cap on the futures in
        flight bounds the rest while keeping the store's request slots busy.
        """
        self._check_large_ranges(ranges)
        opts = self.options
        budget = ByteBudget(opts.memory_budget)
        buffers = ReadBuffers(granule=MiB, limit=opts.memory_budget)
        waiting = deque(ranges)
        max_in_flight = 4 * opts.max_concurrency
        in_flight: dict[concurrent.futures.Future[Any], _InFlight] = {}
        fetched = 0
        try:
            while waiting or in_flight:
                while waiting and len(in_flight) < max_in_flight:
                    held = self._held_bytes(waiting[0], buffers)
                    if held and not budget.try_acquire(held):
                        break
                    pending = self._start(waiting.popleft(), buffers, held)
                    in_flight[pending.future] = pending
                    fetched += pending.size
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    pending = in_flight.pop(future)
                    data = self._fetched(pending.fetch, future)
                    on_fetched(pending.fetch, data)
                    del data
                    if pending.buffer is not None:
                        buffers.put(pending.buffer)
                    budget.release(pending.held)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
        return fetched

    def fetch_into(self, jobs: list[tuple[FetchRange, memoryview]]) -> int:
        """Fill each memoryview with its range's bytes, the ranges concurrently; the bytes
        requested. The caller holds the memory (counted against its own budget); a range
        larger than the memory budget is first probed for its end, as in :meth:`run`."""
        self._check_large_ranges([fetch for fetch, _ in jobs])
        max_in_flight = 4 * self.options.max_concurrency
        waiting = deque(jobs)
        in_flight: dict[concurrent.futures.Future[Any], FetchRange] = {}
        fetched = 0
        try:
            while waiting or in_flight:
                while waiting and len(in_flight) < max_in_flight:
                    fetch, out = waiting.popleft()
                    in_flight[self.store.submit(self._fetch(fetch.key, fetch.start, out))] = fetch
                    fetched += fetch.size
                done, _ = concurrent.futures.wait(in_flight, return_when=concurrent.futures.FIRST_COMPLETED)
                for future in done:
                    self._fetched(in_flight.pop(future), future)
        except BaseException:
            for future in in_flight:
                future.cancel()
            raise
        return fetched

    def _check_large_ranges(self, ranges: list[FetchRange]) -> None:
        """Each buffered range too large for the memory budget ends inside its object.

        Such a range gets a fetch buffer of its own whatever the budget, so a ``.metadata``
        claiming a huge item in a small object would otherwise have this process map that many
        bytes before the read finds the object short. One byte at the range's end is read first.
        A direct range needs no probe: its destination tensor already holds its size.
        """
        for fetch in ranges:
            if fetch.size > self.options.memory_budget and fetch.direct is None:
                self._fetched(fetch, self.store.submit(self._probe_end(fetch)))

    async def _probe_end(self, fetch: FetchRange) -> memoryview:
        data = await self.store.get_range(fetch.key, fetch.end - 1, fetch.end)
        if len(data) != 1:
            raise _ShortRead(0, fetch.size)
        return memoryview(data)

    def _held_bytes(self, fetch: FetchRange, buffers: ReadBuffers) -> int:
        """Memory a range holds while in flight, counted against the budget: its fetch buffer
        (for a range with landed payloads, its scratch buffer); for a direct read nothing,
        except on stores whose client library buffers downloads (then the pieces it holds at
        once)."""
        if fetch.landed and not self.store.buffers_downloads:
            return buffers.capacity(fetch.scratch_size) if fetch.scratch_size else 0
        if fetch.direct is None:
            return buffers.capacity(fetch.size)
        if not self.store.buffers_downloads:
            return 0
        return min(fetch.direct.payload.length, self.options.max_concurrency * self.options.part_size)

    def _start(self, fetch: FetchRange, buffers: ReadBuffers, held: int) -> _InFlight:
        """Submit one range: its payload straight into the destination tensor when it is a
        direct read, else the whole range into a fetch buffer."""
        store = self.store
        if fetch.direct is not None:
            start = fetch.start + fetch.direct.payload.offset
            future = store.submit(self._fetch(fetch.key, start, tensor_memory(fetch.direct.target)))
            return _InFlight(future, fetch, fetch.direct.payload.length, held)
        if fetch.landed:
            buffer, view = buffers.get(fetch.scratch_size) if fetch.scratch_size else (None, memoryview(b""))
            future = store.submit(self._fetch_pieces(fetch, view))
            return _InFlight(future, fetch, fetch.size, held, buffer)
        buffer, view = buffers.get(fetch.size)
        future = store.submit(self._fetch(fetch.key, fetch.start, view))
        return _InFlight(future, fetch, fetch.size, held, buffer)

    async def _fetch(self, key: str, start: int, out: memoryview) -> memoryview:
        """Fill ``out`` with the object's bytes from ``start``, in concurrent pieces of at most
        ``part_size`` bytes."""
        store = self.store

        async def piece(a: int, b: int) -> None:
            got = await store.read_into(key, a, out[a - start : b - start])
            if got != b - a:
                raise _ShortRead(a - start + got, len(out))

        pieces = split_range(start, start + len(out), self.options.part_size)
        await asyncio.gather(*(piece(a, b) for a, b in pieces))
        return out

    async def _fetch_pieces(self, fetch: FetchRange, scratch: memoryview) -> memoryview:
        """Read a range with landed payloads with one request: each payload into its
        destination, the rest of the range into ``scratch``; returns ``scratch``."""
        pieces: list[memoryview] = []
        used = 0
        for a, b, landing in fetch.pieces():
            if landing is None:
                pieces.append(scratch[used : used + b - a])
                used += b - a
            else:
                pieces.append(tensor_memory(landing.target))
        if used != len(scratch) or sum(len(p) for p in pieces) != fetch.size:
            raise AssertionError(f"the pieces of {fetch.key} [{fetch.start}, {fetch.end}) do not tile it")
        got = await self.store.read_into_pieces(fetch.key, fetch.start, pieces)
        if got != fetch.size:
            raise _ShortRead(got, fetch.size)
        return scratch

    def _fetched(self, fetch: FetchRange, future: concurrent.futures.Future[Any]) -> memoryview:
        """The fetched bytes, or the error that names the object and the tensors it held."""
        where = f"{self.store.url}/{fetch.key}"
        try:
            result: memoryview = future.result()
            return result
        except FileNotFoundError as exc:
            raise CorruptCheckpointError(
                f"{where} is missing, but .metadata references it (tensors {item_names(fetch.items)}). The "
                "checkpoint is damaged, or was overwritten while loading; load it again or "
                "load an earlier checkpoint."
            ) from exc
        except _ShortRead as exc:
            raise CorruptCheckpointError(
                f"{where} is truncated: read {exc.got} of {exc.wanted} bytes for tensors "
                f"{item_names(fetch.items)}. "
                "The checkpoint is damaged; load an earlier one."
            ) from None


@dataclass
class _InFlight:
    """A submitted range and what it holds until it lands."""

    future: concurrent.futures.Future[memoryview]
    fetch: FetchRange
    #: bytes requested
    size: int
    #: bytes counted against the memory budget until it lands
    held: int
    #: the fetch buffer of a buffered range
    buffer: Any = None


class _ShortRead(Exception):
    def __init__(self, got: int, wanted: int) -> None:
        super().__init__(f"read {got} of {wanted} bytes")
        self.got = got
        self.wanted = wanted
