"""torchtitan 0.3's DCP CheckpointManager on the S3 server, with ``dcp_cloud.install()``.

Two real ranks on gloo (CPU) train a small FSDP2 (``fully_shard``) model with torchtitan's own
OptimizersContainer, LRSchedulersContainer and CheckpointManager, saving to an ``s3://`` folder
every 2 steps with ``keep_latest_k=2``; they record the loss and the parameters of the step after
the last save and exit. Two fresh processes build the model from another seed, let
``CheckpointManager.load()`` find and load the newest step, and must reproduce that loss and
those parameters bit for bit (which needs the model shards, the Adam moments, the LR schedule and
the data position back). Each async mode of torchtitan runs: ``disabled`` (``dcp.save``),
``async`` (``dcp.async_save``, thread) and ``async_with_pinned_mem`` (``dcp.async_save`` in
torch's checkpoint process with a ``DefaultStager``; on CPU without pinned memory and non-blocking
copies, which need an accelerator, see ``_run_mode``). Every saved step must be a committed
dcp_cloud checkpoint (manifest with checksums), and torchtitan's own purge must have deleted the
oldest through fsspec.

Why not torchtitan's Trainer: on a CPU-only torch it picks ``device_type = "cuda"``
(``torchtitan/tools/utils.py``: ``_get_available_device_type() or "cuda"``) and calls
``torch.cuda.set_device`` (``torchtitan/trainer.py``, ``device_module.set_device``), and it needs
a tokenizer and a dataset. The CheckpointManager it builds is the one driven here, with the same
calls the Trainer makes (``save(step)``, ``maybe_wait_for_staging``, ``load(step=-1)``, ``close``).

Run as ``python -m tests.integrations.test_torchtitan CONFIG RANK`` it is one rank of a job.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any, cast

import pytest
import torch

from .conftest import assert_same_tensors, launch_ranks, require_framework

ROOT = Path(__file__).resolve().parents[2]
STEPS = 8  # saves at 2, 4, 6, 8 with keep_latest_k=2
INTERVAL = 2
WORLD = 2


# -- one rank ------------------------------------------------------------------------------------


class DataPosition:
    """A stand-in dataloader: a position in a deterministic stream of batches (Stateful)."""

    def __init__(self) -> None:
        self.pos = 0

    def batch(self, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(10_000 * rank + self.pos)
        self.pos += 1
        x = torch.randn(8, 16, generator=g)
        return x, torch.sin(x[:, :8] * 3.0)

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = int(state["pos"])


class TrainState:
    """The step counter torchtitan's Trainer keeps under ``train_state`` (Stateful)."""

    def __init__(self) -> None:
        self.step = 0

    def state_dict(self) -> dict[str, Any]:
        return {"step": torch.tensor(self.step)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.step = int(state["step"])


def _full_params(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Unsharded parameters (collective: every rank must call it)."""
    from torch.distributed.tensor import DTensor

    return {name: cast(DTensor, p).full_tensor().detach().clone() for name, p in model.named_parameters()}


def _run_mode(cfg: dict[str, Any], mode: str, rank: int, mesh: Any) -> dict[str, Any]:
    """One training run (or its resume) with torchtitan's CheckpointManager in ``async_mode=mode``."""
    import torch.distributed as dist
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

    torch.manual_seed(cfg["seed"])
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.Tanh(), torch.nn.Linear(32, 8))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    optimizers = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 0.05})],
        implementation="for-loop",
    ).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=3, decay_ratio=0.5).build(
        optimizers=optimizers, training_steps=20
    )
    data, train_state = DataPosition(), TrainState()
    checkpointer = CheckpointManager.Config(
        enable=True,
        folder=cfg["folders"][mode],
        interval=INTERVAL,
        async_mode=mode,
        keep_latest_k=2,
        last_save_model_only=False,
    ).build(
        dataloader=data,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={"train_state": train_state},
        sd_adapter=None,
    )

    if mode == "async_with_pinned_mem" and not torch.accelerator.is_available():
        # torchtitan builds DefaultStager(StagingOptions(True, True, True, True)) on its first save
        # unless it has one (checkpointer/dcp.py, ``if self.stager is None``); pinned memory and
        # non-blocking copies need an accelerator (torch staging.py raises "Non-blocking copy
        # requires that the current accelerator is available"). On CPU it gets the same stager
        # without those two; the rest of the mode runs as on GPU: async staging in a thread,
        # shared memory, the upload in torch's checkpoint process, an AsyncSaveResponse.
        from torch.distributed.checkpoint.staging import DefaultStager, StagingOptions

        checkpointer.stager = DefaultStager(
            StagingOptions(
                use_pinned_memory=False,
                use_shared_memory=True,
                use_async_staging=True,
                use_non_blocking_copy=False,
            )
        )

    def train_step() -> float:
        x, y = data.batch(rank)
        optimizers.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizers.step()
        schedulers.step()
        train_state.step += 1
        # every rank's loss, so both ranks' batches count
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach())
        return float(sum(losses))

    out: dict[str, Any] = {}
    if cfg["phase"] == "train":
        out["found_before"] = checkpointer.load(step=-1)  # an empty folder: a fresh start
        for _ in range(STEPS):
            train_step()
            checkpointer.save(train_state.step)
            checkpointer.maybe_wait_for_staging()
        checkpointer.maybe_wait_for_saving()
        out["params_saved"] = _full_params(model)
        out["next_loss"] = train_step()
        out["params_next"] = _full_params(model)
    else:
        out["params_before"] = _full_params(model)
        out["found"] = checkpointer.load(step=-1)
        out["step"] = train_state.step
        out["pos"] = data.pos
        out["params_loaded"] = _full_params(model)
        out["next_loss"] = train_step()
        out["params_next"] = _full_params(model)
    checkpointer.close()  # joins the purge thread: every purge it queued has run
    dist.barrier()
    return out


