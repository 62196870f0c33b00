"""dcp_cloud.copy_checkpoint through its Python API: copies between stores, the destination's
commit last, overwrite, failures that leave nothing behind, and refusing keys that leave the
checkpoint. (The ``dcp-cloud cp`` command's own options are tested in test_cli.py.)"""

from __future__ import annotations

import pickle
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from fsspec.implementations.memory import MemoryFileSystem

from dcp_cloud import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    UnsafeCheckpointError,
    copy_checkpoint,
    verify_checkpoint,
)
from dcp_cloud.checkpoint import layout
from dcp_cloud.checkpoint.manifest import Manifest
from dcp_cloud.options import MIN_PART_SIZE
from dcp_cloud.store import ObjectStore, open_store

from .conftest import BUCKET, Target
from .helpers import assert_same, zeros_like_state

#: parts this small make every data object of ``state()`` a multipart copy of ranged reads
SMALL_PART = 4096


def state(value: float = 1.0) -> dict[str, Any]:
    return {
        "w": torch.full((64, 32), value),  # 8 KiB: several small parts
        "b": torch.arange(16, dtype=torch.float64) * value,
        "step": int(value),
    }


def load(url: str, options: dict[str, Any] | None = None, value: float = 1.0) -> dict[str, Any]:
    out = zeros_like_state(state(value))
    out["step"] = 0
    dcp.load(out, storage_reader=Target("x", url, options or {}).reader())
    return out


def store_of(url: str | Path, options: dict[str, Any] | None = None) -> ObjectStore:
    return open_store(url, options)


def listing(store: ObjectStore) -> dict[str, int]:
    return {o.key: o.size for o in store.run(store.list_objects(""))}


def part_size_for(target: Target) -> int:
    """The smallest part the target store accepts (S3: 5 MiB, so whole-object puts here)."""
    return MIN_PART_SIZE if target.store == "s3" else SMALL_PART


def memory_url(name: str) -> str:
    return f"memory://{BUCKET}/copier-{uuid.uuid4().hex[:10]}/{name}"


# -- copies between stores ------------------------------------------------------------------------


def test_copy_from_each_store_and_back(target: Target, tmp_path: Path) -> None:
    dcp.save(state(), storage_writer=target.writer())
    source = listing(store_of(target.url, target.storage_options))
    local = tmp_path / "copy"
    ticks: list[int] = []
    totals: list[int] = []
    report = copy_checkpoint(
        target.url,
        local,
        storage_options=target.storage_options,
        dst_storage_options={},
        part_size=SMALL_PART,
        progress=ticks.append,
        on_total=totals.append,
    )
    data = {k: v for k, v in source.items() if k.endswith(layout.DATA_SUFFIX)}
    assert report.objects == len(data) + 2  # the data, the manifest, .metadata
    assert report.bytes == sum(data.values()) == totals[0] == sum(ticks) and len(totals) == 1
    assert len(ticks) > len(data), "no object was copied in parts"
    assert not report.replaced and report.dst == str(local)
    assert listing(store_of(local)) == {k: v for k, v in source.items() if not k.endswith("intent.json")}
    assert_same(state(), load(str(local)))
    assert verify_checkpoint(local).ok

    back = target.child("back")
    copy_checkpoint(
        local, back.url, dst_storage_options=back.storage_options, part_size=part_size_for(target)
    )
    assert_same(state(), load(back.url, back.storage_options))
    assert verify_checkpoint(back.url, storage_options=back.storage_options).ok


def test_only_the_committed_checkpoint_is_copied(tmp_path: Path) -> None:
    src = memory_url("src")
    dcp.save(state(), storage_writer=Target("memory", src).writer())
    store = store_of(src)
    committed = set(listing(store))
    debris = ["save-20250101T000000Z-00000000/__0_0.distcp", "notes.txt", "other/.metadata"]
    for key in debris:
        store.run(store.put(key, b"debris"))
    dst = tmp_path / "dst"
    copy_checkpoint(src, dst)
    copied = set(listing(store_of(dst)))
    assert copied == {k for k in committed if not k.endswith("intent.json")}
    assert not copied & set(debris)


# -- the commit comes last ------------------------------------------------------------------------


