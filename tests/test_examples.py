"""The examples run as documented, on their embedded local S3 server."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


def _run(script: str, timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(EXAMPLES / script)],
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=EXAMPLES.parent,
    )


def test_quickstart() -> None:
    result = _run("quickstart.py", 300)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "model and optimizer identical" in result.stdout


@pytest.mark.slow
def test_fsdp_train_crashes_resumes_and_matches_an_uninterrupted_run() -> None:
    result = _run("fsdp_train.py", 480)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "resumed from step 6" in result.stdout
    assert "the resumed run matches the uninterrupted one" in result.stdout


@pytest.mark.slow
def test_torchtitan_example_resumes_and_matches() -> None:
    pytest.importorskip("torchtitan")
    result = _run("torchtitan_s3.py", 300)
    assert result.returncode == 0, (result.stdout + result.stderr)[-3000:]
    assert "resumed from step 6" in result.stdout
    assert "the resumed run matches the first one" in result.stdout
