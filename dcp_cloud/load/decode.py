"""Decoding fetched items into the planner's targets; a torch.save'd tensor without copying.

``torch.load`` on a buffer copies every byte into a new storage, and DCP then copies that tensor
into the destination. Here the zip archive torch.save writes is read in place: the tensor's
storage is a view of the fetched bytes, so the only copy is the one into the destination. Anything
unexpected (compressed records, another byte order, objects other than one dense tensor) falls
back to ``torch.load(weights_only=True)``.

Data flow: the reader hands each landed range to :meth:`ItemDecoder.on_fetched`, which checks
a direct read's payload, or checks and decodes each buffered item. :func:`load_tensor` gets one
buffered item's bytes (a view of its fetch
buffer) when the manifest records no payload to locate the tensor by; the tensor returned (a
view of those bytes, or on fallback its own copy) is copied into the planner's destination
before the buffer is reused.
"""

from __future__ import annotations

import io
import pickle
import struct
import sys
import warnings
import zipfile
from dataclasses import dataclass
from typing import IO, TYPE_CHECKING, Any, cast

import crc32c
import torch
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlanner, ReadItem

from ..buffers import ViewReader
from ..checkpoint import layout
from ..checkpoint.archive import (
    ArchiveError,
    allocating_global,
    archive_pickle,
    check_archive_size,
    check_storages,
)
from ..checkpoint.items import safe_item_bytes
from ..checkpoint.manifest import ItemRecord
from ..checkpoint.stored import checksum_mismatch
from ..errors import CorruptCheckpointError
from .plan import DirectRead, FetchRange, StoredItem, item_names

if TYPE_CHECKING:
    from .direct import DirectReads

_LOCAL_HEADER = struct.Struct("<IHHHHHIIIHH")
_LOCAL_HEADER_MAGIC = 0x04034B50
# The widest natural alignment of a dtype torch stores (complex128). The writer starts every
# item at a multiple of 64 bytes, and torch.save aligns records to 64 within an item, so records
# of fetched ranges are aligned whenever the fetch buffer is (malloc gives 16).
RECORD_ALIGNMENT = 16


class _Unsupported(Exception):
    """The archive is not the plain single-tensor layout the fast path handles."""


class OutOfBoundsError(Exception):
    """The archive places a tensor outside its own storage record."""


class NotATensorError(ValueError):
    """A stored tensor item holds something other than one dense CPU tensor."""


