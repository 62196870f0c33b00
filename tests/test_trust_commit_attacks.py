"""Attacks on the commit protocol as StoredCheckpoint carries it (commit, discard, release the
intent, retire a generation) and on the tools that read ``.metadata`` through it.

A caller (or a bug) hands StoredCheckpoint a folder that escapes, or one that is a prefix of
another folder; someone who can write to the bucket crafts the records a retire or a gc reads;
the store refuses the deletes that follow a commit; a second writer commits first. Every test
asserts that nothing outside the checkpoint changes, that a committed checkpoint stays whole,
and that every save that reported success loads.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import pickle
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner
from torch.distributed.checkpoint.metadata import Metadata

from dcp_cloud import (
    CheckpointExistsError,
    CloudStorageWriter,
    UnsafeCheckpointError,
    checkpoint_info,
    collect_garbage,
    copy_checkpoint,
    verify_checkpoint,
)
from dcp_cloud.checkpoint import layout
from dcp_cloud.checkpoint.commit import older_generation
from dcp_cloud.checkpoint.manifest import ItemRecord, Manifest
from dcp_cloud.checkpoint.stored import StoredCheckpoint
from dcp_cloud.errors import CheckpointNotFoundError, IncompleteCheckpointError
from dcp_cloud.store import open_store
from dcp_cloud.testing import S3Server

from .conftest import Target
from .helpers import failure_types, put_torch_checkpoint


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((64,), value), "b": torch.arange(8, dtype=torch.int64) + int(value)}


def _loaded(url: str, target: Target) -> float:
    out = {"w": torch.zeros(64), "b": torch.zeros(8, dtype=torch.int64)}
    dcp.load(out, storage_reader=target.reader(url))
    value = float(out["w"][0])
    assert torch.equal(out["w"], torch.full((64,), value)), "a torn checkpoint: mixed values"
    assert torch.equal(out["b"], torch.arange(8, dtype=torch.int64) + int(value))
    return value


def _save(target: Target, url: str, value: float, **kwargs: Any) -> Metadata:
    dcp.save(_state(value), storage_writer=target.writer(url, **kwargs))
    return StoredCheckpoint(open_store(url, target.storage_options)).read_metadata()


def _snapshot(store: Any, prefix: str = "") -> dict[str, bytes]:
    return {o.key: store.run(store.get(o.key)) for o in store.run(store.list_objects(prefix))}


def _keys(store: Any, prefix: str = "") -> set[str]:
    return {o.key for o in store.run(store.list_objects(prefix))}


def _data_keys_of(metadata: Metadata) -> set[str]:
    keys = StoredCheckpoint.data_keys(metadata)
    assert keys, "a dcp_cloud save always locates data objects"
    return keys


# -- folders that escape, or that are a prefix of another -----------------------------------

ESCAPING = ["..", "../x", "a/../..", "a//b", "./a", "%2e%2e", "a/%2E%2E/..", "a\\..\\.."]


def test_a_folder_that_escapes_reaches_nothing_outside(
    target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """StoredCheckpoint(store, folder) with a folder that leaves the store's root: every read
    is refused, commit writes nothing, discard / release / retire delete nothing (only log)."""
    parent_url = target.url.rpartition("/")[0]
    outside = _save(target, parent_url, 1.0)  # a real checkpoint right above the store's root
    parent = open_store(parent_url, target.storage_options)
    store = open_store(target.url, target.storage_options)
    store.run(store.put("notes.txt", b"inside"))
    before = _snapshot(parent)
    save_id = StoredCheckpoint.save_id_of(outside)
    assert save_id is not None
    outside_manifest = StoredCheckpoint(parent).read_manifest(save_id)

    for folder in ESCAPING:
        stored = StoredCheckpoint(store, folder)
        with pytest.raises(UnsafeCheckpointError):
            stored.read_committed()
        with pytest.raises(UnsafeCheckpointError):
            stored.is_committed()
        with pytest.raises(UnsafeCheckpointError):
            stored.refuse_if_committed()
        with pytest.raises(UnsafeCheckpointError):
            stored.read_references()
        with pytest.raises(UnsafeCheckpointError):
            stored.read_manifest(save_id)
        with pytest.raises(UnsafeCheckpointError):
            stored.commit(layout.METADATA_KEY, outside_manifest, outside, overwrite=True, previous=None)
        with caplog.at_level(logging.WARNING, logger="dcp_cloud"):
            stored.discard(outside_manifest)  # best effort: logged, never raised
            stored.release_intent(save_id)
            stored.retire_generation_before(outside, outside)
        assert _snapshot(parent) == before, f"folder {folder!r} changed something"
    assert "could not remove the objects" in caplog.text
    assert _loaded(parent_url, target) == 1.0


def test_slashes_around_a_folder_stay_inside_it(target: Target) -> None:
    root_url = target.url
    metadata = _save(target, f"{root_url}/run1", 1.0)
    root = open_store(root_url, target.storage_options)
    for folder in ("run1", "/run1", "run1/", "//run1//"):
        stored = StoredCheckpoint(root, folder)
        assert stored.folder == "run1" and stored.key(".metadata") == "run1/.metadata"
        references = stored.read_references()
        assert references is not None and references.keys == _data_keys_of(metadata)


def test_a_folder_that_is_a_prefix_of_another_folder(target: Target) -> None:
    """run1 beside run10 (and run1-old): reading, diagnosing, retiring and gc in run1 never
    reach into the others, and the reverse."""
    root_url = target.url
    root = open_store(root_url, target.storage_options)
    a1 = _save(target, f"{root_url}/run1", 1.0)
    b1 = _save(target, f"{root_url}/run1", 2.0)
    _save(target, f"{root_url}/run10", 10.0)
    b10 = _save(target, f"{root_url}/run10", 11.0)
    # run1-old: the data of an uncommitted save, no .metadata (a prefix, without the slash)
    root.run(root.put("run1-old/save-20260101T000000Z-0123abcd/__0_0.distcp", b"debris"))
    run10_before = _snapshot(root, "run10/")
    old_before = _snapshot(root, "run1-old/")

    # a folder that is a prefix of others, with nothing of its own: no checkpoint, no debris
    with pytest.raises(CheckpointNotFoundError) as info:
        StoredCheckpoint(root, "run").read_metadata()
    assert not isinstance(info.value, IncompleteCheckpointError)
    with pytest.raises(IncompleteCheckpointError):
        StoredCheckpoint(root, "run1-old").read_metadata()

    run1 = StoredCheckpoint(root, "run1")
    references = run1.read_references()
    assert references is not None and references.keys == _data_keys_of(b1)
    a1_keys = {k for k in _keys(root, "run1/") if k.split("/")[1] == StoredCheckpoint.save_id_of(a1)}
    assert a1_keys and all(k.startswith("run1/") for k in a1_keys)
    doomed = older_generation(run1, b1, b1)
    a1_intent = f"run1/{layout.intent_key(StoredCheckpoint.save_id_of(a1) or '?')}"  # released
    assert doomed and set(doomed) <= a1_keys | {a1_intent} and a1_keys <= set(doomed), doomed
    # data first, the save's records last (a partial deletion still leaves proof)
    records = [i for i, k in enumerate(doomed) if k.endswith(".json")]
    assert records == list(range(len(doomed) - len(records), len(doomed)))

    run1.retire_generation_before(b1, b1)
    assert not (_keys(root, "run1/") & set(doomed))
    assert _snapshot(root, "run10/") == run10_before and _snapshot(root, "run1-old/") == old_before
    assert _loaded(f"{root_url}/run1", target) == 2.0 and _loaded(f"{root_url}/run10", target) == 11.0

    # retiring in run10 never reaches run1
    run1_before = _snapshot(root, "run1/")
    StoredCheckpoint(root, "run10").retire_generation_before(b10, b10)
    assert _snapshot(root, "run1/") == run1_before
    assert _loaded(f"{root_url}/run1", target) == 2.0 and _loaded(f"{root_url}/run10", target) == 11.0


def test_gc_tells_a_folder_from_its_prefix_twin(target: Target) -> None:
    """run1 is committed; run10 holds byte-for-byte the same save folder, uncommitted (no
    .metadata): gc at the root removes run10's copy and keeps run1 whole, and the reverse."""
    root_url = target.url
    root = open_store(root_url, target.storage_options)
    metadata = _save(target, f"{root_url}/run1", 1.0)
    save_id = StoredCheckpoint.save_id_of(metadata)
    for key, data in _snapshot(root, "run1/").items():
        if key != "run1/.metadata":
            root.run(root.put("run10/" + key.removeprefix("run1/"), data))
    run1_before = _snapshot(root, "run1/")
    report = collect_garbage(root_url, storage_options=target.storage_options, grace_seconds=0)
    assert _snapshot(root, "run1/") == run1_before
    assert not _keys(root, f"run10/{save_id}/"), "the uncommitted twin was kept"
    assert report.deleted and all(k.startswith(f"run10/{save_id}/") for k in report.deleted)
    assert _loaded(f"{root_url}/run1", target) == 1.0

    # the reverse: the committed one is the longer name
    metadata = _save(target, f"{root_url}/run10", 2.0)
    save_id = StoredCheckpoint.save_id_of(metadata)
    for key, data in _snapshot(root, f"run10/{save_id}/").items():
        root.run(root.put("run1/" + key.removeprefix("run10/"), data))
    run10_before = _snapshot(root, "run10/")
    collect_garbage(root_url, storage_options=target.storage_options, grace_seconds=0)
    assert _snapshot(root, "run10/") == run10_before
    assert not _keys(root, f"run1/{save_id}/")
    assert _loaded(f"{root_url}/run10", target) == 2.0 and _loaded(f"{root_url}/run1", target) == 1.0


