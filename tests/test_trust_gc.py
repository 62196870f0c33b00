"""Ownership: gc, prune, ls and overwrite cleanup delete only what dcp_cloud provably wrote.

Foreign objects under the prefix (user files, checkpoints named ``save-*``, folders that look like
saves, torch FileSystemWriter checkpoints) survive byte for byte; crafted ``replaced`` lists never
reach outside the checkpoint; a garbled previous manifest never fails a committed save; gc with
no grace period running beside saves in another process never breaks one.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_cloud import CheckpointManager, collect_garbage, list_checkpoints
from dcp_cloud.checkpoint.layout import is_save_id
from dcp_cloud.store import open_store

from .conftest import Target, make_target
from .helpers import assert_same, put_torch_checkpoint

FORGED = "save-20261122T200102Z-3f9a1c0b"  # the exact form of a save id, but no records of ours


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((64, 16), value), "b": torch.arange(32, dtype=torch.int64) + int(value)}


def _load(target: Target, url: str | None = None) -> dict[str, Any]:
    out = {"w": torch.zeros(64, 16), "b": torch.zeros(32, dtype=torch.int64)}
    dcp.load(out, storage_reader=target.reader(url))
    return out


def _store(target: Target) -> Any:
    return open_store(target.url, target.storage_options)


def _snapshot(store: Any) -> dict[str, bytes]:
    return {o.key: store.run(store.get(o.key)) for o in store.run(store.list_objects(""))}


def _plant_foreign(target: Target, tmp_path: Path) -> None:
    """Everything a user may keep beside our checkpoints, none of it ours."""
    store = _store(target)
    for key, data in {
        "notes.txt": b"my notes",
        "save-photos/cat.jpg": b"\xff\xd8 a cat",
        ".draft.tmp-1234": b"a draft",
        f"{FORGED}/__0_0.distcp": b"someone else's bytes",
        f"{FORGED}/data.bin": b"more",
        f"{FORGED}/.metadata.tmp-1234": b"not a temp file of ours",
    }.items():
        store.run(store.put(key, data))
    for name in ("run/save-best", "save-experiments/a", "save-experiments/b"):
        dcp.save(_state(3.0), storage_writer=target.child(name).writer())
    put_torch_checkpoint(store, "torch-ckpt", _state(7.0), tmp_path)


def _debris(target: Target) -> set[str]:
    """A save of ours that never committed (its .metadata removed); returns its keys."""
    dcp.save(_state(5.0), storage_writer=target.child("dead").writer())
    store = _store(target)
    store.run(store.delete(["dead/.metadata"]))
    return {o.key for o in store.run(store.list_objects("dead/"))}


@pytest.mark.parametrize("kind", ["file", "s3", "gcs", "azure"])
def test_gc_deletes_only_what_it_wrote(kind: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    root = make_target(kind, request, tmp_path)
    _plant_foreign(root, tmp_path)
    store = _store(root)
    foreign = _snapshot(store)
    debris = _debris(root)
    assert debris and all(is_save_id(k.split("/")[1]) for k in debris)

    report = collect_garbage(root.url, storage_options=root.storage_options, grace_seconds=0)

    assert set(report.deleted) == debris, "gc must remove our uncommitted save, and only it"
    assert _snapshot(store) == foreign, "a foreign object was changed or deleted"
    for name in ("run/save-best", "save-experiments/a", "save-experiments/b"):
        assert_same(_state(3.0), _load(root, f"{root.url}/{name}"))
    if kind == "file":
        assert (Path(root.url) / ".draft.tmp-1234").read_bytes() == b"a draft"
        assert_same(_state(7.0), _load(root, f"{root.url}/torch-ckpt"))

    found = {c.path: c.status for c in list_checkpoints(root.url, storage_options=root.storage_options)}
    for name in ("run/save-best", "save-experiments/a", "save-experiments/b", "torch-ckpt"):
        assert found.get(name) == "committed", found
    assert "save-experiments" not in found and "run" not in found


def test_gc_keeps_saves_of_nested_and_deep_checkpoints(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """A committed .metadata at any depth protects what it references."""
    root = make_target("file", request, tmp_path)
    dcp.save(_state(1.0), storage_writer=root.child("outer").writer())
    dcp.save(_state(2.0), storage_writer=root.child("outer/inner/deeper").writer())
    store = _store(root)
    before = _snapshot(store)
    report = collect_garbage(root.url, storage_options=root.storage_options, grace_seconds=0)
    assert report.deleted == [] and _snapshot(store) == before
    assert_same(_state(2.0), _load(root, f"{root.url}/outer/inner/deeper"))


@pytest.mark.parametrize("kind", ["file", "s3"])
def test_prune_deletes_only_the_step_itself(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    root = make_target(kind, request, tmp_path)
    manager = CheckpointManager(root.url, storage_options=root.storage_options)
    for step in (1, 2, 3):
        manager.save(step, _state(float(step)))
    store = _store(root)
    step1 = "step-0000000001"
    dcp.save(_state(9.0), storage_writer=root.child(f"{step1}/eval").writer())
    for key, data in {
        f"{step1}/notes.txt": b"keep me",
        f"{step1}/save-photos/cat.jpg": b"a cat",
        f"{step1}/{FORGED}/user.bin": b"mine",
    }.items():
        store.run(store.put(key, data))
    put_torch_checkpoint(store, f"{step1}/torch-eval", _state(7.0), tmp_path)
    kept_folders = (f"{step1}/eval/", f"{step1}/torch-eval/", f"{step1}/save-photos/", f"{step1}/{FORGED}/")
    keep = {
        k: v
        for k, v in _snapshot(store).items()
        if k.startswith(kept_folders + ("step-0000000003/",)) or k == f"{step1}/notes.txt"
    }

    assert manager.prune(keep_last=1) == [1, 2]

    left = _snapshot(store)
    assert {k: left.get(k) for k in keep} == keep, "prune deleted a nested checkpoint or a user file"
    assert not any(k.startswith("step-0000000002/") for k in left)
    assert f"{step1}/.metadata" not in left
    own = [k for k in left if k.startswith(f"{step1}/save-2") and not k.startswith(f"{step1}/{FORGED}/")]
    assert own == [], "step 1's own save was left"
    assert_same(_state(9.0), _load(root, f"{root.url}/{step1}/eval"))
    assert manager.steps() == [3]


def _tamper_manifest(store: Any, change: Any) -> None:
    """Rewrite the manifest of the committed save with ``change(doc)`` (or raw bytes)."""
    from dcp_cloud.checkpoint.metadata import load_metadata

    metadata = load_metadata(store.run(store.get(".metadata")), ".metadata")
    key = f"{metadata.storage_meta.save_id}/manifest.json"
    if isinstance(change, bytes):
        store.run(store.put(key, change))
        return
    doc = json.loads(store.run(store.get(key)))
    change(doc)
    store.run(store.put(key, json.dumps(doc).encode()))


@pytest.mark.parametrize("kind", ["file", "s3", "azure"])
@pytest.mark.parametrize("crafted", ["traversal", "confined-foreign"])
def test_crafted_replaced_entries_are_never_deleted(
    kind: str, crafted: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(kind, request, tmp_path)
    store = _store(target)
    victim_store = open_store(target.url.rsplit("/", 1)[0], target.storage_options)
    victim_store.run(victim_store.put("victim/important.txt", b"precious"))
    foreign = {"sibling/file.txt": b"user", f"{FORGED}/user.bin": b"user", "notes.txt": b"user"}
    for key, data in foreign.items():
        store.run(store.put(key, data))
    before = {o.key for o in store.run(store.list_objects(""))}
    dcp.save(_state(1.0), storage_writer=target.writer())
    first = {o.key for o in store.run(store.list_objects(""))} - before - {".metadata"}
    dcp.save(_state(2.0), storage_writer=target.writer())
    if crafted == "traversal":
        victim_path = os.path.join(os.path.dirname(target.url), "victim", "important.txt")
        entries = ["../victim/important.txt", "../../victim/important.txt", victim_path,
                   "s3://other-bucket/victim/important.txt"]  # fmt: skip
    else:
        entries = sorted(foreign)
    _tamper_manifest(store, lambda doc: doc["replaced"].extend(entries))

    dcp.save(_state(3.0), storage_writer=target.writer())  # must not raise

    assert victim_store.run(victim_store.get("victim/important.txt")) == b"precious"
    for key, data in foreign.items():
        assert store.run(store.get(key)) == data
    assert_same(_state(3.0), _load(target))
    left = {o.key for o in store.run(store.list_objects(""))}
    if crafted == "confined-foreign":  # the manifest parsed: our own old generation did go
        assert not (first & left), "the generation before the replaced one was not deleted"


@pytest.mark.parametrize("kind", ["file", "s3"])
@pytest.mark.parametrize(
    "garble",
    [
        b"\x00\xffnot json",
        b'{"format": "dcp_cloud.manifest", "version": 2, "save_id": 5, "objects": [], "replaced": 7}',
        b"[" * 100_000 + b"]" * 100_000,
        "wrong-types",
        "replaced-not-strings",
    ],
    ids=["bytes", "wrong-doc", "deep", "wrong-types", "replaced-not-strings"],
)
def test_garbled_previous_manifest_never_fails_a_committed_save(
    kind: str, garble: Any, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(kind, request, tmp_path)
    store = _store(target)
    dcp.save(_state(1.0), storage_writer=target.writer())
    dcp.save(_state(2.0), storage_writer=target.writer())
    if garble == "wrong-types":
        _tamper_manifest(
            store, lambda doc: doc.update(objects={"a": {"size": -1, "items": "x"}}, created="then")
        )
    elif garble == "replaced-not-strings":
        _tamper_manifest(store, lambda doc: doc.update(replaced=[{"k": 1}, None, 3, ["a"]]))
    else:
        _tamper_manifest(store, garble)

    dcp.save(_state(3.0), storage_writer=target.writer())  # committed: must report success

    assert_same(_state(3.0), _load(target))


def test_a_garbled_previous_metadata_never_fails_the_save(s3_target: Target) -> None:
    store = _store(s3_target)
    dcp.save(_state(1.0), storage_writer=s3_target.writer())
    store.run(store.put(".metadata", b"\x80\x04garbage"))
    dcp.save(_state(2.0), storage_writer=s3_target.writer())
    assert_same(_state(2.0), _load(s3_target))


def test_gc_honours_a_live_lease_whatever_the_grace(s3_target: Target) -> None:
    """A save whose intent record is renewed is never collected, even with grace 0; once its
    lease runs out (the writer died) it is."""
    from dcp_cloud.checkpoint.ownership import Intent

    store = _store(s3_target)
    save_id = "save-20260101T000000Z-0123abcd"
    now = time.time()
    store.run(store.put(f"{save_id}/intent.json", Intent(save_id, ("__0_",), now, now, 600).to_json()))
    store.run(store.put(f"{save_id}/__0_0.distcp", b"x" * 100))
    store.run(store.put(f"{save_id}/__0_1.distcp", b"x" * 100))
    store.run(store.put(f"{save_id}/__1_0.distcp", b"not ours: rank 1 is not in the intent"))
    report = collect_garbage(s3_target.url, storage_options=s3_target.storage_options, grace_seconds=0)
    assert report.deleted == [] and report.kept_recent == [save_id]

    old = now - 3600  # the writer's last heartbeat is old, and the store's record time passes too
    store.run(store.put(f"{save_id}/intent.json", Intent(save_id, ("__0_",), old, old, 1).to_json()))
    time.sleep(1.1)
    report = collect_garbage(s3_target.url, storage_options=s3_target.storage_options, grace_seconds=0)
    assert report.deleted == [f"{save_id}/__0_0.distcp", f"{save_id}/__0_1.distcp", f"{save_id}/intent.json"]
    assert {o.key for o in store.run(store.list_objects(""))} == {f"{save_id}/__1_0.distcp"}


_SAVER = textwrap.dedent(
    """
    import json, sys, time, warnings
    warnings.simplefilter("ignore")
    import torch, torch.distributed.checkpoint as dcp
    from dcp_cloud import CloudStorageWriter
    url, options, seconds = sys.argv[1], json.loads(sys.argv[2]), float(sys.argv[3])
    end, n = time.monotonic() + seconds, 0
    while time.monotonic() < end:
        n += 1
        name = f"c{n}" if n % 2 else "over"
        state = {"w": torch.full((256, 1024), float(n)), "b": torch.arange(64) + n}
        dcp.save(state, storage_writer=CloudStorageWriter(f"{url}/{name}", storage_options=options))
        print(json.dumps([name, n]), flush=True)
    """
)


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["file", "s3"])
def test_gc_with_no_grace_beside_running_saves(
    kind: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """gc(grace_seconds=0) in a loop while another process saves: every save that reported
    success loads bitwise."""
    root = make_target(kind, request, tmp_path)
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    child = subprocess.Popen(
        [sys.executable, "-c", _SAVER, root.url, json.dumps(root.storage_options), "5"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    rounds = 0
    deadline = time.monotonic() + 60
    while child.poll() is None and time.monotonic() < deadline:
        collect_garbage(root.url, storage_options=root.storage_options, grace_seconds=0)
        rounds += 1
    out, err = child.communicate(timeout=60)
    assert child.returncode == 0, err[-3000:]
    saved = [json.loads(line) for line in out.splitlines() if line.startswith("[")]
    assert len(saved) >= 3 and rounds >= 3, (len(saved), rounds)
    last: dict[str, int] = {}
    for name, n in saved:
        last[name] = n
    for name, n in last.items():
        out_state = {"w": torch.zeros(256, 1024), "b": torch.zeros(64, dtype=torch.int64)}
        dcp.load(out_state, storage_reader=root.reader(f"{root.url}/{name}"))
        assert_same({"w": torch.full((256, 1024), float(n)), "b": torch.arange(64) + n}, out_state)
    found = {c.path: c.status for c in list_checkpoints(root.url, storage_options=root.storage_options)}
    assert {p for p, s in found.items() if s == "committed"} == set(last)
