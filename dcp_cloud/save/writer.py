"""CloudStorageWriter: DCP's StorageWriter for object stores, with an atomic commit.

Data flow: ``prepare_global_plan`` (coordinator) gives each rank a key prefix under a fresh save
id and records the save's intent and lease. ``write_data`` (every rank) serializes the
planner's items with ``torch.save`` into :class:`~dcp_cloud.save.upload.ObjectUpload` streams,
one data object per ``object_size`` bytes, each item aligned and checksummed (CRC32C) as it
passes. On stores that declare ``sends_part_pieces``, large CPU tensors are sent from their own
memory rather than copied: the planner's tensors are not changed until ``write_data`` returns
(DCP's contract for ``save``; ``async_save`` stages a copy first), and every part is sent by
then (see :mod:`dcp_cloud.save.upload`). ``finish`` (coordinator) gathers every rank's results into the manifest and the
metadata and hands them to :class:`~dcp_cloud.checkpoint.stored.StoredCheckpoint`, which owns
the commit protocol (:mod:`dcp_cloud.checkpoint.commit`): the manifest, then ``.metadata`` with
one PUT, the commit; only after that are the intent released and the generation before the
replaced checkpoint deleted. The writer itself keeps to DCP's calls, the lease and the stats.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import dataclasses
import io
import itertools
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import IO, Any, cast

import torch
from fsspec import AbstractFileSystem
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta
from torch.distributed.checkpoint.planner import SavePlan, SavePlanner, WriteItem, WriteItemType
from torch.distributed.checkpoint.storage import StorageWriter, WriteResult
from torch.futures import Future

from .._version import __version__
from ..buffers import BufferPool
from ..checkpoint import layout
from ..checkpoint.manifest import ItemRecord, Manifest, PayloadRecord
from ..checkpoint.ownership import DEFAULT_LEASE_SECONDS, MAX_LEASE_SECONDS, Heartbeat, Intent
from ..checkpoint.stored import StoredCheckpoint
from ..errors import DcpCloudError
from ..options import (
    WRITER_LOCAL_MAX_CONCURRENCY,
    WRITER_MAX_CONCURRENCY,
    WRITER_MEMORY_BUDGET,
    TransferOptions,
)
from ..stats import StatsRecorder, TransferStats
from ..store import ObjectStore
from ..store.connection import StoreConnection
from ..urls import redact_url
from .sizing import SaveSizes, save_sizes
from .upload import ObjectUpload

logger = logging.getLogger("dcp_cloud")

DCP_METADATA_VERSION = "1.0.0"  # what torch's FileSystemWriter writes; FileSystemReader expects it
# Items start at multiples of 64 bytes (the gaps are zeros no locator covers), so the tensor
# records torch.save aligns within an item stay aligned in our read buffers: decoding can alias
# the fetched bytes instead of copying them.
ITEM_ALIGNMENT = 64
# Every non-empty plain tensor gets its payload's place recorded in the manifest: large ones are
# read straight into their destination, small ones copied from the fetched bytes without
# parsing their torch.save archive.
PAYLOAD_MIN_BYTES = 1


@dataclass(frozen=True)
class _SavePrefix:
    """Per-rank plan storage_data: where this rank's objects go. Travels between ranks only."""

    save_id: str
    file_prefix: str


@dataclass(frozen=True)
class _WrittenItem:
    """WriteResult.storage_data on its way to the coordinator: torch's locator plus a CRC32C."""

    info: _StorageInfo
    crc32c: int
    payload: PayloadRecord | None = None


class _Lease:
    """The writer's current save lease; stopped when the writer is garbage collected."""

    def __init__(self) -> None:
        self.heartbeat: Heartbeat | None = None

    def stop(self, wait: float = 0.0) -> None:
        if self.heartbeat is not None:
            self.heartbeat.stop(wait)
            self.heartbeat = None


def _estimated_size(item: WriteItem) -> int:
    """Bytes an item's tensor will take (0 for pickled objects, whose size is unknown)."""
    if item.tensor_data is None:
        return 0
    numel = 1
    for size in item.tensor_data.chunk.sizes:
        numel *= size
    return numel * item.tensor_data.properties.dtype.itemsize


# Threads that serialize items at once where the store writes in place (local files).
_SERIALIZER_THREADS = 8
# ... each given at least this much: small saves stay in one thread and one object.
_BYTES_PER_SERIALIZER = 32 * 1024 * 1024


