"""Loading a checkpoint someone else could write to: crafted checkpoints built by tampering with
real saved ones. Nothing outside the checkpoint is read, no code runs, and every malformed input
is a CorruptCheckpointError (or UnsafeCheckpointError) that names the object."""

from __future__ import annotations

import io
import json
import os
import pickle
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import crc32c
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import (
    BytesStorageMetadata,
    ChunkStorageMetadata,
    Metadata,
    MetadataIndex,
    StorageMeta,
)

from dcp_cloud import CloudStorageReader, checkpoint_info, load_full_state_dict, verify_checkpoint
from dcp_cloud.errors import CorruptCheckpointError, UnsafeCheckpointError
from dcp_cloud.load.decode import OutOfBoundsError, load_tensor
from dcp_cloud.store import ObjectStore, open_store

from .conftest import Target, make_target
from .helpers import failure_text, failure_types

SECRET = 7.0


@dataclass
class Point:
    """A user class that non-tensor items may hold once allowed."""

    x: int
    y: int


def _state() -> dict[str, Any]:
    return {"w": torch.arange(8, dtype=torch.float32), "extra": "a non-tensor value"}


def _template() -> dict[str, Any]:
    return {"w": torch.zeros(8), "extra": None}


def _store(target: Target) -> ObjectStore:
    return open_store(target.url, target.storage_options)


def _saved(target: Target, state: dict[str, Any] | None = None) -> ObjectStore:
    dcp.save(state if state is not None else _state(), storage_writer=target.writer())
    return _store(target)


def _metadata(store: ObjectStore) -> Metadata:
    metadata: Metadata = pickle.loads(store.run(store.get(".metadata")))
    return metadata


def _put_metadata(store: ObjectStore, metadata: Metadata) -> None:
    store.run(store.put(".metadata", pickle.dumps(metadata)))


def _save_id(metadata: Metadata) -> str:
    assert metadata.storage_meta is not None and metadata.storage_meta.save_id
    return metadata.storage_meta.save_id


def _manifest_key(metadata: Metadata) -> str:
    return f"{_save_id(metadata)}/manifest.json"


def _edit_manifest(store: ObjectStore, edit: Callable[[dict[str, Any]], Any]) -> None:
    """Rewrite the manifest with ``edit`` applied to its document (or as the bytes it returns)."""
    key = _manifest_key(_metadata(store))
    doc = json.loads(store.run(store.get(key)))
    written = edit(doc)
    store.run(store.put(key, written if isinstance(written, bytes) else json.dumps(doc).encode()))


def _locator(metadata: Metadata, fqn: str) -> tuple[MetadataIndex, _StorageInfo]:
    return next((i, s) for i, s in metadata.storage_data.items() if i.fqn == fqn)


def _load(target: Target, template: dict[str, Any] | None = None, **options: Any) -> dict[str, Any]:
    state = template if template is not None else _template()
    dcp.load(state, storage_reader=target.reader(**options))
    return state


def _fails(run: Callable[[], Any], kind: type[BaseException], *says: str) -> str:
    """Run ``run``; it must fail with ``kind`` (directly or inside a CheckpointException)
    whose text holds each of ``says``. torch's loader reports a failed ``read_metadata`` as an
    AssertionError quoting the error; :func:`_metadata_fails` checks the type behind those."""
    with pytest.raises(BaseException) as info:
        run()
    types = failure_types(info.value)
    text = failure_text(info.value)
    from_metadata = AssertionError in types and "global metadata read failed" in text
    assert from_metadata or any(issubclass(t, kind) for t in types), f"{types} from {text}"
    for piece in says:
        assert piece in text, f"{piece!r} not in {text}"
    return text


def _metadata_fails(target: Target, kind: type[BaseException], *says: str, **options: Any) -> None:
    """The reader's ``read_metadata`` fails with ``kind``, saying each of ``says``."""
    with pytest.raises(kind) as info:
        target.reader(**options).read_metadata()
    for piece in says:
        assert piece in str(info.value), f"{piece!r} not in {info.value}"


# -- locators from .metadata ----------------------------------------------------------------------


def _secret_beside(target: Target) -> tuple[str, int, int]:
    """A checkpoint beside ``target`` holding SECRET values: its data key as seen from
    ``target`` (through ``..``), and its tensor's offset and length."""
    other = Target(target.store, target.url.rsplit("/", 1)[0] + "/other", target.storage_options)
    store = _saved(other, {"w": torch.full((8,), SECRET)})
    _, info = _locator(_metadata(store), "w")
    return f"../other/{info.relative_path}", info.offset, info.length


