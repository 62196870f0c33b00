"""Red-team tests of the load side: someone who can write arbitrary bytes into a store the victim
loads from. Each attack must end in a bounded CorruptCheckpointError/UnsafeCheckpointError that
names the object, never code execution, a read outside the checkpoint, a huge allocation, a hang
or a bare Python error."""

from __future__ import annotations

import io
import os
import pickle
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.stateful import Stateful

from dcp_cloud import checkpoint_info, load_full_state_dict, to_safetensors, to_torch_save, verify_checkpoint
from dcp_cloud.errors import CorruptCheckpointError, UnsafeCheckpointError
from dcp_cloud.store import ObjectStore

from .conftest import Target, make_target
from .helpers import failure_text, failure_types
from .test_trust_load import (
    SECRET,
    _edit_manifest,
    _fails,
    _gadgets,
    _load,
    _locator,
    _metadata,
    _plant,
    _put_metadata,
    _saved,
    _secret_beside,
    _template,
    _torch_saved,
)

# -- crafted torch.save archives ------------------------------------------------------------------


def _rebuilt(archive: bytes, edit: Callable[[str, bytes], tuple[bytes, int]]) -> bytes:
    """``archive`` with each member replaced by ``edit(name, data)`` -> (data, compress_type)."""
    source = zipfile.ZipFile(io.BytesIO(archive))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as rebuilt:
        for info in source.infolist():
            data, compression = edit(info.filename, source.read(info))
            rebuilt.writestr(info.filename, data, compress_type=compression)
    return out.getvalue()


def _bomb(nbytes: int, value: Callable[[torch.Tensor], Any] = lambda t: t) -> bytes:
    """A torch.save archive of ``value(uint8 tensor of nbytes zeros)`` whose storage record is
    deflated: a few kilobytes that unpack to ``nbytes``."""
    genuine = _torch_saved(value(torch.zeros(nbytes, dtype=torch.uint8)))
    return _rebuilt(
        genuine,
        lambda name, data: (data, zipfile.ZIP_DEFLATED if "/data/" in name else zipfile.ZIP_STORED),
    )


def _deep_list(depth: int) -> bytes:
    """A torch.save archive whose data.pkl builds a list nested ``depth`` deep (3 bytes a level,
    no recursion needed to build it; pickling it again recurses ``depth`` deep)."""
    nested = b"\x80\x02" + b"]" * depth + b"a" * (depth - 1) + b"."
    return _rebuilt(
        _torch_saved([]),
        lambda name, data: (nested if name.endswith("/data.pkl") else data, zipfile.ZIP_STORED),
    )


def _with_pickle_edit(value: Any, old: bytes, new: bytes, deflate_storage: bool = False) -> bytes:
    """torch.save of ``value`` with ``old`` replaced by ``new`` in data.pkl (storage records
    optionally deflated, which turns dcp_cloud's in-place decoder down: torch.load reads it)."""

    def edit(name: str, data: bytes) -> tuple[bytes, int]:
        if name.endswith("/data.pkl"):
            assert old in data, (old, data)
            return data.replace(old, new, 1), zipfile.ZIP_STORED
        deflate = deflate_storage and "/data/" in name
        return data, zipfile.ZIP_DEFLATED if deflate else zipfile.ZIP_STORED

    return _rebuilt(_torch_saved(value), edit)


BIG = 64 * 2**20  # unpacked size of the bombs: large enough to see, small enough to be harmless
# the size (8,) of an 8-element tensor in data.pkl, and a BININT size in its place
SIZE_8 = b"K\x08\x85"


def _binint_size(n: int) -> bytes:
    return b"J" + n.to_bytes(4, "little") + b"\x85"


# -- non-tensor items -----------------------------------------------------------------------------


def _calling(module: str, name: str, n: int) -> bytes:
    """A torch.save archive whose data.pkl is ``module.name(n)``, built from the allowed
    globals only (torch's weights-only loader admits it)."""
    call = f"\x80\x02c{module}\n{name}\n".encode("latin-1") + b"J" + n.to_bytes(4, "little") + b"\x85R."
    return _rebuilt(
        _torch_saved([]),
        lambda member, data: (call if member.endswith("/data.pkl") else data, zipfile.ZIP_STORED),
    )


def _storage_called() -> bytes:
    """``_rebuild_tensor_v2(torch.FloatStorage(8), 0, (8,), (1,))``: a tensor of the described
    dtype and shape over a storage the pickle allocates itself, uninitialized, instead of a
    record of the archive."""
    rebuilt = (
        b"\x80\x02ctorch._utils\n_rebuild_tensor_v2\n(ctorch\nFloatStorage\nK\x08\x85R"
        b"K\x00K\x08\x85K\x01\x85\x89ccollections\nOrderedDict\n)RtR."
    )
    return _rebuilt(
        _torch_saved([]),
        lambda member, data: (rebuilt if member.endswith("/data.pkl") else data, zipfile.ZIP_STORED),
    )


