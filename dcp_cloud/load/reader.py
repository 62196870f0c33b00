"""CloudStorageReader: DCP's StorageReader for object stores, with concurrent ranged reads.

Data flow: ``read_metadata`` reads ``.metadata`` through the restricted unpickler and the
manifest beside it (in a distributed load, on the coordinator alone, which broadcasts them).
``read_data`` is plan -> fetch -> decode -> stats: the plan's ReadItems become routed byte ranges
(:func:`~dcp_cloud.load.plan.plan_reads`); the :class:`~dcp_cloud.load.fetcher.Fetcher` reads
them within the memory budget and hands each landed range to the
:class:`~dcp_cloud.load.decode.ItemDecoder`, which checks and commits a direct read or checks
and decodes a buffered range's items into the planner's targets while the next ranges
download. Stored items several ranks need are first read once and shared among them
(:mod:`dcp_cloud.load.share`), planned in ``prepare_global_plan``.
"""

from __future__ import annotations

import dataclasses
import logging
import os
from collections import defaultdict
from collections.abc import Sequence
from typing import Any, Literal

from fsspec import AbstractFileSystem
from torch.distributed.checkpoint.metadata import Metadata
from torch.distributed.checkpoint.planner import LoadPlan, LoadPlanner, ReadItem
from torch.distributed.checkpoint.storage import StorageReader
from torch.futures import Future

