"""Concurrent writers: with overwrite=False exactly one commits, and its checkpoint is intact."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import CheckpointExistsError
from dcp_cloud.store import open_store

from .conftest import Target, make_target
from .helpers import failure_types
from .kill_child import SHAPES

CHILD = str(Path(__file__).with_name("kill_child.py"))


def _values(target: Target) -> set[float]:
    out = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    dcp.load(out, storage_reader=target.reader())
    return {float(v) for t in out.values() for v in t.unique()}


@pytest.mark.parametrize("store_kind", ["s3", "file"])
def test_two_processes_race_to_commit_without_overwrite(
    store_kind: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    target = make_target(store_kind, request, tmp_path)
    go = tmp_path / "go"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    children = [
        subprocess.Popen(
            [
                sys.executable,
                CHILD,
                "ours",
                target.url,
                json.dumps(target.storage_options),
                str(v),
                str(go),
                "no-overwrite",
            ],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=env,
        )
        for v in (1.0, 2.0)
    ]
    for child in children:
        assert child.stdout is not None and child.stdout.readline().strip() == "READY"
    go.touch()
    outcomes = [child.communicate(timeout=120) for child in children]
    won = [i for i, (out, _err) in enumerate(outcomes) if "DONE" in out]
    assert len(won) == 1, outcomes
    loser_err = outcomes[1 - won[0]][1]
    assert "CheckpointExistsError" in loser_err and "overwrite=False" in loser_err
    assert _values(target) == {float(won[0] + 1)}
    store = open_store(target.url, target.storage_options)
    saves = {o.key.split("/")[0] for o in store.run(store.list_objects("")) if o.key.startswith("save-")}
    assert len(saves) == 1, f"the loser's objects were left behind: {saves}"


def test_commit_race_is_decided_by_the_conditional_put(
    target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The loser passed the early check (nothing committed yet) and only the store can stop it."""
    first = target.writer(overwrite=False)
    second = target.writer(overwrite=False)
    monkeypatch.setattr(second, "_refuse_if_committed", lambda: None)
    real_finish = second.finish

    def finish_after_the_other_commits(metadata: Any, results: Any) -> None:
        dcp.save({"w": torch.full((8,), 1.0)}, storage_writer=first)
        monkeypatch.setattr(second, "_read_committed", lambda key: None)  # as if read before
        real_finish(metadata, results)

    monkeypatch.setattr(second, "finish", finish_after_the_other_commits)
    with pytest.raises(CheckpointException) as info:
        dcp.save({"w": torch.full((8,), 2.0)}, storage_writer=second)
    assert CheckpointExistsError in failure_types(info.value)
    out = {"w": torch.zeros(8)}
    dcp.load(out, storage_reader=target.reader())
    assert torch.equal(out["w"], torch.full((8,), 1.0))
    store = open_store(target.url, target.storage_options)
    saves = {o.key.split("/")[0] for o in store.run(store.list_objects("")) if o.key.startswith("save-")}
    assert first._active is not None and saves == {first._active.save_id}
