"""Large tensors are read straight into their destination tensors, and only when that is right."""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import CloudStorageReader, CloudStorageWriter
from dcp_cloud.buffers import BufferPool
from dcp_cloud.checkpoint.manifest import Manifest
from dcp_cloud.save.upload import ObjectUpload
from dcp_cloud.store import open_store

from .conftest import Target
from .helpers import assert_same, failure_text

MiB = 1024 * 1024
# readers read payloads of at least half a part directly: 3 MiB here, and the 8 MiB tensor
# arrives in two ranged reads
PART = 6 * MiB


def _state() -> dict[str, Any]:
    g = torch.Generator().manual_seed(5)
    return {
        "big": torch.randn(MiB, generator=g),  # 4 MiB fp32
        "bf": torch.randn(1024, 4096, generator=g).to(torch.bfloat16),  # 8 MiB bf16
        "transposed": torch.randn(1024, 1024, generator=g).t(),  # 4 MiB, not contiguous
        "small": torch.randn(1000, generator=g),
        "step": 9,
    }


def _zeroed(state: dict[str, Any]) -> dict[str, Any]:
    """A load target for ``state``: contiguous zeroed tensors, non-tensors blanked."""
    return {
        k: torch.zeros_like(v.contiguous()) if isinstance(v, torch.Tensor) else None for k, v in state.items()
    }


def _manifest_key(store: Any) -> str:
    return next(o.key for o in store.run(store.list_objects("")) if o.key.endswith("manifest.json"))


def _manifest(target: Target) -> tuple[Any, Manifest]:
    store = open_store(target.url, target.storage_options)
    return store, Manifest.from_json(store.run(store.get(_manifest_key(store))))


def _edit_manifest(url: str, edit: Callable[[dict[str, Any]], None], **storage_options: Any) -> None:
    """Rewrite the checkpoint's manifest JSON with ``edit`` applied."""
    store = open_store(url, storage_options)
    key = _manifest_key(store)
    doc = json.loads(store.run(store.get(key)))
    edit(doc)
    store.run(store.put(key, json.dumps(doc).encode()))


def _records_by_size(manifest: Manifest) -> dict[int, Any]:
    return {r.payload.length: (key, r) for key, rs in manifest.objects.items() for r in rs if r.payload}


def test_payloads_recorded_are_the_tensors_bytes(target: Target) -> None:
    state = _state()
    dcp.save(state, storage_writer=target.writer())
    store, manifest = _manifest(target)
    recorded = _records_by_size(manifest)
    # the contiguous tensors have payloads; the transposed one has none
    names = ("big", "bf", "small")
    assert sorted(recorded) == sorted(state[name].nbytes for name in names)
    for name in names:
        key, record = recorded[state[name].nbytes]
        start = record.offset + record.payload.offset
        stored = store.run(store.get_range(key, start, start + record.payload.length))
        assert stored == state[name].view(torch.uint8).numpy().tobytes(), name


def test_large_tensors_land_directly_and_the_rest_is_copied(target: Target) -> None:
    state = _state()
    dcp.save(state, storage_writer=target.writer())
    out = _zeroed(state)
    where = out["big"].data_ptr()
    reader = target.reader(part_size=PART)
    dcp.load(out, storage_reader=reader)
    assert_same(state, out)
    assert out["big"].data_ptr() == where
    assert reader.last_stats is not None and reader.last_stats.direct_items == 2


