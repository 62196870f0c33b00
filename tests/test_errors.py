"""Bad input gets a clear error that names the URL and says what to do."""

from __future__ import annotations

import errno
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from fsspec.registry import _registry as fsspec_registry
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import (
    BucketNotFoundError,
    CloudStorageReader,
    CloudStorageWriter,
    StoreAccessError,
    StoreConfigError,
    UploadError,
)
from dcp_cloud.store import open_store

from .conftest import BUCKET, Target, make_target
from .helpers import failure_text, failure_types


def _save(target: Target) -> dict[str, Any]:
    state = {"w": torch.randn(64, 64), "b": torch.randn(64), "step": 3}
    dcp.save(state, storage_writer=target.writer())
    return state


def _data_object(target: Target) -> tuple[Any, str]:
    """The store of a saved checkpoint and the key of its (single) data object."""
    store = open_store(target.url, target.storage_options)
    return store, next(o.key for o in store.run(store.list_objects("")) if o.key.endswith(".distcp"))


def _target_state() -> dict[str, Any]:
    return {"w": torch.zeros(64, 64), "b": torch.zeros(64), "step": 0}


def test_unknown_scheme() -> None:
    with pytest.raises(CheckpointException) as info:
        dcp.save({"x": torch.ones(1)}, storage_writer=CloudStorageWriter("nosuchscheme://bucket/x"))
    assert StoreConfigError in failure_types(info.value)
    assert "unknown URL scheme 'nosuchscheme'" in failure_text(info.value)


@pytest.mark.parametrize(
    "scheme,module,extra", [("gs", "gcsfs", "gcs"), ("az", "adlfs", "azure"), ("s3", "s3fs", "s3")]
)
def test_missing_backend_names_the_extra_to_install(
    scheme: str, module: str, extra: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # make the backend unimportable, as on a machine without the extra
    monkeypatch.setitem(sys.modules, module, None)
    for name in [k for k in fsspec_registry if k in (scheme, f"{scheme}a", "abfs", "gcs")]:
        monkeypatch.delitem(fsspec_registry, name)
    with pytest.raises(StoreConfigError) as info:
        open_store(f"{scheme}://bucket/ckpt")
    assert f"pip install 'dcp-cloud[{extra}]'" in str(info.value)


@pytest.mark.parametrize("store", ["s3", "gcs", "azure"])
def test_missing_bucket_on_save_and_load(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    target = make_target(store, request, tmp_path)
    url = target.url.replace(BUCKET, "no-such-bucket-here", 1)
    with pytest.raises(CheckpointException) as info:
        dcp.save({"x": torch.ones(1)}, storage_writer=target.writer(url=url))
    assert BucketNotFoundError in failure_types(info.value)
    assert "'no-such-bucket-here' does not exist" in failure_text(info.value)
    assert "Create it" in failure_text(info.value)
    with pytest.raises(CheckpointException) as info:
        dcp.load({"x": torch.ones(1)}, storage_reader=target.reader(url=url))
    assert "'no-such-bucket-here' does not exist" in failure_text(info.value)


def test_no_checkpoint_at_url(target: Target) -> None:
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target_state(), storage_reader=target.reader())
    text = failure_text(info.value)
    assert "no checkpoint here" in text and target.url.rsplit("/", 2)[-2] in text


def test_incomplete_checkpoint_data_without_metadata(target: Target) -> None:
    _save(target)
    store = open_store(target.url, target.storage_options)
    store.run(store.delete([".metadata"]))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target_state(), storage_reader=target.reader())
    assert "data objects but no .metadata" in failure_text(info.value)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty"])
def test_corrupt_metadata(target: Target, damage: str) -> None:
    _save(target)
    store = open_store(target.url, target.storage_options)
    good = store.run(store.get(".metadata"))
    bad = {"garbage": b"\x80\x04not a pickle at all", "truncated": good[: len(good) // 2], "empty": b""}[
        damage
    ]
    store.run(store.put(".metadata", bad))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target_state(), storage_reader=target.reader())
    assert "corrupt or truncated" in failure_text(info.value)


class _Boom:
    def __reduce__(self) -> Any:
        return (Path.touch, (Path("/tmp/dcp-cloud-pwned"),))


def test_malicious_metadata_pickle_is_refused_and_not_run(target: Target, tmp_path: Path) -> None:
    _save(target)
    marker = Path("/tmp/dcp-cloud-pwned")
    marker.unlink(missing_ok=True)
    store = open_store(target.url, target.storage_options)
    store.run(store.put(".metadata", pickle.dumps(_Boom())))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target_state(), storage_reader=target.reader())
    assert "not a plain DCP metadata pickle" in failure_text(info.value)
    assert not marker.exists(), "the crafted pickle ran code"


