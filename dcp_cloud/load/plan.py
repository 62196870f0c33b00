"""Planning a load's reads: which byte ranges of which objects, coalesced, each routed once.

Data flow: the load plan's ReadItems and the metadata's locators go in; each ReadItem is mapped
to the stored item it lies in (several ReadItems of one item share it). Each stored item's route
is decided once (:func:`plan_reads`): a :class:`DirectRead` (its payload fetched straight into
its destination tensor, in a range of its own), landed (a medium payload read straight into its
destination as one piece of a merged range) or buffered. The other items of each object are
sorted by offset and merged with their neighbours into :class:`FetchRange` s. The fetcher
(:mod:`dcp_cloud.load.fetcher`) executes the ranges; the reader commits or decodes each one.
Nothing here touches a store.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.distributed.checkpoint.planner import ReadItem

from ..checkpoint.manifest import PayloadRecord


@dataclass
class StoredItem:
    """One serialized item in a data object, and the ReadItems it serves."""

    offset: int
    length: int
    requests: list[ReadItem] = field(default_factory=list)


@dataclass
class DirectRead:
    """A stored tensor's payload, read straight into the destination tensor ``target``."""

    payload: PayloadRecord
    target: torch.Tensor


@dataclass
class FetchRange:
    """Bytes ``[start, end)`` of one object, fetched together, holding whole items.

    With ``direct`` set the range holds one item whose payload is read into its destination
    tensor. Otherwise the range is read with one request: the payloads in ``landed`` (by their
    item's offset) straight into their destinations, every other byte into a scratch buffer
    (the whole range, when nothing lands), whose items are decoded from it.
    """

    key: str
    start: int
    end: int
    items: list[StoredItem] = field(default_factory=list)
    direct: DirectRead | None = None
    landed: dict[int, DirectRead] = field(default_factory=dict)

    @property
    def size(self) -> int:
        return self.end - self.start

    @property
    def scratch_size(self) -> int:
        """Bytes of the range that land in the scratch buffer rather than a destination."""
        return self.size - sum(d.payload.length for d in self.landed.values())

    def pieces(self) -> list[tuple[int, int, DirectRead | None]]:
        """The range cut at its landed payloads, in order: ``(start, end, landing)`` with
        ``landing`` None for the bytes that go to the scratch buffer. Empty spans are left out."""
        out: list[tuple[int, int, DirectRead | None]] = []
        cursor = self.start
        for offset in sorted(self.landed):
            route = self.landed[offset]
            begin = offset + route.payload.offset
            if begin > cursor:
                out.append((cursor, begin, None))
            out.append((begin, begin + route.payload.length, route))
            cursor = begin + route.payload.length
        if self.end > cursor:
            out.append((cursor, self.end, None))
        return out

    def scratch_offset(self, position: int) -> int:
        """Where byte ``position`` of the object (not inside a landed payload) lies in the
        scratch buffer."""
        before = sum(
            d.payload.length for offset, d in self.landed.items() if offset + d.payload.offset < position
        )
        return position - self.start - before


def plan_fetches(
    requests: list[ReadItem],
    storage_data: dict[Any, Any],
    max_range: int,
    gap: int,
    keep_apart: Callable[[str, StoredItem], bool] | None = None,
) -> list[FetchRange]:
    """Group ReadItems by stored item, then merge nearby items of an object into ranges.

    Items are never split; neighbours closer than ``gap`` bytes are merged while the range
    stays within ``max_range`` bytes. Several ReadItems of one stored item (resharding) are
    served by one fetch and one decode. Items for which ``keep_apart(key, item)`` holds get a
    range of their own.
    """
    by_object: dict[str, dict[tuple[int, int], StoredItem]] = defaultdict(dict)
    for request in requests:
        info = storage_data[request.storage_index]
        items = by_object[info.relative_path]
        slot = (info.offset, info.length)
        if slot not in items:
            items[slot] = StoredItem(info.offset, info.length)
        items[slot].requests.append(request)

    ranges: list[FetchRange] = []
    for key, items in by_object.items():
        current: FetchRange | None = None
        for item in sorted(items.values(), key=lambda i: i.offset):
            end = item.offset + item.length
            if keep_apart is not None and keep_apart(key, item):
                ranges.append(FetchRange(key, item.offset, end, [item]))
                current = None
                continue
            if (
                current is not None
                and item.offset - current.end <= gap
                and end - current.start <= max_range
                and item.offset >= current.end
            ):
                current.end = end
                current.items.append(item)
                continue
            current = FetchRange(key, item.offset, end, [item])
            ranges.append(current)
    return ranges


def plan_reads(
    requests: list[ReadItem],
    storage_data: dict[Any, Any],
    max_range: int,
    gap: int,
    route: Callable[[str, StoredItem], DirectRead | None],
    land: Callable[[str, StoredItem], DirectRead | None] | None = None,
) -> list[FetchRange]:
    """The load's fetches, each with its route: ``route(key, item)`` is asked once per stored
    item; an item it gives a :class:`DirectRead` gets a range of its own carrying it, the rest
    are merged as in :func:`plan_fetches`. ``land(key, item)``, asked of each merged item,
    gives the payloads read straight into their destinations within their merged range."""
    routes: dict[int, DirectRead] = {}

    def keep_apart(key: str, item: StoredItem) -> bool:
        found = route(key, item)
        if found is not None:
            routes[id(item)] = found
        return found is not None

    ranges = plan_fetches(requests, storage_data, max_range, gap, keep_apart)
    for fetch in ranges:
        if len(fetch.items) == 1:
            fetch.direct = routes.get(id(fetch.items[0]))
        if fetch.direct is None and land is not None:
            for item in fetch.items:
                landing = land(fetch.key, item)
                if landing is not None:
                    fetch.landed[item.offset] = landing
    return ranges


def item_names(items: list[StoredItem]) -> str:
    """The fqns read from ``items``, for messages: the first five and how many more."""
    fqns = sorted({r.storage_index.fqn for item in items for r in item.requests})
    shown = ", ".join(fqns[:5])
    return shown + (f" and {len(fqns) - 5} more" if len(fqns) > 5 else "")


def split_range(start: int, end: int, piece: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into pieces of at most ``piece`` bytes."""
    return [(a, min(a + piece, end)) for a in range(start, end, piece)]
