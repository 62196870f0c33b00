"""CheckpointManager: step folders, discovery with one listing, retention, two ranks."""

from __future__ import annotations

import os
import threading
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import CheckpointNotFoundError
from dcp_cloud.save.writer import CloudStorageWriter
from dcp_cloud.store import open_store
from dcp_cloud.tools import manager as manager_module
from dcp_cloud.tools.manager import CheckpointManager, delete_step

from .conftest import Target


def _state(value: float) -> dict[str, Any]:
    return {"w": torch.full((8, 4), value), "b": torch.arange(5) * int(value), "step": int(value)}


def _manager(target: Target, **kwargs: Any) -> CheckpointManager:
    return CheckpointManager(target.url, storage_options=target.storage_options, **kwargs)


def _keys(target: Target) -> set[str]:
    store = open_store(target.url, target.storage_options)
    return {o.key for o in store.run(store.list_objects(""))}


def test_save_discover_and_load(target: Target) -> None:
    manager = _manager(target)
    assert manager.steps() == [] and manager.latest() is None
    with pytest.raises(CheckpointNotFoundError, match="no committed checkpoint") as caught:
        manager.load(_state(0))
    assert target.url.split("://")[-1] in str(caught.value)

    for step in (7, 30, 12):
        manager.save(step, _state(step))
    assert manager.steps() == [7, 12, 30] and manager.latest() == 30
    assert {k.split("/")[0] for k in _keys(target)} == {
        "step-0000000007",
        "step-0000000012",
        "step-0000000030",
    }

    out = _state(0)
    assert manager.load(out) == 30
    assert torch.equal(out["w"], torch.full((8, 4), 30.0)) and out["step"] == 30
    assert manager.load(out, step=7) == 7 and torch.equal(out["b"], torch.arange(5) * 7)
    with pytest.raises(CheckpointNotFoundError, match="step 8 is not committed"):
        manager.load(out, step=8)


def test_incomplete_steps_are_not_discovered(target: Target) -> None:
    manager = _manager(target)
    manager.save(1, _state(1))
    manager.save(2, _state(2))
    store = open_store(target.url, target.storage_options)
    store.run(store.delete(["step-0000000002/.metadata"]))  # a save that never committed
    assert manager.steps() == [1]
    out = _state(0)
    assert manager.load(out) == 1 and out["step"] == 1


def test_async_save_runs_retention_when_it_commits(target: Target) -> None:
    manager = _manager(target, keep_last=2)
    for step in (1, 2, 3):
        manager.save(step, _state(step))
    assert manager.steps() == [2, 3]
    future = manager.save(4, _state(4), async_=True)
    future.result(timeout=60)
    assert manager.steps() == [3, 4]
    assert not any(k.startswith(("step-0000000001/", "step-0000000002/")) for k in _keys(target))
    manager.wait()


def test_discovery_is_one_list(s3_target: Target) -> None:
    manager = _manager(s3_target)
    for step in (1, 2, 3):
        manager.save(step, _state(step))
    server = s3_target.server
    assert server is not None
    server.clear_requests()
    assert manager.latest() == 3
    assert [r.kind for r in server.requests()] == ["list_objects"]

    server.clear_requests()
    out = _state(0)
    assert manager.load(out) == 3
    kinds = [r.kind for r in server.requests()]
    assert kinds.count("list_objects") == 1 and kinds[0] == "list_objects"


def test_delete_step_removes_metadata_first(target: Target) -> None:
    manager = _manager(target)
    manager.save(5, _state(5))
    store = open_store(target.url, target.storage_options)
    calls: list[list[str]] = []
    real_delete = store.delete

    async def recording(keys: list[str]) -> None:
        calls.append(list(keys))
        await real_delete(keys)

    store.delete = recording  # type: ignore[method-assign]
    assert delete_step(store, 5) == 3
    assert calls[0] == ["step-0000000005/.metadata"]
    assert all(not k.endswith(".metadata") for k in calls[1])
    assert _keys(target) == set()


class _GatedWriter(CloudStorageWriter):
    """Blocks in finish() (before the commit) for URLs ending in ``gate_suffix``."""

    gate_suffix = "\0never"
    entered = threading.Event()
    release = threading.Event()
    fail = False

    def finish(self, metadata: Any, results: Any) -> None:
        if self.url.endswith(type(self).gate_suffix):
            type(self).entered.set()
            assert type(self).release.wait(60)
            if type(self).fail:
                raise RuntimeError("injected failure before the commit")
        super().finish(metadata, results)


@pytest.fixture
def gated(monkeypatch: pytest.MonkeyPatch) -> type[_GatedWriter]:
    gate = type("Gate", (_GatedWriter,), {"entered": threading.Event(), "release": threading.Event()})
    monkeypatch.setattr(manager_module, "CloudStorageWriter", gate)
    return gate


