"""dcp_cloud.checkpoint.stored: one reading of a checkpoint as it lies on a store."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.metadata import Metadata

from dcp_cloud import CloudStorageWriter
from dcp_cloud.checkpoint import layout
from dcp_cloud.checkpoint.stored import StoredCheckpoint, checksum_mismatch, checksum_mismatch_text
from dcp_cloud.errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
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
