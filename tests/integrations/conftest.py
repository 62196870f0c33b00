"""Framework integration tests: each needs its framework installed (``pip install
"dcp-cloud[test-integrations]"``). Where one is missing its tests skip, except in CI (``CI`` set),
where a missing framework is an error, as for Azurite in tests/conftest.py."""

from __future__ import annotations

import importlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
import torch

ROOT = Path(__file__).resolve().parents[2]


def require_framework(name: str) -> ModuleType:
    """``import name``; skip the calling test module when that fails, unless in CI."""
    if os.environ.get("CI"):
        return importlib.import_module(name)
    return pytest.importorskip(
        name, reason=f"{name} is not installed (pip install 'dcp-cloud[test-integrations]')"
    )


def launch_ranks(
    module: str, world: int, cfg: dict[str, Any], env: dict[str, str], timeout: float = 150.0
) -> list[dict[str, Any]]:
    """Run one phase of the worker ``module`` (``python -m module CONFIG RANK``) on ``world``
    processes; each rank's report (``rank<r>.pt`` in ``cfg["out"]``), or an AssertionError with
    the ranks' errors."""
    out = Path(cfg["out"])
    config = out / "config.json"
    config.write_text(json.dumps(cfg))
    procs = [
        subprocess.Popen(
            [sys.executable, "-m", module, str(config), str(rank)],
            cwd=ROOT,
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    deadline = time.monotonic() + timeout
    logs = []
    for proc in procs:
        try:
            stdout, _ = proc.communicate(timeout=max(1.0, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            for p in procs:
                p.kill()
            stdout, _ = proc.communicate()
        logs.append(stdout.decode(errors="replace"))
    errors = [(out / f"rank{r}.err").read_text() for r in range(world) if (out / f"rank{r}.err").exists()]
    codes = [p.returncode for p in procs]
    if errors or any(codes):
        raise AssertionError(
            f"phase {cfg['phase']} failed (exit codes {codes}):\n" + "\n".join(errors or logs[-1:])
        )
    return [torch.load(out / f"rank{r}.pt", weights_only=False) for r in range(world)]


def assert_same_tensors(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor], what: str) -> None:
    """The same keys, and bitwise equal tensors under each."""
    assert a.keys() == b.keys(), what
    for key in a:
        assert torch.equal(a[key], b[key]), f"{what}: {key} differs"
