"""The transport: one small async interface over an object store.

Everything above this layer speaks in keys relative to the checkpoint's root. Each store runs its
coroutines on one event loop (fsspec's I/O loop), and callers on ordinary threads use ``run`` and
``submit``. Requests are bounded by ``max_concurrency`` and counted for the stats.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
from collections.abc import Coroutine
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import fsspec.asyn

from ..stats import RequestCounter

T = TypeVar("T")


@dataclass(frozen=True)
class ObjectInfo:
    """One object in a listing: its key relative to the store root, size and modification time."""

    key: str
    size: int
    modified: float | None = None


@dataclass
class PendingUpload:
    """An upload found in the store that was never completed or aborted.

    ``last_activity`` is when it last made progress (its newest part, or its start).
    """

    key: str
    last_activity: float
    upload: MultipartUpload


@dataclass
class MultipartUpload:
    """An upload in progress; ``state`` is the store's own (an upload id, a file handle)."""

    key: str
    state: Any = None
    parts: dict[int, Any] = field(default_factory=dict)


@runtime_checkable
class WritesInPlace(Protocol):
    """A store that takes an upload's bytes straight from the caller's memory (a local file, where
    copying into part buffers first would only cost a second copy)."""

    def write_in_place(
        self, upload: MultipartUpload, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Write ``data`` at ``offset`` of an upload now, in the calling thread."""


class ObjectStore(abc.ABC):
    """Async operations on objects under one root (bucket plus prefix, or a folder).

    Missing objects raise ``FileNotFoundError``; a missing bucket raises
    ``BucketNotFoundError``; refused credentials raise ``StoreAccessError``; ``put`` with
    ``if_absent=True`` on an existing key raises ``FileExistsError``.
    """

    #: whether ``put(if_absent=True)`` is enforced by the store itself, atomically
    supports_conditional_put: bool = False
    #: whether the writer's default object size is one part: where an object of several parts
    #: costs much more than that many one-part objects (GCS: an upload and a delete per part,
    #: plus a compose that rewrites the bytes on emulators)
    prefers_one_part_objects: bool = False
    #: whether ``read_into`` holds the whole range in the client library's own buffer before
    #: copying it out (Azure's SDK does), so even reads into the destination cost memory
    buffers_downloads: bool = False

    def __init__(self, url: str, root: str, max_concurrency: int = 16) -> None:
        self.url = url
        self.root = root.rstrip("/")
        self.max_concurrency = max_concurrency
        self.counter = RequestCounter()
        #: seconds one request may take, retries included (None: no limit)
        self.deadline: float | None = None
        self._semaphore: asyncio.Semaphore | None = None

    @property
    def writes_in_place(self) -> bool:
        """Whether this store is a :class:`WritesInPlace` store."""
        return isinstance(self, WritesInPlace)

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.url!r})"

    # -- running coroutines from ordinary threads ---------------------------------------------

    @property
    def loop(self) -> asyncio.AbstractEventLoop:
        """The event loop this store's coroutines run on."""
        return fsspec.asyn.get_loop()

    def submit(self, coro: Coroutine[Any, Any, T]) -> concurrent.futures.Future[T]:
        """Schedule ``coro`` on the store's loop; returns a thread-safe future."""
        return asyncio.run_coroutine_threadsafe(coro, self.loop)

    def run(self, coro: Coroutine[Any, Any, T]) -> T:
        """Run ``coro`` on the store's loop and wait for its result."""
        return self.submit(coro).result()

    def _slots(self) -> asyncio.Semaphore:
        if self._semaphore is None:
            self._semaphore = asyncio.Semaphore(self.max_concurrency)
        return self._semaphore

    async def _request(self, kind: str, coro: Coroutine[Any, Any, T]) -> T:
        """Await one store request under the concurrency bound, counting it."""
        async with self._slots():
            self.counter.request(kind)
            if self.deadline is None:
                return await coro
            try:
                return await asyncio.wait_for(coro, self.deadline)
            except asyncio.TimeoutError:
                raise TimeoutError(
                    f"{self.url}: a {kind} request did not finish within the {self.deadline:g} s "
                    "deadline (retries included); raise `deadline`, or check the store's health"
                ) from None

    # -- the operations -----------------------------------------------------------------------

    @abc.abstractmethod
    async def put(self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool = False) -> None:
        """Write a whole object in one atomic request. ``data`` may be a view of a buffer that
        the caller reuses once this returns: keep no reference to it."""

    @abc.abstractmethod
    async def get(self, key: str) -> bytes:
        """Read a whole object."""

    @abc.abstractmethod
    async def get_range(self, key: str, start: int, end: int) -> bytes:
        """Read bytes ``[start, end)`` of an object."""

    async def read_into(self, key: str, start: int, out: memoryview) -> int:
        """Read bytes ``[start, start + len(out))`` of an object into ``out``; returns the count
        read (less than ``len(out)`` only when the object ends first)."""
        data = await self.get_range(key, start, start + len(out))
        out[: len(data)] = data
        return len(data)

    @abc.abstractmethod
    async def exists(self, key: str) -> bool:
        """Whether an object exists."""

    @abc.abstractmethod
    async def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        """All objects whose key starts with ``prefix`` (recursively)."""

    @abc.abstractmethod
    async def delete(self, keys: list[str]) -> None:
        """Delete objects; missing ones are ignored."""

    @abc.abstractmethod
    async def start_upload(self, key: str) -> MultipartUpload:
        """Begin a multipart upload of ``key``; nothing is visible until ``complete_upload``."""

    @abc.abstractmethod
    async def upload_part(
        self, upload: MultipartUpload, part_number: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        """Send part ``part_number`` (1-based) that starts at byte ``offset`` of the object."""

    @abc.abstractmethod
    async def complete_upload(self, upload: MultipartUpload) -> None:
        """Make the object visible, atomically, from all parts sent."""

    @abc.abstractmethod
    async def abort_upload(self, upload: MultipartUpload) -> None:
        """Discard an upload; never raises for an upload that is already gone."""

    async def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        """Uploads under ``prefix`` that were started and never finished (none by default:
        stores whose uploads leave nothing behind)."""
        return []
