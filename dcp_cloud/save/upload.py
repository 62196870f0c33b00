"""Streaming one data object to the store as concurrent multipart parts.

``ObjectUpload`` is a write-only stream: torch.save writes into it and each full part is sent
while serialization goes on. A part is a list of pieces (:mod:`dcp_cloud.save.parts`): bytes
copied into pooled segment buffers, and, on stores that send a part from several buffers
(``sends_part_pieces``), read-only views of a large tensor's own memory, which are never copied.

Why referencing a tensor's memory is safe: views are taken only of a tensor the writer hands
to ``begin_item`` as the caller's own memory (a CPU tensor the planner resolved, not a copy the
writer made), and only of the bytes torch.save writes from that tensor's storage, recognised by
address and size; every part is sent before ``write_data`` returns. In a synchronous
``dcp.save`` DCP's contract is that the caller does not change the state dict during the save;
``async_save`` stages a copy first and uploads from it; so in both the memory cannot change
under the upload. Copies the writer makes (a GPU tensor brought to CPU, a view cloned to its own
storage) are copied into segments like the rest: a view would keep each copy alive until its
parts are sent. Everything else (torch.save's records, valid only during its ``write`` call,
small tensors, pickled objects) is copied too, and the pool bounds those copies: when every
segment is held by unsent parts, ``write`` blocks until one is sent. At most ``in_flight`` parts
are queued at once (by default twice the store's concurrency, enough to keep every connection
busy), so bytes in flight are bounded by connections, not by copies.

An object of at most two parts goes up as a single PUT: the first full part is held back until
a second one fills, so a small object costs one request instead of a multipart upload's start,
parts and completion, each a round trip (and a completion may copy the object server-side).
``close_async`` lets the next object start while this one's last parts are still in flight.
Stores that write in place (local files) take the bytes straight from torch.save's memory.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import threading
import warnings
from typing import Any

import crc32c
import torch

from ..buffers import BufferPool
from ..checkpoint.manifest import PayloadRecord
from ..errors import DcpCloudError, UploadError
from ..store import MultipartUpload, ObjectStore
from ..store.base import WritesInPlace
from ..store.body import PartBody
from ..urls import scrub_text
from .parts import Part, PartBuilder

# Payloads below this are copied: a view per small tensor would only add pieces to the body.
REFERENCE_MIN_BYTES = 256 * 1024


def sends_part_pieces(store: ObjectStore) -> bool:
    """Whether parts go to ``store`` as several buffers, tensor memory among them: only where
    the store says so (``sends_part_pieces = True``: S3, GCS and Azure, through PartBody)."""
    return getattr(store, "sends_part_pieces", False) is True


def _byte_view(tensor: torch.Tensor) -> memoryview | None:
    """A read-only byte view of a contiguous CPU tensor's memory that keeps the tensor alive."""
    try:
        array = tensor.detach().reshape(-1).view(torch.uint8).numpy()
    except (RuntimeError, TypeError, ValueError):  # a dtype numpy or view(uint8) cannot take
        return None
    return memoryview(array).cast("B").toreadonly()  # type: ignore[arg-type]


