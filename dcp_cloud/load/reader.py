"""CloudStorageReader: DCP's StorageReader for object stores, with concurrent ranged reads.

Data flow: ``read_metadata`` reads ``.metadata`` through the restricted unpickler and the
manifest beside it. ``read_data`` is plan -> fetch -> commit or decode -> stats: the plan's
ReadItems become routed byte ranges (:func:`~dcp_cloud.load.plan.plan_reads`, each stored
item's route asked of :meth:`~dcp_cloud.load.direct.DirectReads.route` once); the
:class:`~dcp_cloud.load.fetcher.Fetcher` reads them within the memory budget and hands each
landed range to ``on_fetched``. A direct range's payload is already in its destination tensor:
its CRC32C is checked and the tensor committed (``_commit_direct``). A buffered range's items
are checked against their CRC32C and decoded (``_decode``, via
:func:`~dcp_cloud.load.decode.load_tensor` or the payload record) and copied into the planner's
tensors, or, for non-tensor items, made safe (:mod:`dcp_cloud.checkpoint.items`) and handed to
the planner, while the next ranges download.
"""

from __future__ import annotations

import io
import logging
import os
from collections.abc import Sequence
from typing import Any

import crc32c
import torch
from fsspec import AbstractFileSystem
from torch.distributed._shard._utils import narrow_tensor_by_index
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadItemType, LoadPlan, LoadPlanner
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..checkpoint import layout
from ..checkpoint.items import safe_item_bytes
from ..checkpoint.manifest import ItemRecord, Manifest
from ..checkpoint.stored import StoredCheckpoint, checksum_mismatch
from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
)
from ..options import TransferOptions
from ..stats import StatsRecorder, TransferStats
from ..store.connection import StoreConnection
from ..urls import redact_url
from .decode import load_tensor
from .direct import DirectReads, tensor_memory
from .fetcher import Fetcher
from .plan import DirectRead, FetchRange, StoredItem, item_names, plan_reads

logger = logging.getLogger("dcp_cloud")