NON_TENSOR_BOMBS: dict[str, bytes] = {
    "deflated-storage": _bomb(BIG),
    "deflated-storage-in-a-tuple": _bomb(BIG, lambda t: (t, "x")),
    "deep-nesting": _deep_list(200_000),
    # torch's allow-list: bytearray(n) fills n bytes at once, FloatTensor(n) reserves n floats
    "bytearray-of-n": _calling("__builtin__", "bytearray", BIG),
    "legacy-constructor-of-n": _calling("torch", "FloatTensor", BIG),
    "tensor-constructor-of-n": _calling("torch", "Tensor", BIG),
    "storage-constructor-of-n": _calling("torch.storage", "UntypedStorage", BIG),
    "not-a-zip-archive": _torch_saved([1, 2], _use_new_zipfile_serialization=False),
}


@pytest.mark.parametrize("name", list(NON_TENSOR_BOMBS))
def test_bounded_refusal_of_non_tensor_bombs(name: str, tmp_path: Path) -> None:
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    store = _saved(target)
    _plant(store, "extra", NON_TENSOR_BOMBS[name], as_bytes=False)
    _fails(lambda: _load(target), UnsafeCheckpointError, "'extra'", "__9_0.distcp")
    with pytest.raises(UnsafeCheckpointError, match="'extra'"):
        load_full_state_dict(target.url)


def test_bombs_are_real_under_trust() -> None:
    """The control: torch's weights-only loader really builds BIG bytes from these few bytes."""
    for name in ("deflated-storage", "bytearray-of-n", "legacy-constructor-of-n"):
        data = NON_TENSOR_BOMBS[name]
        loaded = torch.load(io.BytesIO(data), weights_only=True)
        assert len(data) < BIG // 100 and len(loaded) * (1 if name == "bytearray-of-n" else 4) >= BIG
        del loaded


def test_values_naming_allocating_globals_load_once_allowed(s3_target: Target) -> None:
    tagged = torch.arange(3.0)
    tagged.note = "kept"  # type: ignore[attr-defined]  # pickled through torch.Tensor
    _saved(s3_target, {"w": torch.arange(8.0), "extra": (bytearray(b"raw"), tagged)})
    _fails(lambda: _load(s3_target), UnsafeCheckpointError, "builtins.bytearray", "safe_globals=[bytearray]")
    value = _load(s3_target, safe_globals=[bytearray, torch.Tensor])["extra"]
    assert value[0] == bytearray(b"raw") and torch.equal(value[1], tagged) and value[1].note == "kept"
    assert _load(s3_target, trust_pickles=True)["extra"][0] == bytearray(b"raw")


# -- tensor items holding something else ----------------------------------------------------------

TENSOR_ITEM_ATTACKS: dict[str, bytes] = {
    "a-dict": _torch_saved({"w": torch.zeros(8)}),
    "a-string": _torch_saved("not a tensor"),
    "a-list-of-tensors": _torch_saved([torch.zeros(8)]),
    "a-sparse-tensor": _torch_saved(torch.zeros(8).to_sparse()),
    "a-meta-tensor": _torch_saved(torch.empty(8, device="meta")),
    "more-elements": _torch_saved(torch.full((16,), SECRET)),
    "other-dtype": _torch_saved(torch.full((8,), SECRET, dtype=torch.float64)),
    "other-shape": _torch_saved(torch.full((2, 4), SECRET)),
    "deflated-storage": _bomb(BIG),
    "deep-nesting": _deep_list(200_000),
    "view-past-storage-deflated": _with_pickle_edit(
        torch.zeros(8), SIZE_8, _binint_size(2**30), deflate_storage=True
    ),
    "huge-storage-numel": _with_pickle_edit(torch.zeros(8), b"cpuq\x04K\x08", b"cpuq\x04J\x00\x00\x00\x40"),
    "legacy-format-huge-numel": _torch_saved(torch.zeros(8), _use_new_zipfile_serialization=False).replace(
        b"cpuq\x04K\x08", b"cpuq\x04J\x00\x00\x00\x40", 1
    ),
    "garbage": b"PK\x03\x04" + b"\xff" * 200,
    # the described dtype and shape, in uninitialized memory of this process
    "legacy-constructor": _calling("torch", "FloatTensor", 8),
    "storage-constructor": _storage_called(),
    "untyped-storage-constructor": _calling("torch.storage", "UntypedStorage", 32),
    "bytearray-of-n": _calling("__builtin__", "bytearray", BIG),
}


