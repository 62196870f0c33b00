"""Parts sent straight from tensor memory: the same bytes as copying, fewer copies, more in flight."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_cloud.buffers import BufferPool
from dcp_cloud.checkpoint import layout
from dcp_cloud.save.parts import Part, PartBuilder
from dcp_cloud.save.upload import sends_part_pieces
from dcp_cloud.store.base import ObjectStore
from dcp_cloud.store.body import PartBody

from .conftest import Target, make_target

MiB = 1024 * 1024


def _mixed_state() -> dict[str, Any]:
    torch.manual_seed(0)
    state: dict[str, Any] = {f"tiny{i}": torch.randn(i % 7 + 1) for i in range(40)}
    for i, mib in enumerate((1, 2, 3, 4, 6, 8)):
        state[f"medium{i}"] = torch.randn(mib * MiB // 4)
    state["large"] = torch.randn(13 * MiB // 4)  # more than two 5 MiB parts
    base = torch.randn(1024, 1024)
    state["transposed"] = base.t()  # not contiguous: copied through a clone
    state["slice"] = base[100:900]  # a view of part of a storage: cloned
    state["half"] = torch.randn(2 * MiB // 2).to(torch.bfloat16)
    state["extra"] = {"step": 7, "name": "run-" + "x" * 1000}  # BYTE_IO items
    return state


def _assert_loads_back(target: Target, state: dict[str, Any]) -> None:
    """A load of ``target`` into a blank copy of ``_mixed_state`` gives ``state`` back, bit for bit."""
    out = {k: (torch.zeros_like(v) if isinstance(v, torch.Tensor) else v) for k, v in state.items()}
    out["extra"] = {"step": 0, "name": ""}
    dcp.load(out, storage_reader=target.reader())
    for key, value in state.items():
        if isinstance(value, torch.Tensor):
            assert torch.equal(out[key], value), key
    assert out["extra"] == state["extra"]


class _PartProbe:
    """Records each part's body kind and whether it holds views of memory outside the pool."""

    def __init__(self, store: ObjectStore, delay: float = 0.0) -> None:
        self.referenced_parts = 0
        self.parts = 0
        self.calls = 0
        self.max_calls = 0
        self.delay = delay
        upload_part = store.upload_part

        async def recording(upload: Any, number: int, offset: int, data: Any) -> None:
            self.parts += 1
            if isinstance(data, PartBody) and any(
                not isinstance(piece.obj, bytearray) for piece in data._pieces
            ):
                self.referenced_parts += 1
            self.calls += 1
            self.max_calls = max(self.max_calls, self.calls)
            try:
                if self.delay:
                    await asyncio.sleep(self.delay)
                await upload_part(upload, number, offset, data)
            finally:
                self.calls -= 1

        store.upload_part = recording  # type: ignore[method-assign]


def _stored_objects(target: Target, save_id: str) -> dict[str, bytes]:
    """Every object of the save (data objects and manifest), by key."""
    store = target.writer().store
    infos = store.run(store.list_objects(f"{save_id}/"))
    return {info.key: store.run(store.get(info.key)) for info in infos}


