"""Planning a load's reads: which byte ranges of which objects, coalesced, each routed once.

Data flow: the load plan's ReadItems and the metadata's locators go in; each ReadItem is mapped
to the stored item it lies in (several ReadItems of one item share it). Each stored item's route
is decided once (:func:`plan_reads`): a :class:`DirectRead` (its payload fetched straight into
its destination tensor, in a range of its own) or buffered. The buffered items of each object are
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
    tensor; otherwise the whole range is read into a fetch buffer and decoded.
    """

    key: str
    start: int
    end: int
    items: list[StoredItem] = field(default_factory=list)
    direct: DirectRead | None = None

    @property
    def size(self) -> int:
        return self.end - self.start


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
) -> list[FetchRange]:
    """The load's fetches, each with its route: ``route(key, item)`` is asked once per stored
    item; an item it gives a :class:`DirectRead` gets a range of its own carrying it, the rest
    are merged as in :func:`plan_fetches`."""
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
    return ranges


def item_names(items: list[StoredItem]) -> str:
    """The fqns read from ``items``, for messages: the first five and how many more."""
    fqns = sorted({r.storage_index.fqn for item in items for r in item.requests})
    shown = ", ".join(fqns[:5])
    return shown + (f" and {len(fqns) - 5} more" if len(fqns) > 5 else "")


def split_range(start: int, end: int, piece: int) -> list[tuple[int, int]]:
    """``[start, end)`` cut into pieces of at most ``piece`` bytes."""
    return [(a, min(a + piece, end)) for a in range(start, end, piece)]
