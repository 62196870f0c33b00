"""How bytes move: parallel parts within the memory budget, coalesced and partial reads."""

from __future__ import annotations

import asyncio
import zlib
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from dcp_cloud import CloudStorageReader, CloudStorageWriter
from dcp_cloud.store.base import ObjectStore

from .conftest import STORES, Target, make_target

MiB = 1024 * 1024
GiB = 1024 * MiB


class _InFlight:
    """Wraps a store method to record the most calls (and bytes) in flight at once."""

    def __init__(self) -> None:
        self.calls = 0
        self.bytes = 0
        self.max_calls = 0
        self.max_bytes = 0

    def wrap(self, method: Any, size_of: Any) -> Any:
        async def wrapped(*args: Any, **kwargs: Any) -> Any:
            size = size_of(*args, **kwargs)
            self.calls += 1
            self.bytes += size
            self.max_calls = max(self.max_calls, self.calls)
            self.max_bytes = max(self.max_bytes, self.bytes)
            try:
                await asyncio.sleep(0.02)  # hold the slot so overlap is visible
                return await method(*args, **kwargs)
            finally:
                self.calls -= 1
                self.bytes -= size

        return wrapped


@pytest.fixture(params=[store for store in STORES if store != "file"])
def parts_target(request: pytest.FixtureRequest, tmp_path: Any) -> Target:
    """A fresh checkpoint URL on each store that uploads in parts (local folders write in place:
    next test)."""
    return make_target(request.param, request, tmp_path)


def _sliced_state(sizes: dict[str, int]) -> tuple[dict[str, torch.Tensor], dict[str, torch.Tensor]]:
    """Tensors that are views of part of a larger storage: the writer copies them (a view
    would keep the whole storage), so their parts are made of pool buffers only."""
    state = {name: torch.randn(numel + 1)[1:] for name, numel in sizes.items()}
    return state, {name: torch.zeros(numel) for name, numel in sizes.items()}


def test_upload_sends_parts_concurrently_within_the_budget(parts_target: Target) -> None:
    writer = parts_target.writer(
        part_size=5 * MiB, memory_budget=15 * MiB, max_concurrency=8, object_size=64 * MiB
    )
    store: ObjectStore = writer.store
    probe = _InFlight()
    store.upload_part = probe.wrap(store.upload_part, lambda upload, n, offset, data: len(data))  # type: ignore[method-assign]
    state, out = _sliced_state({"a": 10 * MiB, "b": 3 * MiB})  # 52 MiB, copied into parts
    dcp.save(state, storage_writer=writer)
    assert writer.last_stats is not None and writer.last_stats.requests["upload_part"] == 11
    assert probe.max_calls >= 2, "parts were sent one at a time"
    assert probe.max_bytes <= 15 * MiB, f"{probe.max_bytes} bytes in flight, budget 15 MiB"
    dcp.load(out, storage_reader=parts_target.reader())
    assert torch.equal(out["a"], state["a"]) and torch.equal(out["b"], state["b"])