@pytest.mark.parametrize("store_name", ["s3", "gcs", "azure"])
def test_referenced_and_copied_saves_store_the_same_bytes(
    store_name: str, request: pytest.FixtureRequest, tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    save_id = layout.new_save_id()
    monkeypatch.setattr(layout, "new_save_id", lambda: save_id)
    state = _mixed_state()
    outcomes = {}
    for mode in ("referenced", "copied"):
        target = make_target(store_name, request, tmp_path)
        writer = target.writer(part_size=5 * MiB, memory_budget=10 * MiB, object_size=64 * MiB)
        assert sends_part_pieces(writer.store)  # the cloud stores send parts in pieces
        if mode == "copied":
            writer.store.sends_part_pieces = False  # type: ignore[attr-defined]
        probe = _PartProbe(writer.store)
        dcp.save(state, storage_writer=writer)
        outcomes[mode] = (_stored_objects(target, save_id), probe)
        _assert_loads_back(target, state)
    referenced, copied = outcomes["referenced"], outcomes["copied"]
    assert sorted(referenced[0]) == sorted(copied[0])
    assert any(key.endswith(layout.DATA_SUFFIX) for key in referenced[0])
    for key, data in copied[0].items():
        if key.endswith(layout.MANIFEST_NAME):  # item records and CRCs; the time may differ
            ours, theirs = json.loads(referenced[0][key]), json.loads(data)
            ours.pop("created"), theirs.pop("created")
            assert ours == theirs and any(ours["objects"].values())
        else:
            assert referenced[0][key] == data, f"{key} differs between the two saves"
    assert referenced[1].referenced_parts >= 3, "no part was sent from tensor memory"
    assert copied[1].referenced_parts == 0 and copied[1].parts == referenced[1].parts


def test_parts_in_flight_are_bounded_by_connections_not_buffers(s3_target: Target) -> None:
    """With buffers for two parts, eight parts still go at once: the large tensors' bytes are
    not copied into the pool."""
    writer = s3_target.writer(
        part_size=5 * MiB, memory_budget=10 * MiB, max_concurrency=8, object_size=128 * MiB
    )
    probe = _PartProbe(writer.store, delay=0.1)
    gets = 0
    real_get = BufferPool.get

    def counting_get(pool: BufferPool) -> bytearray:
        nonlocal gets
        gets += 1
        return real_get(pool)

    state = {f"w{i}": torch.randn(MiB) for i in range(20)}  # 80 MiB of 4 MiB tensors
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(BufferPool, "get", counting_get)
        dcp.save(state, storage_writer=writer)
    assert probe.parts == 17 and probe.referenced_parts >= 16  # 80 MiB and the records
    assert probe.max_calls >= 6, f"only {probe.max_calls} parts in flight at once"
    assert gets <= 2, f"{gets} part buffers taken for 80 MiB of large tensors"
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=s3_target.reader())
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_unsigned_bodies_sent_from_tensor_memory_carry_their_checksum(s3_target: Target) -> None:
    """Over HTTPS (or unsigned plain HTTP) botocore streams a body with a CRC32 trailer, reading
    it piece by piece: a part made of a copied header and a tensor's own memory must reach the
    store whole, with the checksum the server verifies."""
    from dcp_cloud import CloudStorageWriter

    options = {**s3_target.storage_options, "config_kwargs": {"s3": {"payload_signing_enabled": False}}}
    writer = CloudStorageWriter(
        s3_target.url, storage_options=options, part_size=5 * MiB, object_size=64 * MiB
    )
    probe = _PartProbe(writer.store)
    state = _mixed_state()
    assert s3_target.server is not None
    s3_target.server.clear_requests()
    dcp.save(state, storage_writer=writer)
    assert probe.referenced_parts >= 3, "no part was sent from tensor memory"
    uploads = [r for r in s3_target.server.requests() if r.kind in ("upload_part", "put_object")]
    assert uploads and not any(r.body_signed for r in uploads) and all(r.checksums for r in uploads)
    _assert_loads_back(s3_target, state)


def test_memory_store_copies_every_part_into_one_buffer(
    request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    target = make_target("memory", request, tmp_path)
    writer = target.writer(part_size=5 * MiB, memory_budget=10 * MiB, object_size=64 * MiB)
    assert not sends_part_pieces(writer.store)
    kinds: list[type] = []
    upload_part = writer.store.upload_part

    async def recording(upload: Any, number: int, offset: int, data: Any) -> None:
        kinds.append(type(data))
        await upload_part(upload, number, offset, data)

    writer.store.upload_part = recording  # type: ignore[method-assign]
    state = {f"w{i}": torch.randn(MiB) for i in range(5)}
    dcp.save(state, storage_writer=writer)
    assert kinds and set(kinds) == {memoryview}
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=target.reader())
    assert all(torch.equal(out[k], v) for k, v in state.items())


# -- PartBuilder -----------------------------------------------------------------------------


def test_copied_bytes_line_up_with_parts_and_buffers_come_back() -> None:
    pool = BufferPool(8, 3)
    parts: list[Part] = []
    builder = PartBuilder(pool, 8, parts.append)
    for chunk in (b"abc", b"defgh", b"ijklmnopq"):
        builder.copy(memoryview(chunk))
    last = builder.take()
    builder.close()
    assert [b"".join(p.pieces) for p in parts] == [b"abcdefgh", b"ijklmnop"]
    assert all(len(p.pieces) == 1 for p in parts)  # contiguous copies are one piece
    assert last is not None and b"".join(last.pieces) == b"q"
    for part in (*parts, last):
        builder.release(part)
    assert len(pool._free) == 3  # every buffer back, none lost


def test_referenced_views_split_at_part_ends_and_share_a_segment() -> None:
    pool = BufferPool(8, 2)
    parts: list[Part] = []
    builder = PartBuilder(pool, 8, parts.append)
    big = bytearray(b"ABCDEFGHIJKL")
    builder.copy(memoryview(b"hd"))
    builder.reference(memoryview(big))
    builder.copy(memoryview(b"tail"))
    last = builder.take()
    builder.close()
    assert [bytes(b"".join(p.pieces)) for p in parts] == [b"hdABCDEF", b"GHIJKLta"]
    assert parts[0].pieces[1].obj is big  # a view, not a copy
    assert last is not None and b"".join(last.pieces) == b"il"
    builder.release(parts[0])
    assert not pool._free  # still held by the later parts
    builder.release(parts[1])
    builder.release(last)
    assert len(pool._free) == 1  # the one segment that all three shared
