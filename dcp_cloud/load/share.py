"""Shared reads: each stored byte fetched from the store once per job (or per host), not per rank.

Data flow: ``dcp.load`` gathers every rank's read plan on the coordinator, where
:func:`assign_shares` finds the stored items several ranks of one sharing group (the job, or the
ranks of one host) need, gives each to one owner among them (balanced by the bytes each rank
fetches), merges an owner's neighbouring items wanted by the same ranks into
:class:`Segment` s, and packs the segments into rounds of at most the memory budget. The
:class:`SharePlan` travels to every rank in its ``LoadPlan.storage_data``. In ``read_data`` every
rank of the group runs the rounds in lockstep (:class:`ShareRunner`): owners fetch their
segments; all ranks exchange a status (so an owner's failure stops every rank before any data
moves); the ranks that need a segment take it from its owner: from a shared-memory block under
``/dev/shm`` when they see the same one (:mod:`~dcp_cloud.load.share_shm`; one memory copy),
else over gloo point-to-point (CPU bytes); every rank decodes what it needs with the same
decoder as unshared reads. Items only one rank needs are not shared: they are read as without
sharing (direct reads included).

Before the first round the ranks meet under the plan's secret token in the default store
(:mod:`~dcp_cloud.load.share_arrival`), which also tells each which peers share its
``/dev/shm``; a rank that never arrives (it failed before reading, or does not share) is named
in the others' error after ``share_timeout``. The collectives run on a gloo group of the ranks
that share, created with a bounded timeout: a rank that dies or stops answering makes the
others raise after at most that long (at once when its connection closes). The coordinator
also reads ``.metadata`` and the manifest once and broadcasts them (:func:`broadcast_result`).
"""

from __future__ import annotations

import hashlib
import os
import pickle
import secrets
import socket
import sys
from collections import defaultdict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from datetime import timedelta
from types import FrameType
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch.distributed.checkpoint.planner import LoadPlanner, ReadItem

from ..errors import DcpCloudError, PeerReadError
from . import share_shm
from .decode import ItemDecoder
from .direct import tensor_memory
from .fetcher import Fetcher
from .plan import DirectRead, FetchRange, StoredItem
from .share_arrival import absent_message, leave, meet_peers

#: ``share_reads`` values: share across the whole job, among the ranks of each host, or not
SCOPES = ("job", "host", "off")
#: overrides the host name ranks are grouped by with ``share_reads="host"``
HOST_ENV = "DCP_CLOUD_HOST_ID"

T = TypeVar("T")

#: a stored item: (object key, offset, length)
Slot = tuple[str, int, int]


def host_id() -> str:
    """The host a rank shares reads with: ``$DCP_CLOUD_HOST_ID``, else the host name."""
    return os.environ.get(HOST_ENV) or socket.gethostname()


# -- the process group of the running dcp.load -------------------------------------------------


@dataclass(frozen=True)
class LoadGroup:
    """The ranks of the ``dcp.load`` call being served: global ranks in group-rank order."""

    ranks: tuple[int, ...]
    #: this process's rank within the group
    rank: int
    #: the coordinator's rank within the group
    coordinator: int

    @property
    def is_coordinator(self) -> bool:
        return self.rank == self.coordinator


def calling_load_group(max_depth: int = 16) -> LoadGroup | None:
    """The process group of the ``dcp.load`` that called us, when it runs distributed.

    DCP does not hand its process group (or whether it runs distributed at all: ``no_dist``)
    to the storage reader, and collectives on any other group would hang. The load's
    ``_DistWrapper`` is found in the calling frames; when it is not there (another caller, another
    torch) None is returned and nothing is shared.
    """
    if not (dist.is_available() and dist.is_initialized()):
        return None
    from torch.distributed.checkpoint.utils import _DistWrapper

    frame: FrameType | None = sys._getframe(1)
    for _ in range(max_depth):
        if frame is None:
            return None
        # only torch's own frames are looked into (reading f_locals has costs of its own)
        wrapper = frame.f_locals.get("distW") if frame.f_code.co_name in _LOAD_FRAMES else None
        if isinstance(wrapper, _DistWrapper):
            if not wrapper.use_dist:
                return None
            group = wrapper.group
            world = dist.get_world_size(group)
            ranks = tuple(dist.get_global_rank(group, r) if group is not None else r for r in range(world))
            return LoadGroup(ranks, dist.get_rank(group), wrapper.coordinator_rank)
        frame = frame.f_back
    return None