from ..checkpoint import layout
from ..checkpoint.manifest import Manifest
from ..checkpoint.stored import StoredCheckpoint
from ..errors import (
    CheckpointNotFoundError,
    CorruptCheckpointError,
    StoreConfigError,
    UnsafeCheckpointError,
)
from ..options import TransferOptions
from ..stats import StatsRecorder, TransferStats
from ..store.connection import StoreConnection
from ..urls import redact_url
from .decode import ItemDecoder
from .direct import LAND_BYTES, DirectReads
from .fetcher import Fetcher
from .plan import FetchRange, StoredItem, plan_reads
from .share import (
    SCOPES,
    LoadGroup,
    LocalShareInfo,
    SharePlan,
    ShareRunner,
    ShareStats,
    assign_shares,
    broadcast_result,
    calling_load_group,
    host_id,
    plan_slots,
    side_group,
    split_requests,
)

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
        share_reads: ``"job"`` (default): in a distributed ``dcp.load``, each stored item
            several ranks need is fetched by one of them (owners balanced by bytes) and sent
            to the others, so the store serves each byte once per job; ``.metadata`` and the
            manifest are read by the coordinator alone and broadcast. Large tensors travel as
            their raw bytes, straight into each rank's destination where it takes them as
            they are. ``"host"``: the same among the ranks of each host
            (``$DCP_CLOUD_HOST_ID``, else the host name); each host fetches for itself and no
            shared bytes cross machines. ``"off"``: every rank reads all it needs. Without a
            process group, with ``no_dist`` or ``use_collectives=False``, nothing is shared.
            Every rank of the load must use the same setting. Items one rank alone needs are
            read as without sharing. Each rank holds at most ``memory_budget`` bytes of shared
            items at once. Ranks that see the same ``/dev/shm`` take shared bytes from the
            owner's shared-memory block (one memory copy); other ranks get them over a gloo
            group of the load's ranks (TCP), made for the purpose whatever the default
            backend. A rank that does not take part (it failed before reading, or passed
            another ``share_reads``) is named in the others' error after ``share_timeout``.
            The last load's figures are in ``last_share``.
        share_timeout: seconds a rank waits for its peers in one step of shared reading (a
            status exchange, a round's transfer) before it raises. A peer whose fetch fails
            tells the others before any data moves, and one that dies is noticed when its
            connection closes; this bounds the rest (a peer that hangs). Raise it for stores
            slow enough that one round's fetch (``memory_budget`` bytes split among the
            owners) takes longer.
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
        share_reads: Literal["job", "host", "off"] = "job",
        share_timeout: float = 300.0,
    ) -> None:
        if share_reads not in SCOPES:
            raise StoreConfigError(f"share_reads must be one of {', '.join(SCOPES)}, not {share_reads!r}")
        if not share_timeout > 0:
            raise StoreConfigError(
                f"share_timeout must be a positive number of seconds, not {share_timeout!r}"
            )
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
        self.share_reads = share_reads
        self.share_timeout = float(share_timeout)
        self.rank = 0
        self.is_coordinator = True
        self.last_stats: TransferStats | None = None
        #: the last load's shared reading on this rank (None: nothing was shared)
        self.last_share: ShareStats | None = None
        self.storage_data: dict[Any, Any] = {}
        self._manifest: Manifest | None = None
        self._metadata: Metadata | None = None
        #: why ``.metadata`` could not be read, other than its absence
        self._metadata_error: BaseException | None = None
        #: the distributed load being served, while its reads are shared
        self._group: LoadGroup | None = None

    def __repr__(self) -> str:
        return f"CloudStorageReader({redact_url(self.url)!r})"

    # -- StorageReader -------------------------------------------------------------------------

    def reset(self, checkpoint_id: str | os.PathLike[str] | None = None) -> None:
        self._set_url(checkpoint_id)
        self.storage_data = {}
        self._manifest = None
        self._metadata = None
        self._metadata_error = None
        self._group = None

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
        group = self._sharing_group() if rank is None else None
        try:
            if group is None:
                metadata, self._manifest = self._read_metadata(rank)
            else:
                # one GET per job; every rank of the load calls this, so all join the broadcast
                metadata, self._manifest = broadcast_result(
                    side_group(group.ranks, self.share_timeout),
                    group.ranks[group.coordinator],
                    group.is_coordinator,
                    lambda: self._read_metadata(None),
                )
        except BaseException as exc:
            if rank is None:
                self._metadata_error = exc
            raise
        return metadata

    def _read_metadata(self, rank: int | None) -> tuple[Metadata, Manifest | None]:
        metadata = StoredCheckpoint(self.store).read_metadata(rank)
        return metadata, self._read_manifest(metadata)

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
        shared = kwargs.get("use_collectives", True) is not False
        self._group = self._sharing_group() if shared else None

    def prepare_local_plan(self, plan: LoadPlan) -> LoadPlan:
        if self._group is None:
            return plan
        return dataclasses.replace(plan, storage_data=LocalShareInfo(host_id()))

    def prepare_global_plan(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        group = self._group
        if group is None or len(plans) != len(group.ranks):
            return plans
        needs = [plan_slots(plan.items, self.storage_data) for plan in self._checked(plans)]
        if self.share_reads == "host":
            hosts: dict[Any, list[int]] = defaultdict(list)
            for r, plan in enumerate(plans):
                info = plan.storage_data
                # a rank whose host is unknown (a planner dropped it) shares with no one
                hosts[info.host if isinstance(info, LocalShareInfo) else ("unknown", r)].append(r)
            groups = list(hosts.values())
        else:
            groups = [list(range(len(plans)))]
        shares = assign_shares(
            needs,
            groups,
            group.ranks,
            payloads=self._payloads(plans),
            budget=self.options.memory_budget,
            max_range=self.options.part_size,
            gap=self.options.coalesce_gap,
            timeout=self.share_timeout,
        )
        return [dataclasses.replace(plan, storage_data=share) for plan, share in zip(plans, shares)]

    def read_data(self, plan: LoadPlan, planner: LoadPlanner) -> Future[None]:
        store = self.store
        recorder = StatsRecorder("load", store.url, store.counter)
        # payloads of half a part or more are worth a request of their own; smaller ones land
        # in their destinations as pieces of a merged range where the store reads in pieces
        land = LAND_BYTES if store.reads_into_pieces else None
        direct = DirectReads(self._manifest, self._metadata, self.options.part_size // 2, land)
        records = self._manifest.item_index() if self._manifest and self.verify_checksums else {}
        decoder = ItemDecoder(
            store.url,
            records,
            direct,
            verify_checksums=self.verify_checksums,
            trust_pickles=self.trust_pickles,
            safe_globals=self.safe_globals,
        )
        fetcher = Fetcher(store, self.options)
        share = plan.storage_data if self._group is not None else None
        requests: list[ReadItem] = list(plan.items)
        runner: ShareRunner | None = None
        self.last_share = None
        if isinstance(share, SharePlan):
            me = self._group.ranks[self._group.rank]  # type: ignore[union-attr]
            requests, shared_items = split_requests(requests, self.storage_data, share.slots_of(me))
            runner = ShareRunner(share, me, fetcher, decoder, shared_items)
            runner.run(planner)
        ranges = self._plan_reads(requests, planner, direct)
        fetched = fetcher.run(ranges, lambda fetch, data: decoder.on_fetched(fetch, data, planner))
        stats = recorder.stats
        stats.bytes = fetched + (runner.fetched if runner else 0)
        stats.objects = len(
            {r.key for r in ranges}
            | ({s.key for s in runner.plan.segments if s.owner == runner.me} if runner else set())
        )
        stats.items = len(plan.items)
        stats.direct_items = sum(1 if r.direct is not None else len(r.landed) for r in ranges)
        self.last_stats = recorder.finish()
        if runner is not None:
            self.last_share = runner.stats
            logger.info(
                "%s (rank %d; shared reads: %d bytes fetched for peers too, %d received)",
                self.last_stats.summary(),
                self.rank,
                runner.fetched,
                runner.received,
            )
        else:
            logger.info("%s (rank %d)", self.last_stats.summary(), self.rank)
        completed: Future[None] = Future()
        completed.set_result(None)
        return completed

    # -- sharing -------------------------------------------------------------------------------

    def _sharing_group(self) -> LoadGroup | None:
        """The distributed load being served, when its reads are shared."""
        if self.share_reads == "off":
            return None
        group = calling_load_group()
        return group if group is not None and len(group.ranks) > 1 else None

    def _payloads(self, plans: list[LoadPlan]) -> dict[tuple[str, int, int], tuple[int, int]]:
        """Stored tensors to share by their raw bytes alone (which ranks can take straight
        into their destination): (offset in the item, length) by stored item."""
        direct = DirectReads(self._manifest, self._metadata, self.options.part_size // 2)
        found: dict[tuple[str, int, int], tuple[int, int]] = {}
        seen: set[tuple[str, int, int]] = set()
        for plan in plans:
            for request in plan.items:
                info = self.storage_data[request.storage_index]
                slot = (info.relative_path, info.offset, info.length)
                if slot in seen:
                    continue
                seen.add(slot)
                item = StoredItem(info.offset, info.length, [request])
                payload = direct.whole_payload(info.relative_path, item, direct.min_bytes)
                if payload is not None:
                    found[slot] = (payload.offset, payload.length)
        return found

    def _checked(self, plans: list[LoadPlan]) -> list[LoadPlan]:
        """The plans, each item located by ``.metadata`` (else the checkpoint is damaged)."""
        for plan in plans:
            for request in plan.items:
                if request.storage_index not in self.storage_data:
                    raise self._unlocated(request.storage_index)
        return plans

    def _unlocated(self, index: Any) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.store.url}/{layout.METADATA_KEY} describes {index} but does not say "
            "where its bytes are stored (no storage_data entry). The checkpoint is damaged; "
            "load an earlier one."
        )

    # -- planning ------------------------------------------------------------------------------

    def _plan_reads(
        self, requests: list[ReadItem], planner: LoadPlanner, direct: DirectReads
    ) -> list[FetchRange]:
        """The plan's fetches, each routed once: direct into its tensor, or buffered."""
        try:
            return plan_reads(
                requests,
                self.storage_data,
                self.options.part_size,
                self.options.coalesce_gap,
                route=lambda key, item: direct.route(key, item, planner),
                land=lambda key, item: direct.land(key, item, planner),
            )
        except KeyError as exc:
            raise self._unlocated(exc.args[0]) from None

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
