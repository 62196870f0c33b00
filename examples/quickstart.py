"""Save and load a real model's checkpoint with dcp_cloud.

By default it starts a local S3 server (moto) on 127.0.0.1 and uses it: no cloud account needed.
Pass --url to use a real bucket, with credentials from the standard AWS environment:

    python examples/quickstart.py
    python examples/quickstart.py --url s3://my-bucket/quickstart/step-1
"""

from __future__ import annotations

import argparse
import logging
import warnings
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from dcp_cloud import CloudStorageReader, CloudStorageWriter

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def build_model() -> nn.Module:
    """A small transformer language model (about 20M parameters)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=512, nhead=8, dim_feedforward=2048, batch_first=True)
    return nn.Sequential(
        nn.Embedding(8000, 512), nn.TransformerEncoder(layer, num_layers=4), nn.Linear(512, 8000)
    )


def train_step(model: nn.Module, optimizer: torch.optim.Optimizer) -> float:
    tokens = torch.randint(0, 8000, (4, 64))
    logits = model(tokens)
    loss = nn.functional.cross_entropy(logits.reshape(-1, 8000), tokens.reshape(-1))
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
    return loss.item()


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="checkpoint URL (default: a local S3 server started here)")
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    with ExitStack() as stack:
        storage_options: dict[str, Any] = {}
        url = args.url
        if url is None:
            from dcp_cloud.testing import S3Server

            server = stack.enter_context(S3Server())
            server.create_bucket("quickstart")
            storage_options = server.storage_options
            url = "s3://quickstart/run1/step-1"
            print(f"local S3 server on {server.endpoint_url}")

        model = build_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        train_step(model, optimizer)
        state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 1}

        writer = CloudStorageWriter(url, storage_options=storage_options)
        dcp.save(state, storage_writer=writer)

        fresh = build_model()
        fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
        train_step(fresh, fresh_optim)  # materialise optimizer state to load into
        target = {"model": fresh.state_dict(), "optim": fresh_optim.state_dict(), "step": 0}
        reader = CloudStorageReader(url, storage_options=storage_options)
        dcp.load(target, storage_reader=reader)
        fresh.load_state_dict(target["model"])
        fresh_optim.load_state_dict(target["optim"])

        same = all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
        )
        if not same or target["step"] != 1:
            raise SystemExit("loaded checkpoint differs from the saved one")
        print(f"saved and loaded {url}: model and optimizer identical, step {target['step']}")
        print(f"save: {writer.last_stats.gb_per_s:.3f} GB/s, load: {reader.last_stats.gb_per_s:.3f} GB/s")


if __name__ == "__main__":
    main()
