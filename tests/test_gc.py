"""Crash debris: gc removes what killed saves leave behind, and nothing else."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_cloud import collect_garbage
from dcp_cloud.checkpoint import layout
from dcp_cloud.checkpoint.ownership import Intent
from dcp_cloud.store import open_store

from .conftest import BUCKET, Target, make_target
from .kill_child import SHAPES, state

CHILD = str(Path(__file__).with_name("kill_child.py"))


def _load_value(target: Target) -> set[float]:
    out = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    dcp.load(out, storage_reader=target.reader())
    return {float(v) for t in out.values() for v in t.unique()}


def _upload_has_data(target: Target, store: Any) -> bool:
    """Whether the child's upload is open with at least one part (or some bytes) in it."""
    uploads = store.run(store.list_uploads(""))
    if target.store == "s3":
        client = target.server.client()
        prefix = target.url.removeprefix(f"s3://{BUCKET}/")

        def has_parts(key: str, upload_id: str) -> bool:
            try:
                return bool(client.list_parts(Bucket=BUCKET, Key=key, UploadId=upload_id).get("Parts"))
            except client.exceptions.NoSuchUpload:  # completed since it was listed
                return False

        return any(has_parts(f"{prefix}/{u.key}", u.upload.state) for u in uploads)
    if target.store == "file":
        return any(
            os.path.getsize(u.upload.state[1]) > 0
            for u in uploads
            if u.key.endswith(".distcp") and os.path.exists(u.upload.state[1])
        )
    return bool(uploads)  # GCS part objects, Azure uncommitted blocks: listed once they hold data


