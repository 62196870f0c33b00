"""Streaming one data object to the store as concurrent multipart parts.

``ObjectUpload`` is a write-only stream: torch.save writes into it, bytes are copied once into
pooled part buffers, and each full part is sent while serialization goes on. When the pool is
empty, ``write`` blocks until a part has been sent: memory stays within the budget however large
the checkpoint. An object of at most two parts goes up as a single PUT: the first full part is
held back until a second one fills, so a small object costs one request instead of a multipart
upload's start, parts and completion, each a round trip (and a completion may copy the object
server-side). ``close_async`` lets
the next object start while this one's last parts are still in flight. Stores that write in
place (local files) take the bytes straight from torch.save's memory instead.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import warnings
from typing import Any

import crc32c
import torch

from ..buffers import BufferPool
from ..checkpoint.manifest import PayloadRecord
from ..errors import DcpCloudError, UploadError
from ..store import MultipartUpload, ObjectStore
from ..store.base import WritesInPlace
from ..urls import scrub_text


class ObjectUpload:
    """Write-only stream that uploads ``key``; ``close_async`` finishes it, ``abort`` discards it."""

    def __init__(self, store: ObjectStore, key: str, pool: BufferPool) -> None:
        self.store = store
        self.key = key
        self.pool = pool
        self.part_size = pool.size
        self._position = 0
        self._buffer: bytearray | None = None
        self._fill = 0
        # the first full part, held while the object may still fit in one PUT of two parts
        self._held: bytearray | None = None
        self._parts_sent = 0
        # started by the second full part, without blocking the writer on the request
        self._upload: concurrent.futures.Future[MultipartUpload] | None = None
        self._pending: list[concurrent.futures.Future[None]] = []
        self._item_crc = 0
        self._item_start = 0
        self._payload_size: int | None = None
        self._payload_address = 0
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
        if size == self._payload_size:
            self._note_payload(view)
        if self._in_place is not None:
            self._write_in_place(self._in_place, view)
            return size
        while view:
            if self._buffer is None:
                self._raise_failures()
                self._buffer = self.pool.get()
            n = min(len(view), self.part_size - self._fill)
            self._buffer[self._fill : self._fill + n] = view[:n]
            self._fill += n
            view = view[n:]
            if self._fill == self.part_size:
                self._send_part()
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

    def begin_item(self, tensor: torch.Tensor | None = None) -> int:
        """Start checksumming a new item; returns its offset in the object.

        ``tensor``: the contiguous CPU tensor this item is the torch.save of. torch.save hands
        its memory to ``write`` in one call, without a copy; ``end_item`` then says where in
        the item those bytes went.
        """
        self._item_crc = 0
        self._item_start = self._position
        self._payload_size = tensor.nbytes if tensor is not None else None
        self._payload_address = tensor.data_ptr() if tensor is not None else 0
        self._payload = None
        return self._position

    def end_item(self) -> tuple[int, PayloadRecord | None]:
        """The CRC32C of the bytes written since ``begin_item``, and where the tensor's own
        bytes lie in the item (None if they never came in one write)."""
        self._payload_size = None
        return self._item_crc, self._payload

    def _note_payload(self, view: memoryview) -> None:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch warns about read-only buffers
            address = torch.frombuffer(view, dtype=torch.uint8).data_ptr()
        if address == self._payload_address and self._payload is None:
            offset = self._position - self._item_start
            self._payload = PayloadRecord(offset, len(view), crc32c.crc32c(view))

    # -- parts ---------------------------------------------------------------------------------

    def _send_part(self) -> None:
        buffer, fill = self._buffer, self._fill
        assert buffer is not None
        self._buffer, self._fill = None, 0
        if self._upload is None and self._held is None and fill == self.part_size:
            self._held = buffer  # sent at close, with the rest, if the object ends within a part
            return
        if self._upload is None:
            self._upload = self.store.submit(self.store.start_upload(self.key))
        if self._held is not None:
            held, self._held = self._held, None
            self._queue_part(held, self.part_size)
        self._queue_part(buffer, fill)

    def _queue_part(self, buffer: bytearray, fill: int) -> None:
        self._parts_sent += 1
        number = self._parts_sent
        offset = (number - 1) * self.part_size
        self._pending.append(self.store.submit(self._send(number, offset, buffer, fill)))

    async def _started(self) -> MultipartUpload:
        assert self._upload is not None
        return await asyncio.wrap_future(self._upload)

    async def _send(self, number: int, offset: int, buffer: bytearray, fill: int) -> None:
        try:
            upload = await self._started()
            await self.store.upload_part(upload, number, offset, memoryview(buffer)[:fill])
        finally:
            self.pool.put(buffer)

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
        if self._upload is None:
            pieces = [(self._held, self.part_size)] if self._held is not None else []
            if self._buffer is not None:
                pieces.append((self._buffer, self._fill))
            self._held, self._buffer, self._fill = None, None, 0
            return self.store.submit(self._put_whole(pieces))
        if self._fill:
            self._send_part()
        elif self._buffer is not None:
            self.pool.put(self._buffer)
            self._buffer = None
        return self.store.submit(self._complete())

    async def _put_whole(self, pieces: list[tuple[bytearray, int]]) -> int:
        """One PUT of the whole object, sent from its part buffers, at most two (held until
        then, within the memory budget)."""
        views = [memoryview(buffer)[:fill] for buffer, fill in pieces if fill]
        try:
            if len(views) > 1:
                await self.store.put_pieces(self.key, views)
            else:
                await self.store.put(self.key, views[0] if views else b"")
        except Exception as exc:
            raise self._error(exc) from exc
        finally:
            del views
            for buffer, _ in pieces:
                self.pool.put(buffer)
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
        for buffer in (self._held, self._buffer):
            if buffer is not None:
                self.pool.put(buffer)
        self._held = self._buffer = None
        if self._upload is not None:
            try:
                self.store.run(self.store.abort_upload(self._upload.result()))
            except Exception:  # never started, or the store is unreachable: gc cleans up
                pass
