"""Medium tensors (below half a part) land in their destinations as pieces of a merged range."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud.checkpoint.manifest import Manifest
from dcp_cloud.load.plan import DirectRead, FetchRange, StoredItem
from dcp_cloud.store import open_store
from dcp_cloud.store.base import ObjectStore

from .conftest import Target
from .helpers import assert_same, failure_text

MiB = 1024 * 1024
PART = 8 * MiB  # ranges of one request merge up to 8 MiB; a range of its own from 4 MiB up


def _state() -> dict[str, Any]:
    """Medium tensors of 128 KiB to 1.5 MiB (each size once) between tiny ones, as a model's
    layers lie."""
    g = torch.Generator().manual_seed(11)
    state: dict[str, Any] = {}
    for i in range(12):
        state[f"layer{i}.weight"] = torch.randn(32 * (1 + i), 1024, generator=g)
        state[f"layer{i}.norm"] = torch.randn(256, generator=g)
    state["embed"] = torch.randn(500, 512, generator=g).to(torch.bfloat16)
    state["step"] = 3
    return state


def _zeroed(state: dict[str, Any]) -> dict[str, Any]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else None for k, v in state.items()}


def _manifest(target: Target) -> tuple[ObjectStore, Manifest]:
    store = open_store(target.url, target.storage_options)
    key = next(o.key for o in store.run(store.list_objects("")) if o.key.endswith("manifest.json"))
    return store, Manifest.from_json(store.run(store.get(key)))


def test_medium_tensors_land_in_their_destinations_with_few_requests(target: Target) -> None:
    state = _state()
    dcp.save(state, storage_writer=target.writer())
    reader = target.reader(part_size=PART)
    out = _zeroed(state)
    dcp.load(out, storage_reader=reader)
    assert_same(state, out)
    stats = reader.last_stats
    assert stats is not None
    medium = sum(1 for v in state.values() if isinstance(v, torch.Tensor) and v.nbytes >= 64 * 1024)
    # ~10 MiB in ranges of at most 8 MiB: a few requests, not one per tensor
    assert stats.requests.get("get_range", 0) <= 2 * stats.objects + 1 < medium
    assert stats.direct_items == (medium if reader.store.reads_into_pieces else 0)


def test_a_corrupt_landed_payload_names_its_tensor(target: Target) -> None:
    state = _state()
    dcp.save(state, storage_writer=target.writer())
    store, manifest = _manifest(target)
    name = "layer4.weight"
    ((key, record, payload),) = [
        (k, r, r.payload)
        for k, rs in manifest.objects.items()
        for r in rs
        if r.payload is not None and r.payload.length == state[name].nbytes
    ]
    data = bytearray(store.run(store.get(key)))
    data[record.offset + payload.offset + 1000] ^= 0x01
    store.run(store.put(key, bytes(data)))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_zeroed(state), storage_reader=target.reader(part_size=PART))
    text = failure_text(info.value)
    assert "checksum mismatch" in text and key in text and name in text
    # the tiny neighbours of the same range still decode from the scratch buffer
    out = _zeroed(state)
    dcp.load(out, storage_reader=target.reader(part_size=PART, verify_checksums=False))
    assert torch.equal(out["layer3.norm"], state["layer3.norm"])
    assert not torch.equal(out[name], state[name])


def test_a_truncated_object_is_reported_not_half_loaded(target: Target) -> None:
    state = _state()
    dcp.save(state, storage_writer=target.writer())
    store, manifest = _manifest(target)
    key = max(manifest.objects, key=lambda k: sum(r.length for r in manifest.objects[k]))
    data = store.run(store.get(key))
    store.run(store.put(key, data[: len(data) // 2]))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_zeroed(state), storage_reader=target.reader(part_size=PART))
    text = failure_text(info.value)
    assert "truncated" in text and key in text


def test_read_into_pieces_fills_the_pieces_in_order(target: Target) -> None:
    store = open_store(target.url, target.storage_options)
    data = bytes(range(256)) * 64
    store.run(store.put("r", data))
    pieces = [memoryview(bytearray(n)) for n in (10, 0, 3000, 1, 5000)]
    got = store.run(store.read_into_pieces("r", 7, pieces))
    assert got == 8011
    assert b"".join(bytes(p) for p in pieces) == data[7 : 7 + 8011]
    # past the end: the count says how far it got, the rest stays untouched
    tail = [memoryview(bytearray(b"x" * 100)), memoryview(bytearray(b"y" * 100))]
    got = store.run(store.read_into_pieces("r", len(data) - 150, tail))
    assert got == 150
    assert bytes(tail[0]) == data[-150:-50] and bytes(tail[1][:50]) == data[-50:]
    assert bytes(tail[1][50:]) == b"y" * 50


def test_read_into_pieces_checks_its_key(target: Target) -> None:
    store = open_store(target.url, target.storage_options)
    with pytest.raises(Exception, match="\\.\\."):
        store.run(store.read_into_pieces("../escape", 0, [memoryview(bytearray(4))]))


def _route(length: int) -> DirectRead:
    from dcp_cloud.checkpoint.manifest import PayloadRecord

    return DirectRead(PayloadRecord(64, length, 0), torch.empty(length, dtype=torch.uint8))


def test_pieces_tile_the_range_and_map_the_scratch() -> None:
    items = [StoredItem(0, 500), StoredItem(512, 2000), StoredItem(2560, 300), StoredItem(2880, 1000)]
    fetch = FetchRange("k", 0, 3880, items, landed={512: _route(1800), 2880: _route(900)})
    pieces = fetch.pieces()
    assert [(a, b, r is not None) for a, b, r in pieces] == [
        (0, 576, False),
        (576, 2376, True),
        (2376, 2944, False),
        (2944, 3844, True),
        (3844, 3880, False),
    ]
    assert fetch.scratch_size == 3880 - 1800 - 900 == sum(b - a for a, b, r in pieces if r is None)
    assert fetch.scratch_offset(0) == 0
    assert fetch.scratch_offset(2560) == 2560 - 1800  # after the first landed payload
    assert fetch.scratch_offset(3870) == 3870 - 2700


def test_the_scratch_is_budgeted_not_the_landed_bytes() -> None:
    from dcp_cloud.buffers import ReadBuffers
    from dcp_cloud.load.fetcher import Fetcher
    from dcp_cloud.options import TransferOptions

    class _Store:
        buffers_downloads = False

    fetch = FetchRange("k", 0, 6 * MiB, [StoredItem(0, 6 * MiB)], landed={0: _route(6 * MiB - 128)})
    buffers = ReadBuffers(granule=MiB, limit=64 * MiB)
    fetcher = Fetcher(_Store(), TransferOptions())  # type: ignore[arg-type]
    assert fetcher._held_bytes(fetch, buffers) == MiB  # one granule for 128 bytes of headers
    _Store.buffers_downloads = True  # the client holds the whole body: all of it counts
    assert fetcher._held_bytes(fetch, buffers) == 6 * MiB