#: functions of torch.distributed.checkpoint.state_dict_loader that hold the load's _DistWrapper
_LOAD_FRAMES = ("local_step", "_load_state_dict")

_GROUPS: dict[tuple[int, tuple[int, ...]], Any] = {}
#: the timeout each of those groups was last set to
_TIMEOUTS: dict[Any, float] = {}


def side_group(ranks: tuple[int, ...], timeout: float) -> Any:
    """A gloo group of ``ranks`` whose collectives give up after ``timeout`` seconds (this
    rank's own setting); made once per set of ranks. Only its members call this, all alike."""
    c10d = dist.distributed_c10d
    key = (id(c10d._get_default_group()), ranks)
    if key not in _GROUPS:
        # Named by its ranks alone. dist.new_group(use_local_synchronization=True) would hash
        # into the name how many groups this process has joined, which differs between ranks
        # as soon as the application (or a load on a subgroup) made a group of some ranks only:
        # the ranks would rendezvous under different names and wait out the timeout. The
        # timeout is no part of the name either, so ranks set to different ones still meet.
        name = "dcp_cloud_share_" + hashlib.sha1(repr(list(ranks)).encode()).hexdigest()[:20]
        try:
            group, _ = c10d._new_process_group_helper(
                len(ranks),
                ranks.index(dist.get_rank()),
                list(ranks),
                "gloo",
                c10d._get_default_store(),
                group_name=name,  # type: ignore[arg-type]  # GroupName: a NewType of str
                timeout=timedelta(seconds=timeout),
            )
        except RuntimeError as exc:  # the store's rendezvous gave up waiting for a rank
            raise PeerReadError(
                f"{absent_message([], timeout, 'the shared read')} ({type(exc).__name__}: {exc})"
            ) from exc
        c10d._world.pg_group_ranks[group] = {g: i for i, g in enumerate(ranks)}
        _GROUPS[key] = group
    c10d._set_pg_timeout(timedelta(seconds=timeout), _GROUPS[key])
    _TIMEOUTS[_GROUPS[key]] = timeout
    return _GROUPS[key]


def broadcast_result(group: Any, src: int, is_source: bool, produce: Callable[[], T]) -> T:
    """``produce()`` run on the source rank, its result (or what it raised) on every rank."""
    payload: Any = None
    if is_source:
        try:
            payload = ("ok", produce())
        except BaseException as exc:  # noqa: BLE001 - every rank must learn of it
            payload = ("error", _portable(exc))
    box = [payload]
    try:
        dist.broadcast_object_list(box, src=src, group=group)
    except RuntimeError as exc:  # gloo gave up: a rank is missing (or died)
        timeout = _TIMEOUTS.get(group, 0.0)
        raise PeerReadError(
            f"{absent_message([], timeout, 'the shared read of .metadata')} ({type(exc).__name__}: {exc})"
        ) from exc
    status, value = box[0]
    if status == "error":
        raise value
    return value  # type: ignore[no-any-return]


def _portable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling, else a DcpCloudError quoting it."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return DcpCloudError(f"{type(exc).__name__}: {exc}")


# -- planning (on the coordinator) --------------------------------------------------------------


@dataclass(frozen=True)
class LocalShareInfo:
    """What a rank tells the coordinator in its local plan's ``storage_data``."""

    host: str


@dataclass(frozen=True)
class Segment:
    """Bytes ``[start, end)`` of object ``key``, fetched by ``owner`` and sent to ``receivers``
    (global ranks) in round ``round``; ``slots``: the stored items it holds, (offset, length).

    A ``payload`` segment holds only the raw bytes of its one stored tensor (located by the
    manifest): a rank whose destination takes them as they are (a direct read) fetches or
    receives them straight into it.
    """

    round: int
    owner: int
    key: str
    start: int
    end: int
    slots: tuple[tuple[int, int], ...]
    receivers: tuple[int, ...]
    payload: bool = False

    @property
    def size(self) -> int:
        return self.end - self.start