def _rebuild_tensor_v2(
    storage: torch.TypedStorage,
    storage_offset: int,
    size: tuple[int, ...],
    stride: tuple[int, ...],
    requires_grad: bool = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    _check_bounds(storage.size(), storage_offset, tuple(size), tuple(stride))
    tensor = torch.empty((0,), dtype=storage.dtype)
    return tensor.set_(storage._untyped_storage, storage_offset, size, stride)


def _check_bounds(numel: int, offset: int, size: tuple[int, ...], stride: tuple[int, ...]) -> None:
    """Every element of the view lies inside the storage's ``numel`` elements.

    ``Tensor.set_`` grows a storage too small for the view instead of refusing it, and the
    grown part is uninitialized memory of this process: a crafted archive must not get that
    into a loaded tensor.
    """
    numbers = (offset, *size, *stride)
    if len(size) != len(stride) or not all(isinstance(n, int) and n >= 0 for n in numbers):
        raise OutOfBoundsError(f"a view with offset {offset}, size {size}, stride {stride}")
    extent = offset + (sum((n - 1) * s for n, s in zip(size, stride)) + 1 if all(size) else 0)
    if extent > numel:
        raise OutOfBoundsError(
            f"a view with offset {offset}, size {size}, stride {stride} reaches element {extent} "
            f"of a storage of {numel}"
        )


@dataclass(frozen=True)
class _StorageKind:
    """What a pickle's storage class stands for in a persistent id: the dtype of the record."""

    dtype: torch.dtype


class _TensorUnpickler(pickle.Unpickler):
    """Unpickles data.pkl of a single tensor, resolving storages to views of the archive."""

    def __init__(self, data: bytes, records: dict[str, memoryview]) -> None:
        super().__init__(io.BytesIO(data))
        self._records = records

    def find_class(self, module: str, name: str) -> Any:
        if module == "torch._utils" and name == "_rebuild_tensor_v2":
            return _rebuild_tensor_v2
        if module == "collections" and name == "OrderedDict":
            import collections

            return collections.OrderedDict
        if module == "torch" and name.endswith("Storage"):
            storage_type = getattr(torch, name, None)
            if storage_type is torch.UntypedStorage:
                return _StorageKind(torch.uint8)
            if storage_type is not None and isinstance(getattr(storage_type, "dtype", None), torch.dtype):
                # the dtype only: the class itself, called by the pickle, would allocate
                # uninitialized memory of any size
                return _StorageKind(storage_type.dtype)
        raise _Unsupported(f"{module}.{name}")

    def persistent_load(self, pid: Any) -> Any:
        if not (isinstance(pid, tuple) and len(pid) == 5):
            raise _Unsupported("persistent id")
        typename, storage_kind, key, _location, numel = pid
        if not isinstance(storage_kind, _StorageKind) or not isinstance(numel, int) or numel < 0:
            raise _Unsupported("persistent id")
        if (typename.decode() if isinstance(typename, bytes) else typename) != "storage":
            raise _Unsupported("persistent id")
        dtype = storage_kind.dtype
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        record = self._records.get(str(key))
        if record is None or len(record) != nbytes:
            raise _Unsupported("storage record")
        if nbytes == 0:
            return torch.storage.TypedStorage(dtype=dtype, _internal=True)
        raw = torch.frombuffer(record, dtype=torch.uint8)
        if raw.data_ptr() % RECORD_ALIGNMENT:
            # Kernels may assume natural alignment (complex128 needs 16 bytes): copy instead.
            raw = raw.clone()
        untyped = raw.untyped_storage()
        return torch.storage.TypedStorage(wrap_storage=untyped, dtype=dtype, _internal=True)


def _member(view: memoryview, info: zipfile.ZipInfo) -> memoryview:
    """The stored bytes of one archive member, in place.

    Read through the local header rather than ``ZipFile.read``: torch.save may leave the CRC32
    fields at zero (dcp_cloud saves without them), which ``ZipFile.read`` rejects.
    """
    if info.compress_type != zipfile.ZIP_STORED:
        raise _Unsupported("compressed member")
    header = _LOCAL_HEADER.unpack_from(view, info.header_offset)
    if header[0] != _LOCAL_HEADER_MAGIC:
        raise _Unsupported("local header")
    start = info.header_offset + _LOCAL_HEADER.size + header[9] + header[10]
    if start + info.file_size > len(view):
        raise _Unsupported("member past the end")
    return view[start : start + info.file_size]


def _records(view: memoryview) -> tuple[bytes, dict[str, memoryview]]:
    """data.pkl and the storage records of a torch.save archive, as views into ``view``."""
    pickle_data: bytes | None = None
    records: dict[str, memoryview] = {}
    for info in zipfile.ZipFile(ViewReader(view)).infolist():
        _, _, name = info.filename.partition("/")
        if name == "byteorder":
            if bytes(_member(view, info)).decode() != sys.byteorder:
                raise _Unsupported("byte order")
        elif name == "data.pkl":
            pickle_data = bytes(_member(view, info))
        elif name.startswith("data/"):
            records[name[len("data/") :]] = _member(view, info)
    if pickle_data is None:
        raise _Unsupported("no data.pkl")
    return pickle_data, records


def load_tensor(view: memoryview) -> torch.Tensor:
    """The tensor torch.save wrote into ``view``; it aliases ``view`` when possible.

    Raises:
        ArchiveError: the archive is not a zip archive, its records claim more bytes than it
            holds, or its pickle builds a storage of its own.
        NotATensorError: it holds anything but one dense CPU tensor.
        OutOfBoundsError: the tensor's view reaches past its storage.
    """
    try:
        pickle_data, records = _records(view)
        with warnings.catch_warnings():
            # torch warns about typed storages (which its own pickles name) and about
            # read-only buffers (we never write through them).
            warnings.simplefilter("ignore", UserWarning)
            tensor = _TensorUnpickler(pickle_data, records).load()
        if isinstance(tensor, torch.Tensor) and type(tensor) is torch.Tensor:
            return tensor
    except (_Unsupported, zipfile.BadZipFile, struct.error, pickle.UnpicklingError, ValueError, EOFError):
        pass
    check_archive_size(view)
    # torch.save writes tensors as zip archives; torch's legacy format is not read here
    name = allocating_global(archive_pickle(view))
    if name is not None:
        raise ArchiveError(f"its pickle names {name}, which a crafted pickle calls to allocate memory")
    value = torch.load(cast(IO[bytes], ViewReader(view)), map_location="cpu", weights_only=True)
    if not isinstance(value, torch.Tensor) or value.layout != torch.strided or value.device.type != "cpu":
        what = type(value).__name__
        if isinstance(value, torch.Tensor):
            what = f"{what} of layout {value.layout} on {value.device}"
        raise NotATensorError(f"the item holds a {what}, not a dense CPU tensor")
    check_storages(value, view)
    return value


class ItemDecoder:
    """Checks and decodes the buffered items of one load into the planner's targets.

    Each item of a landed range is checked against its CRC32C (when the manifest records one),
    decoded (by the manifest's payload record, else by :func:`load_tensor`), checked against the
    chunk ``.metadata`` describes, and copied into the planner's tensors; non-tensor items are
    made safe (:mod:`dcp_cloud.checkpoint.items`) unless pickles are trusted, and handed to the
    planner. A direct range's payload is already in its destination: it is checked and committed.

    Args:
        where: the checkpoint's URL, for messages.
        records: the manifest's item records by (object key, offset); empty to skip checksums.
        direct: the load's :class:`~dcp_cloud.load.direct.DirectReads` (payload records, stored
            dtypes and chunks).
        verify_checksums: check direct payloads against their CRC32C.
        trust_pickles: hand non-tensor items to the planner as stored.
        safe_globals: what non-tensor items may name beyond torch's weights-only allow-list.
    """

    def __init__(
        self,
        where: str,
        records: dict[tuple[str, int], ItemRecord],
        direct: DirectReads,
        *,
        verify_checksums: bool,
        trust_pickles: bool,
        safe_globals: tuple[Any, ...],
    ) -> None:
        self.where = where
        self.records = records
        self.direct = direct
        self.verify_checksums = verify_checksums
        self.trust_pickles = trust_pickles
        self.safe_globals = safe_globals

    def on_fetched(self, fetch: FetchRange, data: memoryview, planner: LoadPlanner) -> None:
        """Handle one landed range: commit a direct read, or decode a buffered range (``data``:
        its bytes; for a range with landed payloads, its scratch buffer)."""
        if fetch.direct is not None:
            self.commit_direct(fetch, fetch.direct, planner)
        elif fetch.landed:
            self.decode_landed(fetch, data, planner)
        else:
            self.decode(fetch, data, planner)

    def commit_direct(
        self, fetch: FetchRange, route: DirectRead, planner: LoadPlanner, item: StoredItem | None = None
    ) -> None:
        """A payload landed in its destination: check it, and hand the tensor to the planner
        (``item``: the stored item it belongs to, default the range's only one)."""
        from .direct import tensor_memory

        item = fetch.items[0] if item is None else item
        payload, target = route.payload, route.target
        if self.verify_checksums and crc32c.crc32c(tensor_memory(target)) != payload.crc32c:
            start = item.offset + payload.offset
            raise checksum_mismatch(
                f"{self.where}/{fetch.key}", start, start + payload.length, item_names([item])
            )
        planner.commit_tensor(item.requests[0], target)

    def decode_landed(self, fetch: FetchRange, scratch: memoryview, planner: LoadPlanner) -> None:
        """Check and hand over every item of a range read in pieces: a landed payload is checked
        in its destination and committed, every other item is decoded from ``scratch`` (the
        range's bytes outside the landed payloads, in order)."""
        for item in fetch.items:
            route = fetch.landed.get(item.offset)
            if route is not None:
                self.commit_direct(fetch, route, planner, item)
                continue
            start = fetch.scratch_offset(item.offset)
            self.decode_item(fetch.key, item, scratch[start : start + item.length], planner)

    def decode(self, fetch: FetchRange, data: memoryview, planner: LoadPlanner) -> None:
        """Check, decode and hand over every item of a buffered range (``data``: its bytes,
        from ``fetch.start``)."""
        for item in fetch.items:
            start = item.offset - fetch.start
            self.decode_item(fetch.key, item, data[start : start + item.length], planner)

    def decode_item(self, key: str, item: StoredItem, item_view: memoryview, planner: LoadPlanner) -> None:
        """Check, decode and hand over one buffered item (``item_view``: its bytes)."""
        record = self.records.get((key, item.offset))
        if record is not None and crc32c.crc32c(item_view) != record.crc32c:
            raise checksum_mismatch(
                f"{self.where}/{key}",
                item.offset,
                item.offset + item.length,
                item_names([item]),
            )
        first = item.requests[0]
        if any(r.type != first.type for r in item.requests):
            raise CorruptCheckpointError(
                f"{self.where}/{layout.METADATA_KEY} places both tensors and non-tensor "
                f"values at bytes [{item.offset}, {item.offset + item.length}) of {key!r} "
                f"({item_names([item])}). The checkpoint is damaged or crafted; load an earlier one."
            )
        if first.type == LoadItemType.BYTE_IO:
            self._load_bytes(key, item, item_view, planner)
            return
        try:
            # the manifest's payload record spares parsing the archive (hundreds of tiny
            # tensors per model: norms, biases)
            tensor = self.direct.stored_tensor(key, item, item_view)
            if tensor is None:
                tensor = load_tensor(item_view)
        except Exception as exc:
            raise CorruptCheckpointError(
                f"{self.where}/{key}: cannot decode bytes [{item.offset}, "
                f"{item.offset + item.length}) holding {item_names([item])} "
                f"({type(exc).__name__}: {exc})"
            ) from exc
        self._check_stored_tensor(key, item, tensor)
        for request in item.requests:
            self._copy_tensor(key, item, tensor, request, planner)

    def decode_payload(self, key: str, item: StoredItem, data: memoryview, planner: LoadPlanner) -> None:
        """Check and hand over a stored tensor item of which only its raw bytes (its payload,
        located by the manifest) were read into ``data``."""
        payload = self.direct.whole_payload(key, item)
        if payload is None or payload.length != len(data):
            raise CorruptCheckpointError(
                f"{self.where}/{key}: the manifest records no raw tensor bytes of "
                f"{len(data)} bytes in bytes [{item.offset}, {item.offset + item.length}) "
                f"({item_names([item])}). The checkpoint changed while loading; load it again."
            )
        start = item.offset + payload.offset
        if self.verify_checksums and crc32c.crc32c(data) != payload.crc32c:
            raise checksum_mismatch(f"{self.where}/{key}", start, start + payload.length, item_names([item]))
        if any(r.type != LoadItemType.TENSOR for r in item.requests):
            raise CorruptCheckpointError(
                f"{self.where}/{layout.METADATA_KEY} places both tensors and non-tensor "
                f"values at bytes [{item.offset}, {item.offset + item.length}) of {key!r} "
                f"({item_names([item])}). The checkpoint is damaged or crafted; load an earlier one."
            )
        tensor = self.direct.payload_tensor(item, data)
        self._check_stored_tensor(key, item, tensor)
        for request in item.requests:
            self._copy_tensor(key, item, tensor, request, planner)

    def _check_stored_tensor(self, key: str, item: StoredItem, tensor: torch.Tensor) -> None:
        """The decoded tensor is the chunk ``.metadata`` describes: its dtype and shape."""
        for request in item.requests:
            chunk = self.direct.stored_chunk(request)
            dtype = self.direct.stored_dtype(request)
            shape = tuple(chunk.sizes) if chunk is not None else None
            if (dtype is not None and tensor.dtype != dtype) or (
                shape is not None and tuple(tensor.size()) != shape
            ):
                raise CorruptCheckpointError(
                    f"{self.where}/{key}: bytes [{item.offset}, {item.offset + item.length}) "
                    f"hold a {tensor.dtype} tensor of shape {tuple(tensor.size())}, but .metadata "
                    f"describes {request.storage_index.fqn!r} there as {dtype} of shape {shape}. "
                    "The checkpoint is damaged; load an earlier one."
                )

    def _copy_tensor(
        self, key: str, item: StoredItem, tensor: torch.Tensor, request: ReadItem, planner: LoadPlanner
    ) -> None:
        """Copy the requested box of a decoded stored tensor into the planner's tensor."""
        try:
            source = narrow_tensor_by_index(tensor, request.storage_offsets, request.lengths)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"{self.where}/{key}: bytes [{item.offset}, {item.offset + item.length}) hold a "
                f"tensor of shape {tuple(tensor.size())}, which lacks the chunk .metadata describes "
                f"for {request.storage_index.fqn} ({exc}). The checkpoint is damaged; load an "
                "earlier one."
            ) from None
        target = planner.resolve_tensor(request).detach()
        if target.size() != source.size():
            raise ValueError(
                f"size mismatch for {request.dest_index.fqn}: the checkpoint has "
                f"{tuple(source.size())}, the state dict expects {tuple(target.size())}"
            )
        target.copy_(source)
        planner.commit_tensor(request, target)

    def _load_bytes(self, key: str, item: StoredItem, item_view: memoryview, planner: LoadPlanner) -> None:
        """Hand a non-tensor item to the planner: as stored when pickles are trusted, else
        as a fresh archive of what torch's weights-only rules let through."""
        if self.trust_pickles:
            for request in item.requests:
                planner.load_bytes(request, io.BytesIO(item_view))
            return
        where = f"{self.where}/{key}"
        safe = safe_item_bytes(item_view, item_names([item]), where, self.safe_globals).getvalue()
        for request in item.requests:
            planner.load_bytes(request, io.BytesIO(safe))
