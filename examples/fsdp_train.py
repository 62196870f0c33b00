"""Train a small transformer with FSDP2, checkpoint it to S3 with dcp_cloud, crash, and resume.

    python examples/fsdp_train.py                  # the whole demo on a local S3 server
    python examples/fsdp_train.py --url s3://my-bucket/runs/demo   # on a real bucket

The demo runs ``torchrun --nproc-per-node 2`` twice: the first run checkpoints every 3 steps and
dies abruptly at step 8 (os._exit, as a killed node would); the second resumes from the last
committed checkpoint (step 6) and trains on. The losses of both runs are printed side by side
with an uninterrupted reference run: after the resume they are the same.

To run one training job yourself (any launcher works):

    torchrun --nproc-per-node 2 examples/fsdp_train.py --worker --url s3://bucket/run --steps 12
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import warnings
from contextlib import ExitStack
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_state_dict, set_state_dict
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard

from dcp_cloud import CloudStorageReader, CloudStorageWriter

warnings.filterwarnings("ignore", category=FutureWarning)
VOCAB, WIDTH, SEQ, BATCH = 512, 128, 32, 8


class TinyLM(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(VOCAB, WIDTH)
        self.blocks = nn.ModuleList(
            nn.TransformerEncoderLayer(
                WIDTH, nhead=4, dim_feedforward=4 * WIDTH, dropout=0.0, batch_first=True
            )
            for _ in range(2)
        )
        self.head = nn.Linear(WIDTH, VOCAB)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        x = self.embed(tokens)
        for block in self.blocks:
            x = block(x)
        return self.head(x)


class TrainState:
    """What a checkpoint holds: model and optimizer (sharded) and the step (Stateful)."""

    def __init__(self, model: nn.Module, optimizer: torch.optim.Optimizer) -> None:
        self.model, self.optimizer, self.step = model, optimizer, 0

    def state_dict(self) -> dict[str, Any]:
        model_sd, optim_sd = get_state_dict(self.model, self.optimizer)
        return {"model": model_sd, "optim": optim_sd, "step": self.step}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        set_state_dict(
            self.model, self.optimizer, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )
        self.step = state["step"]


def batch(step: int) -> torch.Tensor:
    """The same batch for a given step in every run, so resumed and reference runs match."""
    return torch.randint(0, VOCAB, (BATCH, SEQ), generator=torch.Generator().manual_seed(1000 + step))


def worker(args: argparse.Namespace) -> None:
    dist.init_process_group("gloo")
    torch.manual_seed(0)
    torch.set_num_threads(1)
    mesh = init_device_mesh("cpu", (dist.get_world_size(),))
    model = TinyLM()
    for block in model.blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    train = TrainState(model, optimizer)
    options = json.loads(args.storage_options)
    url = f"{args.url}/latest"  # overwritten atomically every --every steps

    reader = CloudStorageReader(url, storage_options=options)
    committed = [reader.store.run(reader.store.exists(".metadata")) if dist.get_rank() == 0 else None]
    dist.broadcast_object_list(committed, src=0)  # one request, from rank 0 only
    if committed[0]:
        dcp.load({"train": train}, storage_reader=reader)
        if dist.get_rank() == 0:
            print(f"resumed from step {train.step}", flush=True)
    elif dist.get_rank() == 0:
        print("no checkpoint yet: starting at step 0", flush=True)

    writer = CloudStorageWriter(url, storage_options=options)
    losses = {}
    while train.step < args.steps:
        tokens = batch(train.step)
        logits = model(tokens)
        loss = nn.functional.cross_entropy(logits.reshape(-1, VOCAB), tokens.reshape(-1))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        train.step += 1
        losses[train.step] = round(loss.item(), 6)
        if dist.get_rank() == 0:
            print(f"step {train.step:3d} loss {loss.item():.6f}", flush=True)
        if train.step % args.every == 0:
            dcp.save({"train": train}, storage_writer=writer)
            if dist.get_rank() == 0:
                print(f"  checkpoint at step {train.step}: {writer.last_stats.summary()}", flush=True)
        if train.step == args.crash_at:
            print(f"rank {dist.get_rank()}: crashing at step {train.step}", flush=True)
            os._exit(1)  # no cleanup, like a lost node
    if dist.get_rank() == 0 and args.losses:
        Path(args.losses).write_text(json.dumps(losses))
    dist.barrier()
    dist.destroy_process_group()


def torchrun(url: str, options: dict[str, Any], *extra: str) -> subprocess.CompletedProcess[str]:
    command = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--standalone",
        "--nproc-per-node",
        "2",
        __file__,
        "--worker",
        "--url",
        url,
        "--storage-options",
        json.dumps(options),
        *extra,
    ]
    print("$", " ".join(command[:6]), "examples/fsdp_train.py --worker", " ".join(extra), flush=True)
    return subprocess.run(command, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})


def demo(args: argparse.Namespace) -> None:
    with ExitStack() as stack:
        options: dict[str, Any] = {}
        url = args.url
        if url is None:
            from dcp_cloud.testing import S3Server

            server = stack.enter_context(S3Server())
            server.create_bucket("fsdp-demo")
            options, url = server.storage_options, "s3://fsdp-demo/run1"
            print(f"local S3 server on {server.endpoint_url}")
        work = Path(stack.enter_context(tempfile.TemporaryDirectory()))
        steps = str(args.steps)
        crashed = torchrun(url, options, "--steps", steps, "--crash-at", "8")
        print(f"first run exited with code {crashed.returncode} (crashed on purpose)\n")
        resumed = torchrun(url, options, "--steps", steps, "--losses", str(work / "resumed.json"))
        if resumed.returncode != 0:
            raise SystemExit("the resumed run failed")
        reference = torchrun(
            f"{url}-reference", options, "--steps", steps, "--losses", str(work / "ref.json")
        )
        if reference.returncode != 0:
            raise SystemExit("the reference run failed")
        after = json.loads((work / "resumed.json").read_text())
        ref = json.loads((work / "ref.json").read_text())
        print("\nstep  resumed   uninterrupted")
        for step in sorted(after, key=int):
            print(f"{int(step):4d}  {after[step]:.6f}  {ref[step]:.6f}")
        same = all(after[s] == ref[s] for s in after)
        print("the resumed run matches the uninterrupted one" if same else "the runs differ")
        if not same:
            raise SystemExit(1)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="checkpoint prefix (default: a local S3 server started here)")
    parser.add_argument("--worker", action="store_true", help="run one training job (under torchrun)")
    parser.add_argument("--storage-options", default="{}", help="JSON passed to the fsspec filesystem")
    parser.add_argument("--steps", type=int, default=12)
    parser.add_argument("--every", type=int, default=3, help="checkpoint every N steps")
    parser.add_argument("--crash-at", type=int, default=None, help="exit abruptly after this step")
    parser.add_argument("--losses", help="write {step: loss} of this run to this JSON file")
    args = parser.parse_args()
    if args.worker:
        worker(args)
    else:
        demo(args)


if __name__ == "__main__":
    main()
