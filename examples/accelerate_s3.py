"""HF accelerate FSDP (SHARDED_STATE_DICT) checkpoints on S3 through dcp_cloud.

accelerate hard-codes torch's local FileSystemWriter for FSDP sharded states, so instead of
``accelerator.save_state(dir)`` / ``accelerator.load_state(dir)`` this calls
``dcp_accelerate.save_state(accelerator, url)`` / ``dcp_accelerate.load_state(accelerator, url)``.

Two processes train a small FSDP2 model for 3 steps and save; two fresh processes build the model
from another seed, load, and check that their next loss is the one the first run computed.

On a machine without GPUs accelerate never enables FSDP (it falls back to DDP); this demo then sets
the distributed type to FSDP itself so that accelerate's FSDP2 code runs on CPU. On GPUs, launch
it the usual way instead (``accelerate launch --use_fsdp ...``) and drop that part.

By default it starts a local S3 server (moto) on 127.0.0.1; --url uses a real bucket with
credentials from the standard AWS environment:

    python examples/accelerate_s3.py
    python examples/accelerate_s3.py --url s3://my-bucket/runs/accelerate-demo/step-3
"""

from __future__ import annotations

import argparse
import os
import socket
import uuid
from contextlib import ExitStack
from typing import Any

import torch
import torch.multiprocessing as mp

from dcp_cloud.integrations import accelerate as dcp_accelerate

WORLD, STEPS = 2, 3


def worker(rank: int, url: str, options: dict[str, Any], port: int, seed: int, results: Any) -> None:
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, set_seed

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    plugin = FullyShardedDataParallelPlugin(fsdp_version=2, state_dict_type="SHARDED_STATE_DICT")
    accelerator = Accelerator(cpu=not torch.cuda.is_available(), fsdp_plugin=plugin)
    if accelerator.distributed_type == DistributedType.MULTI_CPU:  # CPU demo only, see above
        for shared in (PartialState._shared_state, AcceleratorState._shared_state):
            shared["distributed_type"] = DistributedType.FSDP
        AcceleratorState._shared_state["fsdp_plugin"] = plugin

    set_seed(seed)
    model = torch.nn.Sequential(torch.nn.Linear(32, 64), torch.nn.GELU(), torch.nn.Linear(64, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model, optimizer = accelerator.prepare(model, optimizer)

    def step(n: int) -> float:
        g = torch.Generator().manual_seed(100 * rank + n)
        x = torch.randn(16, 32, generator=g).to(accelerator.device)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), torch.tanh(x[:, :4]))
        accelerator.backward(loss)
        optimizer.step()
        return float(accelerator.reduce(loss.detach(), reduction="sum"))

    if seed == 0:
        for n in range(STEPS):
            step(n)
        dcp_accelerate.save_state(accelerator, url, storage_options=options)
    else:
        dcp_accelerate.load_state(accelerator, url, storage_options=options)
    loss = step(STEPS)
    if accelerator.is_main_process:
        results.put(loss)
    accelerator.end_training()


def run(url: str, options: dict[str, Any], seed: int) -> float:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    results = mp.get_context("spawn").SimpleQueue()
    mp.spawn(worker, args=(url, options, port, seed, results), nprocs=WORLD)
    return float(results.get())


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="checkpoint URL (default: a local S3 server started here)")
    args = parser.parse_args()
    os.environ.setdefault("OMP_NUM_THREADS", "1")

    with ExitStack() as stack:
        options: dict[str, Any] = {}
        if args.url is None:
            from dcp_cloud.testing import S3Server

            server = stack.enter_context(S3Server())
            server.create_bucket("examples")
            options = server.storage_options
            args.url = f"s3://examples/accelerate-{uuid.uuid4().hex[:8]}/step-{STEPS}"

        expected = run(args.url, options, seed=0)
        print(f"run 1 saved to {args.url}; next loss {expected:.6f}")
        loss = run(args.url, options, seed=1)
        print(f"run 2 loaded it; next loss {loss:.6f}")
        assert loss == expected, (loss, expected)
        print("the resumed run matches the first one")


if __name__ == "__main__":
    main()
