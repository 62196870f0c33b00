"""dcp_cloud.checkpoint.stored: what a ``.metadata`` says, read without any store."""

from __future__ import annotations

from typing import Any

import pytest
from torch.distributed.checkpoint.filesystem import _StorageInfo
from torch.distributed.checkpoint.metadata import Metadata, MetadataIndex, StorageMeta

from dcp_cloud.checkpoint import layout
from dcp_cloud.checkpoint.stored import References, StoredCheckpoint
from dcp_cloud.errors import UnsafeCheckpointError
from dcp_cloud.store import open_store

SAVE_ID = "save-20261122T200102Z-3f9a1c0b"
OTHER = "save-20261121T100000Z-00000000"


def metadata(paths: list[Any], save_id: Any = SAVE_ID) -> Metadata:
    storage = {
        MetadataIndex(f"t{n}"): _StorageInfo(relative_path=path, offset=0, length=4)
        for n, path in enumerate(paths)
    }
    return Metadata(state_dict_metadata={}, storage_data=storage, storage_meta=StorageMeta(save_id=save_id))


def test_a_save_of_ours_names_its_save_and_records() -> None:
    data = [f"{SAVE_ID}/__0_0.distcp", f"{SAVE_ID}/ab/__1_0.distcp"]
    found = metadata(data)
    assert StoredCheckpoint.save_id_of(found) == SAVE_ID
    assert StoredCheckpoint.written_by_dcp_cloud(found)
    assert StoredCheckpoint.data_keys(found) == set(data)
    assert StoredCheckpoint.referenced_keys(found) == set(data) | {
        layout.manifest_key(SAVE_ID),
        layout.intent_key(SAVE_ID),
    }
    assert StoredCheckpoint.references(found, "w") == References(frozenset(data), frozenset({SAVE_ID}))


def test_a_claimed_save_id_without_data_under_it_is_not_proof() -> None:
    found = metadata([f"{OTHER}/__0_0.distcp"])
    assert StoredCheckpoint.claimed_save_id(found) == SAVE_ID
    assert StoredCheckpoint.save_id_of(found) is None
    assert StoredCheckpoint.referenced_keys(found) == {f"{OTHER}/__0_0.distcp"}
    # for deleting, a claimed save is still named: gc keeps it
    assert StoredCheckpoint.references(found, "w").saves == {SAVE_ID, OTHER}


@pytest.mark.parametrize("claimed", [None, "", 7, "save-best"])
def test_no_strict_save_id_names_no_save_of_its_own(claimed: Any) -> None:
    found = metadata(["__0_0.distcp"], save_id=claimed)
    assert StoredCheckpoint.save_id_of(found) is None
    assert StoredCheckpoint.claimed_save_id(found) == (claimed if claimed == "save-best" else None)
    assert StoredCheckpoint.references(found, "w") == References(frozenset({"__0_0.distcp"}), frozenset())


@pytest.mark.parametrize("crafted", ["../outside.distcp", "/abs.distcp", "a//b.distcp", None, 3])
def test_a_locator_outside_the_checkpoint_is_refused_or_left_out(crafted: Any) -> None:
    found = metadata([f"{SAVE_ID}/__0_0.distcp", crafted])
    assert StoredCheckpoint.data_keys(found) == {f"{SAVE_ID}/__0_0.distcp"}
    with pytest.raises(UnsafeCheckpointError, match="s3://b/c/.metadata names the key"):
        StoredCheckpoint.confined_data_keys(found, "s3://b/c/.metadata")
    with pytest.raises(UnsafeCheckpointError):
        StoredCheckpoint.references(found, "s3://b/c/.metadata")


def test_keys_of_a_checkpoint_in_a_folder() -> None:
    store = open_store("memory://unit-stored-folder")
    stored = StoredCheckpoint(store, "run/step-1/")
    assert stored.folder == "run/step-1"
    assert stored.key(".metadata") == "run/step-1/.metadata"
    assert stored.where("__3.metadata") == f"{store.url}/run/step-1/__3.metadata"
    assert StoredCheckpoint(store).key(".metadata") == ".metadata"


def test_located_items_are_the_string_locators_with_their_storage_info() -> None:
    found = metadata([f"{SAVE_ID}/__0_0.distcp", None, "../x.distcp"])
    located = [(index.fqn, key, info.length) for index, key, info in StoredCheckpoint.located_items(found)]
    assert located == [("t0", f"{SAVE_ID}/__0_0.distcp", 4), ("t2", "../x.distcp", 4)]
    assert list(StoredCheckpoint.located_items(Metadata(state_dict_metadata={}))) == []
