"""The commit protocol, proven from the server's side: .metadata last, old data deleted after."""

from __future__ import annotations

from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner, DefaultSavePlanner

from dcp_cloud import CheckpointExistsError, CloudStorageWriter, UploadError
from dcp_cloud.store import open_store
from dcp_cloud.store.s3 import S3Store

from .conftest import BUCKET, Target
from .helpers import failure_text, failure_types

WRITES = {"put_object", "upload_part", "create_multipart_upload", "complete_multipart_upload"}


def _state(value: float) -> dict[str, Any]:
    return {"big": torch.full((3 * 1024 * 1024,), value), "small": torch.full((10,), value), "tag": value}


def _load(target: Target) -> dict[str, Any]:
    out = {"big": torch.zeros(3 * 1024 * 1024), "small": torch.zeros(10), "tag": None}
    dcp.load(out, storage_reader=target.reader())
    return out


def _ckpt_requests(target: Target) -> list:
    """Requests on the checkpoint's keys, plus batch deletes (sent to the bucket itself)."""
    path = "/" + target.url.removeprefix("s3://")
    return [
        r
        for r in target.server.requests()
        if r.path.startswith(path) or (r.kind == "delete_objects" and r.path.strip("/") == BUCKET)
    ]


def test_metadata_put_is_the_last_write_of_a_save(s3_target: Target) -> None:
    s3_target.server.clear_requests()
    dcp.save(_state(1.0), storage_writer=s3_target.writer(part_size=5 * 1024 * 1024))
    requests = _ckpt_requests(s3_target)
    writes = [r for r in requests if r.kind in WRITES]
    assert writes[-1].kind == "put_object" and writes[-1].path.endswith("/.metadata")
    assert sum(r.kind == "upload_part" for r in writes) >= 2
    assert all(r.status < 300 for r in writes)
    # everything after the commit is cleanup, never a write
    last = requests.index(writes[-1])
    assert all(r.kind not in WRITES for r in requests[last + 1 :])


def _data_keys(store: Any) -> set[str]:
    return {o.key for o in store.run(store.list_objects("")) if o.key != ".metadata"}


def test_overwrite_touches_no_committed_object_and_keeps_one_generation(s3_target: Target) -> None:
    store = open_store(s3_target.url, s3_target.storage_options)
    dcp.save(_state(1.0), storage_writer=s3_target.writer(part_size=5 * 1024 * 1024))
    first = _data_keys(store)
    s3_target.server.clear_requests()

    dcp.save(_state(2.0), storage_writer=s3_target.writer(part_size=5 * 1024 * 1024))
    requests = _ckpt_requests(s3_target)
    commit = max(
        i for i, r in enumerate(requests) if r.kind == "put_object" and r.path.endswith("/.metadata")
    )
    # nothing before the commit wrote to or deleted an object of the committed checkpoint
    for r in requests[:commit]:
        assert r.kind == "get_object" or not any(r.path.endswith("/" + k) for k in first), r
    second = _data_keys(store) - first
    assert first <= _data_keys(store), "the replaced version must stay whole for loads in flight"
    assert _load(s3_target)["tag"] == 2.0

    dcp.save(_state(3.0), storage_writer=s3_target.writer(part_size=5 * 1024 * 1024))
    remaining = _data_keys(store)
    assert not (first & remaining), "the generation before the replaced one was not deleted"
    assert second <= remaining
    assert any(r.kind == "delete_objects" for r in _ckpt_requests(s3_target)[commit + 1 :])
    assert _load(s3_target)["tag"] == 3.0


class _OverwriteWhilePlanning(DefaultLoadPlanner):
    """A load planner that lets a writer overwrite the checkpoint after the load read
    ``.metadata`` and before it reads any data: the race a reader can lose."""

    def __init__(self, overwrite: Any) -> None:
        super().__init__()
        self._overwrite = overwrite

    def create_local_plan(self) -> Any:
        self._overwrite()
        return super().create_local_plan()


def test_a_load_racing_an_overwrite_gets_one_whole_version(target: Target) -> None:
    dcp.save(_state(1.0), storage_writer=target.writer())
    dcp.save(_state(2.0), storage_writer=target.writer())
    out = {"big": torch.zeros(3 * 1024 * 1024), "small": torch.zeros(10), "tag": None}
    planner = _OverwriteWhilePlanning(lambda: dcp.save(_state(3.0), storage_writer=target.writer()))
    dcp.load(out, storage_reader=target.reader(), planner=planner)
    assert out["tag"] == 2.0
    assert set(out["big"].unique().tolist()) == {2.0} and set(out["small"].unique().tolist()) == {2.0}
    assert _load(target)["tag"] == 3.0


def test_overwrite_false_refuses_an_existing_checkpoint(target: Target) -> None:
    dcp.save(_state(1.0), storage_writer=target.writer())
    with pytest.raises(CheckpointException) as info:
        dcp.save(_state(2.0), storage_writer=target.writer(overwrite=False))
    assert CheckpointExistsError in failure_types(info.value)
    assert "overwrite=False" in failure_text(info.value) and target.url.split("/")[-2] in failure_text(
        info.value
    )
    out = _load(target)
    assert out["tag"] == 1.0 and torch.equal(out["small"], torch.full((10,), 1.0))


def test_overwrite_false_saves_where_nothing_is_committed(target: Target) -> None:
    dcp.save(_state(3.0), storage_writer=target.writer(overwrite=False))
    assert _load(target)["tag"] == 3.0