def _split_by_size(items: list[WriteItem], count: int) -> list[list[WriteItem]]:
    """``items`` in at most ``count`` groups of about equal bytes (largest first into the
    lightest group), each keeping the given order; empty groups are dropped."""
    groups: list[list[WriteItem]] = [[] for _ in range(max(1, count))]
    loads = [0] * len(groups)
    for item in sorted(items, key=_estimated_size, reverse=True):
        lightest = loads.index(min(loads))
        groups[lightest].append(item)
        loads[lightest] += max(_estimated_size(item), 1)
    order = {id(item): n for n, item in enumerate(items)}
    return [sorted(group, key=lambda i: order[id(i)]) for group in groups if group]


@contextlib.contextmanager
def _torch_save_without_crc32() -> Iterator[None]:
    """torch.save skips its zip CRC32s (we keep a CRC32C of each item in the manifest).

    torch.load does not need them. The switch is process-wide, so it is restored at once.
    """
    get_option = getattr(torch.serialization, "get_crc32_options", None)
    if get_option is None:
        yield
        return
    previous = get_option()
    torch.serialization.set_crc32_options(False)
    try:
        yield
    finally:
        torch.serialization.set_crc32_options(previous)


def _cpu_tensor(tensor: torch.Tensor) -> torch.Tensor:
    """The tensor as torch's FileSystemWriter serializes it: detached, on CPU, minimal storage."""
    tensor = tensor.detach()
    if tensor.device.type != "cpu":
        tensor = tensor.cpu()
    if tensor.untyped_storage().size() != tensor.nbytes:
        tensor = tensor.clone()
    return tensor


def _has_plain_payload(tensor: torch.Tensor) -> bool:
    """Whether torch.save of ``tensor`` stores exactly its row-major contents as one record (and
    the tensor is not empty)."""
    return (
        tensor.nbytes >= PAYLOAD_MIN_BYTES
        and tensor.is_contiguous()
        and tensor.storage_offset() == 0
        and tensor.untyped_storage().nbytes() == tensor.nbytes
    )


def _is_borrowed(given: torch.Tensor, tensor: torch.Tensor) -> bool:
    """Whether ``tensor`` is the memory the planner handed over (a CPU tensor), not a copy made
    here: only that memory stays unchanged, and alive, until the save returns."""
    return given.device.type == "cpu" and (
        given.untyped_storage().data_ptr() == tensor.untyped_storage().data_ptr()
    )


