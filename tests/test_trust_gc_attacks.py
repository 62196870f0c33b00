"""Attacks on ownership: gc, prune, ls and overwrite cleanup against forged records, odd keys,
symlinks, clock skew and saves in flight.

Someone who can write objects into the bucket plants records of our format (intent, manifest)
to make gc delete what is not ours; a hurried user runs gc with no grace period beside running
saves. Every test asserts that nothing foreign changes and that every save that reported
success loads.
"""

from __future__ import annotations

import gc as pygc
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_cloud import CloudStorageWriter, HashPrefix, collect_garbage, list_checkpoints
from dcp_cloud.errors import UnsafeCheckpointError, UploadError
from dcp_cloud.store import open_store

from .conftest import Target, make_target
from .helpers import assert_same, failure_text, put_torch_checkpoint

SID = "save-20260101T000000Z-0123abcd"  # strict save-id form
SID2 = "save-20260101T000000Z-4567ef01"
OLD = 1_000_000.0  # a heartbeat long past


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((32, 8), value), "b": torch.arange(16, dtype=torch.int64) + int(value)}


def _empty() -> dict[str, Any]:
    return {"w": torch.zeros(32, 8), "b": torch.zeros(16, dtype=torch.int64)}


def _store(target: Target, url: str | None = None) -> Any:
    return open_store(url or target.url, target.storage_options)


def _snapshot(store: Any) -> dict[str, bytes]:
    return {o.key: store.run(store.get(o.key)) for o in store.run(store.list_objects(""))}


def _gc(target: Target, url: str | None = None, **kwargs: Any) -> Any:
    return collect_garbage(
        url or target.url, storage_options=target.storage_options, grace_seconds=0, **kwargs
    )


def _intent(save_id: str, prefixes: Any, heartbeat: Any = OLD, lease: Any = 0.001, **extra: Any) -> bytes:
    doc = {
        "format": "dcp_cloud.intent",
        "version": 1,
        "save_id": save_id,
        "created": OLD,
        "heartbeat": heartbeat,
        "lease_seconds": lease,
        "file_prefixes": prefixes,
        **extra,
    }
    return json.dumps(doc).encode()


def _manifest(save_id: str, objects: list[str], replaced: list[str] | None = None) -> bytes:
    doc = {
        "format": "dcp_cloud.manifest",
        "version": 2,
        "save_id": save_id,
        "objects": {key: {"size": 1, "items": []} for key in objects},
        "replaced": replaced or [],
    }
    return json.dumps(doc).encode()


# -- forged records ----------------------------------------------------------------------------

USER_FILES = {
    "photos/cat.jpg": b"a cat",
    f"photos/{SID}/cat.jpg": b"another cat",
    f"photos/{SID}/cat_1.distcp": b"a file named like data",
    f"photos/{SID}/img/cat_0.distcp": b"nested",
    f"photos/{SID}/img/cat__0_0.distcp": b"nested, named almost like data",
    f"photos/{SID}/cat.jpg__0_0.distcp.bak": b"almost",
    f"photos/{SID2}/__0_0.distcp": b"a file in another save-like folder",
}

FORGED_INTENTS = {
    "empty-prefix": [""],
    "dotdot": ["../"],
    "dotdot-inner": ["a/../__0_"],
    "absolute": ["/etc/__0_"],
    "wildcard": ["*_", "*"],
    "user-names": ["cat_", "img/cat_"],
    "other-save": [f"../{SID2}/__0_"],
    "metadata-name": [".metadata_", "__0.metadata_", "img/cat_", "img/cat__0_"],
    "huge-list": [f"r{i}/__{i}_" for i in range(100_000)] + ["cat_"],
    "not-strings": [None, 3, {"a": 1}],
    "not-a-list": "cat_",
}


