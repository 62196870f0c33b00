"""The transport: one small async interface over an object store.

Everything above this layer speaks in keys relative to the checkpoint's root. Each store runs its
coroutines on one event loop (fsspec's I/O loop), and callers on ordinary threads use ``run`` and
``submit``. Requests are bounded by ``max_concurrency`` and counted for the stats.

Every operation refuses a key that is not confined to the store's root (``..`` or ``.``
segments, absolute paths, empty segments, backslashes, schemes: see
:func:`dcp_cloud.store.keys.key_problem`) with ``UnsafeCheckpointError`` before any client library
sees it, so no caller can reach another folder, bucket or container however a library
normalizes names.

Each request has one retry layer, :meth:`ObjectStore._request`: failures the store calls
transient (refused or timed-out connections, cut-off bodies, throttling and 5xx answers) are
tried again with jittered exponential backoff, up to ``max_attempts`` tries and only while less
than ``retry_window`` seconds have passed since the first failure; then the request fails with
``StoreUnavailableError``. The client libraries' own retries are switched off where ours run.
"""

from __future__ import annotations

import abc
import asyncio
import concurrent.futures
import functools
import ipaddress
import random
import re
import time
import urllib.parse
from collections.abc import Awaitable, Callable, Coroutine, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, TypeVar, runtime_checkable

import fsspec.asyn

from ..errors import StoreUnavailableError, UnsafeCheckpointError
from ..options import RETRY_WINDOW
from ..stats import RequestCounter
from .keys import key_problem

T = TypeVar("T")

#: first and largest pause between two tries of a request, in seconds
BACKOFF_BASE = 0.5
BACKOFF_MAX = 8.0

# Operations whose first argument is one key, a list of keys, a listing prefix or an upload.
_KEY_OPERATIONS = (
    "put",
    "put_pieces",
    "get",
    "get_range",
    "read_into",
    "read_into_pieces",
    "exists",
    "start_upload",
)
_KEYS_OPERATIONS = ("delete",)
_PREFIX_OPERATIONS = ("list_objects", "list_uploads")
_UPLOAD_OPERATIONS = ("upload_part", "complete_upload", "abort_upload")


def check_key(key: Any, store: str) -> str:
    """``key`` itself when it names an object inside the store's root, else
    ``UnsafeCheckpointError`` naming it."""
    problem = key_problem(key)
    if problem is not None:
        raise UnsafeCheckpointError(
            f"{store}: refused the key {key!r}, which {problem}: store operations take only keys "
            "inside the store's root (relative, no '.' or '..' segments, no empty segments). "
            "Nothing was sent to the store; if the key came from a checkpoint's files, that "
            "checkpoint may have been crafted."
        )
    return str(key)


def check_prefix(prefix: Any, store: str) -> str:
    """A listing prefix: empty (the whole root), or a key, optionally ending with ``/``."""
    if prefix == "":
        return prefix
    check_key(prefix[:-1] if isinstance(prefix, str) and prefix.endswith("/") else prefix, store)
    return str(prefix)


def _guarded(name: str, method: Callable[..., Any]) -> Callable[..., Any]:
    """``method`` with its key argument checked first (see :func:`check_key`)."""

    def check(self: ObjectStore, first: Any) -> None:
        if name in _KEY_OPERATIONS:
            check_key(first, self.url)
        elif name in _KEYS_OPERATIONS:
            for key in first:
                check_key(key, self.url)
        elif name in _PREFIX_OPERATIONS:
            check_prefix(first, self.url)
        else:
            check_key(getattr(first, "key", None), self.url)

    @functools.wraps(method)
    async def guarded(self: ObjectStore, *args: Any, **kwargs: Any) -> Any:
        if args:
            check(self, args[0])
        elif kwargs:
            check(self, next(iter(kwargs.values())))
        return await method(self, *args, **kwargs)

    guarded.__dcp_key_guard__ = True  # type: ignore[attr-defined]
    return guarded