@pytest.mark.parametrize("store_kind", ["s3", "file"])
def test_conditional_put_is_enforced_by_the_store(
    store_kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    from .conftest import make_target

    target = make_target(store_kind, request, tmp_path)
    store = open_store(target.url, target.storage_options)
    store.run(store.put("x", b"first", if_absent=True))
    with pytest.raises(FileExistsError):
        store.run(store.put("x", b"second", if_absent=True))
    assert store.run(store.get("x")) == b"first"


class FailingPlanner(DefaultSavePlanner):
    """Raises while resolving one item, the way a broken tensor or a D2H copy would."""

    def resolve_data(self, write_item: Any) -> Any:
        if write_item.index.fqn == "small":
            raise RuntimeError("injected failure resolving 'small'")
        return super().resolve_data(write_item)


def test_an_item_that_fails_fails_the_save_and_keeps_the_old(target: Target) -> None:
    dcp.save(_state(1.0), storage_writer=target.writer())
    with pytest.raises(CheckpointException) as info:
        dcp.save(
            _state(2.0), storage_writer=target.writer(part_size=5 * 1024 * 1024), planner=FailingPlanner()
        )
    assert "injected failure" in failure_text(info.value)
    assert _load(target)["tag"] == 1.0


def test_a_part_that_fails_to_upload_aborts_the_multipart_upload(
    s3_target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    dcp.save(_state(1.0), storage_writer=s3_target.writer())
    real_upload_part = S3Store.upload_part

    async def flaky_upload_part(self: S3Store, upload: Any, part_number: int, offset: int, data: Any) -> None:
        if part_number == 2:
            raise ConnectionResetError("injected: connection reset while sending part 2")
        await real_upload_part(self, upload, part_number, offset, data)

    monkeypatch.setattr(S3Store, "upload_part", flaky_upload_part)
    s3_target.server.clear_requests()
    with pytest.raises(CheckpointException) as info:
        dcp.save(_state(2.0), storage_writer=s3_target.writer(part_size=5 * 1024 * 1024))
    assert UploadError in failure_types(info.value)
    assert "part 2" in failure_text(info.value)
    kinds = [r.kind for r in _ckpt_requests(s3_target)]
    assert "abort_multipart_upload" in kinds and "complete_multipart_upload" not in kinds
    assert not any(
        r.path.endswith("/.metadata") and r.kind == "put_object" for r in _ckpt_requests(s3_target)
    )
    uploads = s3_target.server.client().list_multipart_uploads(Bucket=BUCKET).get("Uploads", [])
    prefix = s3_target.url.removeprefix(f"s3://{BUCKET}/")
    assert not [u for u in uploads if u["Key"].startswith(prefix)], "a multipart upload was left open"
    monkeypatch.undo()
    assert _load(s3_target)["tag"] == 1.0


def test_uploads_carry_checksums_the_server_can_check(s3_target: Target) -> None:
    s3_target.server.clear_requests()
    dcp.save(_state(1.0), storage_writer=s3_target.writer(part_size=5 * 1024 * 1024))
    uploads = [r for r in _ckpt_requests(s3_target) if r.kind in ("upload_part", "put_object")]
    assert uploads and all(r.checksums for r in uploads), [(r.kind, r.checksums) for r in uploads]
    assert all(r.body_signed for r in uploads), "botocore signs bodies over plain HTTP by default"


def test_plain_http_bodies_can_go_unsigned_with_their_checksum(s3_target: Target) -> None:
    """The documented knob for trusted plain-HTTP endpoints: no SHA-256 pass over every body,
    the CRC32 checksum stays."""
    options = {**s3_target.storage_options, "config_kwargs": {"s3": {"payload_signing_enabled": False}}}
    s3_target.server.clear_requests()
    writer = CloudStorageWriter(s3_target.url, storage_options=options, part_size=5 * 1024 * 1024)
    dcp.save(_state(2.0), storage_writer=writer)
    uploads = [r for r in _ckpt_requests(s3_target) if r.kind in ("upload_part", "put_object")]
    assert uploads and not any(r.body_signed for r in uploads)
    assert all(r.checksums for r in uploads)
    assert _load(s3_target)["tag"] == 2.0


def test_a_failing_serializer_thread_fails_a_local_save_and_leaves_no_debris(tmp_path: Any) -> None:
    """On local folders items are serialized on several threads (one object each): one thread
    failing fails the save, the old checkpoint stays, and the other threads' objects are removed."""
    from dcp_cloud import CloudStorageReader, CloudStorageWriter

    url = str(tmp_path / "ckpt")
    state = {f"big{i}": torch.full((9 * 1024 * 1024,), 1.0) for i in range(4)}  # 144 MiB: 4 threads
    dcp.save({**state, "small": torch.ones(4)}, storage_writer=CloudStorageWriter(url))
    committed = sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*") if p.is_file())
    assert len([p for p in committed if p.suffix == ".distcp"]) >= 2  # several serializer threads
    with pytest.raises(CheckpointException) as info:
        dcp.save(
            {**{k: v * 2 for k, v in state.items()}, "small": torch.ones(4) * 2},
            storage_writer=CloudStorageWriter(url),
            planner=FailingPlanner(),
        )
    assert "injected failure" in failure_text(info.value)
    assert sorted(p.relative_to(tmp_path) for p in (tmp_path / "ckpt").rglob("*") if p.is_file()) == committed
    out = {**{k: torch.zeros_like(v) for k, v in state.items()}, "small": torch.zeros(4)}
    dcp.load(out, storage_reader=CloudStorageReader(url))
    assert all(torch.equal(out[k], v) for k, v in state.items()) and torch.equal(out["small"], torch.ones(4))