def _saver_with_open_upload(
    target: Target, value: float, hold_file: Path, lease: float | None = None
) -> subprocess.Popen[str]:
    """A child saving ``value`` (with a save lease of ``lease`` seconds), returned once its
    multipart upload holds some data. Its parts wait for ``hold_file`` to exist, so the upload
    stays open until the caller creates that file or kills the child."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path), "KILL_CHILD_HOLD_FILE": str(hold_file)}
    if lease is not None:
        env["KILL_CHILD_LEASE_SECONDS"] = str(lease)
    child = subprocess.Popen(
        [sys.executable, CHILD, "ours", target.url, json.dumps(target.storage_options), str(value)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=env,
    )
    try:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
        line = child.stdout.readline().strip()
        assert line == "PART", f"the child stored no part (it printed {line!r})"
        store = open_store(target.url, target.storage_options)
        assert _upload_has_data(target, store), "a part was stored but no open upload holds it"
    except BaseException:
        child.kill()
        child.communicate(timeout=30)
        raise
    return child


def _kill_mid_upload(target: Target, value: float, hold_file: Path, lease: float | None = None) -> None:
    """Start a save in a child and SIGKILL it while its multipart upload is open."""
    child = _saver_with_open_upload(target, value, hold_file, lease)
    child.kill()
    child.wait(timeout=30)


@pytest.mark.parametrize("store_kind", ["s3", "gcs", "azure", "file"])
def test_gc_after_a_killed_save(store_kind: str, request: pytest.FixtureRequest, tmp_path: Any) -> None:
    target = make_target(store_kind, request, tmp_path)
    dcp.save(state(1.0), storage_writer=target.writer(part_size=5 * 1024 * 1024))
    store = open_store(target.url, target.storage_options)
    committed = {o.key for o in store.run(store.list_objects(""))}

    lease = 3.0
    _kill_mid_upload(target, 2.0, tmp_path / "go", lease)
    killed_at = time.monotonic()
    held = collect_garbage(target.url, storage_options=target.storage_options, grace_seconds=0)
    assert held.deleted == [] and held.aborted_uploads == []  # its lease is still live: untouched
    assert _load_value(target) == {1.0}
    open_uploads = store.run(store.list_uploads(""))
    orphans = {o.key for o in store.run(store.list_objects(""))} - committed
    assert open_uploads or orphans, "the killed save left nothing to clean"
    time.sleep(max(0.0, lease + 0.5 - (time.monotonic() - killed_at)))
    young = collect_garbage(target.url, storage_options=target.storage_options)
    assert young.deleted == [] and young.aborted_uploads == []  # within the grace period: untouched

    preview = collect_garbage(
        target.url, storage_options=target.storage_options, grace_seconds=0, dry_run=True
    )
    assert set(preview.deleted) == orphans and len(preview.aborted_uploads) == len(open_uploads)
    assert len(store.run(store.list_uploads(""))) == len(open_uploads)  # the dry run aborted nothing

    report = collect_garbage(target.url, storage_options=target.storage_options, grace_seconds=0)
    assert report.deleted == preview.deleted and report.aborted_uploads == preview.aborted_uploads
    assert store.run(store.list_uploads("")) == []
    assert {o.key for o in store.run(store.list_objects(""))} == committed
    assert _load_value(target) == {1.0}


def test_gc_removes_uncommitted_saves_and_keeps_committed_ones(target: Target) -> None:
    """A root of step folders: one committed, one that died before its commit, and one killed
    mid-upload (an expired intent record and an open upload). Only the committed step stays."""
    root = target
    dcp.save({"x": torch.ones(4)}, storage_writer=root.child("step-1").writer())
    dcp.save({"x": torch.ones(4)}, storage_writer=root.child("step-2").writer())
    store = open_store(root.url, root.storage_options)
    store.run(store.delete(["step-2/.metadata"]))  # step-2 never committed
    dead = "save-20260101T000000Z-0000dead"
    intent = Intent(dead, ("__0_",), created=time.time(), heartbeat=time.time(), lease_seconds=0.1)
    store.run(store.put(f"step-3/{layout.intent_key(dead)}", intent.to_json()))
    upload = store.run(store.start_upload(f"step-3/{dead}/__0_0.distcp"))
    store.run(store.upload_part(upload, 1, 0, b"x" * 65536))
    time.sleep(0.2)  # past the lease
    open_uploads = store.run(store.list_uploads(""))
    assert open_uploads or root.store == "memory"  # the memory store holds uploads unlisted
    before = {o.key for o in store.run(store.list_objects(""))}
    report = collect_garbage(root.url, storage_options=root.storage_options, grace_seconds=0)
    after = {o.key for o in store.run(store.list_objects(""))}
    assert report.deleted and all(k.startswith(("step-2/save-", "step-3/save-")) for k in report.deleted)
    assert f"step-3/{layout.intent_key(dead)}" in report.deleted
    assert len(report.aborted_uploads) == len(open_uploads)
    assert after == before - set(report.deleted)
    assert after and all(k.startswith("step-1/") for k in after)
    assert store.run(store.list_uploads("")) == []
    out = {"x": torch.zeros(4)}
    dcp.load(out, storage_reader=root.child("step-1").reader())
    assert torch.equal(out["x"], torch.ones(4))


def test_gc_keeps_everything_under_unreadable_metadata(target: Target) -> None:
    dcp.save({"x": torch.ones(4)}, storage_writer=target.writer())
    store = open_store(target.url, target.storage_options)
    store.run(store.put(".metadata", b"garbage"))
    before = {o.key for o in store.run(store.list_objects(""))}
    report = collect_garbage(target.url, storage_options=target.storage_options, grace_seconds=0)
    assert report.deleted == [] and report.unreadable_metadata == [".metadata"]
    assert {o.key for o in store.run(store.list_objects(""))} == before


def test_gc_leaves_foreign_files_alone(s3_target: Target) -> None:
    client = s3_target.server.client()
    prefix = s3_target.url.removeprefix(f"s3://{BUCKET}/")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/notes.txt", Body=b"mine")
    client.put_object(Bucket=BUCKET, Key=f"{prefix}/__0_0.distcp", Body=b"torch's")
    report = collect_garbage(s3_target.url, storage_options=s3_target.storage_options, grace_seconds=0)
    assert report.deleted == []


def test_gc_never_touches_a_save_in_progress(s3_target: Target, tmp_path: Path) -> None:
    dcp.save(state(1.0), storage_writer=s3_target.writer(part_size=5 * 1024 * 1024))
    go = tmp_path / "go"
    child = _saver_with_open_upload(s3_target, 2.0, go)
    report = collect_garbage(s3_target.url, storage_options=s3_target.storage_options)
    go.touch()
    out, err = child.communicate(timeout=120)
    assert child.returncode == 0 and "DONE" in out, err[-2000:]
    assert report.aborted_uploads == [] and report.deleted == []
    assert _load_value(s3_target) == {2.0}
