"""Export a DCP checkpoint to safetensors (for inference servers, the Hugging Face Hub, ...).

Saves a model with DCP to an object store, converts the checkpoint to one .safetensors file with
``dcp_cloud.tools.convert.to_safetensors``, loads that file with ``safetensors`` and checks that every
tensor matches. The same conversion on the command line:
``dcp-cloud convert s3://bucket/ckpt model.safetensors --format safetensors``.

By default it starts a local S3 server (moto) on 127.0.0.1; --url uses a real bucket with
credentials from the standard AWS environment:

    python examples/export_safetensors.py
    python examples/export_safetensors.py --url s3://my-bucket/exports/ckpt --out model.safetensors
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
import torch.distributed.checkpoint as dcp
from safetensors import safe_open
from safetensors.torch import load_file
from torch import nn

from dcp_cloud import CloudStorageWriter
from dcp_cloud.tools.convert import to_safetensors

warnings.filterwarnings("ignore", message="torch.distributed is disabled")


def build_model() -> nn.Module:
    """A small transformer encoder (about 3M parameters)."""
    torch.manual_seed(0)
    layer = nn.TransformerEncoderLayer(d_model=256, nhead=4, dim_feedforward=1024, batch_first=True)
    return nn.Sequential(nn.Embedding(1000, 256), nn.TransformerEncoder(layer, num_layers=2))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="checkpoint URL (default: a local S3 server started here)")
    parser.add_argument("--out", help="the .safetensors file to write (default: a temporary folder)")
    args = parser.parse_args()

    with ExitStack() as stack:
        options: dict[str, Any] = {}
        url = args.url
        if url is None:
            from dcp_cloud.testing import S3Server

            server = stack.enter_context(S3Server())
            server.create_bucket("examples")
            options = server.storage_options
            url = f"s3://examples/export-{uuid.uuid4().hex[:8]}/step-1"
            print(f"local S3 server on {server.endpoint_url}")
        out = args.out or os.path.join(
            stack.enter_context(tempfile.TemporaryDirectory()), "model.safetensors"
        )

        model = build_model()
        state = {**model.state_dict(), "config": {"d_model": 256, "layers": 2}}
        dcp.save(state, storage_writer=CloudStorageWriter(url, storage_options=options))
        print(f"saved {len(model.state_dict())} tensors with DCP to {url}")

        left_out = to_safetensors(url, out, storage_options=options)
        print(f"wrote {out} ({os.path.getsize(out) / 1e6:.1f} MB); non-tensor values left out: {left_out}")

        tensors = load_file(out)
        expected = model.state_dict()
        assert set(tensors) == set(expected), set(tensors) ^ set(expected)
        for name, tensor in expected.items():
            assert torch.equal(tensors[name], tensor), name
        with safe_open(out, framework="pt") as handle:
            print(f"file metadata: {handle.metadata()}")

        fresh = build_model()
        for parameter in fresh.parameters():
            nn.init.zeros_(parameter)
        fresh.load_state_dict(tensors)
        tokens = torch.randint(0, 1000, (2, 16))
        model.eval()
        fresh.eval()
        with torch.no_grad():
            same = torch.equal(model(tokens), fresh(tokens))
        print(f"loaded {len(tensors)} tensors with safetensors: all equal; same outputs: {same}")


if __name__ == "__main__":
    main()