class CloudStorageWriter(StoreConnection, StorageWriter):
    """Saves DCP checkpoints to an object store (S3, GCS, Azure) or any fsspec filesystem.

    Each rank packs its items into data objects under a save-unique key, sending large objects
    as concurrent multipart uploads within a memory budget. The coordinator then writes a
    manifest and, last, ``.metadata`` with one PUT: until that PUT the new checkpoint does not
    exist, and a checkpoint it replaces stays loadable. The replaced version stays whole until
    the next save commits (so loads already reading it finish), then it is deleted.

    Args:
        url: where the checkpoint goes, e.g. ``s3://bucket/run1/step-100``, ``gs://...``,
            ``az://container/...``, ``file:///...``, ``memory://...`` or a local path.
        storage_options: passed to the fsspec filesystem (``endpoint_url``, ``key``,
            ``secret``, ``profile``, ``token``, ...). Defaults to each cloud's standard
            credential chain and environment (``AWS_ENDPOINT_URL``, ``AWS_PROFILE``, ...).
        filesystem: an existing fsspec filesystem to use instead of ``storage_options``.
        part_size: bytes per multipart part (at least 5 MiB). Default: 16 MiB, or less (down
            to 5 MiB) for a rank that saves fewer than ``max_concurrency`` parts of 16 MiB, so
            that every connection has a part to send.
        max_concurrency: requests in flight per process. Default: 64, or 8 where the store's
            server runs on this machine (a loopback endpoint such as a local MinIO, SeaweedFS
            or emulator), which shares the CPU, so that more uploads at once only contend.
        memory_budget: bytes of part buffers per process (default 160 MiB, or two parts if
            parts are larger). On S3, GCS and Azure, large CPU tensors (256 KiB and more) are
            sent from their own memory, and the buffers hold only the bytes that are copied:
            torch.save's records, small tensors, pickled objects, and tensors the writer had
            to copy (GPU tensors, non-contiguous views). Elsewhere every part is a buffer;
            raise the budget where each connection is slow, to keep more parts in flight.
        object_size: a rank starts a new data object past this many bytes. Default: 128 MiB (or
            one part if parts are larger), or about an eighth of a small rank's bytes (at least
            four parts), or one part where an eighth is under four parts (each object is then a
            single PUT); on GCS one part, where an object of several parts costs an upload and
            a delete per part plus a compose.
        max_attempts: tries per request, retries included (throttling, 5xx, refused or timed-out
            connections, bodies cut off midway), with jittered exponential backoff.
        retry_window: seconds after a request's first failure within which it is tried again
            (default 20): with the default timeouts a dead endpoint fails within about a minute
            with :class:`StoreUnavailableError`. Raise it to ride out longer outages.
        deadline: seconds one request may take, retries included (default: no limit).
        overwrite: when False, saving where a checkpoint is already committed raises
            :class:`CheckpointExistsError` (checked before uploading, and enforced at the
            commit by a conditional PUT where the store supports one).
        key_prefix: spreads ranks' data objects over key prefixes, against S3 throttling at
            high request rates: a callable ``rank -> "prefix/"``, such as
            :class:`dcp_cloud.HashPrefix` or :class:`dcp_cloud.ReversedRankPrefix`. Only the
            coordinator's is used. Default: all ranks under ``<save_id>/``.
        lease_seconds: how long gc must leave a save alone past its last heartbeat. Before
            any rank writes data the coordinator records the save's keys and this lease in
            ``<save_id>/intent.json`` and renews it every third of the lease until the save
            ends; a save that dies is collectable this long after. Default 600 s, at most
            7 days. When another rank's error ends a save, DCP never calls this writer's
            ``finish``: the coordinator renews until the writer is reset for its next save or
            garbage collected (its daemon thread never keeps the process alive), and the lease
            runs out this long after.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        *,
        storage_options: dict[str, Any] | None = None,
        filesystem: AbstractFileSystem | None = None,
        part_size: int | None = None,
        max_concurrency: int | None = None,
        memory_budget: int | None = None,
        object_size: int | None = None,
        max_attempts: int = TransferOptions.max_attempts,
        retry_window: float = TransferOptions.retry_window,
        deadline: float | None = TransferOptions.deadline,
        overwrite: bool = True,
        key_prefix: Callable[[int], str] | None = None,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
    ) -> None:
        if not 0 < lease_seconds <= MAX_LEASE_SECONDS:
            raise ValueError(
                f"lease_seconds must be more than 0 and at most {MAX_LEASE_SECONDS:g} seconds, "
                f"got {lease_seconds!r}"
            )
        self._part_size_given = part_size is not None
        self._concurrency_given = max_concurrency is not None
        if max_concurrency is None:
            max_concurrency = WRITER_MAX_CONCURRENCY
        if part_size is None:
            part_size = TransferOptions.part_size
        options = TransferOptions(
            part_size=part_size,
            max_concurrency=max_concurrency,
            memory_budget=memory_budget
            if memory_budget is not None
            else max(WRITER_MEMORY_BUDGET, 2 * part_size),
            object_size=object_size
            if object_size is not None
            else max(TransferOptions.object_size, part_size),
            max_attempts=max_attempts,
            retry_window=retry_window,
            deadline=deadline,
        )
        StoreConnection.__init__(self, url, storage_options, filesystem, options)
        self._object_size_given = object_size is not None
        self.overwrite = overwrite
        self.key_prefix = key_prefix
        self.rank = 0
        self.is_coordinator = True
        self.use_collectives = True
        self.save_id = layout.new_save_id()
        self.last_stats: TransferStats | None = None
        self._recorder: StatsRecorder | None = None
        self._active: _SavePrefix | None = None
        self.lease_seconds = float(lease_seconds)
        self._lease: _Lease | None = None
        self._lease_ranks = 0

    @property
    def object_size(self) -> int:
        """Bytes past which a rank starts a new data object, at most: ``object_size`` if given,
        else the store's default (one part on stores that prefer one-part objects). A small
        save uses smaller objects (see :meth:`sizes_for`)."""
        if not self._object_size_given and self.store.prefers_one_part_objects:
            return self.options.part_size
        return self.options.object_size

    def _store_opened(self, store: ObjectStore) -> None:
        if not self._concurrency_given and store.on_this_machine:
            store.max_concurrency = min(store.max_concurrency, WRITER_LOCAL_MAX_CONCURRENCY)

    @property
    def max_concurrency(self) -> int:
        """Requests in flight at once: ``max_concurrency`` if given, else 64, or 8 where the
        store's server runs on this machine (a loopback endpoint)."""
        return self.store.max_concurrency

    def sizes_for(self, total_bytes: int) -> SaveSizes:
        """The part and object size of a rank that saves ``total_bytes`` of tensors: the
        options', or, where the caller left them to the writer, smaller ones that give every
        connection parts to send (see :mod:`dcp_cloud.save.sizing`)."""
        if self.store.writes_in_place:  # local files: parts are not requests
            return SaveSizes(self.options.part_size, self.object_size)
        return save_sizes(
            total_bytes,
            part_size=self.options.part_size,
            object_size=self.object_size,
            max_concurrency=self.max_concurrency,
            part_size_given=self._part_size_given,
            object_size_given=self._object_size_given,
            one_part_objects=self.store.prefers_one_part_objects,
        )

    def __repr__(self) -> str:
        return f"CloudStorageWriter({redact_url(self.url)!r}, overwrite={self.overwrite})"

    def __getstate__(self) -> dict[str, Any]:
        state = super().__getstate__()
        state["_recorder"] = None
        state["_lease"] = None
        return state

    # -- StorageWriter -------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._end_lease()
        self._set_url(checkpoint_id)
        self.save_id = layout.new_save_id()

    def storage_meta(self) -> StorageMeta | None:
        return StorageMeta(checkpoint_id=redact_url(self.url), save_id=self.save_id)

    def set_up_storage_writer(self, is_coordinator: bool, *args: Any, **kwargs: Any) -> None:
        self.is_coordinator = is_coordinator
        self.rank = int(kwargs.get("rank", 0) or 0)
        self.use_collectives = bool(kwargs.get("use_collectives", True))

    def prepare_local_plan(self, plan: SavePlan) -> SavePlan:
        self.save_id = layout.new_save_id()
        self._recorder = StatsRecorder("save", self.store.url, self.store.counter)
        return plan

    def prepare_global_plan(self, plans: list[SavePlan]) -> list[SavePlan]:
        if not self.overwrite:
            self._refuse_if_committed()
        out = []
        for index, plan in enumerate(plans):
            rank = index if self.use_collectives else self.rank
            file_prefix = layout.rank_file_prefix(rank, self.key_prefix)
            out.append(dataclasses.replace(plan, storage_data=_SavePrefix(self.save_id, file_prefix)))
        self._lease_ranks = len(out)
        self._begin_lease([p.storage_data.file_prefix for p in out])
        return out

    def write_data(self, plan: SavePlan, planner: SavePlanner) -> Future[list[WriteResult]]:
        prefix = plan.storage_data
        if not isinstance(prefix, _SavePrefix):
            raise DcpCloudError(
                f"{self.store.url}: the save plan carries no dcp_cloud save prefix; was the plan "
                "prepared by another StorageWriter (or cached across writers)?"
            )
        self._active = prefix
        if self._recorder is None:
            self._recorder = StatsRecorder("save", self.store.url, self.store.counter)
        try:
            results = self._upload_items(plan.items, planner, prefix)
        except BaseException:
            self._abandon_lease(prefix.save_id)
            raise
        stats = self._recorder.stats
        stats.items = len(results)
        stats.bytes = sum(r.size_in_bytes for r in results)
        stats.objects = len({r.storage_data.info.relative_path for r in results})
        self.last_stats = self._recorder.finish()
        if not self.is_coordinator:
            logger.debug("%s (rank %d)", self.last_stats.summary(), self.rank)
        future: Future[list[WriteResult]] = Future()
        future.set_result(results)
        return future

    def finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        try:
            self._finish(metadata, results)
        finally:
            self._end_lease()

    def _finish(self, metadata: Metadata, results: list[list[WriteResult]]) -> None:
        prefix = self._active
        if prefix is None:
            raise DcpCloudError("finish() was called before write_data()")
        store = self.store
        manifest = Manifest(
            save_id=prefix.save_id,
            torch_version=torch.__version__,
            dcp_cloud_version=__version__,
        )
        storage_data: dict[Any, _StorageInfo] = {}
        for rank_results in results:
            for result in rank_results:
                located = result.storage_data
                info = located.info if isinstance(located, _WrittenItem) else located
                storage_data[result.index] = info
                if isinstance(located, _WrittenItem):
                    manifest.objects.setdefault(info.relative_path, []).append(
                        ItemRecord(info.offset, info.length, located.crc32c, located.payload)
                    )
        metadata.version = DCP_METADATA_VERSION
        metadata.storage_data = storage_data
        metadata.storage_meta = StorageMeta(checkpoint_id=redact_url(self.url), save_id=prefix.save_id)
        key = layout.metadata_key(None if self.use_collectives else self.rank)

        stored = StoredCheckpoint(store)
        previous = self._read_committed(key)
        stored.commit(key, manifest, metadata, overwrite=self.overwrite, previous=previous)
        # Committed: from here on, failures are only logged.
        self._release_intent(prefix.save_id)
        if previous is not None:
            stored.retire_generation_before(previous, metadata)

        recorder = self._recorder or StatsRecorder("save", store.url, store.counter)
        recorder.stats.bytes = manifest.total_bytes
        recorder.stats.objects = len(manifest.objects)
        recorder.stats.items = len(storage_data)
        self.last_stats = recorder.finish()
        self._recorder = None
        logger.info("%s", self.last_stats.summary())

    # -- the save's lease ----------------------------------------------------------------------

    def _begin_lease(self, file_prefixes: list[str]) -> None:
        """Record this save's keys and lease (one PUT, before any rank writes data) and keep
        the lease alive until the save ends."""
        self._end_lease()
        now = time.time()
        intent = Intent(self.save_id, tuple(file_prefixes), now, now, self.lease_seconds)
        key = layout.intent_key(self.save_id)
        self.store.run(self.store.put(key, intent.to_json()))
        if self._lease is None:
            self._lease = _Lease()
            weakref.finalize(self, self._lease.stop)
        self._lease.heartbeat = Heartbeat(self.store, key, intent)

    def _abandon_lease(self, save_id: str) -> None:
        """This rank's writes failed (and removed what they had completed). A save of one rank
        has nothing left to prove, so its intent goes too; with more ranks, others may still be
        writing under the save id, so the record stays (and expires) for gc."""
        if self._lease is None or self._lease.heartbeat is None:
            return  # not the coordinator of this save
        self._end_lease()
        if self._lease_ranks == 1:
            try:
                self.store.run(self.store.delete([layout.intent_key(save_id)]))
            except Exception:  # the record expires; gc removes it
                pass

    def _end_lease(self) -> None:
        if self._lease is not None:
            self._lease.stop(wait=5.0)

    def _release_intent(self, save_id: str) -> None:
        """After the commit: stop renewing the lease, then remove the intent record."""
        self._end_lease()
        StoredCheckpoint(self.store).release_intent(save_id)

    # -- helpers -------------------------------------------------------------------------------

    def _upload_items(
        self, items: list[WriteItem], planner: SavePlanner, prefix: _SavePrefix
    ) -> list[WriteResult]:
        # Same order as torch's FileSystemWriter: pickled objects first, then tensors.
        ordered = [i for i in items if i.type == WriteItemType.BYTE_IO] + [
            i for i in items if i.type != WriteItemType.BYTE_IO
        ]
        if not ordered:
            return []
        opts = self.options
        sizes = self.sizes_for(sum(_estimated_size(item) for item in ordered))
        pool = BufferPool(sizes.part_size, max(2, opts.memory_budget // sizes.part_size))
        # parts queued or being sent: enough to keep every connection busy
        in_flight = threading.Semaphore(2 * self.max_concurrency)
        object_numbers = itertools.count()  # shared by the serializing threads
        if not self.store.writes_in_place:
            # one thread serializes; the parts it fills upload concurrently
            groups = [ordered]
        else:
            # local files are written from torch.save's memory, so serializing is the work:
            # spread it over threads, each packing its own objects, as FileSystemWriter does
            total = sum(_estimated_size(item) for item in ordered)
            thread_count = min(
                _SERIALIZER_THREADS, self.max_concurrency, max(1, total // _BYTES_PER_SERIALIZER)
            )
            groups = _split_by_size(ordered, thread_count)
        with _torch_save_without_crc32():
            if len(groups) == 1:
                outcomes = [
                    self._pack_objects(
                        groups[0], planner, prefix, pool, in_flight, object_numbers, sizes.object_size
                    )
                ]
            else:
                with concurrent.futures.ThreadPoolExecutor(len(groups), "dcp-cloud-serialize") as threads:
                    outcomes = list(
                        threads.map(
                            lambda group: self._pack_objects(
                                group, planner, prefix, pool, in_flight, object_numbers, sizes.object_size
                            ),
                            groups,
                        )
                    )
        closing = [entry for _, entries, _ in outcomes for entry in entries]
        self._wait_for_objects(closing, next((error for _, _, error in outcomes if error is not None), None))
        return [result for results, _, _ in outcomes for result in results]

    def _pack_objects(
        self,
        items: list[WriteItem],
        planner: SavePlanner,
        prefix: _SavePrefix,
        pool: BufferPool,
        in_flight: threading.Semaphore,
        object_numbers: Iterator[int],
        object_size: int,
    ) -> tuple[list[WriteResult], list[tuple[str, concurrent.futures.Future[int]]], BaseException | None]:
        """Serialize ``items`` into objects of at most ``object_size`` bytes; returns their
        results, the objects being completed, and the error that stopped it (if any)."""
        results: list[WriteResult] = []
        closing: list[tuple[str, concurrent.futures.Future[int]]] = []
        upload: ObjectUpload | None = None
        try:
            for item in items:
                if upload is None or (upload.tell() and upload.tell() + _estimated_size(item) > object_size):
                    if upload is not None:
                        closing.append((upload.key, upload.close_async()))
                    key = layout.data_key(prefix.save_id, prefix.file_prefix, next(object_numbers))
                    upload = ObjectUpload(self.store, key, pool, in_flight)
                results.append(self._write_item(upload, item, planner))
            assert upload is not None
            closing.append((upload.key, upload.close_async()))
            upload = None
        except BaseException as exc:
            if upload is not None:
                upload.abort()
            return results, closing, exc
        return results, closing, None

    def _write_item(self, upload: ObjectUpload, item: WriteItem, planner: SavePlanner) -> WriteResult:
        data = planner.resolve_data(item)
        upload.write(bytes(-upload.tell() % ITEM_ALIGNMENT))
        if item.type == WriteItemType.BYTE_IO:
            offset = upload.begin_item()
            upload.write(cast(io.BytesIO, data).getbuffer())
        else:
            given = cast(torch.Tensor, data)
            tensor = _cpu_tensor(given)
            offset = upload.begin_item(
                tensor if _has_plain_payload(tensor) else None, borrowed=_is_borrowed(given, tensor)
            )
            try:
                torch.save(tensor, cast(IO[bytes], upload))
            except Exception as exc:
                if upload.failure is not None:  # the real cause, which torch.save reworded
                    raise upload.failure from exc
                raise
        length = upload.tell() - offset
        info = _StorageInfo(relative_path=upload.key, offset=offset, length=length)
        crc, payload = upload.end_item()
        return WriteResult(
            index=item.index, size_in_bytes=length, storage_data=_WrittenItem(info, crc, payload)
        )

    def _wait_for_objects(
        self, closing: list[tuple[str, concurrent.futures.Future[int]]], failure: BaseException | None = None
    ) -> None:
        """Wait until every object is complete; on a failure (of an object, or ``failure``
        while serializing), remove the ones that completed."""
        concurrent.futures.wait([f for _, f in closing])
        failed = [f for _, f in closing if f.exception() is not None]
        if failed or failure is not None:
            done = [key for key, f in closing if f.exception() is None]
            if done:
                try:
                    self.store.run(self.store.delete(done))
                except Exception:  # debris for gc; the save fails either way
                    pass
            if failure is not None:
                raise failure
            raise failed[0].exception()  # type: ignore[misc]

    def _refuse_if_committed(self) -> None:
        StoredCheckpoint(self.store).refuse_if_committed(
            layout.metadata_key(None if self.use_collectives else self.rank)
        )

    def _read_committed(self, key: str) -> Metadata | None:
        """The metadata this save replaces, or None."""
        return StoredCheckpoint(self.store).read_replaced(key)