@pytest.mark.parametrize("kind", ["file", "s3"])
@pytest.mark.parametrize("prefixes", list(FORGED_INTENTS.values()), ids=list(FORGED_INTENTS))
def test_forged_intent_claims_no_user_file(
    kind: str, prefixes: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = make_target(kind, request, tmp_path)
    store = _store(root)
    for key, data in USER_FILES.items():
        store.run(store.put(key, data))
    store.run(store.put(f"photos/{SID}/intent.json", _intent(SID, prefixes)))
    time.sleep(0.01)
    _gc(root)
    left = _snapshot(store)
    assert {k: left.get(k) for k in USER_FILES} == USER_FILES


@pytest.mark.parametrize("kind", ["file", "s3"])
@pytest.mark.parametrize(
    "records",
    [
        {"manifest": [f"{SID}/cat.jpg", f"{SID}/cat_1.distcp", f"{SID}/img/cat_0.distcp"]},
        {
            "manifest": [
                f"{SID2}/__0_0.distcp",
                f"{SID}/.metadata",
                f"{SID}/__0.metadata",
                f"{SID}/img/cat__0_0.distcp",
            ]
        },
        {"intent-names-other-save": True},
        {"manifest-names-other-save": True},
    ],
    ids=["manifest-user-names", "manifest-other-folder", "intent-save-id", "manifest-save-id"],
)
def test_forged_manifest_or_mismatched_record_claims_no_user_file(
    kind: str, records: dict[str, Any], request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = make_target(kind, request, tmp_path)
    store = _store(root)
    files = {
        **USER_FILES,
        f"photos/{SID}/__0_0.distcp": b"user bytes in a save-like folder",
        f"photos/{SID}/.metadata": b"not a pickle",
        f"photos/{SID}/__0.metadata": b"not a pickle either",
    }
    for key, data in files.items():
        store.run(store.put(key, data))
    if "manifest" in records:
        store.run(store.put(f"photos/{SID}/manifest.json", _manifest(SID, records["manifest"])))
    elif "intent-names-other-save" in records:
        store.run(store.put(f"photos/{SID}/intent.json", _intent(SID2, ["__0_"])))
    else:
        store.run(store.put(f"photos/{SID}/manifest.json", _manifest(SID2, [f"{SID}/__0_0.distcp"])))
    time.sleep(0.01)
    _gc(root)
    left = _snapshot(store)
    if "manifest" in records:
        files.pop(f"photos/{SID}/__0_0.distcp")  # not named by the forged manifest; kept anyway
    assert {k: left.get(k) for k in files} == files


@pytest.mark.parametrize("kind", ["file", "s3"])
@pytest.mark.parametrize("writer", ["dcp_cloud", "torch"])
def test_checkpoint_nested_inside_a_dead_save_folder_survives(
    kind: str, writer: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """``<ckpt>/<save_id>/eval`` is a committed checkpoint of its own, though the save around it
    never committed and its intent claims the nested data keys; gc keeps it, ls lists it."""
    root = make_target(kind, request, tmp_path)
    store = _store(root)
    nested = f"{SID}/eval"
    if writer == "torch":
        put_torch_checkpoint(store, nested, _state(7.0), tmp_path)
    else:
        dcp.save(_state(7.0), storage_writer=root.child(nested).writer())
    store.run(store.put(f"{SID}/__0_0.distcp", b"dead data"))
    store.run(store.put(f"{SID}/intent.json", _intent(SID, ["__0_", "eval/__0_"])))
    before = {k: v for k, v in _snapshot(store).items() if k.startswith(nested + "/")}
    time.sleep(0.01)
    _gc(root)
    left = _snapshot(store)
    assert {k: left.get(k) for k in before} == before
    out = _empty()
    dcp.load(out, storage_reader=root.reader(f"{root.url}/{nested}"))
    assert_same(_state(7.0), out)
    found = {c.path: c.status for c in list_checkpoints(root.url, storage_options=root.storage_options)}
    assert found.get(nested) == "committed", found


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_unreadable_metadata_inside_a_save_folder_protects_its_folder(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """A .metadata that cannot be read inside a save folder keeps everything below it, even
    where the save's own records claim those keys (``HashPrefix`` style ``ab/__0_``)."""
    root = make_target(kind, request, tmp_path)
    store = _store(root)
    keep = {f"{SID}/ab/.metadata": b"\x80\x04 a future format", f"{SID}/ab/__0_0.distcp": b"theirs"}
    for key, data in keep.items():
        store.run(store.put(key, data))
    store.run(store.put(f"{SID}/intent.json", _intent(SID, ["ab/__0_"])))
    time.sleep(0.01)
    _gc(root)
    left = _snapshot(store)
    assert {k: left.get(k) for k in keep} == keep


def test_odd_keys_in_a_listing_do_not_break_gc(s3_target: Target) -> None:
    """Keys our writer never makes (empty segments, trailing slashes, ``.`` segments) are not
    ours: gc neither fails on them nor deletes them, and still collects real debris."""
    store = _store(s3_target)
    client_put = _raw_s3_put(s3_target)
    odd = {
        f"a//{SID}/intent.json": _intent(SID, ["__0_"]),
        f"a//{SID}/__0_0.distcp": b"x",
        f"{SID2}/": b"",
        f"b/./{SID}/intent.json": _intent(SID, ["__0_"]),
        f"b/./{SID}/__0_0.distcp": b"x",
        "c//.metadata": b"junk",
    }
    for key, data in odd.items():
        client_put(key, data)
    store.run(store.put(f"dead/{SID}/intent.json", _intent(SID, ["__0_"])))
    store.run(store.put(f"dead/{SID}/__0_0.distcp", b"debris"))
    time.sleep(0.01)
    report = _gc(s3_target)
    assert sorted(report.deleted) == [f"dead/{SID}/__0_0.distcp", f"dead/{SID}/intent.json"]
    listed = {o.key for o in store.run(store.list_objects(""))}
    assert set(odd) <= listed
    list_checkpoints(s3_target.url, storage_options=s3_target.storage_options)


def _raw_s3_put(target: Target) -> Any:
    """Put an object under the target's prefix with boto3 itself (no key checks of ours)."""
    import boto3

    opts = target.storage_options
    client = boto3.client(
        "s3",
        endpoint_url=opts.get("endpoint_url") or opts.get("client_kwargs", {}).get("endpoint_url"),
        aws_access_key_id=opts.get("key", "testing"),
        aws_secret_access_key=opts.get("secret", "testing"),
        region_name="us-east-1",
    )
    bucket, _, prefix = target.url.removeprefix("s3://").partition("/")
    return lambda key, data: client.put_object(Bucket=bucket, Key=f"{prefix}/{key}", Body=data)


def test_user_multipart_uploads_are_never_aborted(s3_target: Target) -> None:
    store = _store(s3_target)
    store.run(store.put(f"{SID}/intent.json", _intent(SID, ["__0_"])))
    ours = store.run(store.start_upload(f"{SID}/__0_0.distcp"))
    theirs = [
        store.run(store.start_upload(k))
        for k in (f"{SID}/movie.mp4", "big/backup.tar", f"{SID2}/__0_0.distcp")
    ]
    time.sleep(0.01)
    report = _gc(s3_target)
    assert report.aborted_uploads == [ours.key]
    pending = {u.key for u in store.run(store.list_uploads(""))}
    assert pending == {u.key for u in theirs}
    for upload in theirs:
        store.run(store.abort_upload(upload))


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_prefix_that_is_a_prefix_of_another_folder(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    base = make_target(kind, request, tmp_path)
    run1, run10 = base.child("run1"), base.child("run10")
    s10 = _store(run10)
    s10.run(s10.put(f"{SID}/intent.json", _intent(SID, ["__0_"])))
    s10.run(s10.put(f"{SID}/__0_0.distcp", b"run10 debris"))
    s10.run(s10.put("notes.txt", b"run10 notes"))
    before = _snapshot(s10)
    time.sleep(0.01)
    report = _gc(run1)
    assert report.deleted == []
    assert _snapshot(s10) == before
    assert list_checkpoints(run1.url, storage_options=run1.storage_options) == []


# -- leases, clocks, forged lease fields ------------------------------------------------------


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_a_writer_clock_hours_behind_still_holds_its_lease(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """The store's own modification time keeps a just-renewed lease alive, whatever the
    writer's clock wrote into the record."""
    root = make_target(kind, request, tmp_path)
    store = _store(root)
    behind = time.time() - 6 * 3600
    store.run(store.put(f"{SID}/intent.json", _intent(SID, ["__0_"], heartbeat=behind, lease=600)))
    store.run(store.put(f"{SID}/__0_0.distcp", b"in flight"))
    report = _gc(root)
    assert report.deleted == [] and report.kept_recent == [SID]


@pytest.mark.parametrize(
    "lease",
    [0, -5, "600", None, True, float("nan"), float("inf")],
    ids=["zero", "negative", "string", "null", "bool", "nan", "inf"],
)
def test_forged_lease_fields_never_make_foreign_objects_ours(lease: Any, tmp_path: Path) -> None:
    root = Target("file", str(tmp_path / "ckpt"))
    store = _store(root)
    store.run(store.put(f"{SID}/__0_0.distcp", b"user"))
    store.run(store.put(f"{SID}/intent.json", _intent(SID, ["__0_"], lease=lease)))
    _gc(root)
    assert store.run(store.get(f"{SID}/__0_0.distcp")) == b"user"


@pytest.mark.parametrize("lease", [600, 1e12], ids=["lease-ok", "lease-centuries"])
def test_a_heartbeat_in_the_future_runs_out_by_the_store_clock(lease: float, tmp_path: Path) -> None:
    """A record whose heartbeat lies far in the future, written a month ago by the store's
    clock, does not keep its save forever; one claiming a lease longer than any writer may
    take is not ours at all, and kept."""
    root = Target("file", str(tmp_path / "ckpt"))
    store = _store(root)
    store.run(store.put(f"{SID}/__0_0.distcp", b"debris"))
    store.run(store.put(f"{SID}/intent.json", _intent(SID, ["__0_"], heartbeat=1e15, lease=lease)))
    month_ago = time.time() - 30 * 86400
    for name in ("__0_0.distcp", "intent.json"):
        os.utime(Path(root.url) / SID / name, (month_ago, month_ago))
    report = _gc(root)
    expected = [f"{SID}/__0_0.distcp", f"{SID}/intent.json"] if lease == 600 else []
    assert sorted(report.deleted) == expected
    with pytest.raises(ValueError, match="lease_seconds"):
        root.writer(lease_seconds=1e12)


# -- saves in flight --------------------------------------------------------------------------


class _GcAt:
    """Runs gc(grace 0) on the checkpoint's parent at one stage of a save, from inside it."""

    def __init__(self, target: Target, stage: str) -> None:
        self.target = target
        self.stage = stage
        self.runs = 0
        self.parent = target.url.rsplit("/", 1)[0]

    def __call__(self) -> None:
        collect_garbage(self.parent, storage_options=self.target.storage_options, grace_seconds=0)
        self.runs += 1


def _hooked_writer(target: Target, hook: _GcAt, **kwargs: Any) -> CloudStorageWriter:
    """A writer whose store runs ``hook`` at the stage it names."""
    writer = target.writer(**kwargs)
    store = writer.store
    stage = hook.stage
    put, delete, start, complete = store.put, store.delete, store.start_upload, store.complete_upload
    put_pieces = store.put_pieces

    async def hooked_put(key: str, data: Any, **kw: Any) -> None:
        if stage == "before-intent" and key.endswith("intent.json") and not hook.runs:
            await _in_thread(hook)
        await put(key, data, **kw)
        if stage == "after-intent" and key.endswith("intent.json") and not hook.runs:
            await _in_thread(hook)
        if stage == "after-data" and key.endswith(".distcp"):
            await _in_thread(hook)
        if stage == "before-metadata" and key.endswith("manifest.json"):
            await _in_thread(hook)

    async def hooked_delete(keys: list[str]) -> None:
        if stage == "after-commit" and any(k.endswith("intent.json") for k in keys):
            await _in_thread(hook)
        await delete(keys)

    async def hooked_start(key: str) -> Any:
        upload = await start(key)
        if stage == "multipart":
            await _in_thread(hook)
        return upload

    async def hooked_complete(upload: Any) -> None:
        await complete(upload)
        if stage == "after-data":
            await _in_thread(hook)

    async def hooked_put_pieces(key: str, pieces: Any) -> None:
        await put_pieces(key, pieces)
        if stage == "after-data" and key.endswith(".distcp"):
            await _in_thread(hook)

    store.put, store.delete = hooked_put, hooked_delete  # type: ignore[method-assign]
    store.put_pieces = hooked_put_pieces  # type: ignore[method-assign]
    store.start_upload, store.complete_upload = hooked_start, hooked_complete  # type: ignore[method-assign]
    return writer


async def _in_thread(hook: _GcAt) -> None:
    import asyncio

    await asyncio.to_thread(hook)


STAGES = ["before-intent", "after-intent", "after-data", "multipart", "before-metadata", "after-commit"]


@pytest.mark.parametrize("kind", ["file", "s3"])
@pytest.mark.parametrize("stage", STAGES)
def test_gc_at_each_stage_of_a_save_breaks_nothing(
    kind: str, stage: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = make_target(kind, request, tmp_path)
    first = _state(1.0)
    dcp.save(first, storage_writer=root.writer())
    # 12 MiB: three 5 MiB parts, so the object goes up as a multipart upload
    big = {**_state(2.0), "big": torch.arange(12 * 2**20 // 4, dtype=torch.float32)}
    hook = _GcAt(root, stage)
    writer = _hooked_writer(root, hook, part_size=5 * 2**20, key_prefix=HashPrefix(2))
    dcp.save(big, storage_writer=writer)
    if stage != "multipart" or kind == "s3":
        assert hook.runs >= 1, "the hook never ran"
    out = {**_empty(), "big": torch.zeros(12 * 2**20 // 4)}
    dcp.load(out, storage_reader=root.reader())
    assert_same(big, out)


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_gc_beside_saves_without_collectives(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = make_target(kind, request, tmp_path)
    hook = _GcAt(root, "before-metadata")
    dcp.save(_state(3.0), storage_writer=_hooked_writer(root, hook), no_dist=True)
    assert hook.runs == 1
    out = _empty()
    dcp.load(out, storage_reader=root.reader(), no_dist=True)
    assert_same(_state(3.0), out)


def test_heartbeats_keep_a_save_slower_than_its_lease_alive(s3_target: Target) -> None:
    """lease_seconds=0.6 and a save that takes ~2 s: gc(grace 0) running all along never
    collects it, because the heartbeat renews the record every 0.2 s."""
    root = s3_target
    stop = threading.Event()
    runs = [0]

    def collect() -> None:
        while not stop.is_set():
            _gc(root)
            runs[0] += 1

    class Slow(dcp.DefaultSavePlanner):  # type: ignore[misc]
        def resolve_data(self, item: Any) -> Any:
            time.sleep(0.5)
            return super().resolve_data(item)

    thread = threading.Thread(target=collect)
    thread.start()
    try:
        state = {f"t{i}": torch.full((8,), float(i)) for i in range(4)}
        dcp.save(state, storage_writer=root.writer(lease_seconds=0.6), planner=Slow())
    finally:
        stop.set()
        thread.join()
    assert runs[0] >= 3
    out = {f"t{i}": torch.zeros(8) for i in range(4)}
    dcp.load(out, storage_reader=root.reader())
    assert_same(state, out)


def test_two_writers_on_one_url_with_gc_between(s3_target: Target) -> None:
    a, b = s3_target.writer(), s3_target.writer()
    for n in range(4):
        dcp.save(_state(float(n)), storage_writer=a if n % 2 else b)
        _gc(s3_target)
        out = _empty()
        dcp.load(out, storage_reader=s3_target.reader())
        assert_same(_state(float(n)), out)


# -- the heartbeat thread ---------------------------------------------------------------------


def _lease_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "dcp-cloud-lease" and t.is_alive()]


def test_no_lease_thread_outlives_its_save(tmp_path: Path) -> None:
    root = Target("file", str(tmp_path / "ckpt"))
    writer = root.writer()
    for n in range(50):
        dcp.save({"x": torch.full((4,), float(n))}, storage_writer=writer if n % 2 else root.writer())
    pygc.collect()
    assert _lease_threads() == []


def test_a_save_that_fails_elsewhere_stops_renewing_once_the_writer_goes(tmp_path: Path) -> None:
    """Another rank's failure never reaches this writer's finish(): its heartbeat renews until
    the writer is reset for the next save or garbage collected (the lease then runs out)."""
    from torch.distributed.checkpoint.planner import SavePlan

    root = Target("file", str(tmp_path / "ckpt"))
    writer = root.writer(lease_seconds=0.3)
    writer.set_up_storage_writer(True, rank=0)
    writer.prepare_local_plan(SavePlan([]))
    writer.prepare_global_plan([SavePlan([])])  # the intent and its heartbeat
    assert len(_lease_threads()) == 1
    writer.reset()  # the next save's reset
    assert _lease_threads() == []
    writer.prepare_local_plan(SavePlan([]))
    writer.prepare_global_plan([SavePlan([])])
    assert len(_lease_threads()) == 1
    del writer
    pygc.collect()
    deadline = time.monotonic() + 5
    while _lease_threads() and time.monotonic() < deadline:
        time.sleep(0.05)
    assert _lease_threads() == []


def test_a_failing_heartbeat_never_raises_into_the_save(tmp_path: Path) -> None:
    root = Target("file", str(tmp_path / "ckpt"))
    writer = root.writer(lease_seconds=0.15)
    store = writer.store
    put = store.put
    beats = [0]

    async def flaky_put(key: str, data: Any, **kw: Any) -> None:
        if key.endswith("intent.json") and beats[0] >= 0:
            beats[0] += 1
            if beats[0] > 1:
                raise ConnectionError("store away")
        await put(key, data, **kw)

    class Slow(dcp.DefaultSavePlanner):  # type: ignore[misc]
        def resolve_data(self, item: Any) -> Any:
            time.sleep(0.4)
            return super().resolve_data(item)

    store.put = flaky_put  # type: ignore[method-assign]
    dcp.save(_state(4.0), storage_writer=writer, planner=Slow())
    assert beats[0] >= 2, "the heartbeat never ran"
    out = _empty()
    dcp.load(out, storage_reader=root.reader())
    assert_same(_state(4.0), out)


# -- local folders: symlinks ------------------------------------------------------------------


def test_gc_and_prune_never_follow_a_symlink_out_of_the_prefix(tmp_path: Path) -> None:
    from dcp_cloud import CheckpointManager

    outside = Target("file", str(tmp_path / "outside"))
    ostore = _store(outside)
    ostore.run(ostore.put(f"{SID}/intent.json", _intent(SID, ["__0_"])))
    ostore.run(ostore.put(f"{SID}/__0_0.distcp", b"outside debris-like"))
    dcp.save(_state(5.0), storage_writer=outside.child("ckpt").writer())
    before = _snapshot(ostore)
    root = tmp_path / "run"
    root.mkdir()
    (root / "link").symlink_to(tmp_path / "outside", target_is_directory=True)
    (root / "step-0000000001").symlink_to(tmp_path / "outside" / "ckpt", target_is_directory=True)
    manager = CheckpointManager(str(root))
    manager.save(2, _state(2.0))
    manager.save(3, _state(3.0))
    time.sleep(0.01)
    collect_garbage(str(root), grace_seconds=0)
    manager.prune(keep_last=1)
    assert _snapshot(ostore) == before
    assert os.path.islink(root / "link") and os.path.islink(root / "step-0000000001")


@pytest.mark.parametrize("what", ["data-file", "save-folder", "metadata"])
def test_a_load_never_reads_through_a_symlink_out_of_the_checkpoint(what: str, tmp_path: Path) -> None:
    secret = tmp_path / "secret"
    secret.mkdir()
    root = Target("file", str(tmp_path / "ckpt"))
    dcp.save(_state(6.0), storage_writer=root.writer())
    ckpt = Path(root.url)
    data = next(ckpt.rglob("*.distcp"))
    if what == "data-file":
        (secret / "key.pem").write_bytes(data.read_bytes())
        data.unlink()
        data.symlink_to(secret / "key.pem")
    elif what == "save-folder":
        folder = data.parent
        os.rename(folder, secret / folder.name)
        folder.symlink_to(secret / folder.name, target_is_directory=True)
    else:
        (secret / "meta").write_bytes((ckpt / ".metadata").read_bytes())
        (ckpt / ".metadata").unlink()
        (ckpt / ".metadata").symlink_to(secret / "meta")
    with pytest.raises(BaseException) as caught:  # torch's CheckpointException is one
        dcp.load(_empty(), storage_reader=root.reader())
    assert "a symbolic link on its path leads outside the folder" in failure_text(caught.value)
    store = _store(root)
    key = data.relative_to(ckpt).as_posix() if what != "metadata" else ".metadata"
    with pytest.raises(UnsafeCheckpointError, match="symbolic link"):
        store.run(store.get(key))


def test_symlinks_inside_the_checkpoint_still_load(tmp_path: Path) -> None:
    """A link that stays inside the checkpoint folder (and a checkpoint folder that is itself a
    link, such as ``latest``) loads as before."""
    root = Target("file", str(tmp_path / "ckpt"))
    dcp.save(_state(8.0), storage_writer=root.writer())
    (tmp_path / "latest").symlink_to(tmp_path / "ckpt", target_is_directory=True)
    out = _empty()
    dcp.load(out, storage_reader=root.reader(str(tmp_path / "latest")))
    assert_same(_state(8.0), out)


# -- error texts -------------------------------------------------------------------------------


def test_upload_errors_carry_no_secret(tmp_path: Path) -> None:
    from dcp_cloud.buffers import BufferPool
    from dcp_cloud.save.upload import ObjectUpload

    store = open_store(f"memory://dcp-cloud-tests/{tmp_path.name}/ckpt")

    async def failing_put(key: str, data: Any, **kw: Any) -> None:
        raise OSError(
            "PUT https://admin:hunter2@store.example/b/k?sig=SECRETSIG&se=1 failed: AccountKey=abcd1234"
        )

    store.put = failing_put  # type: ignore[method-assign]
    upload = ObjectUpload(store, "a/__0_0.distcp", BufferPool(5 * 2**20, 2))
    upload.write(b"x" * 10)
    with pytest.raises(UploadError) as caught:
        upload.close_async().result()
    text = str(caught.value)
    for secret in ("hunter2", "SECRETSIG", "abcd1234", "admin:"):
        assert secret not in text, text
    assert "a/__0_0.distcp" in text


def test_a_live_heartbeat_never_keeps_the_process_alive(tmp_path: Path) -> None:
    import subprocess
    import sys
    import textwrap

    code = textwrap.dedent(
        """
        import sys
        from torch.distributed.checkpoint.planner import SavePlan
        from dcp_cloud import CloudStorageWriter
        writer = CloudStorageWriter(sys.argv[1], lease_seconds=0.3)
        writer.set_up_storage_writer(True, rank=0)
        writer.prepare_local_plan(SavePlan([]))
        writer.prepare_global_plan([SavePlan([])])  # then the process ends mid-save
        print("leased", flush=True)
        """
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    done = subprocess.run(
        [sys.executable, "-c", code, str(tmp_path / "ckpt")],
        capture_output=True,
        text=True,
        timeout=60,
        env=env,
    )
    assert done.returncode == 0 and "leased" in done.stdout, done.stderr[-2000:]


def test_async_save_beside_gc(s3_target: Target) -> None:
    state = _state(9.0)
    future = dcp.async_save(state, storage_writer=s3_target.writer())
    runs = 0
    while not future.done() or runs < 2:
        _gc(s3_target)
        runs += 1
    future.result()
    out = _empty()
    dcp.load(out, storage_reader=s3_target.reader())
    assert_same(state, out)


def test_oversized_records_are_not_read(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """An intent record larger than any writer makes is not read (nor ours); a ``.metadata``
    too large to read keeps everything below its folder."""
    from dcp_cloud.checkpoint import ownership

    monkeypatch.setattr(ownership, "MAX_INTENT_BYTES", 1000)
    monkeypatch.setattr(ownership, "MAX_METADATA_BYTES", 1000)
    root = Target("file", str(tmp_path / "ckpt"))
    store = _store(root)
    store.run(store.put(f"{SID}/__0_0.distcp", b"user"))
    store.run(store.put(f"{SID}/intent.json", _intent(SID, ["__0_"], padding="x" * 2000)))
    store.run(store.put(f"b/{SID}/intent.json", _intent(SID, ["__0_"])))
    store.run(store.put(f"b/{SID}/__0_0.distcp", b"theirs"))
    store.run(store.put("b/.metadata", b"\x80" * 2000))
    time.sleep(0.01)
    report = _gc(root)
    assert report.deleted == [] and report.unreadable_metadata == ["b/.metadata"]
    assert store.run(store.get(f"{SID}/__0_0.distcp")) == b"user"


@pytest.mark.parametrize("spread", ["a//", "./", "a/./", "../", "/abs/", "c:/", "a\\b/"])
def test_a_key_prefix_strategy_must_give_plain_relative_folders(spread: str, tmp_path: Path) -> None:
    writer = Target("file", str(tmp_path / "ckpt")).writer(key_prefix=lambda rank: spread)
    with pytest.raises(BaseException, match="key prefix"):
        dcp.save(_state(1.0), storage_writer=writer)
    assert not (tmp_path / "ckpt" / ".metadata").exists()