def test_flipped_byte_in_data_names_object_and_tensor(target: Target) -> None:
    _save(target)
    store, key = _data_object(target)
    data = bytearray(store.run(store.get(key)))
    data[len(data) // 2] ^= 0xFF
    store.run(store.put(key, bytes(data)))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target_state(), storage_reader=target.reader())
    text = failure_text(info.value)
    assert "checksum mismatch" in text and key in text and "w" in text


def test_flipped_byte_loads_when_verification_is_off(target: Target) -> None:
    state = _save(target)
    store, key = _data_object(target)
    data = bytearray(store.run(store.get(key)))
    data[len(data) // 2] ^= 0x01  # inside the payload of "w", the largest item
    store.run(store.put(key, bytes(data)))
    out = _target_state()
    dcp.load(out, storage_reader=target.reader(verify_checksums=False))
    assert not (torch.equal(out["w"], state["w"]) and torch.equal(out["b"], state["b"]))


def test_truncated_data_object(target: Target) -> None:
    _save(target)
    store, key = _data_object(target)
    data = store.run(store.get(key))
    store.run(store.put(key, data[: len(data) - 100]))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target_state(), storage_reader=target.reader())
    text = failure_text(info.value)
    assert "truncated" in text and key in text


def test_missing_data_object(target: Target) -> None:
    _save(target)
    store, key = _data_object(target)
    store.run(store.delete([key]))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target_state(), storage_reader=target.reader())
    text = failure_text(info.value)
    assert "is missing" in text and key in text


def test_state_dict_with_reshaped_tensor(target: Target) -> None:
    _save(target)
    out = _target_state()
    out["w"] = torch.zeros(32, 128)
    with pytest.raises(CheckpointException) as info:
        dcp.load(out, storage_reader=target.reader())
    assert "w" in failure_text(info.value)


def test_bad_options_are_refused_up_front() -> None:
    with pytest.raises(ValueError, match="5 MiB"):
        CloudStorageWriter("memory://x/y", part_size=1024)
    with pytest.raises(ValueError, match="memory_budget"):
        CloudStorageReader("memory://x/y", part_size=8 * 1024 * 1024, memory_budget=8 * 1024 * 1024)


def test_secrets_stay_out_of_repr_and_errors(s3_target: Target) -> None:
    options = dict(s3_target.storage_options)
    writer = CloudStorageWriter("s3://no-such-bucket-here/x", storage_options=options)
    assert options["secret"] not in repr(writer)
    with pytest.raises(CheckpointException) as info:
        dcp.save({"x": torch.ones(1)}, storage_writer=writer)
    assert options["secret"] not in failure_text(info.value)


# A base64 account key that is not Azurite's
_WRONG_AZURE_KEY = "bm90LXRoZS1rZXktbm90LXRoZS1rZXktbm90LXRoZS1rZXktbm90LXRoZS1rZXk="


