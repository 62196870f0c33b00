"""dcp_cloud.load.plan: which byte ranges a load reads, and how a range is cut into requests."""

from __future__ import annotations

import random
from typing import Any

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import MetadataIndex
from torch.distributed.checkpoint.planner import LoadItemType, ReadItem

from dcp_cloud.checkpoint.manifest import PayloadRecord
from dcp_cloud.load.plan import DirectRead, FetchRange, StoredItem, plan_fetches, plan_reads, split_range


class Plan:
    """ReadItems and their storage_data, built up item by item."""

    def __init__(self) -> None:
        self.requests: list[ReadItem] = []
        self.storage_data: dict[MetadataIndex, _StorageInfo] = {}

    def item(self, key: str, offset: int, length: int, readers: int = 1) -> list[ReadItem]:
        """A stored item at ``key[offset, offset+length)`` read by ``readers`` ReadItems."""
        index = MetadataIndex(f"{key}@{offset}", torch.Size([0]), len(self.storage_data))
        self.storage_data[index] = _StorageInfo(key, offset, length)
        made = []
        for n in range(readers):
            dest = MetadataIndex(f"{key}@{offset}", torch.Size([n]), n)
            request = ReadItem(
                LoadItemType.BYTE_IO, dest, torch.Size([0]), index, torch.Size([0]), torch.Size([1])
            )
            made.append(request)
        self.requests.extend(made)
        return made

    def plan(self, max_range: int = 1 << 30, gap: int = 0, **kwargs: Any) -> list[FetchRange]:
        return plan_fetches(self.requests, self.storage_data, max_range, gap, **kwargs)


def spans(ranges: list[FetchRange]) -> list[tuple[str, int, int, int]]:
    """Each range as (key, start, end, number of items), sorted."""
    return sorted((r.key, r.start, r.end, len(r.items)) for r in ranges)


def test_neighbours_within_the_gap_are_read_together() -> None:
    plan = Plan()
    plan.item("a", 0, 10)
    plan.item("a", 12, 8)  # 2 bytes after the first
    plan.item("a", 100, 10)  # 80 bytes after the second
    assert spans(plan.plan(gap=5)) == [("a", 0, 20, 2), ("a", 100, 110, 1)]
    assert spans(plan.plan(gap=80)) == [("a", 0, 110, 3)]
    assert spans(plan.plan(gap=1)) == [("a", 0, 10, 1), ("a", 12, 20, 1), ("a", 100, 110, 1)]


def test_adjacent_items_merge_with_no_gap() -> None:
    plan = Plan()
    for offset in range(0, 40, 10):
        plan.item("a", offset, 10)
    assert spans(plan.plan(gap=0)) == [("a", 0, 40, 4)]


def test_ranges_stay_within_max_range() -> None:
    plan = Plan()
    for offset in range(0, 50, 10):
        plan.item("a", offset, 10)
    assert spans(plan.plan(max_range=20, gap=100)) == [("a", 0, 20, 2), ("a", 20, 40, 2), ("a", 40, 50, 1)]


def test_an_item_larger_than_max_range_is_never_split() -> None:
    plan = Plan()
    plan.item("a", 0, 100)
    plan.item("a", 100, 5)
    assert spans(plan.plan(max_range=30)) == [("a", 0, 100, 1), ("a", 100, 105, 1)]


def test_objects_are_never_merged() -> None:
    plan = Plan()
    plan.item("a", 0, 10)
    plan.item("b", 10, 10)
    assert spans(plan.plan(gap=100)) == [("a", 0, 10, 1), ("b", 10, 20, 1)]


def test_readers_of_one_stored_item_share_one_fetch() -> None:
    plan = Plan()
    requests = plan.item("a", 0, 10, readers=3)
    (only,) = plan.plan()
    assert [(i.offset, i.length) for i in only.items] == [(0, 10)]
    assert only.items[0].requests == requests


def test_items_of_a_range_are_in_offset_order_whatever_the_request_order() -> None:
    plan = Plan()
    for offset in (30, 0, 20, 10):
        plan.item("a", offset, 10)
    random.Random(0).shuffle(plan.requests)
    (only,) = plan.plan()
    assert [i.offset for i in only.items] == [0, 10, 20, 30]
    assert only.size == 40


def test_overlapping_items_are_not_merged() -> None:
    plan = Plan()
    plan.item("a", 0, 10)
    plan.item("a", 5, 10)
    assert spans(plan.plan(gap=100)) == [("a", 0, 10, 1), ("a", 5, 15, 1)]


def test_items_kept_apart_get_a_range_of_their_own() -> None:
    plan = Plan()
    for offset in range(0, 40, 10):
        plan.item("a", offset, 10)

    def apart(key: str, item: StoredItem) -> bool:
        return item.offset == 10

    assert spans(plan.plan(gap=100, keep_apart=apart)) == [
        ("a", 0, 10, 1),
        ("a", 10, 20, 1),
        ("a", 20, 40, 2),
    ]