def test_retention_waits_for_the_newer_save_to_commit(target: Target, gated: type[_GatedWriter]) -> None:
    manager = _manager(target, keep_last=1)
    manager.save(1, _state(1))
    gated.gate_suffix = "step-0000000002"
    future = manager.save(2, _state(2), async_=True)
    assert gated.entered.wait(60)
    assert manager.steps() == [1]  # step 2 is uploading, step 1 untouched
    gated.release.set()
    future.result(timeout=60)
    assert manager.steps() == [2]


def test_retention_never_runs_after_a_failed_save(target: Target, gated: type[_GatedWriter]) -> None:
    manager = _manager(target, keep_last=1)
    manager.save(1, _state(1))
    gated.gate_suffix, gated.fail = "step-0000000002", True
    gated.release.set()
    with pytest.raises((CheckpointException, RuntimeError)):
        manager.save(2, _state(2))
    assert manager.steps() == [1]
    out = _state(0)
    assert manager.load(out) == 1


def test_retention_spares_saves_in_flight(target: Target, gated: type[_GatedWriter]) -> None:
    manager = _manager(target, keep_last=1)
    manager.save(1, _state(1))
    manager.save(2, _state(2), async_=False)
    manager.save(1, _state(1))  # a re-save of step 1 is protected as just committed...
    assert manager.steps() == [1, 2]
    gated.gate_suffix = "step-0000000001"
    future = manager.save(1, _state(11), async_=True)  # ...and while in flight
    assert gated.entered.wait(60)
    manager.save(3, _state(3))  # retention now: newest is 3; 2 goes; 1 is in flight
    assert manager.steps() == [1, 3]
    gated.release.set()
    future.result(timeout=60)
    assert manager.steps() == [1, 3]  # 1 just committed: kept; 3 is the newest
    out = _state(0)
    assert manager.load(out, step=1) == 1 and out["step"] == 11


def test_retention_keeps_the_newest_step(target: Target) -> None:
    manager = _manager(target, keep_last=1)
    manager.save(5, _state(5))
    manager.save(3, _state(3))  # an older step number: neither the newest nor the new one goes
    assert manager.steps() == [3, 5]
    assert manager.prune(keep_last=1, dry_run=True) == [3]
    assert manager.prune(keep_last=1) == [3]
    assert manager.steps() == [5]
    with pytest.raises(ValueError):
        CheckpointManager(target.url, keep_last=0)


# -- two ranks ------------------------------------------------------------------------------------


def _rank_main(rank: int, world: int, init_file: str, url: str, options: dict[str, Any], out: str) -> None:
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        manager = CheckpointManager(url, keep_last=1, storage_options=options)
        manager.save(1, _state(1))
        manager.save(2, _state(2))
        steps = manager.steps()
        latest = manager.latest()
        loaded = _state(0)
        step = manager.load(loaded)
        lists = 0 if manager._store is None else manager._store.counter.snapshot()[0].get("list", 0)
        torch.save(
            {"steps": steps, "latest": latest, "step": step, "w": loaded["w"], "lists": lists},
            os.path.join(out, f"rank{rank}.pt"),
        )
        dist.barrier()
    finally:
        dist.destroy_process_group()


@pytest.mark.timeout(120)
def test_two_ranks_only_rank0_lists(s3_target: Target, tmp_path: Path) -> None:
    server = s3_target.server
    assert server is not None
    server.clear_requests()
    init_file = str(tmp_path / f"pg-{uuid.uuid4().hex}")
    mp.spawn(
        _rank_main,
        args=(2, init_file, s3_target.url, s3_target.storage_options, str(tmp_path)),
        nprocs=2,
        join=True,
    )
    results = [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(2)]
    for seen in results:
        assert seen["steps"] == [2] and seen["latest"] == 2 and seen["step"] == 2
        assert torch.equal(seen["w"], torch.full((8, 4), 2.0))
    # 2 retention listings + 2 of step 1 to delete it (objects, uploads) + steps() + latest() + load()
    assert results[0]["lists"] == 7
    assert results[1]["lists"] == 0
    server_lists = [r for r in server.requests() if r.kind == "list_objects"]
    assert len(server_lists) == results[0]["lists"]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_resume_training_example() -> None:
    import subprocess
    import sys

    script = Path(__file__).resolve().parent.parent / "examples" / "resume_training.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "SIGKILLed the training process after step 28 (exit -9)" in done.stdout
    assert "committed steps now: [20, 25]" in done.stdout and "resumed from step 25" in done.stdout
    assert "losses identical: True" in done.stdout and "committed steps at the end: [35, 40]" in done.stdout
