"""dcp_cloud.checkpoint.stored: one reading of a checkpoint as it lies on a store."""

from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata, StorageMeta

from dcp_cloud import CloudStorageWriter
from dcp_cloud.checkpoint import layout
from dcp_cloud.checkpoint.manifest import ItemRecord, Manifest
from dcp_cloud.checkpoint.stored import StoredCheckpoint, checksum_mismatch, checksum_mismatch_text
from dcp_cloud.errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from dcp_cloud.store import open_store


def _saved(path: Path) -> StoredCheckpoint:
    dcp.save({"w": torch.arange(8.0)}, storage_writer=CloudStorageWriter(str(path)))
    return StoredCheckpoint(open_store(str(path)))


def test_missing_metadata_is_diagnosed_once(tmp_path: Path) -> None:
    stored = StoredCheckpoint(open_store(str(tmp_path)))
    with pytest.raises(CheckpointNotFoundError, match="no checkpoint here") as info:
        stored.read_metadata()
    assert not isinstance(info.value, IncompleteCheckpointError)
    stored.store.run(stored.store.put("save-x/__0_0.distcp", b"1234"))
    with pytest.raises(IncompleteCheckpointError, match="1 data objects but no .metadata"):
        stored.read_metadata()
    with pytest.raises(CheckpointNotFoundError, match="no __3.metadata either"):
        stored.read_metadata(rank=3)


def test_a_dcp_cloud_checkpoint_names_its_save_and_keys(tmp_path: Path) -> None:
    stored = _saved(tmp_path)
    metadata = stored.read_metadata()
    save_id = StoredCheckpoint.save_id_of(metadata)
    assert save_id is not None and layout.is_save_id(save_id)
    assert StoredCheckpoint.written_by_dcp_cloud(metadata)
    data = StoredCheckpoint.data_keys(metadata)
    assert data and all(layout.save_id_of_key(k) == save_id for k in data)
    assert StoredCheckpoint.referenced_keys(metadata) == data | {
        layout.manifest_key(save_id),
        layout.intent_key(save_id),
    }
    assert set(stored.read_manifest(save_id).objects) == data
    assert stored.read_committed() == stored.read_metadata_bytes()


def test_a_missing_manifest_says_so(tmp_path: Path) -> None:
    stored = _saved(tmp_path)
    save_id = StoredCheckpoint.save_id_of(stored.read_metadata())
    assert save_id is not None
    stored.store.run(stored.store.delete([layout.manifest_key(save_id)]))
    with pytest.raises(CorruptCheckpointError, match="manifest.json is missing"):
        stored.read_manifest(save_id)


def test_foreign_and_crafted_locators(tmp_path: Path) -> None:
    dcp.save({"w": torch.ones(4)}, storage_writer=dcp.FileSystemWriter(str(tmp_path)))
    stored = StoredCheckpoint(open_store(str(tmp_path)))
    metadata = stored.read_metadata()
    assert StoredCheckpoint.save_id_of(metadata) is None
    assert StoredCheckpoint.referenced_keys(metadata) == StoredCheckpoint.data_keys(metadata) != set()
    crafted: Metadata = pickle.loads(pickle.dumps(metadata))
    for info in crafted.storage_data.values():
        info.relative_path = "../outside.distcp"
    assert StoredCheckpoint.data_keys(crafted) == set()
    assert stored.read_committed("__5.metadata") is None


def test_checksum_mismatch_message() -> None:
    text = checksum_mismatch_text("s3://b/c/k.distcp", 4, 12, "w, b")
    assert text == "s3://b/c/k.distcp: checksum mismatch in bytes [4, 12) holding w, b"
    error = checksum_mismatch("s3://b/c/k.distcp", 4, 12, "w, b")
    assert isinstance(error, CorruptCheckpointError)
    assert str(error).startswith(text + ". ") and "verify_checksums=False" in str(error)


# -- the commit protocol, driven through StoredCheckpoint ----------------------------------------


def _save(path: Path, value: float) -> Metadata:
    dcp.save({"w": torch.full((8,), value)}, storage_writer=CloudStorageWriter(str(path)))
    return StoredCheckpoint(open_store(str(path))).read_metadata()


def _keys(path: Path) -> set[str]:
    store = open_store(str(path))
    return {o.key for o in store.run(store.list_objects(""))}


def _new_save(stored: StoredCheckpoint) -> tuple[Manifest, str]:
    """A save's data object and intent on the store, and its manifest (not yet written)."""
    save_id = layout.new_save_id()
    data = layout.data_key(save_id, "__0_", 0)
    store = stored.store
    store.run(store.put(stored.key(data), b"\0" * 16))
    store.run(store.put(stored.key(layout.intent_key(save_id)), b"{}"))
    manifest = Manifest(save_id=save_id, objects={data: [ItemRecord(0, 16, 0)]})
    return manifest, data