def test_one_part_objects_are_put_from_their_part_buffer(parts_target: Target) -> None:
    """An object smaller than a part goes up as one PUT of a view of its pooled buffer: no copy
    outside the memory budget, and the buffer is reused only after the PUT."""
    writer = parts_target.writer(part_size=5 * MiB, memory_budget=10 * MiB, object_size=5 * MiB)
    store: ObjectStore = writer.store
    seen: list[tuple[type, int]] = []
    put = store.put

    async def recording_put(key: str, data: Any, *, if_absent: bool = False) -> None:
        if key.endswith(".distcp"):
            seen.append((type(data), len(data)))
            before = zlib.crc32(data)
            await asyncio.sleep(0.05)  # other objects fill buffers meanwhile
            assert zlib.crc32(data) == before, "the buffer was reused before the PUT ended"
        await put(key, data, if_absent=if_absent)

    store.put = recording_put  # type: ignore[method-assign]
    state, out = _sliced_state({f"w{i}": MiB // 4 * 3 for i in range(8)})  # 3 MiB each: one per object
    dcp.save(state, storage_writer=writer)
    assert len(seen) == 8 and {kind for kind, _ in seen} == {memoryview}, seen
    assert writer.last_stats is not None and "upload_part" not in writer.last_stats.requests
    dcp.load(out, storage_reader=parts_target.reader())
    assert all(torch.equal(out[k], v) for k, v in state.items())


@pytest.mark.parametrize("store_name", ["s3", "gcs"])
def test_small_saves_and_gcs_make_objects_of_one_part(
    store_name: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    """An object of several parts costs a multipart upload's start and completion besides its
    parts (on GCS an upload and a delete per part, plus a compose), so a small save (an eighth of
    it under four parts), and by default every save on GCS, makes objects of one part: only an
    item larger than a part makes a larger one. Larger saves elsewhere pack objects of at least
    four parts, up to 128 MiB."""
    target = make_target(store_name, request, tmp_path)
    state = {f"m{i}": torch.randn(MiB // 4 * 3) for i in range(4)}  # 3 MiB each
    state["big"] = torch.randn(3 * MiB)  # 12 MiB: three parts of 5 MiB
    writer = target.writer(part_size=5 * MiB)
    dcp.save(state, storage_writer=writer)
    stats = writer.last_stats
    assert stats is not None
    assert writer.sizes_for(24 * MiB).object_size == 5 * MiB
    assert stats.objects == 5 and stats.requests["complete_upload"] == 1  # the big item only
    if store_name == "gcs":
        assert writer.object_size == 5 * MiB and writer.sizes_for(GiB).object_size == 5 * MiB
    else:
        assert writer.object_size == 128 * MiB and writer.sizes_for(GiB).object_size == 128 * MiB
        assert writer.sizes_for(160 * MiB).object_size == 20 * MiB  # four parts
    packed = target.writer(target.url + "-packed", part_size=5 * MiB, object_size=64 * MiB)
    dcp.save(state, storage_writer=packed)
    assert packed.object_size == 64 * MiB and packed.last_stats is not None and packed.last_stats.objects == 1
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=target.reader())
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_local_folders_write_from_torch_save_memory_without_parts(tmp_path: Any) -> None:
    url = str(tmp_path / "ckpt")
    writer = CloudStorageWriter(url, part_size=5 * MiB, memory_budget=10 * MiB)
    assert writer.store.writes_in_place
    state = {"a": torch.randn(10 * MiB), "b": torch.randn(10 * MiB), "step": 7}  # 80 MiB: 2 threads
    dcp.save(state, storage_writer=writer)
    requests = writer.last_stats.requests  # type: ignore[union-attr]
    assert "upload_part" not in requests and requests["write"] >= 2, requests
    # items are serialized on several threads, each into objects of its own, renamed into place
    assert requests["complete_upload"] == writer.last_stats.objects >= 2  # type: ignore[union-attr]
    assert not [p for p in (tmp_path / "ckpt").rglob("*") if ".tmp-" in p.name]
    out = {"a": torch.zeros(10 * MiB), "b": torch.zeros(10 * MiB), "step": 0}
    dcp.load(out, storage_reader=CloudStorageReader(url))
    assert torch.equal(out["a"], state["a"]) and torch.equal(out["b"], state["b"]) and out["step"] == 7


def _load_probing_reads(target: Target, state: dict[str, torch.Tensor], budget: int) -> tuple[Any, _InFlight]:
    """Save ``state``, load it back (5 MiB parts, 8 requests at a time, ``budget`` bytes of fetch
    buffers) while recording the ranged reads in flight; returns the reader and the record."""
    dcp.save(state, storage_writer=target.writer())
    reader = target.reader(part_size=5 * MiB, memory_budget=budget, max_concurrency=8)
    store: ObjectStore = reader.store
    probe = _InFlight()
    store.read_into = probe.wrap(store.read_into, lambda key, start, out: len(out))  # type: ignore[method-assign]
    store.read_into_pieces = probe.wrap(  # type: ignore[method-assign]
        store.read_into_pieces, lambda key, start, pieces: sum(len(p) for p in pieces)
    )
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=reader)
    assert all(torch.equal(out[k], v) for k, v in state.items())
    return reader, probe


def test_download_fetches_ranges_concurrently_within_the_budget(target: Target) -> None:
    # 2 MiB tensors, under half a part: two items per 5 MiB range, fetched into buffers, or
    # where the store reads a range in pieces, landed in their destinations (then only the
    # scratch between them holds budget, so more than the budget may be downloading)
    state = {f"t{i}": torch.randn(MiB // 2) for i in range(24)}  # 48 MiB
    reader, probe = _load_probing_reads(target, state, budget=12 * MiB)
    landed = reader.store.reads_into_pieces
    assert reader.last_stats is not None and reader.last_stats.direct_items == (24 if landed else 0)
    assert probe.max_calls >= 2, "ranges were fetched one at a time"
    if not landed:
        assert probe.max_bytes <= 12 * MiB


def test_direct_reads_are_not_held_back_by_the_budget(target: Target) -> None:
    # 8 MiB tensors land straight in their destinations: they hold no fetch buffer, so the
    # budget (which bounds buffers) does not queue them behind one another, except on stores
    # whose client library buffers every download (Azure), where they hold memory all the same
    state = {f"w{i}": torch.randn(2 * MiB) for i in range(6)}  # 48 MiB
    reader, probe = _load_probing_reads(target, state, budget=10 * MiB)
    assert reader.last_stats is not None and reader.last_stats.direct_items == 6
    if reader.store.buffers_downloads:
        assert probe.max_bytes <= 10 * MiB, f"{probe.max_bytes} bytes downloading, budget 10 MiB"
    else:
        assert probe.max_bytes > 10 * MiB


def test_small_items_are_packed_and_coalesced(s3_target: Target) -> None:
    state = {f"layer{i}.bias": torch.randn(256) for i in range(300)}
    writer = s3_target.writer()
    dcp.save(state, storage_writer=writer)
    assert writer.last_stats is not None and writer.last_stats.objects == 1
    # one data PUT, metadata check, intent record (and its removal), manifest, .metadata
    assert writer.last_stats.total_requests <= 6
    s3_target.server.clear_requests()
    out = {k: torch.zeros(256) for k in state}
    dcp.load(out, storage_reader=s3_target.reader())
    gets = [r for r in s3_target.server.requests() if r.kind == "get_object"]
    assert len(gets) == 3, [r.path for r in gets]  # .metadata, manifest, one range for all 300 items
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_partial_load_reads_only_the_needed_ranges(target: Target) -> None:
    state = {"big": torch.randn(8 * MiB), "wanted": torch.randn(1000)}
    dcp.save(state, storage_writer=target.writer())
    reader = target.reader()
    out = {"wanted": torch.zeros(1000)}
    dcp.load(out, storage_reader=reader, planner=DefaultLoadPlanner(allow_partial_load=True))
    assert torch.equal(out["wanted"], state["wanted"])
    assert reader.last_stats is not None and reader.last_stats.bytes < 10_000


def test_standard_aws_environment_needs_no_options(
    s3_target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in s3_target.server.env.items():
        monkeypatch.setenv(name, value)
    url = s3_target.url + "-env"
    state = {"x": torch.arange(100)}
    dcp.save(state, storage_writer=CloudStorageWriter(url, storage_options={"skip_instance_cache": True}))
    out = {"x": torch.zeros(100, dtype=torch.int64)}
    dcp.load(out, storage_reader=CloudStorageReader(url, storage_options={"skip_instance_cache": True}))
    assert torch.equal(out["x"], state["x"])


def test_async_save_in_one_process(target: Target) -> None:
    state = {"w": torch.randn(256, 256), "step": 9}
    future = dcp.async_save(state, storage_writer=target.writer())
    future.result(timeout=120)
    out = {"w": torch.zeros(256, 256), "step": 0}
    dcp.load(out, storage_reader=target.reader())
    assert torch.equal(out["w"], state["w"]) and out["step"] == 9


def test_writer_and_reader_pickle_without_their_connections(target: Target) -> None:
    import pickle

    writer = target.writer()
    _ = writer.store
    clone = pickle.loads(pickle.dumps(writer))
    assert clone._store is None and clone.url == writer.url
    dcp.save({"x": torch.ones(3)}, storage_writer=clone)
    reader = pickle.loads(pickle.dumps(target.reader()))
    out = {"x": torch.zeros(3)}
    dcp.load(out, storage_reader=reader)
    assert torch.equal(out["x"], torch.ones(3))


@pytest.mark.skipif(
    not torch.cuda.is_available(), reason="needs a CUDA device; CPU tensors are covered everywhere else"
)
def test_cuda_tensors_are_staged_to_cpu(target: Target) -> None:
    state = {"w": torch.randn(128, 128, device="cuda"), "v": torch.arange(10, device="cuda")[::2]}
    dcp.save(state, storage_writer=target.writer())
    out = {"w": torch.zeros(128, 128, device="cuda"), "v": torch.zeros(5, dtype=torch.int64, device="cuda")}
    dcp.load(out, storage_reader=target.reader())
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["v"], state["v"])


def test_defaults_follow_a_large_part_size() -> None:
    writer = CloudStorageWriter("memory://x/y", part_size=200 * MiB)
    assert writer.options.memory_budget == 400 * MiB and writer.options.object_size == 200 * MiB
    assert CloudStorageWriter("memory://x/y").options.memory_budget == 160 * MiB
    reader = CloudStorageReader("memory://x/y", part_size=200 * MiB)
    assert reader.options.memory_budget == 400 * MiB
    with pytest.raises(ValueError, match="memory_budget"):  # an explicit budget is kept, and checked
        CloudStorageWriter("memory://x/y", part_size=200 * MiB, memory_budget=200 * MiB)
