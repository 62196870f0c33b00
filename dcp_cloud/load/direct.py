"""Reading a large tensor's bytes straight into its destination tensor.

A stored tensor item is torch.save's zip archive; its raw bytes (the payload) lie in one piece
inside it, and dcp_cloud's manifest records where. When the load plan wants the whole stored
tensor and the destination is a contiguous CPU tensor of the same dtype and size, the payload is
fetched straight into the destination's memory: no fetch buffer, no decode, no copy. The rest of
the archive is not fetched at all, and the payload's own CRC32C stands in for the item's.

Data flow: the planner (:func:`~dcp_cloud.load.plan.plan_reads`) asks :meth:`DirectReads.route`
once per stored item; a :class:`~dcp_cloud.load.plan.DirectRead` it returns travels with the
item's fetch range to the fetcher, which reads the payload into ``tensor_memory(target)``.
Where the store reads one request's body into several buffers, smaller payloads are read
straight into their destinations too, as pieces of their merged range
(:meth:`DirectReads.land`).
Buffered tensor items come back here through :meth:`DirectReads.stored_tensor`, which finds
their payload inside the fetched archive bytes without parsing it.
"""

from __future__ import annotations

import ctypes
import math
import sys

import torch
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, Metadata, TensorStorageMetadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner, ReadItem

from ..checkpoint.manifest import ItemRecord, Manifest, PayloadRecord
from .decode import RECORD_ALIGNMENT
from .plan import DirectRead, StoredItem

#: the smallest payload read straight into its destination as a piece of a merged range: below
#: it, a copy out of the range's scratch buffer costs less than the extra piece
LAND_BYTES = 64 * 1024