def _plant_tensor(store: ObjectStore, data: bytes) -> None:
    """Point the tensor entry ``w`` at ``data`` in a new data object, recorded in the manifest
    with a correct checksum (and no payload record: the reader decodes the archive)."""
    metadata = _metadata(store)
    key = f"{metadata.storage_meta.save_id}/__9_0.distcp"  # type: ignore[union-attr]
    store.run(store.put(key, data))
    index, _ = _locator(metadata, "w")
    metadata.storage_data[index] = _StorageInfo(key, 0, len(data))
    _put_metadata(store, metadata)
    _edit_manifest(
        store,
        lambda doc: doc["objects"].update(
            {key: {"size": len(data), "items": [[0, len(data), crc32c.crc32c(data)]]}}
        ),
    )


@pytest.mark.parametrize("store_kind", ["file", "s3"])
def test_tensor_items_that_are_not_the_described_tensor(
    store_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(store_kind, request, tmp_path)
    store = _saved(target)
    for name, data in TENSOR_ITEM_ATTACKS.items():
        _plant_tensor(store, data)
        for options in ({}, {"verify_checksums": False}):
            template = _template()
            _fails(
                lambda t=template, o=options: _load(target, t, **o),  # type: ignore[misc]
                CorruptCheckpointError,
                "__9_0.distcp",
            )
            assert not template["w"].eq(SECRET).any(), name
        with pytest.raises(CorruptCheckpointError, match="__9_0.distcp"):
            load_full_state_dict(target.url, storage_options=target.storage_options)


# -- every route to an unpickler ------------------------------------------------------------------


class _Holder(Stateful):
    """A Stateful object whose state holds a non-tensor value."""

    def __init__(self) -> None:
        self.state: dict[str, Any] = {"w": torch.zeros(8), "extra": None}

    def state_dict(self) -> dict[str, Any]:
        return self.state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.state = dict(state_dict)


class _CustomPlanner(DefaultLoadPlanner):
    """A user's planner that unpickles non-tensor values itself, as torch's does."""

    def load_bytes(self, read_item: Any, value: io.BytesIO) -> None:
        self.state_dict[read_item.dest_index.fqn] = pickle.loads(torch.load(value, weights_only=False))


def test_gadgets_do_not_run_through_any_route(s3_target: Target, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    gadget = _gadgets(marker)["builtins.exec"][0]
    dcp.save({"model": _Holder()}, storage_writer=s3_target.writer())
    store = _store_of(s3_target)
    _plant(store, "model.extra", gadget, as_bytes=False)
    opts = {"storage_options": s3_target.storage_options}
    routes: dict[str, Callable[[], Any]] = {
        "stateful": lambda: dcp.load({"model": _Holder()}, storage_reader=s3_target.reader()),
        "custom-planner": lambda: dcp.load(
            {"model": _Holder().state}, storage_reader=s3_target.reader(), planner=_CustomPlanner()
        ),
        "full-state-dict": lambda: load_full_state_dict(s3_target.url, **opts),
        "to-torch-save": lambda: to_torch_save(s3_target.url, tmp_path / "out.pt", **opts),
        "to-safetensors": lambda: to_safetensors(s3_target.url, tmp_path / "out.st", **opts),
        "tensor-redeclared-as-bytes": lambda: _redeclared_and_loaded(s3_target, store, gadget),
    }
    for name, route in routes.items():
        _fails(route, UnsafeCheckpointError, "trust_pickles=True")
        assert not marker.exists(), f"{name} ran code"
    assert not (tmp_path / "out.pt").exists() and not (tmp_path / "out.st").exists()


def _store_of(target: Target) -> ObjectStore:
    from dcp_cloud.store import open_store

    return open_store(target.url, target.storage_options)


def _redeclared_and_loaded(target: Target, store: ObjectStore, gadget: bytes) -> None:
    _plant(store, "model.w", gadget, as_bytes=True)
    dcp.load({"model": _Holder()}, storage_reader=target.reader())


# -- locators ----------------------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["file", "s3"])
def test_a_locator_longer_than_its_object_fails_before_allocating(
    store_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(store_kind, request, tmp_path)
    store = _saved(target)
    metadata = _metadata(store)
    index, info = _locator(metadata, "w")
    # 1 TiB: more than this machine can map, so reserving a buffer for it first would fail
    metadata.storage_data[index] = _StorageInfo(info.relative_path, info.offset, 2**40)
    _put_metadata(store, metadata)
    _fails(lambda: _load(target, verify_checksums=False), CorruptCheckpointError, info.relative_path)
    _fails(lambda: _load(target), CorruptCheckpointError, "manifest.json", "verify_checksums=False")
    report = verify_checkpoint(target.url, storage_options=target.storage_options, checksums=False)
    assert not report.ok and {p.object for p in report.problems} >= {info.relative_path}
    assert checkpoint_info(target.url, storage_options=target.storage_options).tensors[0].fqn == "w"


@pytest.mark.parametrize("first", ["w", "extra"])
def test_one_item_claimed_as_tensor_and_as_non_tensor(first: str, tmp_path: Path) -> None:
    """Two entries share one stored item, one as a tensor and one as a non-tensor value."""
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    store = _saved(target)
    metadata = _metadata(store)
    other = "extra" if first == "w" else "w"
    index, _ = _locator(metadata, other)
    metadata.storage_data[index] = _locator(metadata, first)[1]
    _put_metadata(store, metadata)
    for options in ({}, {"verify_checksums": False}):
        _fails(
            lambda o=options: _load(target, **o),  # type: ignore[misc]
            CorruptCheckpointError,
            "both tensors and non-tensor values",
        )


# -- planner_data --------------------------------------------------------------------------------

PLANNER_DATA: dict[str, Any] = {
    # torch grows a list one None at a time up to the index: a hang, then out of memory
    "huge-list-index": {"extra": ["extra", 2**40]},
    "negative-index": {"extra": ["extra", -3]},
    "empty-path": {"extra": []},
    "very-deep-path": {"extra": ["k"] * 100_000},
}


@pytest.mark.parametrize("name", list(PLANNER_DATA))
def test_hostile_planner_data(name: str, tmp_path: Path) -> None:
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    store = _saved(target)
    metadata = _metadata(store)
    metadata.planner_data = PLANNER_DATA[name]
    _put_metadata(store, metadata)
    with pytest.raises(CorruptCheckpointError, match="planner_data"):
        load_full_state_dict(target.url)
    _fails(lambda: checkpoint_info(target.url), CorruptCheckpointError, "planner_data")


def test_plausible_planner_data_still_loads(tmp_path: Path) -> None:
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    state = {"opt": {"state": {"0": {"step": torch.tensor(3.0)}}, "groups": [{"lr": 0.1}, {"lr": 0.2}]}}
    dcp.save(state, storage_writer=target.writer())
    loaded = load_full_state_dict(target.url)
    assert loaded["opt"]["groups"] == [{"lr": 0.1}, {"lr": 0.2}]
    assert torch.equal(loaded["opt"]["state"]["0"]["step"], torch.tensor(3.0))


# -- local folders: links ------------------------------------------------------------------------


@pytest.mark.parametrize("link", ["object", "folder"])
def test_symlinks_inside_a_local_checkpoint_are_not_followed(link: str, tmp_path: Path) -> None:
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    outside, offset, length = _secret_beside(target)
    store = _saved(target)
    root = Path(target.url)
    metadata = _metadata(store)
    index, _ = _locator(metadata, "w")
    secret_path = (root / outside).resolve()
    if link == "object":
        key = f"{metadata.storage_meta.save_id}/__8_0.distcp"  # type: ignore[union-attr]
        (root / key).symlink_to(secret_path)
    else:
        key = f"linked/{secret_path.name}"
        (root / "linked").symlink_to(secret_path.parent, target_is_directory=True)
    metadata.storage_data[index] = _StorageInfo(key, offset, length)
    _put_metadata(store, metadata)
    template = _template()
    with pytest.raises(BaseException) as info:
        _load(template=template, target=target, verify_checksums=False)
    assert UnsafeCheckpointError in failure_types(info.value), failure_text(info.value)
    assert not template["w"].eq(SECRET).any()


# -- manifests whose numbers disagree with the objects --------------------------------------------


def test_manifest_payload_pointing_outside_the_item_bytes(tmp_path: Path) -> None:
    """A payload record with a valid checksum of other bytes of the object: the load must not
    place bytes that the item does not hold into the tensor."""
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    state = {"w": torch.arange(2**16, dtype=torch.float32), "extra": "x"}
    store = _saved(target, state)
    _, info = _locator(_metadata(store), "w")

    def stretch(doc: dict[str, Any]) -> None:
        for record in doc["objects"][info.relative_path]["items"]:
            if record[0] == info.offset and len(record) == 6:
                record[4] = record[1] - record[3] + 1  # payload one byte past the item
                return
        raise AssertionError("no payload record for w")

    _edit_manifest(store, stretch)
    template = {"w": torch.zeros(2**16), "extra": None}
    _fails(lambda: _load(target, template), CorruptCheckpointError, "manifest.json")


# -- imports -------------------------------------------------------------------------------------


def test_import_does_not_load_pydantic() -> None:
    code = "import sys, dcp_cloud; sys.exit(1 if 'pydantic' in sys.modules else 0)"
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": os.getcwd()})