ESCAPES = [
    "../other/{key}",
    "%2e%2e/other/{key}",
    "save-x/%2E%2E/../other/{key}",
    "{save}//../other/{key}",
    "./{key}",
    "/etc/passwd",
    "s3://other-bucket/{key}",
    "gs://other/{key}",
    "C:/Windows/win.ini",
    "..\\other\\{key}",
    "~/secret",
    "",
]


@pytest.mark.parametrize("store_kind", ["file", "s3"])
def test_locators_outside_the_checkpoint_are_refused(
    store_kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(store_kind, request, tmp_path)
    outside, offset, length = _secret_beside(target)
    store = _saved(target)
    metadata = _metadata(store)
    save_id = _save_id(metadata)
    index, _ = _locator(metadata, "w")
    for escape in ESCAPES:
        key = escape.format(key=outside.removeprefix("../other/"), save=save_id)
        metadata.storage_data[index] = _StorageInfo(key, offset, length)
        _put_metadata(store, metadata)
        for options in ({}, {"verify_checksums": False}):
            template = _template()
            _fails(lambda t=template, o=options: _load(target, t, **o), UnsafeCheckpointError, repr(key))  # type: ignore[misc]
            assert not template["w"].eq(SECRET).any(), f"{key!r} read the secret"
            _metadata_fails(target, UnsafeCheckpointError, repr(key), **options)
        with pytest.raises(UnsafeCheckpointError, match="names the key|locates"):
            load_full_state_dict(target.url, storage_options=target.storage_options)
        _fails(
            lambda: checkpoint_info(target.url, storage_options=target.storage_options), UnsafeCheckpointError
        )
        _fails(
            lambda: verify_checkpoint(target.url, storage_options=target.storage_options),
            UnsafeCheckpointError,
        )


def test_locator_escape_refused_on_every_store(target: Target) -> None:
    outside, offset, length = _secret_beside(target)
    store = _saved(target)
    metadata = _metadata(store)
    index, _ = _locator(metadata, "w")
    metadata.storage_data[index] = _StorageInfo(outside, offset, length)
    _put_metadata(store, metadata)
    template = _template()
    _fails(lambda: _load(target, template, verify_checksums=False), UnsafeCheckpointError, "../other/")
    assert not template["w"].eq(SECRET).any()


def test_a_readable_file_beside_the_checkpoint_stays_unread(tmp_path: Path) -> None:
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    store = _saved(target)
    secret = Path(target.url).parent / "secret.bin"
    secret.write_bytes(torch.full((8,), SECRET).numpy().tobytes())
    metadata = _metadata(store)
    index, _ = _locator(metadata, "w")
    metadata.storage_data[index] = _StorageInfo(str(secret), 0, 32)
    _put_metadata(store, metadata)
    template = _template()
    _fails(lambda: _load(target, template, verify_checksums=False), UnsafeCheckpointError, str(secret))
    assert not template["w"].eq(SECRET).any()


# -- keys from the manifest -----------------------------------------------------------------------


@pytest.mark.parametrize("store_kind", ["file", "s3"])
@pytest.mark.parametrize(
    "edit",
    [
        lambda doc: doc["objects"].update({"../other/x.distcp": {"size": 1, "items": [[0, 1, 0]]}}),
        lambda doc: doc.update(replaced=["../../victim/important.txt"]),
        lambda doc: doc.update(replaced=["/etc/passwd"]),
        lambda doc: doc.update(replaced=["%2e%2e/victim"]),
    ],
    ids=["object", "replaced-dotdot", "replaced-absolute", "replaced-encoded"],
)
def test_manifest_keys_outside_the_checkpoint(
    store_kind: str, edit: Callable[[dict[str, Any]], Any], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(store_kind, request, tmp_path)
    store = _saved(target)
    _edit_manifest(store, edit)
    refused = _fails(lambda: _load(target), UnsafeCheckpointError, "manifest.json")
    assert "verify_checksums=False" not in refused  # no advice to check less on a crafted file
    report = verify_checkpoint(target.url, storage_options=target.storage_options)
    assert not report.ok and [p.kind for p in report.problems] == ["manifest"]
    assert torch.equal(_load(target, verify_checksums=False)["w"], _state()["w"])


# -- non-tensor items: pickle gadgets -------------------------------------------------------------


class _Gadget:
    """Unpickles to a call of ``call(*args)``."""

    def __init__(self, call: Any, *args: Any) -> None:
        self.call, self.args = call, args

    def __reduce__(self) -> tuple[Any, ...]:
        return self.call, self.args


def _torch_saved(value: Any, **kwargs: Any) -> bytes:
    out = io.BytesIO()
    torch.save(value, out, **kwargs)
    return out.getvalue()


def _two_data_pkls(benign: bytes, hostile: bytes) -> bytes:
    """A torch.save archive holding data.pkl twice: a benign one first, a hostile one last."""
    source = zipfile.ZipFile(io.BytesIO(benign))
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as archive:
        for info in source.infolist():
            archive.writestr(info.filename, source.read(info))
        name = next(n for n in source.namelist() if n.endswith("/data.pkl"))
        archive.writestr(name, zipfile.ZipFile(io.BytesIO(hostile)).read(name))
    return out.getvalue()


def _gadgets(marker: Path) -> dict[str, tuple[bytes, str | None]]:
    """Bytes that run code under a full unpickler (creating ``marker``), and what the refusal
    names (None: the bytes may also be read as harmless)."""
    touch = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": (_torch_saved(_Gadget(os.system, f"touch {marker}")), "system"),
        "builtins.eval": (_torch_saved(_Gadget(eval, touch)), "eval"),
        "builtins.exec": (_torch_saved({"ok": _Gadget(exec, touch)}), "exec"),
        "torch.save": (_torch_saved(_Gadget(torch.save, torch.zeros(1), str(marker))), "torch"),
        "plain-pickle-2": (pickle.dumps(_Gadget(exec, touch), protocol=2), "zip archive"),
        "plain-pickle-5": (pickle.dumps(_Gadget(exec, touch), protocol=5), ""),
        "legacy-torch": (
            _torch_saved(_Gadget(exec, touch), _use_new_zipfile_serialization=False),
            "zip archive",
        ),
        "zip-twice": (_two_data_pkls(_torch_saved({"a": 1}), _torch_saved(_Gadget(exec, touch))), None),
        "not-a-pickle": (b"\x00" * 40 + b"just some bytes", ""),
    }


def _plant(store: ObjectStore, fqn: str, data: bytes, as_bytes: bool) -> None:
    """Point the checkpoint's entry ``fqn`` at ``data`` in a new data object, recorded in the
    manifest with a correct checksum; ``as_bytes`` re-declares a tensor entry as bytes."""
    metadata = _metadata(store)
    key = f"{_save_id(metadata)}/__9_0.distcp"
    store.run(store.put(key, data))
    for index in [i for i in metadata.storage_data if i.fqn == fqn]:
        del metadata.storage_data[index]
    if as_bytes:
        metadata.state_dict_metadata[fqn] = BytesStorageMetadata()
    metadata.storage_data[MetadataIndex(fqn)] = _StorageInfo(key, 0, len(data))
    _put_metadata(store, metadata)
    _edit_manifest(
        store,
        lambda doc: doc["objects"].update(
            {key: {"size": len(data), "items": [[0, len(data), crc32c.crc32c(data)]]}}
        ),
    )


@pytest.mark.parametrize("as_tensor_target", [False, True], ids=["bytes-target", "tensor-target"])
def test_pickle_gadgets_in_non_tensor_items_do_not_run(
    as_tensor_target: bool, s3_target: Target, tmp_path: Path
) -> None:
    marker = tmp_path / "pwned"
    store = _saved(s3_target)
    fqn = "w" if as_tensor_target else "extra"
    for name, (data, refused) in _gadgets(marker).items():
        _plant(store, fqn, data, as_bytes=as_tensor_target)
        template = _template()
        if refused is None:  # torch's reader may take the benign copy: then it loads, harmlessly
            try:
                _load(s3_target, template)
            except BaseException as exc:  # noqa: BLE001 - a CheckpointException is a BaseException
                assert UnsafeCheckpointError in failure_types(exc), failure_text(exc)
            assert not marker.exists(), f"{name} ran code"
            continue
        text = _fails(
            lambda t=template: _load(s3_target, t),  # type: ignore[misc]
            UnsafeCheckpointError,
            repr(fqn),
            "trust_pickles=True",
        )
        assert refused in text, name
        _fails(
            lambda: load_full_state_dict(s3_target.url, storage_options=s3_target.storage_options),
            UnsafeCheckpointError,
        )
        assert not marker.exists(), f"{name} ran code"
        if as_tensor_target:
            assert torch.equal(template["w"], torch.zeros(8))


def test_trust_pickles_is_torchs_behaviour(s3_target: Target, tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    store = _saved(s3_target)
    _plant(store, "extra", _gadgets(marker)["builtins.exec"][0], as_bytes=False)
    _load(s3_target, trust_pickles=True)
    assert marker.exists()  # the control: the gadget is real, and trusting it runs it


def test_user_classes_need_allowing(s3_target: Target) -> None:
    _saved(s3_target, {"w": torch.arange(8.0), "extra": Point(1, 2)})
    _fails(lambda: _load(s3_target), UnsafeCheckpointError, "tests.test_trust_load.Point", "add_safe_globals")
    assert _load(s3_target, safe_globals=[Point])["extra"] == Point(1, 2)
    assert _load(s3_target, trust_pickles=True)["extra"] == Point(1, 2)
    with torch.serialization.safe_globals([Point]):
        assert _load(s3_target)["extra"] == Point(1, 2)
    loaded = load_full_state_dict(
        s3_target.url, storage_options=s3_target.storage_options, safe_globals=[Point]
    )
    assert loaded["extra"] == Point(1, 2)


def test_plain_values_load_by_default(s3_target: Target) -> None:
    state = {"w": torch.arange(8.0), "extra": {"step": 3, "lr": [0.1, None], "name": "x", "t": torch.ones(2)}}
    _saved(s3_target, state)
    loaded = load_full_state_dict(s3_target.url, storage_options=s3_target.storage_options)
    assert (
        loaded["extra"]["step"] == 3
        and loaded["extra"]["name"] == "x"
        and loaded["extra"]["lr"] == [0.1, None]
    )
    assert torch.equal(loaded["extra"]["t"], torch.ones(2))


# -- malformed manifests --------------------------------------------------------------------------


def _deep(doc: dict[str, Any]) -> bytes:
    head = json.dumps({k: v for k, v in doc.items() if k != "objects"})[:-1]
    return f'{head}, "objects": {"[" * 5000}{"]" * 5000}}}'.encode()


MANIFEST_EDITS: dict[str, Callable[[dict[str, Any]], Any] | bytes] = {
    "garbage": b"\x89PNG\r\n not json",
    "empty": b"",
    "empty-object": b"{}",
    "json-list": b"[1, 2]",
    "items-wrong-type": lambda doc: [v.update(items="x") for v in doc["objects"].values()],
    "record-strings": lambda doc: [v.update(items=[["0", "1", "2"]]) for v in doc["objects"].values()],
    "negative-offset": lambda doc: [
        v.update(items=[[-64, *r[1:]] for r in v["items"]]) for v in doc["objects"].values()
    ],
    "huge-length": lambda doc: [
        v.update(items=[[r[0], 2**70, *r[2:]] for r in v["items"]]) for v in doc["objects"].values()
    ],
    "crc-too-big": lambda doc: [
        v.update(items=[[*r[:2], 2**32, *r[3:]] for r in v["items"]]) for v in doc["objects"].values()
    ],
    "payload-outside-item": lambda doc: [
        v.update(items=[[*r[:3], r[1], 64, 0] for r in v["items"]]) for v in doc["objects"].values()
    ],
    "missing-objects": lambda doc: doc.pop("objects"),
    "missing-save-id": lambda doc: doc.pop("save_id"),
    "other-save-id": lambda doc: doc.update(save_id="save-20200101T000000Z-00000000"),
    "byteorder": lambda doc: doc.update(byteorder="middle"),
    "version": lambda doc: doc.update(version=99),
    "deep-nesting": _deep,
    "records-dropped": lambda doc: [v.update(items=[]) for v in doc["objects"].values()],
    "size-too-small": lambda doc: [v.update(size=1) for v in doc["objects"].values()],
}


@pytest.mark.parametrize("name", list(MANIFEST_EDITS))
def test_malformed_manifests(name: str, tmp_path: Path) -> None:
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    store = _saved(target)
    edit = MANIFEST_EDITS[name]
    if isinstance(edit, bytes):
        store.run(store.put(_manifest_key(_metadata(store)), edit))
    else:
        _edit_manifest(store, edit)
    text = _fails(lambda: _load(target), CorruptCheckpointError, "manifest.json", "verify_checksums=False")
    assert "Traceback" not in text.split("\n", 1)[0]
    report = verify_checkpoint(target.url)
    assert not report.ok, report
    loaded = _load(target, verify_checksums=False)
    assert torch.equal(loaded["w"], _state()["w"]) and loaded["extra"] == _state()["extra"]


def test_missing_manifest(s3_target: Target) -> None:
    store = _saved(s3_target)
    store.run(store.delete([_manifest_key(_metadata(store))]))
    _fails(
        lambda: _load(s3_target), CorruptCheckpointError, "manifest.json is missing", "verify_checksums=False"
    )
    assert torch.equal(_load(s3_target, verify_checksums=False)["w"], _state()["w"])
    report = verify_checkpoint(s3_target.url, storage_options=s3_target.storage_options)
    assert not report.ok and report.problems[0].kind == "manifest" and "missing" in report.problems[0].message


# -- malformed .metadata made of allowed classes --------------------------------------------------


def _with_locator(**fields: Any) -> Callable[[Metadata], None]:
    def edit(metadata: Metadata) -> None:
        index, info = _locator(metadata, "w")
        values = {"relative_path": info.relative_path, "offset": info.offset, "length": info.length, **fields}
        metadata.storage_data[index] = _StorageInfo(**values)

    return edit


def _chunk_outside(metadata: Metadata) -> None:
    entry = metadata.state_dict_metadata["w"]
    entry.chunks = [ChunkStorageMetadata(offsets=torch.Size([4]), sizes=torch.Size([8]))]  # type: ignore[union-attr]


METADATA_EDITS: dict[str, Callable[[Metadata], None]] = {
    "negative-offset": _with_locator(offset=-1),
    "string-length": _with_locator(length="32"),
    "huge-length": _with_locator(length=2**64),
    "bool-offset": _with_locator(offset=True),
    "path-not-str": _with_locator(relative_path=Path("x.distcp")),
    "storage-data-list": lambda md: setattr(md, "storage_data", [1, 2]),
    "entry-wrong-type": lambda md: md.state_dict_metadata.update(w=StorageMeta()),  # type: ignore[dict-item]
    "entries-not-dict": lambda md: setattr(md, "state_dict_metadata", [1]),
    "chunk-outside-tensor": _chunk_outside,
    "planner-data": lambda md: setattr(md, "planner_data", {"w": [[["deep"]]]}),
    "storage-meta": lambda md: setattr(md, "storage_meta", {"save_id": 1}),
    "save-id-not-str": lambda md: setattr(md.storage_meta, "save_id", 5),
    "no-locator": lambda md: md.storage_data.pop(_locator(md, "w")[0]),
}


@pytest.mark.parametrize("name", list(METADATA_EDITS))
def test_malformed_metadata(name: str, tmp_path: Path) -> None:
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    store = _saved(target)
    metadata = _metadata(store)
    METADATA_EDITS[name](metadata)
    _put_metadata(store, metadata)
    for options in ({}, {"verify_checksums": False}):
        _fails(lambda o=options: _load(target, **o), CorruptCheckpointError, str(Path(target.url)))  # type: ignore[misc]
        if name != "no-locator":
            _metadata_fails(target, CorruptCheckpointError, ".metadata", **options)
    with pytest.raises(CorruptCheckpointError):
        load_full_state_dict(target.url, verify_checksums=False)
    if name != "no-locator":  # .metadata itself is well-formed there: only a load misses the bytes
        _fails(lambda: checkpoint_info(target.url), CorruptCheckpointError, ".metadata")
        _fails(lambda: verify_checkpoint(target.url), CorruptCheckpointError, ".metadata")


def test_tensor_views_past_their_storage_are_refused() -> None:
    archive = bytearray(_torch_saved(torch.arange(4, dtype=torch.float32)))
    at = archive.find(b"K\x04\x85")  # the size (4,) in data.pkl
    assert at > 0
    archive[at : at + 3] = b"K\x64\x85"  # (100,): 96 elements past the storage's end
    with pytest.raises(OutOfBoundsError, match="storage of 4"):
        load_tensor(memoryview(bytes(archive)))


# -- bounded failure ------------------------------------------------------------------------------


def test_a_failed_metadata_read_is_not_retried_rank_locally(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = make_target("file", None, tmp_path)  # type: ignore[arg-type]
    _saved(target)
    reader = CloudStorageReader(target.url)
    calls: list[str] = []

    async def dead(key: str) -> bytes:
        calls.append(key)
        raise ConnectionRefusedError("connection refused")

    monkeypatch.setattr(reader.store, "get", dead)
    with pytest.raises(BaseException) as info:
        dcp.load(_template(), storage_reader=reader)
    assert "connection refused" in failure_text(info.value)
    assert calls == [".metadata"]  # not again as __0.metadata
    monkeypatch.undo()
    state = _template()
    dcp.load(state, checkpoint_id=target.url, storage_reader=reader)  # reset: reads afresh
    assert torch.equal(state["w"], _state()["w"])