@dataclass(frozen=True)
class SharePlan:
    """A rank's part in shared reads, in its ``LoadPlan.storage_data``: the ranks it shares with
    (global ranks) and every segment of that group, in round order."""

    ranks: tuple[int, ...]
    segments: tuple[Segment, ...] = ()
    timeout: float = 300.0
    #: this load's secret: names its peers' meeting and its shared-memory blocks ("": neither)
    token: str = ""

    def slots_of(self, rank: int) -> set[Slot]:
        """The stored items ``rank`` reads through sharing."""
        return {
            (s.key, offset, length)
            for s in self.segments
            if rank == s.owner or rank in s.receivers
            for offset, length in s.slots
        }

    def rounds(self) -> Iterator[list[Segment]]:
        current: list[Segment] = []
        for segment in self.segments:
            if current and segment.round != current[0].round:
                yield current
                current = []
            current.append(segment)
        if current:
            yield current


def assign_shares(
    needs: list[set[Slot]],
    groups: list[list[int]],
    global_ranks: tuple[int, ...],
    *,
    payloads: dict[Slot, tuple[int, int]] | None = None,
    budget: int,
    max_range: int,
    gap: int,
    timeout: float,
) -> list[SharePlan | None]:
    """Each plan's :class:`SharePlan` (None for a rank that shares with no one).

    Args:
        needs: the stored items each rank's plan reads, by group rank.
        groups: the sharing groups, as lists of group ranks (the job, or one per host).
        global_ranks: the global rank of each group rank.
        payloads: stored tensors shared by their raw bytes alone: (offset in the item, length).
        budget: the most bytes of segments in one round (a larger segment has a round alone).
        max_range: the largest merged segment.
        gap: neighbouring items at most this far apart are merged.
        timeout: seconds the sharing collectives may wait.
    """
    plans: list[SharePlan | None] = [None] * len(needs)
    for members in groups:
        if len(members) < 2:
            continue
        needers: dict[Slot, list[int]] = defaultdict(list)
        for r in members:
            for slot in needs[r]:
                needers[slot].append(r)
        load = {r: 0 for r in members}
        for slot, ranks in needers.items():
            if len(ranks) == 1:
                load[ranks[0]] += slot[2]
        # the items each set of ranks needs, cut into one contiguous run per owner (so owners
        # fetch neighbouring items together), the least loaded owners first
        by_needers: dict[tuple[int, ...], list[Slot]] = defaultdict(list)
        for slot, needing in needers.items():
            if len(needing) > 1:
                by_needers[tuple(sorted(needing))].append(slot)
        owned: dict[tuple[int, tuple[int, ...], str], list[Slot]] = defaultdict(list)
        for needset, slots in sorted(by_needers.items()):
            slots.sort(key=lambda s: (s[0], s[1]))
            total = sum(s[2] for s in slots)
            owners = sorted(needset, key=lambda r: (load[r], r))
            done, k = 0, 0
            for slot in slots:
                # the next owner takes over once the item's middle passes this owner's share
                while k < len(owners) - 1 and 2 * done + slot[2] > 2 * (k + 1) * total // len(owners):
                    k += 1
                owner = owners[k]
                done += slot[2]
                load[owner] += slot[2]
                owned[(owner, needset, slot[0])].append(slot)
        # neighbours merge only when no other stored item the load reads lies between them
        order = {slot: i for i, slot in enumerate(sorted(needers, key=lambda s: (s[0], s[1])))}
        by_owner: dict[int, list[Segment]] = defaultdict(list)
        payloads = payloads or {}
        for (owner, needset, key), slots in sorted(owned.items()):
            receivers = tuple(global_ranks[r] for r in needset if r != owner)
            whole = [slot for slot in slots if slot not in payloads]
            for slot in sorted(set(slots) - set(whole), key=lambda s: s[1]):
                start = slot[1] + payloads[slot][0]
                by_owner[owner].append(
                    Segment(
                        -1,
                        global_ranks[owner],
                        key,
                        start,
                        start + payloads[slot][1],
                        ((slot[1], slot[2]),),
                        receivers,
                        payload=True,
                    )
                )
            for start, end, held in _merge(sorted(whole, key=lambda s: s[1]), order, max_range, gap):
                by_owner[owner].append(Segment(-1, global_ranks[owner], key, start, end, held, receivers))
        segments = _pack_rounds(by_owner, budget)
        plan = SharePlan(
            tuple(sorted(global_ranks[r] for r in members)), tuple(segments), timeout, secrets.token_hex(16)
        )
        for r in members:
            plans[r] = plan
    return plans