def test_small_tensors_are_copied_from_their_payload_without_parsing_the_archive(
    tmp_path: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    import dcp_cloud.load.decode as decode_module

    state = {
        **_state(),
        "scalar": torch.tensor(2.5),
        "ints": torch.arange(10),
        "half": torch.ones(3, 5).half(),
    }
    url = str(tmp_path / "ckpt")
    dcp.save(state, storage_writer=CloudStorageWriter(url))
    parsed: list[int] = []
    parse = decode_module.load_tensor
    monkeypatch.setattr(decode_module, "load_tensor", lambda view: parsed.append(len(view)) or parse(view))
    out = _zeroed(state)
    reader = CloudStorageReader(url, part_size=PART)
    dcp.load(out, storage_reader=reader)
    assert_same(state, out)
    assert reader.last_stats is not None and reader.last_stats.direct_items == 2
    # only the transposed tensor, whose storage is not row-major, has no payload to copy from
    assert len(parsed) == 1


def test_destinations_that_do_not_fit_are_filled_by_copy(target: Target) -> None:
    state = _state()
    dcp.save(state, storage_writer=target.writer())
    out = {
        "big": torch.zeros(MiB, dtype=torch.float64),  # another dtype: converted on copy
        "bf": torch.zeros(4096, 1024, dtype=torch.bfloat16).t(),  # right shape, not contiguous
    }
    reader = target.reader(part_size=PART)
    dcp.load(out, storage_reader=reader, planner=dcp.DefaultLoadPlanner(allow_partial_load=True))
    assert torch.equal(out["big"], state["big"].double())
    assert torch.equal(out["bf"], state["bf"])
    assert reader.last_stats is not None and reader.last_stats.direct_items == 0


def test_small_part_size_keeps_medium_tensors_coalesced(target: Target) -> None:
    state = _state()
    dcp.save(state, storage_writer=target.writer())
    reader = target.reader(part_size=20 * MiB)  # a range of its own from 10 MiB up: none here
    out = _zeroed(state)
    dcp.load(out, storage_reader=reader)
    assert_same(state, out)
    stats = reader.last_stats
    assert stats is not None and stats.requests.get("get_range") == stats.objects  # one range each
    # where the store reads a range in pieces, the contiguous medium payloads ("big", "bf")
    # land in their destinations within it; elsewhere every item is copied out of the buffer
    assert stats.direct_items == (2 if reader.store.reads_into_pieces else 0)


def test_corrupt_payload_names_object_and_tensor(target: Target) -> None:
    state = _state()
    dcp.save(state, storage_writer=target.writer())
    store, manifest = _manifest(target)
    key, record = _records_by_size(manifest)[state["bf"].nbytes]
    data = bytearray(store.run(store.get(key)))
    data[record.offset + record.payload.offset + PART + 12345] ^= 0x10  # in the second piece
    store.run(store.put(key, bytes(data)))
    out = {"bf": torch.zeros_like(state["bf"])}
    planner = dcp.DefaultLoadPlanner(allow_partial_load=True)
    with pytest.raises(CheckpointException) as info:
        dcp.load(out, storage_reader=target.reader(part_size=PART), planner=planner)
    text = failure_text(info.value)
    assert "checksum mismatch" in text and key in text and "bf" in text
    reader = target.reader(part_size=PART, verify_checksums=False)
    dcp.load(out, storage_reader=reader, planner=planner)
    assert reader.last_stats is not None and reader.last_stats.direct_items == 1
    assert not torch.equal(out["bf"], state["bf"])


def test_version_1_manifests_still_load_and_verify(target: Target) -> None:
    """Checkpoints written before payloads were recorded load by copy, checksums still checked."""
    state = _state()
    dcp.save(state, storage_writer=target.writer())
    store, manifest = _manifest(target)

    def as_version_1(doc: dict[str, Any]) -> None:
        doc["version"] = 1
        del doc["byteorder"]
        for entry in doc["objects"].values():
            entry["items"] = [fields[:3] for fields in entry["items"]]

    _edit_manifest(target.url, as_version_1, **target.storage_options)
    out = _zeroed(state)
    reader = target.reader(part_size=PART)
    dcp.load(out, storage_reader=reader)
    assert_same(state, out)
    assert reader.last_stats is not None and reader.last_stats.direct_items == 0

    key, offset = next((k, rs[-1].offset) for k, rs in manifest.objects.items())
    data = bytearray(store.run(store.get(key)))
    data[offset + 1000] ^= 0x01
    store.run(store.put(key, bytes(data)))
    with pytest.raises(CheckpointException) as info:
        dcp.load(out, storage_reader=target.reader(part_size=PART))
    assert "checksum mismatch" in failure_text(info.value)


def test_a_foreign_byte_order_is_never_read_directly(tmp_path: Any) -> None:
    url = str(tmp_path / "ckpt")
    state = {"big": torch.arange(MiB, dtype=torch.float32)}
    dcp.save(state, storage_writer=CloudStorageWriter(url))
    _edit_manifest(url, lambda doc: doc.update(byteorder="big"))
    reader = CloudStorageReader(url, part_size=PART)
    out = {"big": torch.zeros(MiB)}
    dcp.load(out, storage_reader=reader)
    assert torch.equal(out["big"], state["big"])  # torch.save's own byte-order record decides
    assert reader.last_stats is not None and reader.last_stats.direct_items == 0


def test_only_the_tensors_own_memory_counts_as_its_payload() -> None:
    """Bytes of the right size from elsewhere (a copy) are not taken for the tensor's payload."""
    store = open_store("memory://dcp-cloud-direct-test")
    upload = ObjectUpload(store, "x.distcp", BufferPool(MiB, 2))
    tensor = torch.ones(100_000, dtype=torch.uint8)
    upload.begin_item(tensor)
    upload.write(bytes(10))
    upload.write(tensor.clone().numpy())  # same size, same bytes, other memory
    assert upload.end_item()[1] is None
    upload.begin_item(tensor)
    upload.write(bytes(10))
    upload.write(tensor.numpy())
    crc, payload = upload.end_item()
    assert payload is not None and (payload.offset, payload.length) == (10, 100_000)
    assert crc != payload.crc32c
    upload.close_async().result()


def test_verify_checks_payload_checksums_across_windows(tmp_path: Any) -> None:
    """A manifest whose payload CRC32C disagrees with the bytes is reported by verify, as a load
    reading that tensor directly would fail; the item's own CRC32C alone would not catch it."""
    from dcp_cloud import verify_checkpoint

    url = str(tmp_path / "ckpt")
    dcp.save({"w": torch.randn(100_000), "b": torch.randn(10)}, storage_writer=CloudStorageWriter(url))
    good = verify_checkpoint(url, part_size=30_000)  # the payload spans 14 windows
    assert good.ok and good.items_checksummed == 2

    def spoil_payload_crcs(doc: dict[str, Any]) -> None:
        for entry in doc["objects"].values():
            for fields in entry["items"]:
                if len(fields) == 6:
                    fields[5] ^= 1

    _edit_manifest(url, spoil_payload_crcs)
    bad = verify_checkpoint(url, part_size=30_000)
    # both tensors have payloads (small ones too): each spoiled record is reported
    assert sorted((p.kind, p.tensors) for p in bad.problems) == [("checksum", ["b"]), ("checksum", ["w"])]


def test_a_destination_view_keeps_its_tensor_alive() -> None:
    """A read still running after a failed load writes into the tensor, never into freed memory."""
    import gc
    import struct
    import weakref

    from dcp_cloud.load.direct import tensor_memory

    tensor = torch.zeros(1000)
    alive = weakref.ref(tensor)
    piece = tensor_memory(tensor)[40:80]
    del tensor
    gc.collect()
    assert alive() is not None
    piece[:4] = struct.pack("=f", 1.0)  # element 10
    assert alive()[10].item() == 1.0  # type: ignore[index]
    del piece
    gc.collect()
    assert alive() is None
