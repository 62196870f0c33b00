"""torchtitan's CheckpointManager saving to and resuming from S3 through dcp_cloud.

``dcp_cloud.install()`` is the only change: torchtitan calls ``dcp.save``/``dcp.async_save``/
``dcp.load`` with ``checkpoint_id="s3://..."``, which then go through dcp_cloud's writer and reader.
torchtitan lists and purges its checkpoint folder (``keep_latest_k``) through its own fsspec
filesystem, built from the URL alone: configure both through the standard environment (AWS_*
variables), and turn that filesystem's listing cache off, because the checkpoints are not written
through it.

A small FSDP2 model trains 6 steps, saving every 2 (keeping 2), and the run stops; a second run
builds everything afresh from another seed, resumes from the newest step and checks that its next
loss is the one the first run computed.

By default it starts a local S3 server (moto) on 127.0.0.1; --url uses a real bucket with
credentials from the standard AWS environment:

    python examples/torchtitan_s3.py
    python examples/torchtitan_s3.py --url s3://my-bucket/runs/titan-demo --async-mode async
"""

from __future__ import annotations

import argparse
import os
import tempfile
import uuid
import warnings
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed as dist

import dcp_cloud

warnings.filterwarnings("ignore", message="torch.distributed is disabled")
STEPS, INTERVAL = 6, 2


class Data:
    """A stand-in dataloader whose position is checkpointed (torchtitan saves it as a Stateful)."""

    def __init__(self) -> None:
        self.pos = 0

    def next(self) -> tuple[torch.Tensor, torch.Tensor]:
        g = torch.Generator().manual_seed(self.pos)
        self.pos += 1
        x = torch.randn(16, 32, generator=g)
        return x, torch.tanh(x[:, :4])

    def state_dict(self) -> dict[str, Any]:
        return {"pos": self.pos}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.pos = state["pos"]


def run(folder: str, async_mode: str, seed: int) -> tuple[int, float]:
    """Build model, optimizer, scheduler and CheckpointManager; resume if the folder has a
    checkpoint, else train and save. Returns (step reached, loss of the next step)."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from torchtitan.components.checkpoint import CheckpointManager
    from torchtitan.components.optimizer.lr_scheduler import LRSchedulersContainer
    from torchtitan.components.optimizer.optimizer import OptimizersContainer, ParamGroupConfig

    torch.manual_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.Tanh(), torch.nn.Linear(64, 4))
    fully_shard(model, mesh=init_device_mesh("cpu", (dist.get_world_size(),)))
    optimizers = OptimizersContainer.Config(
        param_groups=[ParamGroupConfig(pattern=".*", optimizer_name="AdamW", optimizer_kwargs={"lr": 1e-2})],
        implementation="for-loop",
    ).build(model_parts=[model])
    schedulers = LRSchedulersContainer.Config(warmup_steps=2).build(optimizers=optimizers, training_steps=20)
    data = Data()
    checkpointer = CheckpointManager.Config(
        enable=True,
        folder=folder,
        interval=INTERVAL,
        async_mode=async_mode,
        keep_latest_k=2,
        last_save_model_only=False,
    ).build(
        dataloader=data,
        model_parts=[model],
        optimizers=optimizers,
        lr_schedulers=schedulers,
        states={},
        sd_adapter=None,
    )

    def step() -> float:
        x, y = data.next()
        optimizers.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        loss.backward()
        optimizers.step()
        schedulers.step()
        return loss.item()

    if checkpointer.load():  # the newest step-N under the folder
        print(f"resumed from step {data.pos}")
    else:
        for n in range(1, STEPS + 1):
            step()
            checkpointer.save(n)
            checkpointer.maybe_wait_for_staging()
        checkpointer.maybe_wait_for_saving()
    reached, loss = data.pos, step()
    checkpointer.close()
    return reached, loss


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="checkpoint folder (default: a local S3 server started here)")
    parser.add_argument("--async-mode", default="disabled", choices=["disabled", "async"])
    args = parser.parse_args()

    with ExitStack() as stack:
        if args.url is None:
            from dcp_cloud.testing import S3Server

            server = stack.enter_context(S3Server())
            server.create_bucket("examples")
            # endpoint and keys through the standard AWS variables, which both dcp_cloud and
            # torchtitan's own fsspec calls (listing, purging) read
            os.environ.update(server.env)
            args.url = f"s3://examples/titan-{uuid.uuid4().hex[:8]}/checkpoint"
        # the one line torchtitan needs (it also makes torchtitan's own fsspec listings fresh)
        dcp_cloud.install()
        store = os.path.join(tempfile.mkdtemp(), "pg")
        dist.init_process_group("gloo", init_method=f"file://{store}", rank=0, world_size=1)
        try:
            saved_at, expected = run(args.url, args.async_mode, seed=0)
            print(f"run 1 saved steps up to {saved_at} to {args.url}; next loss {expected:.6f}")
            kept = [c.path for c in dcp_cloud.list_checkpoints(args.url)]
            print(f"checkpoints kept: {sorted(kept)}")
            resumed_at, loss = run(args.url, args.async_mode, seed=1)
            print(f"run 2 next loss {loss:.6f}")
            assert resumed_at == saved_at and loss == expected, (resumed_at, loss, expected)
            print("the resumed run matches the first one")
        finally:
            dist.destroy_process_group()


if __name__ == "__main__":
    main()