# fake-gcs-server checks no credentials, so GCS is not in this list
@pytest.mark.parametrize("store", ["s3", "azure"])
def test_wrong_credentials_are_refused_clearly(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(store, request, tmp_path)
    if store == "s3":
        options, secret = (
            {**target.storage_options, "key": "not-a-key", "secret": "not-a-secret"},
            "not-a-secret",
        )
    else:
        options = {"connection_string": target.server.connection_string_with_key(_WRONG_AZURE_KEY)}
        secret = _WRONG_AZURE_KEY
    start = time.monotonic()
    with pytest.raises(CheckpointException) as info:
        dcp.save({"x": torch.ones(2)}, storage_writer=CloudStorageWriter(target.url, storage_options=options))
    assert StoreAccessError in failure_types(info.value)
    assert "Check the credentials" in failure_text(info.value)
    assert secret not in failure_text(info.value)
    assert time.monotonic() - start < 10  # refused credentials are not retried
    with pytest.raises(CheckpointException) as info:
        dcp.load({"x": torch.ones(2)}, storage_reader=CloudStorageReader(target.url, storage_options=options))
    assert "Check the credentials" in failure_text(info.value)


def test_permission_denied_on_write_midway(s3_target: Target) -> None:
    state = _save(s3_target)
    server = s3_target.server
    server.set_faults(1.0, kinds="403", methods="PUT")  # uploads refused, everything else allowed
    try:
        with pytest.raises(CheckpointException) as info:
            dcp.save(
                {"w": torch.randn(2 * 1024 * 1024), "b": torch.randn(64), "step": 4},
                storage_writer=s3_target.writer(part_size=5 * 1024 * 1024),
            )
    finally:
        server.set_faults(0.0)
    assert StoreAccessError in failure_types(info.value)
    out = _target_state()
    dcp.load(out, storage_reader=s3_target.reader())
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3


def test_disk_full_on_a_local_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = str(tmp_path / "ckpt")
    dcp.save({"w": torch.ones(4)}, storage_writer=CloudStorageWriter(url))
    real_pwrite = os.pwrite

    def full_disk(fd: int, data: Any, offset: int) -> int:
        if offset > 0:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_pwrite(fd, data, offset)

    monkeypatch.setattr(os, "pwrite", full_disk)
    with pytest.raises(CheckpointException) as info:
        dcp.save(
            {"w": torch.randn(4 * 1024 * 1024)},
            storage_writer=CloudStorageWriter(url, part_size=5 * 1024 * 1024),
        )
    monkeypatch.undo()
    assert UploadError in failure_types(info.value) and "no space left" in failure_text(info.value)
    assert not [p for p in (tmp_path / "ckpt").rglob("*") if ".tmp-" in p.name], "temporary files left behind"
    out = {"w": torch.zeros(4)}
    dcp.load(out, storage_reader=CloudStorageReader(url))
    assert torch.equal(out["w"], torch.ones(4))


def test_zero_byte_data_object(target: Target) -> None:
    _save(target)
    store, key = _data_object(target)
    store.run(store.put(key, b""))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target_state(), storage_reader=target.reader())
    assert "truncated" in failure_text(info.value) and key in failure_text(info.value)


def test_a_prefix_that_is_not_a_checkpoint(target: Target) -> None:
    store = open_store(target.url, target.storage_options)
    store.run(store.put("README.txt", b"not a checkpoint"))
    store.run(store.put("data/part-0.parquet", b"PAR1"))
    with pytest.raises(CheckpointException) as info:
        dcp.load(_target_state(), storage_reader=target.reader())
    assert "no checkpoint here" in failure_text(info.value)


def test_extra_keys_in_the_checkpoint_load_with_partial_planner(target: Target) -> None:
    from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

    state = _save(target)
    out = {"w": torch.zeros(64, 64)}
    dcp.load(out, storage_reader=target.reader(), planner=DefaultLoadPlanner(allow_partial_load=True))
    assert torch.equal(out["w"], state["w"])


def test_every_field_of_dcp_metadata_passes_the_safe_unpickler() -> None:
    from pathlib import PurePosixPath

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import (
        BytesStorageMetadata,
        ChunkStorageMetadata,
        Metadata,
        MetadataIndex,
        StorageMeta,
        TensorProperties,
        TensorStorageMetadata,
    )

    from dcp_cloud.checkpoint.metadata import load_metadata

    props = TensorProperties(
        dtype=torch.bfloat16,
        layout=torch.strided,
        requires_grad=True,
        memory_format=torch.channels_last,
        pin_memory=False,
    )
    chunk = ChunkStorageMetadata(offsets=torch.Size([0, 0, 0, 0]), sizes=torch.Size([1, 2, 3, 4]))
    metadata = Metadata(
        state_dict_metadata={
            "t": TensorStorageMetadata(properties=props, size=torch.Size([1, 2, 3, 4]), chunks=[chunk]),
            "b": BytesStorageMetadata(),
        },
        planner_data={"t": ("t",), "b": ("b", 0, "x")},
        storage_data={
            MetadataIndex("t", torch.Size([0, 0, 0, 0]), 0): _StorageInfo("x/__0_0.distcp", 0, 10),
            MetadataIndex("b"): _StorageInfo("x/__0_0.distcp", 64, 5, ["zstd"]),
        },
        storage_meta=StorageMeta(
            checkpoint_id=PurePosixPath("/ckpt"), save_id="s", load_id="l", modules=["m"]
        ),
        version="1.0.0",
    )
    loaded = load_metadata(pickle.dumps(metadata, protocol=2), "test") and load_metadata(
        pickle.dumps(metadata), "test"
    )
    assert loaded.state_dict_metadata["t"].properties.memory_format == torch.channels_last
    assert loaded.storage_data == metadata.storage_data and loaded.planner_data == metadata.planner_data