class ObjectUpload:
    """Write-only stream that uploads ``key``; ``close_async`` finishes it, ``abort`` discards it.

    ``pool`` holds the copied bytes; ``in_flight`` (shared by a save's uploads) bounds the parts
    queued or being sent.
    """

    def __init__(
        self,
        store: ObjectStore,
        key: str,
        pool: BufferPool,
        in_flight: threading.Semaphore | None = None,
    ) -> None:
        self.store = store
        self.key = key
        self.pool = pool
        self.part_size = pool.size
        self._position = 0
        self._parts = PartBuilder(pool, pool.size, self._send_part)
        self._references = sends_part_pieces(store)
        self._in_flight = in_flight or threading.Semaphore(2 * max(1, store.max_concurrency))
        # the first full part, held while the object may still fit in one PUT of two parts
        self._held: Part | None = None
        self._parts_sent = 0
        # started by the second full part, without blocking the writer on the request
        self._upload: concurrent.futures.Future[MultipartUpload] | None = None
        self._pending: list[concurrent.futures.Future[None]] = []
        # queued parts not yet given back (a send cancelled before it ran never gives its back)
        self._unsent: dict[int, Part] = {}
        self._item_crc = 0
        self._item_start = 0
        self._payload_size: int | None = None
        self._payload_address = 0
        self._payload_tensor: torch.Tensor | None = None
        self._payload: PayloadRecord | None = None
        self._closed = False
        self.failure: Exception | None = None
        # local files: bytes go from torch.save's memory to the file, without part buffers
        self._in_place = store if isinstance(store, WritesInPlace) else None

    # -- the file-like surface torch.save needs ------------------------------------------------

    def write(self, data: Any) -> int:
        view = memoryview(data).cast("B")
        size = len(view)
        self._item_crc = crc32c.crc32c(view, self._item_crc)
        source = None
        if size == self._payload_size and self._is_payload(view):
            source = self._note_payload(view)
        if self._in_place is not None:
            self._write_in_place(self._in_place, view)
            return size
        if source is not None:
            self._parts.reference(source)
        else:
            self._parts.copy(view)
        self._position += size
        return size

    def _write_in_place(self, store: WritesInPlace, view: memoryview) -> None:
        """Local files: write from torch.save's memory at once; no part buffers, no second copy
        (the view is valid only during this call, so it cannot be queued)."""
        if self._upload is None:
            self._upload = self.store.submit(self.store.start_upload(self.key))
        try:
            store.write_in_place(self._upload.result(), self._position, view)
        except Exception as exc:
            # Kept: torch.save turns errors raised inside write() into its own RuntimeError.
            self.failure = self._error(exc)
            raise self.failure from exc
        self._position += len(view)

    def flush(self) -> None:
        """No-op: parts are sent when full (torch.save calls flush)."""

    def tell(self) -> int:
        return self._position

    def writable(self) -> bool:
        return True

    # -- items ---------------------------------------------------------------------------------

    def begin_item(self, tensor: torch.Tensor | None = None, *, borrowed: bool = False) -> int:
        """Start checksumming a new item; returns its offset in the object.

        ``tensor``: the contiguous CPU tensor this item is the torch.save of. torch.save hands
        its memory to ``write`` in one call, without a copy; ``end_item`` then says where in
        the item those bytes went. ``borrowed``: the tensor is the caller's memory, unchanged
        until the save returns, so parts may be sent straight from it (see the module's
        docstring).
        """
        self._item_crc = 0
        self._item_start = self._position
        self._payload_size = tensor.nbytes if tensor is not None else None
        self._payload_address = tensor.data_ptr() if tensor is not None else 0
        self._payload_tensor = (
            tensor
            if tensor is not None and borrowed and self._references and tensor.nbytes >= REFERENCE_MIN_BYTES
            else None
        )
        self._payload = None
        return self._position

    def end_item(self) -> tuple[int, PayloadRecord | None]:
        """The CRC32C of the bytes written since ``begin_item``, and where the tensor's own
        bytes lie in the item (None if they never came in one write)."""
        self._payload_size = None
        self._payload_tensor = None
        return self._item_crc, self._payload

    def _is_payload(self, view: memoryview) -> bool:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only buffers
            address = torch.frombuffer(view, dtype=torch.uint8).data_ptr()
        return address == self._payload_address and self._payload is None

    def _note_payload(self, view: memoryview) -> memoryview | None:
        """Record where the payload lies; returns a lasting view of it to send from, if the
        tensor may be referenced."""
        offset = self._position - self._item_start
        self._payload = PayloadRecord(offset, len(view), crc32c.crc32c(view))
        if self._payload_tensor is None:
            return None
        source = _byte_view(self._payload_tensor)
        if source is None or len(source) != len(view):
            return None
        return source

    # -- parts ---------------------------------------------------------------------------------

    def _send_part(self, part: Part) -> None:
        try:
            self._raise_failures()
        except BaseException:
            self._parts.release(part)
            raise
        if self._upload is None and self._held is None and part.size == self.part_size:
            self._held = part  # sent at close, with the rest, if the object ends within a part
            return
        if self._upload is None:
            self._upload = self.store.submit(self.store.start_upload(self.key))
        if self._held is not None:
            held, self._held = self._held, None
            self._queue_part(held)
        self._queue_part(part)

    def _queue_part(self, part: Part) -> None:
        self._in_flight.acquire()  # released when the part is sent: never waits on this thread
        self._parts_sent += 1
        number = self._parts_sent
        offset = (number - 1) * self.part_size
        self._unsent[number] = part
        try:
            self._pending.append(self.store.submit(self._send(number, offset, part)))
        except BaseException:
            self._give_back(number)
            raise

    async def _started(self) -> MultipartUpload:
        assert self._upload is not None
        return await asyncio.wrap_future(self._upload)

    async def _send(self, number: int, offset: int, part: Part) -> None:
        try:
            upload = await self._started()
            await self.store.upload_part(upload, number, offset, self._body(part))
        finally:
            self._give_back(number)

    def _give_back(self, number: int) -> None:
        part = self._unsent.pop(number, None)  # once, from whichever thread comes first
        if part is not None:
            self._parts.release(part)
            self._in_flight.release()

    def _body(self, part: Part) -> Any:
        """A part's bytes as ``upload_part`` takes them: one view, or a PartBody of its pieces
        (only stores that send pieces get several)."""
        if len(part.pieces) == 1:
            return part.pieces[0]
        if self._references:
            return PartBody(part.pieces)
        return b"".join(part.pieces)  # not reached: without views, a part is one segment

    def _raise_failures(self) -> None:
        for future in self._pending:
            if future.done() and not future.cancelled() and future.exception() is not None:
                # Kept: torch.save turns errors raised inside write() into its own RuntimeError.
                self.failure = self._error(future.exception())  # type: ignore[arg-type]
                raise self.failure

    def _error(self, exc: BaseException) -> Exception:
        if isinstance(exc, DcpCloudError):  # already says what is wrong (missing bucket, access)
            return exc
        # a client library's text may hold request URLs with signatures, or user-info
        detail = scrub_text(f"{type(exc).__name__}: {exc}")
        error = UploadError(f"{self.store.url}: uploading {self.key} failed: {detail}")
        error.__cause__ = exc
        return error

    def close_async(self) -> concurrent.futures.Future[int]:
        """Send what is left and make the object visible, without waiting; the future gives the
        object's size, or raises (after aborting the upload)."""
        if self._closed:
            raise RuntimeError(f"upload of {self.key} is already finished")
        self._closed = True
        last = self._parts.take()
        self._parts.close()
        if self._upload is None:
            parts = [p for p in (self._held, last) if p is not None]
            self._held = None
            return self.store.submit(self._put_whole(parts))
        if last is not None:  # a failed part fails the completion, which aborts the upload
            self._queue_part(last)
        return self.store.submit(self._complete())

    async def _put_whole(self, parts: list[Part]) -> int:
        """One PUT of the whole object, sent from its parts, at most two (held until then,
        within the memory budget)."""
        views = [piece for part in parts for piece in part.pieces]
        try:
            if len(views) > 1:
                await self.store.put_pieces(self.key, views)
            else:
                await self.store.put(self.key, views[0] if views else b"")
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            del views
            for part in parts:
                self._parts.release(part)
        return self._position

    async def _complete(self) -> int:
        try:
            upload = await self._started()
        except Exception as exc:  # never started: nothing to abort
            raise self._error(exc) from exc
        try:
            await asyncio.gather(*(asyncio.wrap_future(f) for f in self._pending))
            await self.store.complete_upload(upload)
        except BaseException as exc:
            await self.store.abort_upload(upload)
            if isinstance(exc, Exception):
                raise self._error(exc) from exc
            raise
        return self._position

    def abort(self) -> None:
        """Stop sending, wait for parts in flight, and discard the multipart upload."""
        if self._closed:
            return
        self._closed = True
        for future in self._pending:
            future.cancel()
        concurrent.futures.wait(self._pending)
        for number in list(self._unsent):
            self._give_back(number)
        for part in (self._held, self._parts.take()):
            if part is not None:
                self._parts.release(part)
        self._held = None
        self._parts.close()
        self._payload_tensor = None
        if self._upload is not None:
            try:
                self.store.run(self.store.abort_upload(self._upload.result()))
            except Exception:  # never started, or the store is unreachable: gc cleans up
                pass