def _merge(
    slots: list[Slot], order: dict[Slot, int], max_range: int, gap: int
) -> Iterator[tuple[int, int, tuple[tuple[int, int], ...]]]:
    """Neighbouring items of one object merged into ranges (items never split); ``order``: the
    position of every item the load reads, so that no range spans an item it does not hold."""
    current: list[tuple[int, int]] = []
    start = end = 0
    previous = -2
    for slot in slots:
        _, offset, length = slot
        if (
            current
            and order[slot] == previous + 1
            and offset >= end
            and offset - end <= gap
            and offset + length - start <= max_range
        ):
            current.append((offset, length))
            end = offset + length
            previous = order[slot]
            continue
        if current:
            yield start, end, tuple(current)
        current, start, end, previous = [(offset, length)], offset, offset + length, order[slot]
    if current:
        yield start, end, tuple(current)


def _pack_rounds(by_owner: dict[int, list[Segment]], budget: int) -> list[Segment]:
    """Segments taken from the owners in turn (so all of them fetch in each round), cut into
    rounds of at most ``budget`` bytes."""
    queues = [list(reversed(segments)) for _, segments in sorted(by_owner.items())]
    out: list[Segment] = []
    round_no, used = 0, 0
    while any(queues):
        for queue in queues:
            if not queue:
                continue
            segment = queue.pop()
            if used and used + segment.size > budget:
                round_no, used = round_no + 1, 0
            used += segment.size
            out.append(replace(segment, round=round_no))
    return out


@dataclass(frozen=True)
class ShareStats:
    """One rank's shared reading in one load: bytes it fetched from the store for itself and
    its peers, bytes it received from its peers, and how many of those it took from a peer's
    shared-memory block (the rest came over gloo)."""

    fetched: int
    received: int
    through_memory: int = 0


# -- running (on every rank) --------------------------------------------------------------------

#: a block holds the segments of one owner and round, each at an offset aligned to this
_ALIGN = 64