def describe_error(exc: BaseException) -> str:
    """An exception's type and first line, without URL query strings or user-info (where
    presigned URLs and SAS tokens travel)."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = re.sub(r"\?[^\s\"'<>]*", "", text)
    text = re.sub(r"([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@\s]*@", r"\1", text)
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def redacted_endpoint(url: str | None) -> str:
    """``scheme://host[:port]`` of an endpoint URL, nothing else."""
    if not url:
        return "the store's endpoint"
    match = re.match(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)(?:[^/@]*@)?([^/?#]*)", url)
    return f"{match.group(1)}{match.group(2)}" if match else "the store's endpoint"


def is_loopback_endpoint(endpoint: str) -> bool:
    """Whether ``endpoint`` (a URL) is a server on this machine: ``localhost`` or a loopback
    address."""
    host = urllib.parse.urlsplit(endpoint).hostname
    if not host:
        return False
    if host == "localhost" or host.endswith(".localhost"):
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


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
    #: whether ``read_into_pieces`` streams one request's body into the pieces as it arrives
    #: (else it reads the range into a buffer of its own and copies it out)
    reads_into_pieces: bool = False
    #: whether ``upload_part`` and ``put_pieces`` send a body made of several buffers (a
    #: ``PartBody``) without joining them: the writer then sends large CPU tensors from their
    #: own memory instead of copying them into part buffers
    sends_part_pieces: bool = False

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        names = _KEY_OPERATIONS + _KEYS_OPERATIONS + _PREFIX_OPERATIONS + _UPLOAD_OPERATIONS
        for name in names:
            method = cls.__dict__.get(name)
            if method is not None and not getattr(method, "__dcp_key_guard__", False):
                setattr(cls, name, _guarded(name, method))

    def __init__(self, url: str, root: str, max_concurrency: int = 16) -> None:
        self.url = url
        self.root = root.rstrip("/")
        self.max_concurrency = max_concurrency
        self.counter = RequestCounter()
        #: seconds one request may take, retries included (None: no limit)
        self.deadline: float | None = None
        #: tries per request, retries included, for the failures ``_is_transient`` admits
        self.max_attempts = 1
        #: seconds after a request's first failure within which it is tried again
        self.retry_window = RETRY_WINDOW
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

    async def _request(self, kind: str, call: Coroutine[Any, Any, T] | Callable[[], Awaitable[T]]) -> T:
        """Run one store request under the concurrency bound, counting each try.

        ``call`` is a coroutine (tried once) or a function that starts a fresh try each time it
        is called (tried again on transient failures: see the module docstring). ``deadline``
        bounds the whole, retries included.
        """
        tries = self._tries(kind, call) if callable(call) else self._one_try(kind, call)
        if self.deadline is None:
            return await tries
        try:
            return await asyncio.wait_for(tries, self.deadline)
        except asyncio.TimeoutError:
            raise TimeoutError(
                f"{self.url}: a {kind} request did not finish within the {self.deadline:g} s "
                "deadline (retries included); raise `deadline`, or check the store's health"
            ) from None

    async def _one_try(self, kind: str, attempt: Awaitable[T]) -> T:
        async with self._slots():
            self.counter.request(kind)
            return await attempt

    async def _tries(self, kind: str, start: Callable[[], Awaitable[T]]) -> T:
        first_failure: float | None = None
        number = 0
        while True:
            number += 1
            try:
                return await self._one_try(kind, start())
            except Exception as exc:
                if not self._is_transient(exc):
                    raise
                now = time.monotonic()
                first_failure = now if first_failure is None else first_failure
                pause = backoff(number)
                if number >= self.max_attempts or now + pause - first_failure > self.retry_window:
                    raise self._unavailable(kind, exc, number, now - first_failure) from exc
            self.counter.retry()
            await asyncio.sleep(pause)

    def _is_transient(self, exc: BaseException) -> bool:
        """Whether a failed try may succeed if repeated (stores with a retry layer of their
        own in this class answer for the failures that layer covers)."""
        return False

    @property
    def endpoint(self) -> str:
        """The store's endpoint, ``scheme://host[:port]`` only (for messages)."""
        return redacted_endpoint(None)

    @property
    def on_this_machine(self) -> bool:
        """Whether the store's server runs on this machine (a loopback endpoint): it then
        shares the CPU with this process, and fewer requests at once go faster."""
        return is_loopback_endpoint(self.endpoint)

    def _unavailable(
        self, kind: str, exc: BaseException, tries: int, seconds: float
    ) -> StoreUnavailableError:
        return StoreUnavailableError(
            f"{self.url}: the store at {self.endpoint} did not complete a {kind} request "
            f"({tries} tries, {seconds:.0f} s after the first failure; last: {describe_error(exc)}). "
            "Check the endpoint URL, the network and that the service is up. To wait longer for "
            "a store that comes back, raise `retry_window` or `max_attempts`."
        )

    # -- the operations -----------------------------------------------------------------------

    @abc.abstractmethod
    async def put(self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool = False) -> None:
        """Write a whole object in one atomic request. ``data`` may be a view of a buffer that
        the caller reuses once this returns: keep no reference to it."""

    async def put_pieces(self, key: str, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        """Write a whole object whose bytes are ``pieces`` one after the other, in one atomic
        request, as ``put`` (stores that can send the pieces without joining them override
        this; here they are joined, a copy)."""
        await self.put(key, b"".join(pieces))

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

    async def read_into_pieces(self, key: str, start: int, pieces: Sequence[memoryview]) -> int:
        """Read bytes ``[start, start + total)`` of an object with one request, filling the
        ``pieces`` (``total`` bytes together) one after another; returns the count read (less
        than ``total`` only when the object ends first)."""
        total = sum(len(p) for p in pieces)
        scratch = memoryview(bytearray(total))
        got = await self.read_into(key, start, scratch)
        fill_pieces(pieces, scratch[:got])
        return got

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


def fill_pieces(pieces: Sequence[memoryview], data: memoryview) -> None:
    """Copy ``data`` into ``pieces`` one after another, as far as it goes."""
    done = 0
    for piece in pieces:
        if done >= len(data):
            return
        n = min(len(piece), len(data) - done)
        piece[:n] = data[done : done + n]
        done += n


def backoff(tries: int) -> float:
    """Seconds to wait after ``tries`` failed tries: doubling from ``BACKOFF_BASE`` up to
    ``BACKOFF_MAX``, each between half and all of that (jitter spreads concurrent retries)."""
    ceiling = min(BACKOFF_MAX, BACKOFF_BASE * 2 ** (tries - 1))
    return ceiling * (0.5 + 0.5 * random.random())


# The abstract operations get the key check too, for stores that inherit them.
for _name in _KEY_OPERATIONS + _KEYS_OPERATIONS + _PREFIX_OPERATIONS + _UPLOAD_OPERATIONS:
    _method = ObjectStore.__dict__[_name]
    _wrapped = _guarded(_name, _method)
    if getattr(_method, "__isabstractmethod__", False):
        _wrapped.__isabstractmethod__ = True  # type: ignore[attr-defined]
    setattr(ObjectStore, _name, _wrapped)
