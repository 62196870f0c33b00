"""Lightning Fabric with FSDP2 on 2 CPU ranks, saving a sharded checkpoint to S3 and resuming.

dcp_cloud's ``FabricModelParallelStrategy`` is Lightning's ``ModelParallelStrategy`` whose
``fabric.save``/``fabric.load`` also take cloud URLs: the shards go through
``CloudStorageWriter``, Lightning's ``meta.pt`` beside them. Local paths behave as in Lightning.

By default it starts a local S3 server (moto) on 127.0.0.1; pass --url for a real bucket, with
credentials from the standard AWS environment. Needs ``pip install "dcp-cloud[lightning]"``.

    python examples/lightning_fabric.py
    python examples/lightning_fabric.py --url s3://my-bucket/fabric-demo/step-4
"""

from __future__ import annotations

import argparse
import os
import warnings
from contextlib import ExitStack
from typing import Any

import lightning as L
import torch
from torch import nn
from torch.distributed.fsdp import fully_shard

from dcp_cloud.integrations.lightning import FabricModelParallelStrategy

warnings.filterwarnings("ignore")
STEPS = 4
URL_VAR = "DCP_CLOUD_EXAMPLE_URL"  # hands the URL to the rank Fabric starts


def parallelize(model: nn.Module, device_mesh) -> nn.Module:  # type: ignore[no-untyped-def]
    """FSDP2: shard each linear layer, then the whole model, over the data-parallel ranks."""
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=device_mesh["data_parallel"])
    fully_shard(model, mesh=device_mesh["data_parallel"])
    return model


def setup(fabric: L.Fabric, seed: int) -> tuple[Any, Any]:
    torch.manual_seed(seed)
    with fabric.init_module(empty_init=False):
        model = nn.Sequential(nn.Linear(32, 64), nn.ReLU(), nn.Linear(64, 8))
    model = fabric.setup(model)
    return model, fabric.setup_optimizers(torch.optim.AdamW(model.parameters(), lr=1e-2))


def train_step(fabric: L.Fabric, model: Any, optimizer: Any, step: int) -> float:
    g = torch.Generator().manual_seed(step * 100 + fabric.global_rank)  # each rank its own data
    x, y = torch.randn(16, 32, generator=g), torch.randn(16, 8, generator=g)
    loss = nn.functional.mse_loss(model(x), y)
    fabric.backward(loss)
    optimizer.step()
    optimizer.zero_grad()
    return float(loss.item())


def run(url: str) -> None:
    fabric = L.Fabric(
        accelerator="cpu",
        devices=2,
        strategy=FabricModelParallelStrategy(
            parallelize_fn=parallelize, data_parallel_size=2, tensor_parallel_size=1
        ),
    )
    fabric.launch()  # starts rank 1 (this script again); this process is rank 0
    model, optimizer = setup(fabric, seed=0)
    for step in range(STEPS):
        train_step(fabric, model, optimizer, step)
    fabric.save(url, {"model": model, "optimizer": optimizer, "step": STEPS})
    fabric.print(f"saved a sharded checkpoint to {url}")
    expected = train_step(fabric, model, optimizer, STEPS)

    model, optimizer = setup(fabric, seed=1)  # other weights: everything must come from the checkpoint
    state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": 0}
    fabric.load(url, state)
    resumed = train_step(fabric, model, optimizer, state["step"])
    agree = fabric.all_reduce(torch.tensor(float(resumed == expected)), reduce_op="sum")
    fabric.print(f"resumed from step {state['step']}: next loss {resumed:.6f} (uninterrupted {expected:.6f})")
    if int(agree.item()) != fabric.world_size:  # type: ignore[union-attr]
        raise SystemExit("the resumed run differs from the uninterrupted one")
    fabric.print("the resumed run matches the uninterrupted one on every rank")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="checkpoint URL (default: a local S3 server)")
    args = parser.parse_args()
    with ExitStack() as stack:
        url = args.url or os.environ.get(URL_VAR)
        if url is None:  # rank 0 of a default run: start the server the ranks will share
            from dcp_cloud.testing import S3Server

            server = stack.enter_context(S3Server())
            server.create_bucket("demo")
            os.environ.update(server.env)  # AWS_ENDPOINT_URL etc., inherited by rank 1
            url = f"s3://demo/fabric-example/step-{STEPS}"
        os.environ[URL_VAR] = url
        run(url)


if __name__ == "__main__":
    main()