@dataclass
class ShareRunner:
    """Runs one rank's part of a :class:`SharePlan`: rounds of fetch, status, hand-over, decode.

    Owners fetch each round's segments; when a receiver of a segment shares this rank's
    ``/dev/shm`` (:func:`~dcp_cloud.load.share_shm.shm_domain`), straight into a shared-memory
    block of the round, from which those receivers copy or decode; other receivers get it over
    gloo. The status exchange tells every rank which owners made their block (one that could not,
    say for lack of room, sends over gloo). An owner unlinks a block after the next exchange, when
    every receiver holds its mapping; a failed load sweeps the blocks of its host.

    Memory: a rank holds the segments of one round at a time (those it owns and those it
    receives), at most the plan's budget, or one segment larger than it.
    """

    plan: SharePlan
    me: int
    fetcher: Fetcher
    decoder: ItemDecoder
    #: this rank's stored items and the requests each serves, by (key, offset, length)
    items: dict[Slot, StoredItem] = field(default_factory=dict)
    #: bytes this rank fetched from the store / received from its peers (through shared memory)
    fetched: int = 0
    received: int = 0
    through_memory: int = 0
    #: payload segments this rank reads straight into its destination, by (key, item offset)
    _routes: dict[tuple[str, int], DirectRead] = field(default_factory=dict)
    #: each rank's shared-memory domain ("" where it has none)
    _domains: dict[int, str] = field(default_factory=dict)

    @property
    def stats(self) -> ShareStats:
        return ShareStats(self.fetched, self.received, self.through_memory)

    def run(self, planner: LoadPlanner) -> None:
        plan = self.plan
        if plan.token:
            mine = share_shm.shm_domain(host_id()) or ""
            self._domains = meet_peers(plan.ranks, self.me, plan.token, plan.timeout, mine)
        group = side_group(plan.ranks, plan.timeout)
        pending: BaseException | None = None
        try:
            self._route_payloads(planner)
        except Exception as exc:
            pending = exc
        held: list[share_shm.Block] = []  # this rank's blocks not yet unlinked, oldest first
        round_no = 0
        try:
            for round_no, segments in enumerate(plan.rounds()):
                buffers: dict[int, torch.Tensor] = {}
                block: share_shm.Block | None = None
                if pending is None:
                    try:
                        buffers, block = self._fetch(round_no, segments)
                    except Exception as exc:
                        pending = exc
                if block is not None:
                    held.append(block)
                made = self._exchange_status(group, pending, block is not None)
                if round_no == 0 and plan.token:
                    leave(plan.token, self.me)
                # every receiver mapped the earlier rounds' blocks before this exchange
                while len(held) > (block is not None):
                    self._drop(held.pop(0))
                try:
                    self._transfer(round_no, group, segments, buffers, made)
                    self._decode(segments, buffers, planner)
                except Exception as exc:
                    pending = exc
                del buffers
            self._exchange_status(group, pending, False)
        except BaseException:
            self._sweep(round_no)
            raise
        finally:
            for block in held:
                self._drop(block)

    def _route_payloads(self, planner: LoadPlanner) -> None:
        """Which payload segments this rank takes straight into its destination tensor."""
        for segment in self.plan.segments:
            if segment.payload and (self.me == segment.owner or self.me in segment.receivers):
                (item,) = self._items(segment)
                route = self.decoder.direct.route(segment.key, item, planner)
                if route is not None and route.payload.length == segment.size:
                    self._routes[(segment.key, item.offset)] = route

    def _memory(self, segment: Segment) -> torch.Tensor:
        """Where a segment's bytes land on this rank: its destination tensor's bytes for a
        direct payload, else a buffer of its own."""
        route = self._routes.get((segment.key, segment.slots[0][0])) if segment.payload else None
        if route is not None:
            return route.target.reshape(-1).view(torch.uint8)
        return torch.empty(segment.size, dtype=torch.uint8)

    # -- shared memory ---------------------------------------------------------------------------

    def _local(self, a: int, b: int) -> bool:
        """Whether ranks ``a`` and ``b`` see the same ``/dev/shm``."""
        domain = self._domains.get(a, "")
        return bool(domain) and domain == self._domains.get(b, "")

    def _layout(self, segments: list[Segment], owner: int) -> tuple[dict[int, int], int]:
        """Where ``owner``'s block of a round holds each segment (by index in the round) that a
        rank of its host receives, and the block's size."""
        offsets: dict[int, int] = {}
        size = 0
        for i, segment in enumerate(segments):
            if segment.owner == owner and any(self._local(owner, r) for r in segment.receivers):
                offsets[i] = size
                size += -(-segment.size // _ALIGN) * _ALIGN
        return offsets, size

    def _drop(self, block: share_shm.Block | None) -> None:
        """Unlink this rank's block (its receivers keep their own mappings; it is unmapped here
        when the last view of it goes)."""
        if block is not None:
            share_shm.unlink_block(block.name)

    def _sweep(self, last_round: int) -> None:
        """After a failure: remove the blocks of this load that ranks of this host (this one
        included) made up to ``last_round``, as an owner that died cannot."""
        if not self.plan.token or not self._local(self.me, self.me):
            return
        owners = {s.owner for s in self.plan.segments if self._local(s.owner, self.me)}
        for round_no in range(last_round + 1):
            for owner in owners:
                share_shm.unlink_block(share_shm.block_name(self.plan.token, round_no, owner))

    # -- the steps of a round ----------------------------------------------------------------------

    def _fetch(
        self, round_no: int, segments: list[Segment]
    ) -> tuple[dict[int, torch.Tensor], share_shm.Block | None]:
        """This rank's segments of the round, from the store, by index in the round, and the
        shared-memory block that holds those a rank of this host receives (None: no block)."""
        fetches = {
            i: FetchRange(segment.key, segment.start, segment.end, self._items(segment))
            for i, segment in enumerate(segments)
            if segment.owner == self.me
        }
        if not fetches:
            return {}, None
        # a crafted .metadata may declare an item far larger than its object: each range over
        # the budget is probed for its end before any memory is mapped for it
        self.fetcher._check_large_ranges(list(fetches.values()))
        offsets, size = self._layout(segments, self.me)
        block = None
        if size:
            block = share_shm.create_block(share_shm.block_name(self.plan.token, round_no, self.me), size)
        try:
            buffers = {
                i: _view(block, offsets[i], segments[i].size)
                if block is not None and i in offsets
                else self._memory(segments[i])
                for i in fetches
            }
            jobs = [(fetch, tensor_memory(buffers[i])) for i, fetch in fetches.items()]
            self.fetched += self.fetcher.fetch_into(jobs)
        except BaseException:
            self._drop(block)
            raise
        return buffers, block

    def _exchange_status(self, group: Any, error: BaseException | None, made_block: bool) -> set[int]:
        """Every rank learns whether any rank failed (the first failure is raised everywhere)
        and which ranks made a shared-memory block this round."""
        statuses: list[Any] = [None] * len(self.plan.ranks)
        mine = (None if error is None else (self.me, _portable(error)), made_block)
        dist.all_gather_object(statuses, mine, group=group)
        if error is not None:
            raise error
        for status, _ in statuses:
            if status is not None:
                rank, cause = status
                raise PeerReadError(
                    f"rank {rank} failed while reading bytes it shares with this rank "
                    f"({type(cause).__name__}: {cause}); every rank of the load stops. Fix the "
                    "cause that rank reports and load again.",
                    rank,
                    cause,
                ) from cause
        return {rank for rank, (_, made) in zip(self.plan.ranks, statuses) if made}

    def _transfer(
        self,
        round_no: int,
        group: Any,
        segments: list[Segment],
        buffers: dict[int, torch.Tensor],
        made: set[int],
    ) -> None:
        """Owners send each segment over gloo to its receivers on other hosts (or to all of
        them, without a block); receivers take theirs over gloo or map their owner's block."""
        works: list[Any] = []
        blocks: dict[int, tuple[dict[int, int], int]] = {}
        for i, segment in enumerate(segments):
            owner = segment.owner
            if owner == self.me:
                for receiver in segment.receivers:
                    if owner not in made or not self._local(owner, receiver):
                        works.append(dist.isend(buffers[i], dst=receiver, group=group, tag=i))
            elif self.me in segment.receivers:
                self.received += segment.size
                if owner in made and self._local(owner, self.me):
                    blocks.setdefault(owner, self._layout(segments, owner))
                    continue
                buffers[i] = self._memory(segment)
                works.append(dist.irecv(buffers[i], src=owner, group=group, tag=i))
        failure: BaseException | None = None
        for owner, (offsets, size) in blocks.items():
            try:
                block = share_shm.open_block(
                    share_shm.block_name(self.plan.token, round_no, owner), size, owner
                )
            except share_shm.SharedBlockError as exc:
                failure = failure or exc
                continue
            for i, offset in offsets.items():
                if self.me in segments[i].receivers:
                    buffers[i] = _view(block, offset, segments[i].size)
                    self.through_memory += segments[i].size
        for work in works:
            work.wait()
        if failure is not None:
            raise failure

    def _decode(
        self, segments: list[Segment], buffers: dict[int, torch.Tensor], planner: LoadPlanner
    ) -> None:
        for i, segment in enumerate(segments):
            if i not in buffers:
                continue
            items = self._items(segment)
            if not segment.payload:
                fetch = FetchRange(segment.key, segment.start, segment.end, items)
                self.decoder.decode(fetch, tensor_memory(buffers[i]), planner)
                continue
            (item,) = items
            route = self._routes.get((segment.key, item.offset))
            if route is not None:
                target = route.target.reshape(-1).view(torch.uint8)
                if target.data_ptr() != buffers[i].data_ptr():  # landed in a block: copy it over
                    target.copy_(buffers[i])
                fetch = FetchRange(segment.key, item.offset, item.offset + item.length, items, route)
                self.decoder.commit_direct(fetch, route, planner)
            else:
                self.decoder.decode_payload(segment.key, item, tensor_memory(buffers[i]), planner)

    def _items(self, segment: Segment) -> list[StoredItem]:
        return [self.items[(segment.key, o, n)] for o, n in segment.slots]


def _view(block: share_shm.Block, offset: int, size: int) -> torch.Tensor:
    """Bytes ``[offset, offset + size)`` of a block, as a tensor (which keeps it mapped)."""
    if size == 0:
        return torch.empty(0, dtype=torch.uint8)
    return torch.frombuffer(block.memory, dtype=torch.uint8, count=size, offset=offset)


def split_requests(
    requests: list[ReadItem], storage_data: dict[Any, Any], shared: set[Slot]
) -> tuple[list[ReadItem], dict[Slot, StoredItem]]:
    """The requests read without sharing, and the shared stored items with their requests."""
    alone: list[ReadItem] = []
    items: dict[Slot, StoredItem] = {}
    for request in requests:
        info = storage_data[request.storage_index]
        slot = (info.relative_path, info.offset, info.length)
        if slot in shared:
            items.setdefault(slot, StoredItem(info.offset, info.length)).requests.append(request)
        else:
            alone.append(request)
    return alone, items


def plan_slots(requests: list[ReadItem], storage_data: dict[Any, Any]) -> set[Slot]:
    """The stored items a plan reads."""
    slots: set[Slot] = set()
    for request in requests:
        info = storage_data[request.storage_index]
        slots.add((info.relative_path, info.offset, info.length))
    return slots