class CloudStorageReader(StoreConnection, StorageReader):
    """Loads DCP checkpoints from an object store (S3, GCS, Azure) or any fsspec filesystem.

    Reads only the byte ranges the load plan needs, merges neighbouring ranges, fetches them
    with concurrent ranged GETs within a memory budget, and decodes each range while the next
    ones download. Loads checkpoints written by dcp_cloud, by torch's FileSystemWriter and
    FsspecWriter, and by s3torchconnector. Items of dcp_cloud checkpoints are checked against
    their CRC32C.

    Args:
        url: the checkpoint, e.g. ``s3://bucket/run1/step-100`` or a local path.
        storage_options: passed to the fsspec filesystem (see CloudStorageWriter).
        filesystem: an existing fsspec filesystem to use instead of ``storage_options``.
        part_size: bytes per ranged GET of a large item, and the largest merged range.
        max_concurrency: requests in flight per process.
        memory_budget: bytes of fetch buffers held at once (a range larger than the budget
            gets its buffer alone). Tensors read straight into their destination need no
            buffer and are not held back by it, except on Azure, whose SDK buffers every
            download.
        coalesce_gap: neighbouring items closer than this many bytes are fetched together.
        max_attempts: tries per request, retries included.
        retry_window: seconds after a request's first failure within which it is tried again
            (default 20); see CloudStorageWriter.
        deadline: seconds one request may take, retries included (default: no limit).
        verify_checksums: check each item's CRC32C against the manifest (dcp_cloud
            checkpoints); a mismatch raises :class:`CorruptCheckpointError`, and so does a
            dcp_cloud checkpoint whose manifest is missing or unreadable. ``False`` loads
            without checksums (and without the manifest when it is unusable, with a warning).
        trust_pickles: hand non-tensor items' bytes to the load planner as they are, which
            unpickles them with torch's ``weights_only=False``: only for checkpoints from a
            store you trust, since a crafted item runs code. By default each item is first
            loaded under torch's weights-only rules, and one that names any other global
            raises :class:`UnsafeCheckpointError`.
        safe_globals: classes and functions non-tensor items may name, on top of torch's
            weights-only allow-list and ``torch.serialization.add_safe_globals``.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: AbstractFileSystem | None = None,
        part_size: int = TransferOptions.part_size,
        max_concurrency: int = TransferOptions.max_concurrency,
        memory_budget: int | None = None,
        coalesce_gap: int = TransferOptions.coalesce_gap,
        max_attempts: int = TransferOptions.max_attempts,
        retry_window: float = TransferOptions.retry_window,
        deadline: float | None = TransferOptions.deadline,
        verify_checksums: bool = True,
        trust_pickles: bool = False,
        safe_globals: Sequence[Any] = (),
    ) -> None:
        options = TransferOptions(
            part_size=part_size,
            max_concurrency=max_concurrency,
            memory_budget=memory_budget
            if memory_budget is not None
            else max(TransferOptions.memory_budget, 2 * part_size),
            object_size=max(TransferOptions.object_size, part_size),  # unused on load
            coalesce_gap=coalesce_gap,
            max_attempts=max_attempts,
            retry_window=retry_window,
            deadline=deadline,
        )
        StoreConnection.__init__(self, url, storage_options, filesystem, options)
        self.verify_checksums = verify_checksums
        self.trust_pickles = trust_pickles
        self.safe_globals = tuple(safe_globals)
        self.rank = 0
        self.is_coordinator = True
        self.last_stats: TransferStats | None = None
        self.storage_data: dict[Any, Any] = {}
        self._manifest: Manifest | None = None
        self._metadata: Metadata | None = None
        #: why ``.metadata`` could not be read, other than its absence
        self._metadata_error: BaseException | None = None

    def __repr__(self) -> str:
        return f"CloudStorageReader({redact_url(self.url)!r})"

    # -- StorageReader -------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._set_url(checkpoint_id)
        self.storage_data = {}
        self._manifest = None
        self._metadata = None
        self._metadata_error = None

    def read_metadata(self, *args: Any, **kwargs: Any) -> Metadata:
        rank = kwargs.get("rank")
        failed = self._metadata_error
        if rank is not None and failed is not None and not isinstance(failed, CheckpointNotFoundError):
            # torch retries a failed read_metadata() as read_metadata(rank=r), for checkpoints
            # saved with use_collectives=False; that is only worth it when .metadata is absent,
            # not when the store failed (it would wait on a dead store twice) or it was bad.
            raise failed
        if rank is None:
            self._metadata_error = None
        try:
            metadata = StoredCheckpoint(self.store).read_metadata(rank)
            self._manifest = self._read_manifest(metadata)
        except BaseException as exc:
            if rank is None:
                self._metadata_error = exc
            raise
        return metadata

    @property
    def metadata_error(self) -> BaseException | None:
        """Why the last ``read_metadata()`` failed, if it did. ``dcp.load`` reports such a
        failure as an ``AssertionError`` that only quotes it; this is the error itself."""
        return self._metadata_error

    def set_up_storage_reader(
        self, metadata: Metadata, is_coordinator: bool, *args: Any, **kwargs: Any
    ) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0) or 0)
        if metadata.storage_data is None:
            raise CorruptCheckpointError(f"{self.store.url}: .metadata has no storage_data")
        self.storage_data = metadata.storage_data
        self._metadata = metadata

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        return plan

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        return plans

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        store = self.store
        recorder = StatsRecorder("load", store.url, store.counter)
        # payloads of half a part or more are worth a request of their own
        direct = DirectReads(self._manifest, self._metadata, self.options.part_size // 2)
        ranges = self._plan_reads(plan, planner, direct)
        records = self._manifest.item_index() if self._manifest and self.verify_checksums else {}

        def on_fetched(fetch: FetchRange, data: memoryview) -> None:
            if fetch.direct is not None:
                self._commit_direct(fetch, fetch.direct, planner)
            else:
                self._decode(fetch, data, planner, records, direct)

        fetched = Fetcher(store, self.options).run(ranges, on_fetched)
        stats = recorder.stats
        stats.bytes = fetched
        stats.objects = len({r.key for r in ranges})
        stats.items = len(plan.items)
        stats.direct_items = sum(1 for r in ranges if r.direct is not None)
        self.last_stats = recorder.finish()
        logger.info("%s (rank %d)", self.last_stats.summary(), self.rank)
        completed: Future[None] = Future()
        completed.set_result(None)
        return completed

    # -- planning ------------------------------------------------------------------------------

    def _plan_reads(self, plan: LoadPlan, planner: LoadPlanner, direct: DirectReads) -> list[FetchRange]:
        """The plan's fetches, each routed once: direct into its tensor, or buffered."""
        try:
            return plan_reads(
                plan.items,
                self.storage_data,
                self.options.part_size,
                self.options.coalesce_gap,
                route=lambda key, item: direct.route(key, item, planner),
            )
        except KeyError as exc:
            raise CorruptCheckpointError(
                f"{self.store.url}/{layout.METADATA_KEY} describes {exc.args[0]} but does not say "
                "where its bytes are stored (no storage_data entry). The checkpoint is damaged; "
                "load an earlier one."
            ) from None

    # -- decoding ------------------------------------------------------------------------------

    def _commit_direct(self, fetch: FetchRange, route: DirectRead, planner: LoadPlanner) -> None:
        """A payload landed in its destination: check it, and hand the tensor to the planner."""
        payload, target = route.payload, route.target
        if self.verify_checksums and crc32c.crc32c(tensor_memory(target)) != payload.crc32c:
            start = fetch.start + payload.offset
            raise checksum_mismatch(
                f"{self.store.url}/{fetch.key}", start, start + payload.length, item_names(fetch.items)
            )
        planner.commit_tensor(fetch.items[0].requests[0], target)

    def _decode(
        self,
        fetch: FetchRange,
        data: memoryview,
        planner: LoadPlanner,
        records: dict[tuple[str, int], ItemRecord],
        direct: DirectReads,
    ) -> None:
        for item in fetch.items:
            start = item.offset - fetch.start
            item_view = data[start : start + item.length]
            record = records.get((fetch.key, item.offset))
            if record is not None and crc32c.crc32c(item_view) != record.crc32c:
                raise checksum_mismatch(
                    f"{self.store.url}/{fetch.key}",
                    item.offset,
                    item.offset + item.length,
                    item_names([item]),
                )
            first = item.requests[0]
            if any(r.type != first.type for r in item.requests):
                raise CorruptCheckpointError(
                    f"{self.store.url}/{layout.METADATA_KEY} places both tensors and non-tensor "
                    f"values at bytes [{item.offset}, {item.offset + item.length}) of {fetch.key!r} "
                    f"({item_names([item])}). The checkpoint is damaged or crafted; load an earlier one."
                )
            if first.type == LoadItemType.BYTE_IO:
                self._load_bytes(fetch.key, item, item_view, planner)
                continue
            try:
                # the manifest's payload record spares parsing the archive (hundreds of tiny
                # tensors per model: norms, biases)
                tensor = direct.stored_tensor(fetch.key, item, item_view)
                if tensor is None:
                    tensor = load_tensor(item_view)
            except Exception as exc:
                raise CorruptCheckpointError(
                    f"{self.store.url}/{fetch.key}: cannot decode bytes [{item.offset}, "
                    f"{item.offset + item.length}) holding {item_names([item])} "
                    f"({type(exc).__name__}: {exc})"
                ) from exc
            self._check_stored_tensor(fetch.key, item, tensor, direct)
            for request in item.requests:
                self._copy_tensor(fetch.key, item, tensor, request, planner)

    def _check_stored_tensor(
        self, key: str, item: StoredItem, tensor: torch.Tensor, direct: DirectReads
    ) -> None:
        """The decoded tensor is the chunk ``.metadata`` describes: its dtype and shape."""
        for request in item.requests:
            chunk = direct.stored_chunk(request)
            dtype = direct.stored_dtype(request)
            shape = tuple(chunk.sizes) if chunk is not None else None
            if (dtype is not None and tensor.dtype != dtype) or (
                shape is not None and tuple(tensor.size()) != shape
            ):
                raise CorruptCheckpointError(
                    f"{self.store.url}/{key}: bytes [{item.offset}, {item.offset + item.length}) "
                    f"hold a {tensor.dtype} tensor of shape {tuple(tensor.size())}, but .metadata "
                    f"describes {request.storage_index.fqn!r} there as {dtype} of shape {shape}. "
                    "The checkpoint is damaged; load an earlier one."
                )

    def _copy_tensor(
        self, key: str, item: StoredItem, tensor: torch.Tensor, request: Any, planner: LoadPlanner
    ) -> None:
        """Copy the requested box of a decoded stored tensor into the planner's tensor."""
        try:
            source = narrow_tensor_by_index(tensor, request.storage_offsets, request.lengths)
        except (RuntimeError, IndexError, ValueError) as exc:
            raise CorruptCheckpointError(
                f"{self.store.url}/{key}: bytes [{item.offset}, {item.offset + item.length}) hold a "
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
        where = f"{self.store.url}/{key}"
        safe = safe_item_bytes(item_view, item_names([item]), where, self.safe_globals).getvalue()
        for request in item.requests:
            planner.load_bytes(request, io.BytesIO(safe))

    # -- metadata ------------------------------------------------------------------------------

    def _read_manifest(self, metadata: Metadata) -> Manifest | None:
        """The manifest of a checkpoint written by dcp_cloud, checked against ``.metadata``;
        None for other checkpoints. A missing, unreadable or disagreeing manifest raises
        :class:`CorruptCheckpointError`, or with ``verify_checksums=False`` is skipped with a
        warning."""
        save_id = StoredCheckpoint.save_id_of(metadata)
        if save_id is None:
            return None  # not written by dcp_cloud: no manifest to check against
        where = f"{self.store.url}/{layout.manifest_key(save_id)}"
        try:
            manifest = StoredCheckpoint(self.store).read_manifest(save_id)
            _check_agreement(manifest, metadata, where)
            return manifest
        except UnsafeCheckpointError as exc:
            # a crafted manifest: refused as it is, with no advice to check less
            if self.verify_checksums:
                raise
            problem = str(exc).rstrip(".")
        except CorruptCheckpointError as exc:
            problem = str(exc).rstrip(".")
        if self.verify_checksums:
            raise CorruptCheckpointError(
                f"{problem}. Without its manifest the checkpoint's checksums cannot be checked, "
                "so it was not loaded. To load it anyway, unchecked: "
                "CloudStorageReader(..., verify_checksums=False)."
            )
        logger.warning("%s; loading without checksums (verify_checksums=False)", problem)
        return None


def _check_agreement(manifest: Manifest, metadata: Metadata, where: str) -> None:
    """Every item ``.metadata`` locates is recorded in the manifest with the same length."""
    records = manifest.item_index()
    for index, info in (metadata.storage_data or {}).items():
        record = records.get((info.relative_path, info.offset))
        if record is None or record.length != info.length:
            raise CorruptCheckpointError(
                f"{where} does not record bytes [{info.offset}, {info.offset + info.length}) of "
                f"{info.relative_path!r}, where .metadata places {index.fqn!r}"
            )
