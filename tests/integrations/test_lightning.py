"""PyTorch Lightning 2.6 (Fabric and Trainer) saving sharded checkpoints to S3 (moto) and resuming.

Two real ranks on CPU with gloo (``tests/integrations/lightning_worker.py``): FSDP2 through
Lightning's ModelParallelStrategy, with dcp_cloud's subclasses. Each scenario trains, saves to
``s3://``, exits; fresh processes start from other weights, load, and must hold the same shards
and compute the same next loss. Credentials and endpoint reach every client (dcp_cloud's, and
the s3fs that Lightning's ModelCheckpoint uses) through the standard ``AWS_*`` variables.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import fsspec
import pytest
import torch

from dcp_cloud import verify_checkpoint
from dcp_cloud.checkpoint.layout import MANIFEST_NAME
from dcp_cloud.testing import S3Server
from dcp_cloud.testing.process import free_port

from ..conftest import BUCKET
from ..helpers import assert_same
from .conftest import require_framework

require_framework("lightning")

ROOT = Path(__file__).resolve().parents[2]
STEPS = 3

pytestmark = pytest.mark.timeout(600)


def _launch(cfg: dict[str, Any], server: S3Server, cwd: Path, world: int = 2) -> list[dict[str, Any]]:
    """Run one phase on ``world`` ranks; each rank's results."""
    out = Path(cfg["out"])
    out.mkdir(parents=True, exist_ok=True)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DCP_CLOUD_"))}
    env.update(server.env)
    env.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(free_port()),
        WORLD_SIZE=str(world),
        NODE_RANK="0",
        PYTHONPATH=str(ROOT),
        PYTHONWARNINGS="ignore",
    )
    command = [sys.executable, "-m", "tests.integrations.lightning_worker", json.dumps(cfg)]
    procs = [
        subprocess.Popen(
            command,
            cwd=cwd,
            env={**env, "LOCAL_RANK": str(rank)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
        )
        for rank in range(world)
    ]
    logs = []
    try:
        for proc in procs:
            logs.append(proc.communicate(timeout=240)[0].decode(errors="replace"))
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    for rank, proc in enumerate(procs):
        err = out / f"rank{rank}.err"
        assert proc.returncode == 0, (
            f"rank {rank} failed:\n{err.read_text() if err.exists() else logs[rank][-4000:]}"
        )
    return [torch.load(out / f"rank{rank}.pt", weights_only=False) for rank in range(world)]


def _s3(server: S3Server) -> fsspec.AbstractFileSystem:
    # a fresh filesystem, without a listing cache: other clients change the bucket between calls
    return fsspec.filesystem(
        "s3", skip_instance_cache=True, use_listings_cache=False, **server.storage_options
    )


def _assert_dcp_cloud_checkpoint(server: S3Server, url: str) -> None:
    fs = _s3(server)
    root = url.removeprefix("s3://")
    names = fs.find(root)
    assert f"{root}/.metadata" in names and f"{root}/meta.pt" in names
    assert any(n.endswith("/" + MANIFEST_NAME) for n in names), "not written by dcp_cloud"
    report = verify_checkpoint(url, storage_options=server.storage_options)
    assert report.ok, report


@pytest.mark.slow
def test_fabric_sharded_checkpoint_on_s3_resumes(s3_server: S3Server, tmp_path: Path) -> None:
    url = f"s3://{BUCKET}/lightning-{uuid.uuid4().hex[:10]}/fabric/step-{STEPS}"
    base = {"mode": "fabric", "url": url, "steps": STEPS}
    saved = _launch({**base, "phase": "save", "out": str(tmp_path / "save")}, s3_server, tmp_path)
    _assert_dcp_cloud_checkpoint(s3_server, url)
    assert not (tmp_path / "s3:").exists(), "Lightning wrote the checkpoint to a local folder"

    resumed = _launch({**base, "phase": "resume", "out": str(tmp_path / "resume")}, s3_server, tmp_path)
    for rank, (before, after) in enumerate(zip(saved, resumed)):
        assert after["step"] == STEPS, f"rank {rank}: meta.pt state not restored"
        assert after["remainder"] == {"note": "dcp_cloud"}
        assert_same(before["model"], after["model"], f"rank{rank}.model")
        assert_same(before["optimizer"], after["optimizer"], f"rank{rank}.optimizer")
        assert after["next_loss"] == before["next_loss"], f"rank {rank}: next loss differs"
    # the ranks hold different shards: the checkpoint is really sharded
    first = next(iter(saved[0]["model"]))
    assert not torch.equal(saved[0]["model"][first], saved[1]["model"][first])


@pytest.mark.slow
def test_trainer_model_checkpoint_on_s3_resumes(s3_server: S3Server, tmp_path: Path) -> None:
    folder = f"s3://{BUCKET}/lightning-{uuid.uuid4().hex[:10]}/trainer"
    base = {"mode": "trainer", "dir": folder, "steps": STEPS}
    saved = _launch({**base, "phase": "save", "out": str(tmp_path / "save")}, s3_server, tmp_path)
    first_ckpt = f"{folder}/epoch=0-step={STEPS}.ckpt"
    second_ckpt = f"{folder}/epoch=1-step={2 * STEPS}.ckpt"
    assert saved[0]["last_saved"] == second_ckpt
    assert sorted(_s3(s3_server).ls(folder.removeprefix("s3://"))) == [
        c.removeprefix("s3://") for c in (first_ckpt, second_ckpt)
    ]
    _assert_dcp_cloud_checkpoint(s3_server, first_ckpt)
    assert not (tmp_path / "s3:").exists()

    resumed = _launch(
        {**base, "phase": "resume", "ckpt": first_ckpt, "out": str(tmp_path / "resume")}, s3_server, tmp_path
    )
    for rank, (before, after) in enumerate(zip(saved, resumed)):
        assert after["global_step"] == before["global_step"] == STEPS
        assert_same(before["model"], after["model"], f"rank{rank}.model")
        assert_same(before["optimizer"], after["optimizer"], f"rank{rank}.optimizer")
        assert after["next_loss"] == before["next_loss"], f"rank {rank}: next loss differs"


@pytest.mark.slow
def test_lightnings_own_strategy_turns_an_s3_url_into_a_local_folder(
    s3_server: S3Server, tmp_path: Path
) -> None:
    """Why the strategies exist: install() alone cannot help Lightning, which makes the URL a
    pathlib.Path ('s3:/bucket/...') before DCP sees it. If this starts failing, Lightning passes
    URLs through and install() may be enough."""
    prefix = f"lightning-{uuid.uuid4().hex[:10]}"
    url = f"s3://{BUCKET}/{prefix}/plain"
    [result] = _launch(
        {"mode": "plain", "url": url, "out": str(tmp_path / "out")}, s3_server, tmp_path, world=1
    )
    assert "s3:" in result["cwd_entries"]
    assert (tmp_path / "s3:" / BUCKET / prefix / "plain" / ".metadata").is_file()
    assert not _s3(s3_server).exists(f"{BUCKET}/{prefix}")


@pytest.mark.slow
def test_fabric_example_runs_as_documented() -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "DCP_CLOUD_", "LOCAL_RANK"))}
    done = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "lightning_fabric.py")],
        capture_output=True,
        text=True,
        timeout=300,
        cwd=ROOT,
        env=env,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert f"resumed from step {4}" in done.stdout
    assert "the resumed run matches the uninterrupted one on every rank" in done.stdout