class RecordingMemoryFS(MemoryFileSystem):
    """fsspec's memory filesystem, recording each object written (and failing on request).

    Every write, ``pipe_file`` included, opens the object for writing."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.writes: list[tuple[str, bool]] = []  # (path, whether .metadata existed then)
        self.fail_on: str | None = None
        self.root = ""

    def _record(self, path: str) -> None:
        committed = self.exists(f"{self.root}/{layout.METADATA_KEY}")
        self.writes.append((path, committed))
        if self.fail_on is not None and path.endswith(self.fail_on):
            raise OSError(f"injected failure writing {path}")

    def _open(self, path: str, mode: str = "rb", *args: Any, **kwargs: Any) -> Any:
        if "w" in mode:
            self._record(path)
        return super()._open(path, mode, *args, **kwargs)


def recording_destination() -> tuple[str, RecordingMemoryFS]:
    fs = RecordingMemoryFS(skip_instance_cache=True)
    url = memory_url("dst")
    fs.root = fs._strip_protocol(url)
    return url, fs


def test_metadata_is_written_last_after_every_data_object(s3_target: Target) -> None:
    dcp.save(state(), storage_writer=s3_target.writer())
    keys = set(listing(store_of(s3_target.url, s3_target.storage_options)))
    url, fs = recording_destination()
    copy_checkpoint(
        s3_target.url,
        url,
        storage_options=s3_target.storage_options,
        dst_filesystem=fs,
        part_size=SMALL_PART,
    )
    written = [path.rsplit(f"{fs.root}/", 1)[1] for path, _ in fs.writes]
    assert written[-1] == layout.METADATA_KEY and written.count(layout.METADATA_KEY) == 1
    assert set(written[:-1]) == {k for k in keys if k.endswith((layout.DATA_SUFFIX, layout.MANIFEST_NAME))}
    assert not any(committed for _, committed in fs.writes), "a write happened after the commit"


@pytest.mark.parametrize("fail_on", [layout.DATA_SUFFIX, layout.MANIFEST_NAME, layout.METADATA_KEY])
def test_a_failed_copy_commits_nothing_and_removes_what_it_wrote(fail_on: str, tmp_path: Path) -> None:
    src = tmp_path / "src"
    dcp.save(state(), storage_writer=Target("file", str(src)).writer())
    url, fs = recording_destination()
    fs.fail_on = fail_on
    with pytest.raises(OSError, match="injected failure"):
        copy_checkpoint(src, url, dst_filesystem=fs, max_concurrency=2)
    assert fs.writes, "the copy failed before writing"
    dst = open_store(url, filesystem=fs)
    assert listing(dst) == {}


# -- overwrite ------------------------------------------------------------------------------------


def test_overwrite_is_refused_unless_asked_and_keeps_the_old_objects(tmp_path: Path) -> None:
    old_src, new_src, dst = tmp_path / "old", tmp_path / "new", memory_url("dst")
    dcp.save(state(1.0), storage_writer=Target("file", str(old_src)).writer())
    dcp.save(state(2.0), storage_writer=Target("file", str(new_src)).writer())
    copy_checkpoint(old_src, dst)
    store = store_of(dst)
    before = listing(store)
    metadata_before = store.run(store.get(layout.METADATA_KEY))

    with pytest.raises(CheckpointExistsError, match="overwrite=True"):
        copy_checkpoint(new_src, dst)
    assert listing(store) == before
    assert store.run(store.get(layout.METADATA_KEY)) == metadata_before
    assert_same(state(1.0), load(dst, value=1.0))

    report = copy_checkpoint(new_src, dst, overwrite=True)
    assert report.replaced
    assert_same(state(2.0), load(dst, value=2.0))
    old_data = {k for k in before if k.endswith(layout.DATA_SUFFIX)}
    after = listing(store)
    assert old_data <= set(after), "the replaced checkpoint's objects went before loads could finish"
    manifest_key = next(k for k in after if k.endswith(layout.MANIFEST_NAME) and k not in before)
    manifest = Manifest.from_json(store.run(store.get(manifest_key)))
    assert manifest.replaced == old_data


def test_copying_a_checkpoint_onto_itself_with_overwrite_keeps_it_loadable(tmp_path: Path) -> None:
    src = tmp_path / "src"
    dcp.save(state(), storage_writer=Target("file", str(src)).writer())
    dst = memory_url("dst")
    copy_checkpoint(src, dst)
    copy_checkpoint(src, dst, overwrite=True)
    store = store_of(dst)
    manifest_key = next(k for k in listing(store) if k.endswith(layout.MANIFEST_NAME))
    assert Manifest.from_json(store.run(store.get(manifest_key))).replaced == set()
    assert_same(state(), load(dst))


# -- sources that are not whole, and keys that leave the checkpoint -------------------------------


def test_a_source_without_metadata_is_not_copied(tmp_path: Path) -> None:
    src = tmp_path / "src"
    with pytest.raises(CheckpointNotFoundError):
        copy_checkpoint(src, tmp_path / "dst")
    dcp.save(state(), storage_writer=Target("file", str(src)).writer())
    (src / layout.METADATA_KEY).unlink()
    with pytest.raises(CheckpointNotFoundError, match="no .metadata"):
        copy_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst").exists()


def test_a_source_missing_a_data_object_is_not_copied(tmp_path: Path) -> None:
    src = tmp_path / "src"
    dcp.save(state(), storage_writer=Target("file", str(src)).writer())
    next(src.rglob(f"*{layout.DATA_SUFFIX}")).unlink()
    dst = memory_url("dst")
    with pytest.raises(CorruptCheckpointError, match="missing"):
        copy_checkpoint(src, dst)
    assert listing(store_of(dst)) == {}


def redirect_locator(store: ObjectStore, new_key: str) -> None:
    """Rewrite the committed .metadata so that one locator names ``new_key``."""
    metadata = pickle.loads(store.run(store.get(layout.METADATA_KEY)))  # the test's own checkpoint
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = type(info)(new_key, info.offset, info.length)
    store.run(store.put(layout.METADATA_KEY, pickle.dumps(metadata)))


@pytest.mark.parametrize("evil", ["../outside.distcp", "a/../../outside.distcp", "/abs.distcp", "x//y"])
def test_locators_that_leave_the_checkpoint_are_refused_before_anything_is_copied(
    target: Target, evil: str, tmp_path: Path
) -> None:
    dcp.save(state(), storage_writer=target.writer())
    redirect_locator(store_of(target.url, target.storage_options), evil)
    dst = tmp_path / "dst"
    with pytest.raises(UnsafeCheckpointError) as caught:
        copy_checkpoint(target.url, dst, storage_options=target.storage_options, dst_storage_options={})
    assert repr(evil) in str(caught.value)
    assert not dst.exists() or list(dst.rglob("*")) == []