# -- crafted records that a retire reads --------------------------------------------------------


@pytest.mark.parametrize("escapes", [False, True], ids=["confined", "escaping"])
def test_a_crafted_replaced_list_retires_nothing_outside_or_committed(target: Target, escapes: bool) -> None:
    """The manifest of the replaced save names, in ``replaced``, keys of a sibling folder's
    committed save, the new checkpoint's own keys, and foreign look-alikes: the next save
    commits and retires none of them (only the generation before, which its records prove
    ours). With keys that escape the folder the manifest proves nothing: nothing is retired."""
    root_url = target.url
    root = open_store(root_url, target.storage_options)
    sibling = _save(target, f"{root_url}/run10", 10.0)
    first = _save(target, f"{root_url}/run1", 1.0)
    second = _save(target, f"{root_url}/run1", 2.0)
    sibling_keys = sorted(StoredCheckpoint.referenced_keys(sibling))
    second_id = StoredCheckpoint.save_id_of(second)
    assert second_id is not None
    manifest_key = f"run1/{layout.manifest_key(second_id)}"
    doc = json.loads(root.run(root.get(manifest_key)))
    first_data = sorted(_data_keys_of(first))
    # a look-alike of our data in a folder of first's save id, with no record of ours
    foreign = f"run1/{first_data[0].split('/')[0]}/__7_0.distcp"
    root.run(root.put(foreign, b"not ours"))
    doc["replaced"] = sorted(
        set(doc["replaced"])
        | set(sibling_keys)
        | (
            {f"../run10/{k}" for k in sibling_keys} | {f"/run10/{k}" for k in sibling_keys}
            if escapes
            else set()
        )
        | {f"run10/{k}" for k in sibling_keys}
        | {foreign.removeprefix("run1/"), ".metadata", "__0.metadata"}
        | set(_data_keys_of(second))
    )
    root.run(root.put(manifest_key, json.dumps(doc).encode()))
    sibling_before = _snapshot(root, "run10/")
    second_keys = {f"run1/{k}" for k in _data_keys_of(second)}

    third = _save(target, f"{root_url}/run1", 3.0)  # previous = second: retires first's objects
    left = _keys(root, "run1/")
    assert second_keys <= left, "the replaced generation must stay for loads in flight"
    assert {f"run1/{k}" for k in _data_keys_of(third)} <= left
    if escapes:
        assert {f"run1/{k}" for k in first_data} <= left, "a manifest refused as crafted proved something"
    else:
        assert not {f"run1/{k}" for k in first_data} & left, "the generation before was not retired"
    assert foreign in left and "run1/.metadata" in left
    assert _snapshot(root, "run10/") == sibling_before
    assert _loaded(f"{root_url}/run1", target) == 3.0 and _loaded(f"{root_url}/run10", target) == 10.0


