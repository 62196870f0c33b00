"""The fixed cost of a save or load: the S3 client is built once per process and configuration.

Counted, not timed: every writer and reader of one endpoint, credentials and client settings
uses the same filesystem and the same aiobotocore client, from any thread and across
``reset()``; other credentials, another environment, or a forked child get their own.
"""

from __future__ import annotations

import multiprocessing
import os
import subprocess
import sys
import threading
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_cloud import CloudStorageReader, CloudStorageWriter
from dcp_cloud.store.filesystems import FILESYSTEMS
from tests.conftest import Target


def _state() -> dict[str, torch.Tensor]:
    return {"w": torch.arange(1024, dtype=torch.float32), "b": torch.ones(16)}


def _save(writer: CloudStorageWriter) -> None:
    dcp.save(_state(), storage_writer=writer)


def _load(reader: CloudStorageReader) -> dict[str, torch.Tensor]:
    target = {k: torch.zeros_like(v) for k, v in _state().items()}
    dcp.load(target, storage_reader=reader)
    return target


def _client(connection: CloudStorageWriter | CloudStorageReader) -> Any:
    return connection.store.fs._s3  # type: ignore[attr-defined]


@pytest.fixture
def create_client_calls(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """Every aiobotocore client made from now on, by service name."""
    import aiobotocore.session

    made: list[str] = []
    original = aiobotocore.session.AioSession.create_client

    def counted(self: Any, service_name: str, *args: Any, **kwargs: Any) -> Any:
        made.append(service_name)
        return original(self, service_name, *args, **kwargs)

    monkeypatch.setattr(aiobotocore.session.AioSession, "create_client", counted)
    return made


def test_writers_and_readers_of_one_store_share_one_client(
    s3_target: Target, create_client_calls: list[str]
) -> None:
    first = s3_target.writer(s3_target.url + "/a")
    _save(first)
    client = _client(first)
    built = FILESYSTEMS.built

    second = s3_target.writer(s3_target.url + "/b")
    _save(second)
    reader = s3_target.reader(s3_target.url + "/a")
    loaded = _load(reader)

    assert torch.equal(loaded["w"], _state()["w"])
    assert second.store.fs is first.store.fs and reader.store.fs is first.store.fs
    assert _client(second) is client and _client(reader) is client
    assert FILESYSTEMS.built == built
    assert create_client_calls.count("s3") <= 1  # at most the first writer's, if it was the first


def test_reset_to_a_new_checkpoint_keeps_the_client(
    s3_target: Target, create_client_calls: list[str]
) -> None:
    writer = s3_target.writer(s3_target.url + "/step-1")
    _save(writer)
    client = _client(writer)
    made = len(create_client_calls)
    for step in (2, 3):
        dcp.save(_state(), storage_writer=writer, checkpoint_id=f"{s3_target.url}/step-{step}")
        assert writer.store.url.endswith(f"/step-{step}")
        assert _client(writer) is client
    reader = s3_target.reader(s3_target.url + "/step-1")
    for step in (2, 3):
        target = {k: torch.zeros_like(v) for k, v in _state().items()}
        dcp.load(target, storage_reader=reader, checkpoint_id=f"{s3_target.url}/step-{step}")
        assert torch.equal(target["b"], torch.ones(16))
        assert _client(reader) is client
    assert len(create_client_calls) == made


def test_a_save_from_another_thread_reuses_the_client(
    s3_target: Target, create_client_calls: list[str]
) -> None:
    writer = s3_target.writer(s3_target.url + "/main")
    _save(writer)
    client = _client(writer)
    made = len(create_client_calls)
    seen: list[Any] = []
    errors: list[BaseException] = []

    def save_in_thread() -> None:
        try:
            other = s3_target.writer(s3_target.url + "/thread")
            _save(other)
            seen.append(_client(other))
        except BaseException as exc:  # reported below
            errors.append(exc)

    thread = threading.Thread(target=save_in_thread)
    thread.start()
    thread.join(60)
    assert not errors, errors
    assert seen == [client]
    assert len(create_client_calls) == made


def test_other_credentials_or_settings_get_another_client(s3_target: Target) -> None:
    writer = s3_target.writer()
    fs = writer.store.fs
    other_secret = {**s3_target.storage_options, "secret": "another-secret"}
    other_key = {**s3_target.storage_options, "key": "another-key"}
    other_config = {**s3_target.storage_options, "config_kwargs": {"max_pool_connections": 3}}
    for options in (other_secret, other_key, other_config):
        assert CloudStorageWriter(s3_target.url, storage_options=options).store.fs is not fs
    assert CloudStorageWriter(s3_target.url, storage_options=dict(s3_target.storage_options)).store.fs is fs
    assert writer.store.fs is fs


def test_a_changed_credential_environment_gets_another_client(
    s3_target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    fs = s3_target.writer().store.fs
    monkeypatch.setenv("AWS_SESSION_TOKEN", "a-rotated-token")
    assert s3_target.writer().store.fs is not fs
    monkeypatch.delenv("AWS_SESSION_TOKEN")
    assert s3_target.writer().store.fs is fs


def _save_in_child(writer: CloudStorageWriter, parent_fs: Any, results: Any) -> None:
    try:
        _save(writer)  # the writer's store was opened in the parent
        results.put(("ok", writer.store.fs is not parent_fs, writer.store.fs._pid == os.getpid()))
    except BaseException as exc:
        results.put(("error", repr(exc), False))


def test_a_forked_child_builds_its_own_client(s3_target: Target) -> None:
    writer = s3_target.writer(s3_target.url + "/parent")
    _save(writer)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    writer.reset(s3_target.url + "/child")
    child = context.Process(target=_save_in_child, args=(writer, writer.store.fs, results))
    child.start()
    outcome = results.get(timeout=120)
    child.join(30)
    assert outcome == ("ok", True, True), outcome
    assert child.exitcode == 0
    loaded = _load(s3_target.reader(s3_target.url + "/child"))
    assert torch.equal(loaded["w"], _state()["w"])


def test_importing_dcp_cloud_imports_no_cloud_client_library() -> None:
    code = (
        "import sys, dcp_cloud; print(sorted(m for m in ('boto3', 'botocore', 'aiobotocore', 's3fs', "
        "'gcsfs', 'adlfs', 'azure.storage.blob', 'google.cloud.storage', 'pydantic', 'aiohttp') "
        "if m in sys.modules))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=120
    )
    assert out.stdout.strip() == "[]", out.stdout + out.stderr


def _data_writes(target: Target) -> list[str]:
    assert target.server is not None
    path = "/" + target.url.removeprefix("s3://")
    return [
        r.kind
        for r in target.server.requests()  # type: ignore[union-attr]
        if r.path.startswith(path)
        and r.path.endswith(".distcp")
        and r.kind in {"put_object", "create_multipart_upload", "upload_part", "complete_multipart_upload"}
    ]


def test_an_object_of_up_to_two_parts_is_one_put(s3_target: Target) -> None:
    """A small object costs one request, not a multipart upload's three or more."""
    assert s3_target.server is not None
    mib = 1024 * 1024
    for parts, tensor_mib in ((1, 3), (2, 9), (3, 12)):
        state = {"x": torch.randn(tensor_mib * mib // 4), "y": torch.ones(7)}
        url = f"{s3_target.url}/{parts}-parts"
        s3_target.server.clear_requests()
        writer = s3_target.writer(url, part_size=5 * mib, object_size=64 * mib)
        dcp.save(state, storage_writer=writer)
        writes = _data_writes(s3_target.child(f"{parts}-parts"))
        if parts <= 2:
            assert writes == ["put_object"], (parts, writes)
        else:
            assert writes.count("upload_part") == 3 and writes[-1] == "complete_multipart_upload", writes
        out = {"x": torch.zeros_like(state["x"]), "y": torch.zeros(7)}
        dcp.load(out, storage_reader=s3_target.reader(url))
        assert torch.equal(out["x"], state["x"]) and torch.equal(out["y"], state["y"])


def test_a_small_save_sends_each_part_as_an_object_of_its_own(s3_target: Target) -> None:
    """Under 32 parts, a save by default makes objects of one part: a PUT each, side by side,
    with no multipart start or completion; an item larger than a part still goes up in parts."""
    assert s3_target.server is not None
    mib = 1024 * 1024
    state = {"big": torch.randn(5 * mib), **{f"t{i}": torch.randn(mib // 4) for i in range(8)}}
    writer = s3_target.writer()
    dcp.save(state, storage_writer=writer)
    sizes = writer.sizes_for(sum(t.nbytes for t in state.values()))
    assert sizes.object_size == sizes.part_size <= state["big"].nbytes // 3  # 28 MiB: 5 MiB parts
    writes = _data_writes(s3_target)
    assert writes.count("create_multipart_upload") == writes.count("complete_multipart_upload") == 1
    assert writes.count("put_object") >= 2  # the 1 MiB tensors, a few to an object
    small = {f"s{i}": torch.randn(mib // 4) for i in range(8)}  # 8 MiB, 1 MiB each
    s3_target.server.clear_requests()
    dcp.save(small, storage_writer=s3_target.writer(s3_target.url + "/small"))
    writes = _data_writes(s3_target.child("small"))
    assert writes and set(writes) == {"put_object"}, writes
    out = {k: torch.zeros_like(v) for k, v in small.items()}
    dcp.load(out, storage_reader=s3_target.reader(s3_target.url + "/small"))
    assert all(torch.equal(out[k], v) for k, v in small.items())