class DirectReads:
    """Decides which stored items of one load are read straight into their destination.

    Args:
        manifest: the checkpoint's manifest (None: a checkpoint not written by dcp_cloud, whose
            payloads are unknown, so nothing is read directly).
        metadata: the checkpoint's ``.metadata``, for stored dtypes.
        min_bytes: smaller payloads are fetched with their neighbours instead: one request for
            many items beats one each.
        land_bytes: payloads of at least this many bytes fetched with their neighbours are
            still read straight into their destination, as a piece of their range's request
            (on stores that read a range into several buffers); smaller ones are copied out of
            the range's scratch buffer (a copy costs less than a piece of its own).
    """

    def __init__(
        self,
        manifest: Manifest | None,
        metadata: Metadata | None,
        min_bytes: int,
        land_bytes: int | None = None,
    ) -> None:
        self._records: dict[tuple[str, int], ItemRecord] = {}
        # payloads are in the writer's byte order: only usable as they are on a machine like it
        if manifest is not None and metadata is not None and manifest.byteorder == sys.byteorder:
            self._records = manifest.item_index()
        self._metadata = metadata
        self.min_bytes = min_bytes
        self.land_bytes = land_bytes

    def route(self, key: str, item: StoredItem, planner: LoadPlanner) -> DirectRead | None:
        """The direct read of ``item``: when the plan wants all of its stored tensor and the
        planner's destination can take the payload as is; None to fetch it buffered."""
        return self._routed(key, item, planner, self.min_bytes)

    def land(self, key: str, item: StoredItem, planner: LoadPlanner) -> DirectRead | None:
        """The direct read of a merged ``item``'s payload, as a piece of its range's request;
        None to copy it out of the range's scratch buffer (or when landing is off)."""
        if self.land_bytes is None:
            return None
        return self._routed(key, item, planner, self.land_bytes)

    def _routed(self, key: str, item: StoredItem, planner: LoadPlanner, min_bytes: int) -> DirectRead | None:
        payload = self.payload(key, item, min_bytes)
        if payload is None:
            return None
        target = self.destination(item.requests[0], planner)
        return None if target is None else DirectRead(payload, target)

    def payload(self, key: str, item: StoredItem, min_bytes: int | None = None) -> PayloadRecord | None:
        """The payload to read into the destination, if the plan wants all of the stored tensor
        and it holds at least ``min_bytes`` (default: ``self.min_bytes``)."""
        least = self.min_bytes if min_bytes is None else min_bytes
        payload = self._recorded_payload(key, item)
        if payload is None or payload.length < max(1, least) or len(item.requests) != 1:
            return None
        request = item.requests[0]
        dtype = self.stored_dtype(request)
        if request.type != LoadItemType.TENSOR or dtype is None or any(request.storage_offsets):
            return None
        # A box of the stored chunk starting at its origin, with as many bytes as the chunk
        # holds, is the whole chunk.
        if math.prod(request.lengths) * dtype.itemsize != payload.length:
            return None
        return payload

    def destination(self, request: ReadItem, planner: LoadPlanner) -> torch.Tensor | None:
        """The planner's destination for ``request``, if the payload can land in it as is."""
        dtype = self.stored_dtype(request)
        target = planner.resolve_tensor(request).detach()
        if (
            target.device.type != "cpu"
            or target.dtype != dtype
            or tuple(target.size()) != tuple(request.lengths)
            or not target.is_contiguous()
        ):
            return None
        return target

    def stored_tensor(self, key: str, item: StoredItem, item_bytes: memoryview) -> torch.Tensor | None:
        """The stored tensor chunk of a fetched ``item`` as a view of ``item_bytes``, located
        by its payload record instead of by parsing its torch.save archive; None when the
        manifest records no payload for it or the payload is not the whole chunk."""
        payload = self.whole_payload(key, item)
        if payload is None or payload.offset + payload.length > len(item_bytes):
            return None
        return self.payload_tensor(item, item_bytes[payload.offset : payload.offset + payload.length])

    def whole_payload(self, key: str, item: StoredItem, min_bytes: int = 1) -> PayloadRecord | None:
        """The payload record of a stored tensor item when its raw bytes are the whole chunk
        ``.metadata`` describes (of at least ``min_bytes``); else None."""
        payload = self._recorded_payload(key, item)
        request = item.requests[0]
        dtype = self.stored_dtype(request)
        chunk = self.stored_chunk(request)
        if payload is None or request.type != LoadItemType.TENSOR or dtype is None or chunk is None:
            return None
        if payload.length < max(1, min_bytes):
            return None
        if math.prod(chunk.sizes) * dtype.itemsize != payload.length:
            return None
        return payload

    def payload_tensor(self, item: StoredItem, payload_bytes: memoryview) -> torch.Tensor:
        """The stored chunk of ``item`` as a view of its raw bytes (as :meth:`whole_payload`
        found them)."""
        request = item.requests[0]
        dtype = self.stored_dtype(request)
        chunk = self.stored_chunk(request)
        assert dtype is not None and chunk is not None
        raw = torch.frombuffer(payload_bytes, dtype=torch.uint8)
        if raw.data_ptr() % RECORD_ALIGNMENT:
            raw = raw.clone()  # kernels may assume natural alignment
        return raw.view(dtype).view(chunk.sizes)

    def _recorded_payload(self, key: str, item: StoredItem) -> PayloadRecord | None:
        """The manifest's payload record of the stored item, if it has one."""
        record = self._records.get((key, item.offset))
        if record is None or record.length != item.length:
            return None
        return record.payload

    def stored_chunk(self, request: ReadItem) -> ChunkStorageMetadata | None:
        """The stored chunk ``request`` reads from."""
        if self._metadata is None:
            return None
        entry = self._metadata.state_dict_metadata.get(request.storage_index.fqn)
        if not isinstance(entry, TensorStorageMetadata):
            return None
        index, offset = request.storage_index.index, request.storage_index.offset
        if index is not None and index < len(entry.chunks) and entry.chunks[index].offsets == offset:
            return entry.chunks[index]
        return next((c for c in entry.chunks if c.offsets == offset), None)

    def stored_dtype(self, request: ReadItem) -> torch.dtype | None:
        """The dtype ``.metadata`` gives the stored tensor ``request`` reads from."""
        if self._metadata is None:
            return None
        entry = self._metadata.state_dict_metadata.get(request.storage_index.fqn)
        return entry.properties.dtype if isinstance(entry, TensorStorageMetadata) else None


def tensor_memory(tensor: torch.Tensor) -> memoryview:
    """The bytes of a contiguous CPU tensor as a writable memoryview.

    The view (and every slice of it) keeps the tensor alive: a read that outlives a failed load
    (a cancelled request whose file read still runs in a thread) writes into memory that is
    still the tensor's, never into freed memory.
    """
    array = (ctypes.c_ubyte * tensor.nbytes).from_address(tensor.data_ptr())
    array.tensor = tensor  # type: ignore[attr-defined]
    return memoryview(array).cast("B")