@pytest.mark.parametrize("garbage", [b"not json", b"{}", b'{"format": "dcp_cloud.manifest", "replaced": 5}'])
def test_a_garbled_replaced_manifest_never_fails_a_committed_save(
    garbage: bytes, target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    _save(target, target.url, 1.0)
    second = _save(target, target.url, 2.0)
    store = open_store(target.url, target.storage_options)
    second_id = StoredCheckpoint.save_id_of(second)
    assert second_id is not None
    store.run(store.put(layout.manifest_key(second_id), garbage))
    before = _keys(store)
    with caplog.at_level(logging.WARNING, logger="dcp_cloud"):
        third = _save(target, target.url, 3.0)
    assert _loaded(target.url, target) == 3.0
    # nothing was proven about the generation before: nothing of it goes
    assert before - {layout.intent_key(StoredCheckpoint.save_id_of(third) or "?")} <= _keys(store)


# -- failures after the commit are only logged ------------------------------------------------


def test_refused_deletes_after_the_commit_are_logged_not_raised(
    s3_target: Target, caplog: pytest.LogCaptureFixture
) -> None:
    """The store refuses every delete (403 on DELETE and POST) once the data is up: the save
    still succeeds, its checkpoint loads, and the cleanup it could not do is left for gc."""
    first = _save(s3_target, s3_target.url, 1.0)
    _save(s3_target, s3_target.url, 2.0)
    store = open_store(s3_target.url, s3_target.storage_options)
    before = _keys(store)
    server = s3_target.server
    assert isinstance(server, S3Server)
    server.set_faults(1.0, kinds="403", methods="DELETE,POST")
    try:
        with caplog.at_level(logging.WARNING, logger="dcp_cloud"):
            third = _save(s3_target, s3_target.url, 3.0)
        counts = server.fault_counts()
    finally:
        server.set_faults(0.0)
    assert sum(v for k, v in counts.items() if k != "requests" and isinstance(v, int)) >= 1, counts
    assert _loaded(s3_target.url, s3_target) == 3.0
    third_id = StoredCheckpoint.save_id_of(third)
    assert third_id is not None
    assert before <= _keys(store), "a delete was refused, so nothing can have gone"
    assert _data_keys_of(first) <= _keys(store)
    assert layout.intent_key(third_id) in _keys(store)
    assert "the checkpoint is committed, but removing its intent record failed" in caplog.text
    assert "cleaning up an older one failed" in caplog.text


# -- a save that loses the commit discards only its own objects -----------------------------


class _CommitElsewhereFirst(DefaultSavePlanner):
    """While this save writes its data (after its overwrite=False check passed), another
    writer commits a checkpoint at the same URL."""

    def __init__(self, other: Any) -> None:
        super().__init__()
        self._other = other

    def resolve_data(self, write_item: Any) -> Any:
        if self._other is not None:
            other, self._other = self._other, None
            other()
        return super().resolve_data(write_item)


def test_a_save_that_loses_the_commit_deletes_only_its_own_objects(target: Target) -> None:
    store = open_store(target.url, target.storage_options)
    # what lies there before: a user file, and the debris of a dead save named like ours
    foreign = {
        "notes.txt": b"mine",
        "save-20260101T000000Z-0123abcd/__0_0.distcp": b"debris",
        "save-20260101T000000Z-0123abcd/manifest.json": b"{}",
    }
    for key, data in foreign.items():
        store.run(store.put(key, data))
    loser = target.writer(overwrite=False)

    def commit_elsewhere() -> None:
        # someone else's file inside the losing save's own folder: not in its manifest
        key = f"{loser.save_id}/__9_0.distcp"
        foreign[key] = b"planted inside the losing save's folder"
        store.run(store.put(key, foreign[key]))
        dcp.save(_state(1.0), storage_writer=target.writer())

    with pytest.raises(CheckpointException) as info:
        dcp.save(_state(2.0), storage_writer=loser, planner=_CommitElsewhereFirst(commit_elsewhere))
    assert CheckpointExistsError in failure_types(info.value)
    assert len(foreign) == 4
    winner = StoredCheckpoint(store).read_metadata()
    winner_keys = StoredCheckpoint.referenced_keys(winner) - {
        layout.intent_key(StoredCheckpoint.save_id_of(winner) or "?")
    }
    left = _keys(store)
    assert left == winner_keys | set(foreign) | {layout.METADATA_KEY}, left ^ (winner_keys | set(foreign))
    assert all(store.run(store.get(k)) == v for k, v in foreign.items())
    assert _loaded(target.url, target) == 1.0


def test_a_garbled_marker_that_appears_mid_save_still_wins_the_conditional_put(target: Target) -> None:
    """overwrite=False, and an unreadable .metadata lands while the save writes: the save
    cannot read what it would replace, so only the conditional PUT stands between it and the
    marker; it loses, discards its own objects and leaves the marker as it is."""
    store = open_store(target.url, target.storage_options)
    store.run(store.put("notes.txt", b"mine"))
    planner = _CommitElsewhereFirst(lambda: store.run(store.put(layout.METADATA_KEY, b"not a pickle")))
    with pytest.raises(CheckpointException) as info:
        dcp.save(_state(2.0), storage_writer=target.writer(overwrite=False), planner=planner)
    assert CheckpointExistsError in failure_types(info.value)
    assert _snapshot(store) == {"notes.txt": b"mine", layout.METADATA_KEY: b"not a pickle"}


# -- copy: the replaced destination ----------------------------------------------------------


def test_copy_over_a_garbled_destination(target: Target) -> None:
    src_url = f"{target.url}/src"
    dst_url = f"{target.url}/dst"
    _save(target, src_url, 5.0)
    dst = open_store(dst_url, target.storage_options)
    dst.run(dst.put(layout.METADATA_KEY, b"garbage, not a pickle"))
    dst.run(dst.put("save-20260101T000000Z-0123abcd/__0_0.distcp", b"old data"))
    before = _snapshot(dst)
    with pytest.raises(CheckpointExistsError):
        copy_checkpoint(src_url, dst_url, storage_options=target.storage_options)
    assert _snapshot(dst) == before
    copy_checkpoint(src_url, dst_url, storage_options=target.storage_options, overwrite=True)
    assert _loaded(dst_url, target) == 5.0
    # the old objects are not provably ours: they stay
    assert dst.run(dst.get("save-20260101T000000Z-0123abcd/__0_0.distcp")) == b"old data"


def test_copy_reports_replacing_a_garbled_destination(tmp_path: Any) -> None:
    """A committed .metadata that cannot be parsed is still a checkpoint the copy replaced
    (the CLI says "replaced the old checkpoint" from this flag)."""
    src_url, dst_url = str(tmp_path / "src"), str(tmp_path / "dst")
    dcp.save(_state(5.0), storage_writer=CloudStorageWriter(src_url))
    dst = open_store(dst_url)
    dst.run(dst.put(layout.METADATA_KEY, b"garbage, not a pickle"))
    report = copy_checkpoint(src_url, dst_url, overwrite=True)
    assert report.replaced, "a committed .metadata was overwritten, but the report says none was"


def test_copy_refuses_a_crafted_source_before_writing(target: Target) -> None:
    src_url = f"{target.url}/src"
    dst_url = f"{target.url}/dst"
    metadata = _save(target, src_url, 5.0)
    src = open_store(src_url, target.storage_options)
    index, info = next(iter(metadata.storage_data.items()))
    for path in ("../dst/x.distcp", "/etc/passwd", 7, None):
        crafted = pickle.loads(pickle.dumps(metadata))
        crafted.storage_data[index] = dataclasses.replace(info, relative_path=path)
        src.run(src.put(layout.METADATA_KEY, pickle.dumps(crafted)))
        with pytest.raises(UnsafeCheckpointError):
            copy_checkpoint(src_url, dst_url, storage_options=target.storage_options)
        assert not _keys(open_store(dst_url, target.storage_options))


class _SaveWhilePlanning(DefaultLoadPlanner):
    def __init__(self, save: Any) -> None:
        super().__init__()
        self._save = save

    def create_local_plan(self) -> Any:
        self._save()
        return super().create_local_plan()


def test_a_copied_checkpoint_stays_whole_for_a_load_racing_the_next_save(target: Target) -> None:
    """dst: D (saved), replaced by a copy of A; a load reads the copy's .metadata, then a save
    at dst commits and retires: the load still gets A, D's data goes, the source is untouched."""
    src_url = f"{target.url}/src"
    dst_url = f"{target.url}/dst"
    _save(target, src_url, 5.0)
    d = _save(target, dst_url, 1.0)
    src = open_store(src_url, target.storage_options)
    dst = open_store(dst_url, target.storage_options)
    src_before = _snapshot(src)
    copy_checkpoint(src_url, dst_url, storage_options=target.storage_options, overwrite=True)
    assert _data_keys_of(d) <= _keys(dst), "copy must leave the replaced checkpoint for loads in flight"

    out = {"w": torch.zeros(64), "b": torch.zeros(8, dtype=torch.int64)}
    planner = _SaveWhilePlanning(lambda: dcp.save(_state(7.0), storage_writer=target.writer(dst_url)))
    dcp.load(out, storage_reader=target.reader(dst_url), planner=planner)
    assert torch.equal(out["w"], torch.full((64,), 5.0)), "the load in flight lost its version"
    assert not (_data_keys_of(d) & _keys(dst)), "the generation before the copy was not retired"
    assert _loaded(dst_url, target) == 7.0
    assert _snapshot(src) == src_before


# -- verify, info and gc on crafted metadata --------------------------------------------------


def test_a_save_id_claim_proves_nothing(target: Target, tmp_path: Any) -> None:
    """A torch checkpoint whose .metadata claims the save id of a dcp_cloud save beside it:
    info shows the claim, verify does not take that save's manifest for its own, and gc keeps
    the claimed save (a claim may protect, never doom)."""
    root_url = target.url
    root = open_store(root_url, target.storage_options)
    real = _save(target, f"{root_url}/ck", 1.0)
    real_id = StoredCheckpoint.save_id_of(real)
    assert real_id is not None
    put_torch_checkpoint(root, "ck", _state(2.0), tmp_path)  # replaces ck/.metadata
    ck = open_store(f"{root_url}/ck", target.storage_options)
    torch_meta = StoredCheckpoint(ck).read_metadata()
    assert StoredCheckpoint.save_id_of(torch_meta) is None
    assert torch_meta.storage_meta is not None
    torch_meta.storage_meta = dataclasses.replace(torch_meta.storage_meta, save_id=real_id)
    ck.run(ck.put(layout.METADATA_KEY, pickle.dumps(torch_meta)))

    info = checkpoint_info(f"{root_url}/ck", storage_options=target.storage_options)
    assert info.save_id == real_id
    report = verify_checkpoint(f"{root_url}/ck", storage_options=target.storage_options)
    assert report.ok and not report.has_manifest, report.problems
    assert report.save_id == real_id
    before = _snapshot(root, f"ck/{real_id}/")
    collect_garbage(root_url, storage_options=target.storage_options, grace_seconds=0)
    assert _snapshot(root, f"ck/{real_id}/") == before
    assert _loaded(f"{root_url}/ck", target) == 2.0


def test_an_empty_save_id_claim_is_no_claim(tmp_path: Any) -> None:
    url = str(tmp_path / "ck")
    dcp.save(_state(1.0), storage_writer=CloudStorageWriter(url))
    store = open_store(url)
    metadata = StoredCheckpoint(store).read_metadata()
    assert metadata.storage_meta is not None
    metadata.storage_meta = dataclasses.replace(metadata.storage_meta, save_id="")
    store.run(store.put(layout.METADATA_KEY, pickle.dumps(metadata)))
    assert checkpoint_info(url).save_id is None
    report = verify_checkpoint(url)
    assert report.save_id is None and not report.has_manifest and report.ok


@pytest.mark.parametrize("path", [7, None, b"bytes", "../up.distcp", "", "a//b.distcp"])
def test_a_non_key_locator_is_refused_by_every_reader(path: Any, tmp_path: Any) -> None:
    root_url = str(tmp_path / "root")
    url = f"{root_url}/ck"
    dcp.save(_state(1.0), storage_writer=CloudStorageWriter(url))
    store = open_store(url)
    metadata = StoredCheckpoint(store).read_metadata()
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = dataclasses.replace(info, relative_path=path)
    store.run(store.put(layout.METADATA_KEY, pickle.dumps(metadata)))
    before = _snapshot(open_store(root_url))
    with pytest.raises(UnsafeCheckpointError):
        checkpoint_info(url)
    with pytest.raises(UnsafeCheckpointError):
        verify_checkpoint(url)
    with pytest.raises(UnsafeCheckpointError):
        StoredCheckpoint(open_store(root_url), "ck").read_references()
    assert StoredCheckpoint(store).read_replaced() is None  # replaced, never cleaned up after
    report = collect_garbage(root_url, grace_seconds=0)
    assert report.unreadable_metadata == ["ck/.metadata"] and not report.deleted
    assert _snapshot(open_store(root_url)) == before


def test_a_huge_storage_data_is_read_in_bounded_time(tmp_path: Any) -> None:
    """50k locators into one object: verify, info and gc's reading of references finish
    quickly and agree on what it references."""
    import time

    from torch.distributed.checkpoint.filesystem import _StorageInfo
    from torch.distributed.checkpoint.metadata import BytesStorageMetadata, MetadataIndex, StorageMeta

    url = str(tmp_path / "ck")
    store = open_store(url)
    n = 50_000
    store.run(store.put("__0_0.distcp", b"\0" * n))
    metadata = Metadata(
        state_dict_metadata={f"k{i}": BytesStorageMetadata() for i in range(n)},
        storage_data={MetadataIndex(f"k{i}"): _StorageInfo("__0_0.distcp", i, 1) for i in range(n)},
        storage_meta=StorageMeta(save_id="save-20260101T000000Z-0123abcd"),
    )
    store.run(store.put(layout.METADATA_KEY, pickle.dumps(metadata)))
    started = time.monotonic()
    references = StoredCheckpoint(store).read_references()
    assert references is not None and references.keys == {"__0_0.distcp"}
    assert references.saves == {"save-20260101T000000Z-0123abcd"}
    info = checkpoint_info(url)
    assert len(info.objects) == n and info.save_id == "save-20260101T000000Z-0123abcd"
    report = verify_checkpoint(url)
    assert report.ok and report.items == n and report.objects == 1 and not report.has_manifest
    assert time.monotonic() - started < 30


def test_discard_deletes_only_the_manifests_objects(target: Target) -> None:
    """discard takes its keys from the save's own manifest, joined to the checkpoint's folder."""
    root_url = target.url
    root = open_store(root_url, target.storage_options)
    committed = _save(target, f"{root_url}/run1", 1.0)
    _save(target, f"{root_url}/run10", 2.0)
    save_id = layout.new_save_id()
    mine = layout.data_key(save_id, "__0_", 0)
    for folder in ("run1", "run10"):
        root.run(root.put(f"{folder}/{mine}", b"x" * 4))
        root.run(root.put(f"{folder}/{layout.intent_key(save_id)}", b"{}"))
        # in the save's folder, but not in its manifest: not this save's to delete
        root.run(root.put(f"{folder}/{save_id}/__1_0.distcp", b"other rank"))
        root.run(root.put(f"{folder}/{save_id}/notes.txt", b"user"))
    before = _snapshot(root)
    manifest = Manifest(save_id=save_id, objects={mine: [ItemRecord(0, 4, 0)]})
    StoredCheckpoint(root, "run1").discard(manifest)
    after = _snapshot(root)
    gone = set(before) - set(after)
    assert gone == {f"run1/{mine}", f"run1/{layout.intent_key(save_id)}"}, gone
    assert {f"run1/{k}" for k in StoredCheckpoint.referenced_keys(committed)} - {
        f"run1/{layout.intent_key(StoredCheckpoint.save_id_of(committed) or '?')}"
    } <= set(after)
    assert _loaded(f"{root_url}/run1", target) == 1.0 and _loaded(f"{root_url}/run10", target) == 2.0


# -- a commit whose response is lost ----------------------------------------------------------


def test_a_conditional_commit_whose_answer_was_lost_is_not_discarded(target: Target) -> None:
    """overwrite=False: the .metadata PUT reaches the store and commits, but the connection
    drops before the answer arrives, and the retry of that same PUT is refused because the
    object exists (S3 412 PreconditionFailed, GCS 412, Azure BlobAlreadyExists): the store
    answers FileExistsError for our own commit. The save must not take it for another
    writer's and delete the data its committed .metadata points to."""
    writer = target.writer(overwrite=False)
    store = writer.store
    put = store.put
    answered: list[str] = []

    async def put_whose_answer_is_lost(key: str, data: Any, **kw: Any) -> None:
        if kw.get("if_absent") and key.endswith(layout.METADATA_KEY) and not answered:
            answered.append(key)
            await put(key, data, **kw)  # lands; its answer is lost
            await put(key, data, **kw)  # the retry: FileExistsError
        await put(key, data, **kw)

    store.put = put_whose_answer_is_lost  # type: ignore[method-assign]
    try:
        dcp.save(_state(4.0), storage_writer=writer)
    except CheckpointException:
        pass  # failing is acceptable; a committed checkpoint without its data is not
    assert answered
    fresh = open_store(target.url, target.storage_options)
    committed = StoredCheckpoint(fresh).read_committed()
    assert committed is not None  # the PUT did land: a checkpoint is committed
    missing = _data_keys_of(StoredCheckpoint(fresh).parse_metadata(committed)) - _keys(fresh)
    assert not missing, f"the committed .metadata points to deleted objects: {sorted(missing)}"
    assert _loaded(target.url, target) == 4.0
