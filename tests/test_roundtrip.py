"""Round trips of everything a state dict holds, on every store."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.metadata import ChunkStorageMetadata, MetadataIndex, TensorProperties
from torch.distributed.checkpoint.planner import TensorWriteData, WriteItem, WriteItemType

from dcp_cloud import CloudStorageReader, CloudStorageWriter

from .conftest import Target
from .helpers import assert_same, failure_text, zeros_like_state

ALL_DTYPES = [
    torch.float32,
    torch.float64,
    torch.float16,
    torch.bfloat16,
    torch.int8,
    torch.int16,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
    torch.complex128,
]
ALL_DTYPES += [getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2") if hasattr(torch, n)]
ALL_DTYPES += [getattr(torch, n) for n in ("uint16", "uint32") if hasattr(torch, n)]


def _tensor(dtype: torch.dtype, shape: tuple[int, ...], seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    raw = torch.randint(
        0,
        256,
        (int(torch.Size(shape).numel()) * torch.empty((), dtype=dtype).element_size(),),
        generator=g,
        dtype=torch.uint8,
    )
    if dtype == torch.bool:
        return (raw % 2).bool().reshape(shape)
    if dtype.is_floating_point and dtype.itemsize >= 2:
        # random bytes can be NaN, and NaN != NaN; use real values for floats
        return torch.randn(shape, generator=g).to(dtype)
    return raw.view(dtype).reshape(shape)


def everything() -> dict[str, Any]:
    base = torch.arange(60, dtype=torch.float32).reshape(6, 10)
    state: dict[str, Any] = {
        f"dtype.{str(d).split('.')[-1]}": _tensor(d, (3, 5), i) for i, d in enumerate(ALL_DTYPES)
    }
    state.update(
        {
            "transposed": base.t(),  # non-contiguous, owns its whole storage
            "slice": base[2:4, 1:7],  # a view into a larger storage
            "strided": base[:, ::3],
            "scalar": torch.tensor(3.5),
            "empty": torch.empty(0, 4),
            "large": torch.randn(3 * 1024 * 1024),  # 12 MiB: several 5 MiB parts
            "nested": {"a": {"b": torch.ones(2, 2), "c": [torch.zeros(3), {"d": torch.full((2,), 7)}]}},
            "step": 1234,
            "name": "run-7",
            "config": {"lr": 0.1, "betas": (0.9, 0.99)},
            "none": None,
        }
    )
    return state


def test_round_trip_of_every_kind(target: Target) -> None:
    state = everything()
    writer = target.writer(part_size=5 * 1024 * 1024, memory_budget=10 * 1024 * 1024)
    dcp.save(state, storage_writer=writer)
    loaded = zeros_like_state(state)
    dcp.load(loaded, storage_reader=target.reader())
    assert_same(state, loaded)


def test_stats_are_reported(target: Target) -> None:
    state = {"w": torch.randn(3072, 1024), "b": torch.randn(10)}
    writer = target.writer(part_size=5 * 1024 * 1024)
    dcp.save(state, storage_writer=writer)
    stats = writer.last_stats
    assert stats is not None and stats.operation == "save"
    # one object, or, where objects are one part (a small save; GCS), one more for the tensor
    # above a part
    one_part = writer.sizes_for(sum(t.nbytes for t in state.values())).object_size < state["w"].nbytes
    objects = 2 if one_part else 1
    assert stats.bytes > 8 * 1024 * 1024 and stats.items == 2 and stats.objects == objects
    # parts on object stores; positional writes straight from torch.save on local folders
    assert stats.requests.get("upload_part", 0) + stats.requests.get("write", 0) >= 1 and stats.seconds > 0
    assert "GB/s" in stats.summary()

    reader = target.reader()
    dcp.load({"w": torch.zeros(3072, 1024), "b": torch.zeros(10)}, storage_reader=reader)
    loaded = reader.last_stats
    assert loaded is not None and loaded.items == 2 and loaded.requests.get("get_range", 0) >= 1
    # "w" comes straight into its tensor: its bytes, not the archive around them
    assert loaded.direct_items == 1 and state["w"].nbytes <= loaded.bytes < stats.bytes


def test_checkpoint_id_resets_the_url(target: Target) -> None:
    writer = target.writer(url=target.url + "-unused")
    state = {"x": torch.arange(10)}
    dcp.save(state, checkpoint_id=target.url, storage_writer=writer)
    reader = target.reader(url=target.url + "-unused")
    out = {"x": torch.zeros(10, dtype=torch.int64)}
    dcp.load(out, checkpoint_id=target.url, storage_reader=reader)
    assert torch.equal(out["x"], state["x"])


def test_one_writer_saves_twice_to_new_objects(target: Target) -> None:
    writer = target.writer()
    dcp.save({"x": torch.ones(4)}, storage_writer=writer)
    dcp.save({"x": torch.full((4,), 2.0)}, storage_writer=writer)
    out = {"x": torch.zeros(4)}
    dcp.load(out, storage_reader=target.reader())
    assert torch.equal(out["x"], torch.full((4,), 2.0))


def test_wrong_target_shape_gives_torchs_error(target: Target) -> None:
    dcp.save({"w": torch.randn(4, 4)}, storage_writer=target.writer())
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(5, 4)}, storage_reader=target.reader())
    assert "Size mismatch" in failure_text(info.value) or "size" in failure_text(info.value).lower()


def test_missing_key_in_checkpoint_is_an_error(target: Target) -> None:
    dcp.save({"w": torch.randn(2)}, storage_writer=target.writer())
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(2), "extra": torch.zeros(2)}, storage_reader=target.reader())
    assert "extra" in failure_text(info.value)


class Counter:
    """A Stateful object: DCP calls state_dict() on save and load_state_dict() on load."""

    def __init__(self, value: int = 0) -> None:
        self.tensor = torch.full((3,), float(value))
        self.value = value
        self.calls: list[str] = []

    def state_dict(self) -> dict[str, Any]:
        self.calls.append("state_dict")
        return {"tensor": self.tensor, "value": self.value}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.calls.append("load_state_dict")
        self.tensor = state["tensor"]
        self.value = state["value"]


def test_stateful_top_level_object(target: Target) -> None:
    dcp.save({"counter": Counter(5)}, storage_writer=target.writer())
    fresh = Counter(0)
    dcp.load({"counter": fresh}, storage_reader=target.reader())
    assert fresh.calls == ["state_dict", "load_state_dict"]
    assert fresh.value == 5 and torch.equal(fresh.tensor, torch.full((3,), 5.0))


class RowChunked(torch.Tensor):
    """A tensor subclass that checkpoints itself as ``n`` row chunks (_Checkpointable)."""

    @staticmethod
    def __new__(cls, data: torch.Tensor, n: int) -> RowChunked:
        obj = torch.Tensor._make_subclass(cls, data)
        obj.n = n  # type: ignore[attr-defined]
        return obj

    def _chunks(self) -> list[ChunkStorageMetadata]:
        rows = self.shape[0]
        bounds = [rows * i // self.n for i in range(self.n + 1)]  # type: ignore[attr-defined]
        return [
            ChunkStorageMetadata(
                torch.Size([a] + [0] * (self.dim() - 1)), torch.Size([b - a, *self.shape[1:]])
            )
            for a, b in zip(bounds, bounds[1:])
        ]

    def __create_write_items__(self, fqn: str, obj: object) -> list[WriteItem]:
        plain = self.as_subclass(torch.Tensor)
        return [
            WriteItem(
                index=MetadataIndex(fqn, chunk.offsets),
                type=WriteItemType.SHARD,
                tensor_data=TensorWriteData(chunk, TensorProperties.create_from_tensor(plain), plain.size()),
            )
            for chunk in self._chunks()
        ]

    def __create_chunk_list__(self) -> list[ChunkStorageMetadata]:
        return self._chunks()

    def __get_tensor_shard__(self, index: MetadataIndex) -> torch.Tensor:
        plain = self.as_subclass(torch.Tensor)
        for chunk in self._chunks():
            if chunk.offsets == index.offset:
                return plain.narrow(0, chunk.offsets[0], chunk.sizes[0])
        raise KeyError(index)


def test_checkpointable_tensor_subclass_reshards(target: Target) -> None:
    full = torch.arange(60, dtype=torch.float32).reshape(10, 6)
    dcp.save({"t": RowChunked(full.clone(), 2)}, storage_writer=target.writer())
    plain = {"t": torch.zeros(10, 6)}
    dcp.load(plain, storage_reader=target.reader())
    assert torch.equal(plain["t"], full)
    three = {"t": RowChunked(torch.zeros(10, 6), 3)}
    dcp.load(three, storage_reader=target.reader())
    assert torch.equal(three["t"].as_subclass(torch.Tensor), full)


def test_use_collectives_false_writes_rank_local_metadata(target: Target) -> None:
    state = {"x": torch.arange(6.0), "note": "rank-local"}
    dcp.save(state, storage_writer=target.writer(), use_collectives=False)
    from dcp_cloud.store import open_store

    store = open_store(target.url, target.storage_options)
    keys = {o.key for o in store.run(store.list_objects(""))}
    assert "__0.metadata" in keys and ".metadata" not in keys
    out = {"x": torch.zeros(6), "note": ""}
    dcp.load(out, storage_reader=target.reader())
    assert torch.equal(out["x"], state["x"]) and out["note"] == "rank-local"


@pytest.mark.parametrize("strategy", ["hash", "reversed"])
def test_key_prefix_strategies_spread_data_objects(target: Target, strategy: str) -> None:
    from dcp_cloud import HashPrefix, ReversedRankPrefix
    from dcp_cloud.store import open_store

    prefix = HashPrefix(2) if strategy == "hash" else ReversedRankPrefix(4)
    state = {"w": torch.randn(100), "step": 5}
    dcp.save(state, storage_writer=target.writer(key_prefix=prefix))
    store = open_store(target.url, target.storage_options)
    data = [o.key for o in store.run(store.list_objects("")) if o.key.endswith(".distcp")]
    assert len(data) == 1
    assert data[0].split("/")[1] == prefix(0).rstrip("/") and data[0].endswith("/__0_0.distcp")
    out = {"w": torch.zeros(100), "step": 0}
    dcp.load(out, storage_reader=target.reader())
    assert torch.equal(out["w"], state["w"]) and out["step"] == 5


def test_prefix_strategies_are_deterministic_and_spread() -> None:
    from dcp_cloud import HashPrefix, ReversedRankPrefix

    assert ReversedRankPrefix(4)(12) == "2100/" and ReversedRankPrefix(4)(3) == "3000/"
    hashed = {HashPrefix(2)(rank) for rank in range(1024)}
    assert len(hashed) > 200  # 256 possible prefixes, well spread
    assert HashPrefix(2)(7) == HashPrefix(2)(7)


def test_any_fsspec_filesystem_works_through_the_generic_path(tmp_path: Any) -> None:
    """A filesystem with no store of its own (here fsspec's DirFileSystem over a local folder,
    standing in for ossfs and the like) saves and loads through the generic store."""
    from fsspec.implementations.dirfs import DirFileSystem
    from fsspec.implementations.local import LocalFileSystem

    from dcp_cloud.store.fsspec_store import FsspecStore

    fs = DirFileSystem(path=str(tmp_path), fs=LocalFileSystem())
    writer = CloudStorageWriter("run/ckpt", filesystem=fs, part_size=5 * 1024 * 1024)
    assert type(writer.store) is FsspecStore
    state = {"w": torch.randn(3 * 1024 * 1024), "b": torch.randn(7), "step": 11}  # 12 MiB: 3 parts
    dcp.save(state, storage_writer=writer)
    assert (tmp_path / "run" / "ckpt" / ".metadata").exists()
    out = {"w": torch.zeros(3 * 1024 * 1024), "b": torch.zeros(7), "step": 0}
    dcp.load(out, storage_reader=CloudStorageReader("run/ckpt", filesystem=fs))
    assert torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"]) and out["step"] == 11