def test_checkpoint_layout_and_removal_on_s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch) -> None:
    """One process, no training: the layout helpers and the Trainer strategy's removal, which
    uncommits first and then lets Lightning's fsspec filesystem delete the folder."""
    from dcp_cloud.integrations.lightning import LightningCheckpoints, TrainerModelParallelStrategy

    for name, value in s3_server.env.items():  # Lightning's own s3fs reads the standard variables
        monkeypatch.setenv(name, value)
    options = {"storage_options": s3_server.storage_options}
    checkpoints = LightningCheckpoints(options)
    url = f"s3://{BUCKET}/lightning-{uuid.uuid4().hex[:10]}/epoch=0-step=1.ckpt"
    assert not checkpoints.exists(url)
    with pytest.raises(FileNotFoundError, match="no Lightning distributed checkpoint"):
        checkpoints.require(url)
    tensors = {"state_dict": {"w": torch.arange(6.0)}}
    checkpoints.save(url, tensors, {"epoch": 0, "global_step": 1}, rank=0)
    assert checkpoints.exists(url)
    assert checkpoints.load_meta(url, weights_only=True) == {"epoch": 0, "global_step": 1}
    _assert_dcp_cloud_checkpoint(s3_server, url)

    strategy = TrainerModelParallelStrategy(checkpoint_options=options)
    strategy.remove_checkpoint(url)
    assert not checkpoints.exists(url)
    assert not _s3(s3_server).exists(url.removeprefix("s3://"))
    with pytest.raises(TypeError, match="unknown option"):
        LightningCheckpoints({"part_sise": 1})


def test_a_missing_framework_skips_locally_and_fails_in_ci(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CI", raising=False)
    with pytest.raises(pytest.skip.Exception):
        require_framework("dcp_cloud_no_such_framework")
    monkeypatch.setenv("CI", "true")
    with pytest.raises(ImportError):
        require_framework("dcp_cloud_no_such_framework")


def test_modes_outside_the_cloud_scope_are_refused_with_what_to_do(s3_server: S3Server) -> None:
    """Full (non-distributed) checkpoints, per-call storage_options, Fabric's filter and loading
    into a bare module are refused at a cloud URL, before anything is written."""
    from dcp_cloud.integrations.lightning import FabricModelParallelStrategy, TrainerModelParallelStrategy

    options = {"storage_options": s3_server.storage_options}
    prefix = f"{BUCKET}/lightning-{uuid.uuid4().hex[:10]}"
    url = f"s3://{prefix}/epoch=0-step=1.ckpt"
    full = TrainerModelParallelStrategy(save_distributed_checkpoint=False, checkpoint_options=options)
    with pytest.raises(NotImplementedError, match="only distributed checkpoints"):
        full.save_checkpoint({"epoch": 0}, url)
    trainer = TrainerModelParallelStrategy(checkpoint_options=options)
    with pytest.raises(NotImplementedError, match="set them in checkpoint_options"):
        trainer.save_checkpoint({"epoch": 0}, url, storage_options={"anon": True})
    fabric = FabricModelParallelStrategy(lambda module, mesh: module, checkpoint_options=options)
    with pytest.raises(NotImplementedError, match="without storage_options or filter"):
        fabric.save_checkpoint(url, {"step": 1}, filter={"step": lambda k, v: True})
    with pytest.raises(NotImplementedError, match=r"fabric\.load\(url, \{'model': model"):
        fabric.load_checkpoint(url, torch.nn.Linear(2, 2))
    assert not _s3(s3_server).exists(prefix)  # nothing was written