def _run_rank(cfg: dict[str, Any], rank: int) -> dict[str, Any]:
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    import dcp_cloud

    dist.init_process_group("gloo", init_method=f"file://{cfg['store']}", rank=rank, world_size=WORLD)
    dcp_cloud.install(storage_options=cfg["storage_options"])
    mesh = init_device_mesh("cpu", (WORLD,))
    out = {mode: _run_mode(cfg, mode, rank, mesh) for mode in cfg["folders"]}
    dist.destroy_process_group()
    return out


def _worker_main(config_path: str, rank: int) -> None:
    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["out"])
    try:
        torch.save(_run_rank(cfg, rank), out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.exit(1)


# -- the parent ----------------------------------------------------------------------------------


def _launch(cfg: dict[str, Any], env: dict[str, str]) -> list[dict[str, Any]]:
    out = Path(cfg["out"])
    out.mkdir(parents=True)
    return launch_ranks(
        "tests.integrations.test_torchtitan", WORLD, {**cfg, "store": str(out / "pg-store")}, env
    )


MODES = ("disabled", "async", "async_with_pinned_mem")


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_torchtitan_checkpoint_manager_saves_purges_and_resumes_on_s3(s3_server: Any, tmp_path: Path) -> None:
    """Each of torchtitan's async modes, in its own folder, in the same two jobs (train, resume)."""
    require_framework("torchtitan")
    from dcp_cloud import list_checkpoints, verify_checkpoint

    from ..conftest import BUCKET

    run = f"s3://{BUCKET}/titan-{uuid.uuid4().hex[:10]}"
    folders = {mode: f"{run}/{mode}/checkpoint" for mode in MODES}
    env = {
        **os.environ,
        # torchtitan lists and purges the folder through its own fsspec filesystem, built with no
        # options: the environment points s3fs at the server (install() keeps its listings fresh)
        **s3_server.env,
        "PYTHONPATH": str(ROOT),
        "OMP_NUM_THREADS": "1",
    }
    common = {"folders": folders, "storage_options": s3_server.storage_options}

    trained = _launch({**common, "phase": "train", "seed": 0, "out": str(tmp_path / "train")}, env)
    for mode, folder in folders.items():
        assert trained[0][mode]["found_before"] is False, mode
        # keep_latest_k=2: torchtitan lists step-* right after starting a save and queues all but
        # the newest 2 for deletion (fs.rm through fsspec). A synchronous save is complete by then;
        # an async one may not have written any object yet, so its listing can miss the newest
        # step and keep one more (step-4 here). Step 2 is gone either way: the save of step 8
        # first waits for step 6's upload, so that listing sees steps 2, 4 and 6.
        found = {c.path: c for c in list_checkpoints(folder, storage_options=s3_server.storage_options)}
        if mode == "disabled":
            assert sorted(found) == ["step-6", "step-8"], (mode, found)
        else:
            assert {"step-6", "step-8"} <= set(found) <= {"step-4", "step-6", "step-8"}, (mode, found)
        for name, summary in found.items():
            assert summary.committed, (mode, name)
            report = verify_checkpoint(f"{folder}/{name}", storage_options=s3_server.storage_options)
            # a manifest with checksums: CloudStorageWriter wrote it, not torch's FsspecWriter
            assert report.has_manifest and report.items_checksummed > 0 and not report.problems, report

    resumed = _launch({**common, "phase": "resume", "seed": 1234, "out": str(tmp_path / "resume")}, env)
    for mode in MODES:
        for rank in range(WORLD):
            res, ref, what = resumed[rank][mode], trained[rank][mode], f"{mode}, rank {rank}"
            assert res["found"] is True, what
            assert res["step"] == STEPS and res["pos"] == STEPS, (what, res["step"], res["pos"])
            assert not torch.equal(res["params_before"]["0.weight"], ref["params_saved"]["0.weight"])
            assert_same_tensors(ref["params_saved"], res["params_loaded"], f"{what}: loaded params")
            assert res["next_loss"] == ref["next_loss"], (what, res["next_loss"], ref["next_loss"])
            # the step after the resume moves the parameters exactly as in the first run: the
            # Adam moments and the LR schedule came back too
            assert_same_tensors(ref["params_next"], res["params_next"], f"{what}: params one step later")


if __name__ == "__main__":
    _worker_main(sys.argv[1], int(sys.argv[2]))