def test_a_checkpoint_in_a_folder_is_read_relative_to_it(tmp_path: Path) -> None:
    metadata = _save(tmp_path / "run" / "step-1", 1.0)
    stored = StoredCheckpoint(open_store(str(tmp_path)), "run/step-1")
    save_id = StoredCheckpoint.save_id_of(stored.read_metadata())
    assert save_id == StoredCheckpoint.save_id_of(metadata) and save_id is not None
    references = stored.read_references()
    assert references is not None
    assert references.keys == StoredCheckpoint.data_keys(metadata) and references.saves == {save_id}
    assert stored.read_references("__4.metadata") is None
    assert set(stored.read_manifest(save_id).objects) == references.keys
    assert stored.url == f"{stored.store.url}/run/step-1"
    with pytest.raises(CheckpointNotFoundError, match="/elsewhere: no checkpoint here"):
        StoredCheckpoint(stored.store, "elsewhere").read_metadata()


def test_an_unreadable_committed_metadata_is_replaced_but_not_cleaned_up_after(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    stored = StoredCheckpoint(open_store(str(tmp_path)))
    stored.store.run(stored.store.put(layout.METADATA_KEY, b"not a pickle"))
    with pytest.raises(CorruptCheckpointError):
        stored.read_references()
    with caplog.at_level("WARNING", logger="dcp_cloud"):
        assert stored.read_replaced() is None
    assert "not cleaning up after the replaced checkpoint" in caplog.text


def test_commit_writes_the_manifest_then_the_metadata_and_records_what_it_replaces(tmp_path: Path) -> None:
    previous = _save(tmp_path, 1.0)
    stored = StoredCheckpoint(open_store(str(tmp_path)))
    manifest, data = _new_save(stored)
    current: Metadata = pickle.loads(pickle.dumps(previous))
    current.storage_meta.save_id = manifest.save_id  # type: ignore[union-attr]
    stored.commit(layout.METADATA_KEY, manifest, current, overwrite=True, previous=previous)
    written = stored.read_manifest(manifest.save_id)
    assert written.replaced == StoredCheckpoint.referenced_keys(previous) != set()
    assert StoredCheckpoint.claimed_save_id(stored.read_metadata()) == manifest.save_id
    stored.release_intent(manifest.save_id)
    assert layout.intent_key(manifest.save_id) not in _keys(tmp_path) and data in _keys(tmp_path)


@pytest.mark.parametrize("early", [True, False])
def test_a_save_that_cannot_commit_is_discarded(tmp_path: Path, early: bool) -> None:
    """``early``: the save saw the committed checkpoint; else it lost the conditional PUT."""
    previous = _save(tmp_path, 1.0)
    before = _keys(tmp_path)
    stored = StoredCheckpoint(open_store(str(tmp_path)))
    manifest, data = _new_save(stored)
    assert data in _keys(tmp_path)
    ours = dataclasses.replace(previous, storage_meta=StorageMeta(save_id=manifest.save_id))
    with pytest.raises(CheckpointExistsError, match=r"\.metadata exists\) and overwrite=False"):
        stored.commit(
            layout.METADATA_KEY, manifest, ours, overwrite=False, previous=previous if early else None
        )
    assert _keys(tmp_path) == before
    with pytest.raises(CheckpointExistsError, match="overwrite=False"):
        stored.refuse_if_committed()
    stored.refuse_if_committed("__2.metadata")


def test_retiring_a_generation_deletes_only_what_its_records_prove_ours(tmp_path: Path) -> None:
    first = _save(tmp_path / "ck", 1.0)
    second = _save(tmp_path / "ck", 2.0)
    root = open_store(str(tmp_path))
    first_keys = {
        k for k in _keys(tmp_path / "ck") if k.startswith(StoredCheckpoint.save_id_of(first) or "?")
    }
    assert first_keys  # the second save keeps the generation it replaced
    # the same keys outside the checkpoint's folder, and a user file inside it
    for key in first_keys:
        root.run(root.put(key, b"not the checkpoint's"))
    root.run(root.put("ck/notes.txt", b"mine"))
    StoredCheckpoint(root, "ck").retire_generation_before(second, second)
    left = _keys(tmp_path / "ck")
    assert not left & first_keys and "notes.txt" in left
    assert (
        StoredCheckpoint.referenced_keys(second)
        - {layout.intent_key(StoredCheckpoint.save_id_of(second) or "?")}
        <= left
    )
    assert first_keys <= _keys(tmp_path)  # the look-alikes at the store root stay
    out = {"w": torch.zeros(8)}
    dcp.load(out, checkpoint_id=str(tmp_path / "ck"))
    assert torch.equal(out["w"], torch.full((8,), 2.0))
