"""SIGKILL a saving process at random moments: the checkpoint is always one whole version.

torch's FsspecWriter runs as a control in the same test and must fail it (a mix of versions,
or no loadable checkpoint), which proves the test can bite.
"""

from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

from .conftest import Target, make_target
from .kill_child import SHAPES

CHILD = str(Path(__file__).with_name("kill_child.py"))

pytestmark = pytest.mark.slow


def _spawn(kind: str, target: Target, value: float) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    return subprocess.Popen(
        [sys.executable, CHILD, kind, target.url, json.dumps(target.storage_options), str(value)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env=env,
    )


def _save_timed(kind: str, target: Target, value: float) -> float:
    """Run one save to completion; the seconds from READY to DONE."""
    child = _spawn(kind, target, value)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    start = time.monotonic()
    assert child.stdout.readline().strip() == "DONE"
    elapsed = time.monotonic() - start
    assert child.wait(timeout=60) == 0
    return elapsed


def _save_and_kill(kind: str, target: Target, value: float, delay: float) -> bool:
    """Start a save and SIGKILL it after ``delay`` seconds; True if it finished first."""
    child = _spawn(kind, target, value)
    assert child.stdout is not None
    assert child.stdout.readline().strip() == "READY"
    time.sleep(delay)
    child.send_signal(signal.SIGKILL)
    child.wait(timeout=60)
    rest = child.stdout.read()
    return "DONE" in rest


def _load_versions(kind: str, target: Target) -> set[float] | str:
    """The set of distinct values in the loaded checkpoint, or the error it raised."""
    out = {name: torch.zeros(shape) for name, shape in SHAPES.items()}
    reader: Any = target.reader() if kind == "ours" else FsspecReader(target.url, **target.storage_options)
    try:
        dcp.load(out, storage_reader=reader)
    except BaseException as exc:  # CheckpointException is a BaseException
        return f"{type(exc).__name__}: {str(exc)[:200]}"
    return {float(v) for t in out.values() for v in t.unique()}


def _kill_loop(kind: str, target: Target, kills: int, rng: random.Random, stop_on_failure: bool) -> list[str]:
    """Overwrite a committed checkpoint ``kills`` times, killing each save at a random moment.

    Returns the failures seen: loads that raised, or that mixed versions.
    """
    duration = _save_timed(kind, target, 0.0)
    committed = 0.0
    failures: list[str] = []
    for attempt in range(1, kills + 1):
        value = float(attempt)
        finished = _save_and_kill(kind, target, value, rng.uniform(0.0, duration * 1.2))
        seen = _load_versions(kind, target)
        if isinstance(seen, str):
            failures.append(f"kill {attempt}: load failed: {seen}")
        elif len(seen) != 1 or next(iter(seen)) not in (committed, value):
            failures.append(f"kill {attempt}: mixed versions {sorted(seen)} (old {committed}, new {value})")
        else:
            committed = next(iter(seen))
            if finished:
                assert committed == value
        if failures and stop_on_failure:
            break
    return failures


@pytest.mark.parametrize("store", ["s3", "gcs", "azure", "file"])
def test_sigkill_during_overwrite_leaves_one_whole_version(
    store: str, request: pytest.FixtureRequest, tmp_path: Any
) -> None:
    target = make_target(store, request, tmp_path)
    rng = random.Random(1234)
    failures = _kill_loop("ours", target, kills={"s3": 6}.get(store, 4), rng=rng, stop_on_failure=False)
    assert failures == []


def test_control_fsspec_writer_fails_the_same_test(s3_target: Target) -> None:
    rng = random.Random(99)
    failures = _kill_loop("fsspec", s3_target, kills=15, rng=rng, stop_on_failure=True)
    assert failures, "torch's FsspecWriter survived every kill: the kill test is not biting"