@given(
    items=st.lists(
        st.tuples(st.sampled_from("abc"), st.integers(0, 500), st.integers(1, 60), st.integers(1, 3)),
        max_size=30,
    ),
    max_range=st.integers(1, 300),
    gap=st.integers(0, 100),
)
def test_every_request_is_served_once_by_a_range_that_holds_its_item(
    items: list[tuple[str, int, int, int]], max_range: int, gap: int
) -> None:
    plan = Plan()
    for key, offset, length, readers in items:
        plan.item(key, offset, length, readers)
    ranges = plan.plan(max_range=max_range, gap=gap)
    served = [id(r) for fetch in ranges for item in fetch.items for r in item.requests]
    assert sorted(served) == sorted(id(r) for r in plan.requests)
    for fetch in ranges:
        assert fetch.items and fetch.size <= max(max_range, max(i.length for i in fetch.items))
        for item in fetch.items:
            assert fetch.start <= item.offset and item.offset + item.length <= fetch.end
            info = plan.storage_data[item.requests[0].storage_index]
            assert info.relative_path == fetch.key and (info.offset, info.length) == (
                item.offset,
                item.length,
            )
        offsets = [i.offset for i in fetch.items]
        assert offsets == sorted(offsets)


@pytest.mark.parametrize(
    ("start", "end", "piece", "expected"),
    [
        (0, 10, 4, [(0, 4), (4, 8), (8, 10)]),
        (5, 13, 4, [(5, 9), (9, 13)]),
        (0, 4, 4, [(0, 4)]),
        (7, 7, 4, []),
        (0, 3, 10, [(0, 3)]),
    ],
)
def test_split_range(start: int, end: int, piece: int, expected: list[tuple[int, int]]) -> None:
    assert split_range(start, end, piece) == expected


@given(st.integers(0, 10_000), st.integers(0, 10_000), st.integers(1, 5_000))
def test_split_range_covers_the_range_exactly_in_bounded_pieces(start: int, length: int, piece: int) -> None:
    pieces = split_range(start, start + length, piece)
    assert [a for a, _ in pieces] == list(range(start, start + length, piece))
    assert all(0 < b - a <= piece for a, b in pieces)
    assert all(b == a2 for (_, b), (a2, _) in zip(pieces, pieces[1:]))
    assert sum(b - a for a, b in pieces) == length


def test_each_stored_item_is_routed_once_and_a_direct_read_gets_a_range_of_its_own() -> None:
    plan = Plan()
    plan.item("a", 0, 10, readers=2)
    plan.item("a", 10, 100)  # the one read straight into its tensor
    plan.item("a", 110, 10)
    asked: list[tuple[str, int]] = []
    direct = DirectRead(PayloadRecord(0, 100, 0), torch.empty(0))

    def route(key: str, item: StoredItem) -> DirectRead | None:
        asked.append((key, item.offset))
        return direct if item.offset == 10 else None

    ranges = plan_reads(plan.requests, plan.storage_data, 1 << 30, 1 << 20, route)
    assert sorted(asked) == [("a", 0), ("a", 10), ("a", 110)]  # once per stored item
    routed = [r for r in ranges if r.direct is not None]
    assert len(routed) == 1 and routed[0].direct is direct
    assert (routed[0].start, routed[0].end, len(routed[0].items)) == (10, 110, 1)
    assert all(r.direct is None for r in ranges if r is not routed[0])
    assert sum(len(r.items) for r in ranges) == 3


# -- shared reads: which rank fetches which stored items for whom -------------------------------


@given(
    st.lists(  # per stored item: its length and which of 4 ranks need it
        st.tuples(st.integers(1, 3000), st.sets(st.integers(0, 3), min_size=1)), min_size=1, max_size=40
    ),
    st.sampled_from([[[0, 1, 2, 3]], [[0, 1], [2, 3]], [[0], [1, 2, 3]]]),
    st.integers(0, 200),
)
def test_shared_items_have_one_owner_and_reach_every_rank_that_needs_them(
    items: list[tuple[int, set[int]]], groups: list[list[int]], gap: int
) -> None:
    from dcp_cloud.load.share import assign_shares

    needs: list[set[tuple[str, int, int]]] = [set() for _ in range(4)]
    offset = 0
    payloads: dict[tuple[str, int, int], tuple[int, int]] = {}
    for i, (length, ranks) in enumerate(items):
        slot = ("k" if i % 3 else "j", offset, length)
        offset += length + (i % 2) * 50
        for r in ranks:
            needs[r].add(slot)
        if i % 4 == 0 and length > 100:  # a tensor shared by its raw bytes alone
            payloads[slot] = (64, length - 80)
    budget = 4000
    plans = assign_shares(
        needs,
        groups,
        (10, 11, 12, 13),
        payloads=payloads,
        budget=budget,
        max_range=2500,
        gap=gap,
        timeout=5.0,
    )
    for members in groups:
        plan = plans[members[0]]
        assert all(plans[r] is plan for r in members)
        if plan is None:
            assert len(members) == 1
            continue
        held: dict[tuple[str, int, int], tuple[int, ...]] = {}
        for segment in plan.segments:
            for o, n in segment.slots:
                slot = (segment.key, o, n)
                assert slot not in held, "an item fetched twice"
                if segment.payload:
                    assert len(segment.slots) == 1
                    assert (segment.start - o, segment.size) == payloads[slot]
                else:
                    assert slot not in payloads
                    assert segment.start <= o and o + n <= segment.end
                held[slot] = (segment.owner, *segment.receivers)
            # a merged range spans no item it does not hold
            inside = [
                s
                for need in needs
                for s in need
                if s[0] == segment.key and segment.start < s[1] + s[2] and s[1] < segment.end
            ]
            assert {(s[1], s[2]) for s in inside} <= set(segment.slots)
        for slot in set().union(*(needs[r] for r in members)):
            needing = {10 + r for r in members if slot in needs[r]}
            if len(needing) > 1:
                assert set(held[slot]) == needing and len(held[slot]) == len(needing)
            else:
                assert slot not in held
        for segments in plan.rounds():
            assert len(segments) == 1 or sum(s.size for s in segments) <= budget
