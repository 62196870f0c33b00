"""Multi-rank shared-read scenarios for tests/test_shared_reads.py and benchmarks/shared_reads.py.

Same pattern as tests/dist_worker.py (whose ``main`` and ``Job`` this reuses): the parent calls
:func:`launch`, which starts one ``python -m tests.share_worker CFG RANK`` process per rank; each
rank joins a gloo group, runs ``cfg["steps"]`` (saves and loads, each followed by a marker
request in the S3 server's log) and writes what it saw to ``<out>/rank<R>.pt``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import torch

from tests import dist_worker as dw

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# States: "rep" (replicated plain tensors, as data parallelism keeps them), "dt" (DTensors
# sharded on dim 0), "mix" (both). The same on every rank, so the parent can rebuild them.


def full_state(kind: str, rep_tensors: int = 16, rep_rows: int = 192, dt_rows: int = 96) -> dict[str, Any]:
    """The global tensors and values of a state of ``kind``."""
    g = torch.Generator().manual_seed(7)
    out: dict[str, Any] = {}
    if kind in ("rep", "mix"):
        # rep_rows x 1024 float32: 768 KiB each by default
        out.update({f"rep.w{i}": torch.randn(rep_rows, 1024, generator=g) for i in range(rep_tensors)})
        out.update({f"rep.b{i}": torch.randn(17, generator=g) for i in range(6)})
        out["rep.step"] = 42
        out["rep.cfg"] = {"lr": 0.1, "name": "run"}
    if kind in ("dt", "mix"):
        out.update({f"dt.d{i}": torch.randn(dt_rows, 1024, generator=g) for i in range(4)})
        out["dt.h"] = torch.randn(9, 64, generator=g).to(torch.bfloat16)  # uneven; empty on 4
    return out


def is_sharded(key: str) -> bool:
    return key.startswith("dt.")


def make_state(kind: str, mesh: Any, zeros: bool = False, **sizes: Any) -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    out: dict[str, Any] = {}
    for key, value in full_state(kind, **sizes).items():
        if isinstance(value, torch.Tensor):
            value = torch.zeros_like(value) if zeros else value.clone()
            out[key] = distribute_tensor(value, mesh, [Shard(0)]) if is_sharded(key) else value
        else:
            out[key] = _blank(value) if zeros else value
    return out


def _blank(value: Any) -> Any:
    """A value of the same structure (DCP flattens dicts), holding other leaves."""
    if isinstance(value, dict):
        return {k: _blank(v) for k, v in value.items()}
    return {int: -1, float: -1.0, str: ""}.get(type(value), None)


def describe(state: dict[str, Any]) -> dict[str, Any]:
    """Full tensors (DTensors gathered: a collective) and values, as loaded."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if hasattr(value, "full_tensor"):
            out[key] = value.full_tensor().clone()
        elif isinstance(value, torch.Tensor):
            out[key] = value.clone()
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# The scenario


def _inject(step: dict[str, Any], rank: int) -> Any:
    """Make this rank's shared fetch fail (``fail``) or die (``kill``), its mapping of a peer's
    shared-memory block fail (``map``), or its read_data fail before it shares anything
    (``before_read``), when the step asks; returns the undo."""
    from dcp_cloud.load import share_shm
    from dcp_cloud.load.fetcher import Fetcher
    from dcp_cloud.load.reader import CloudStorageReader

    mode = step.get("fail_mode")
    if mode is None or step.get("fail_rank") != rank:
        return lambda: None
    if mode == "map":
        original_open = share_shm.open_block

        def refuse(name: str, size: int, owner: int) -> Any:
            raise share_shm.SharedBlockError(f"injected mapping failure on rank {rank}")

        share_shm.open_block = refuse  # type: ignore[assignment]
        return lambda: setattr(share_shm, "open_block", original_open)
    if mode == "before_read":
        original_read = CloudStorageReader.read_data

        def fail_early(self: Any, plan: Any, planner: Any) -> Any:
            raise RuntimeError(f"injected failure before reading on rank {rank}")

        CloudStorageReader.read_data = fail_early  # type: ignore[method-assign]
        return lambda: setattr(CloudStorageReader, "read_data", original_read)
    original = Fetcher.fetch_into

    def broken(self: Any, jobs: Any) -> int:
        if mode == "kill":
            os.kill(os.getpid(), signal.SIGKILL)
        raise RuntimeError(f"injected fetch failure on rank {rank}")

    Fetcher.fetch_into = broken  # type: ignore[method-assign]
    return lambda: setattr(Fetcher, "fetch_into", original)


def _received(reader: Any) -> int:
    """Bytes this rank received from its peers in its last load (0 without sharing)."""
    share = reader.last_share
    return int(share.received) if share is not None else 0


def _per_rank(value: Any, rank: int) -> Any:
    """A step's setting for this rank: one for all, or a list with one per rank."""
    return value[rank] if isinstance(value, list) else value


def shm_blocks() -> list[str]:
    """The shared-memory blocks of shared reads now in the block directory (of any load)."""
    from dcp_cloud.load.share_shm import PREFIX, shm_dir

    try:
        return sorted(name for name in os.listdir(shm_dir()) if name.startswith(PREFIX))
    except OSError:
        return []


def scenario_share(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """Run cfg["steps"]: {"op": "save"|"load", "name", "url", "kind", ...}."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    from dcp_cloud import CloudStorageReader, CloudStorageWriter

    out: dict[str, Any] = {}
    for step in cfg["steps"]:
        options = dict(cfg["storage_options"])
        sizes = step.get("sizes", {})
        if step.get("endpoint"):
            options["endpoint_url"] = step["endpoint"]
        result: dict[str, Any] = {}
        if step["op"] == "save":
            writer = CloudStorageWriter(step["url"], storage_options=options)
            dcp.save(make_state(step["kind"], mesh, **sizes), storage_writer=writer)
        elif step["op"] == "fsspec_save":
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

            dcp.save(
                make_state(step["kind"], mesh, **sizes), storage_writer=FsspecWriter(step["url"], **options)
            )
        elif step["op"] == "fsspec_load":
            from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

            target = make_state(step["kind"], mesh, zeros=True, **sizes)
            started = time.monotonic()
            dcp.load(target, storage_reader=FsspecReader(step["url"], **options))
            result["seconds"] = time.monotonic() - started
            result["state"] = describe(target) if step.get("report", True) else None
        else:
            if step.get("host_ids"):
                os.environ["DCP_CLOUD_HOST_ID"] = step["host_ids"][rank]
            undo = _inject(step, rank)
            reader = CloudStorageReader(
                step["url"],
                storage_options=options,
                share_reads=_per_rank(step.get("share_reads", "job"), rank),
                share_timeout=step.get("share_timeout", 60.0),
                **step.get("reader", {}),
            )
            target = make_state(step["kind"], mesh, zeros=True, **sizes)
            started = time.monotonic()
            try:
                dcp.load(target, storage_reader=reader)
                result["error"] = None
            except BaseException as exc:  # CheckpointException is a BaseException
                result["error"] = dw._failure(exc)
            finally:
                undo()
            result["seconds"] = time.monotonic() - started
            if result["error"] is None:
                result["state"] = describe(target) if step.get("report", True) else None
                stats = reader.last_stats
                result["bytes"] = stats.bytes if stats else None
                result["received"] = _received(reader)
                share = reader.last_share
                result["through_memory"] = int(share.through_memory) if share is not None else 0
            if step.get("fail_mode") == "kill":
                torch.save(out | {step["name"]: result}, Path(cfg["out"]) / f"rank{rank}.pt")
                return out | {step["name"]: result}
        out[step["name"]] = result
        dist.barrier()
        # every rank is done with the step: no block of it may be left
        result["shm_left"] = shm_blocks()
        if rank == 0:
            dw._marker({"url": step["url"], "storage_options": cfg["storage_options"]}, step["name"])
        dist.barrier()
    return out


# ---------------------------------------------------------------------------------------------
# Parent side


def launch(world: int, workdir: Path, timeout: float = 180.0, grace: float = 30.0, **cfg: Any) -> dw.Job:
    """Run scenario_share on ``world`` ranks (see :func:`tests.dist_worker.launch`)."""
    return launch_module("tests.share_worker", "share", world, workdir, timeout, grace, **cfg)


def launch_module(
    module: str, scenario: str, world: int, workdir: Path, timeout: float, grace: float, **cfg: Any
) -> dw.Job:
    """Run ``scenario`` of the worker module ``module`` on ``world`` ranks, each in its own
    process group; once one rank fails, the others get ``grace`` seconds before they are killed."""
    out = Path(workdir) / f"{scenario}-w{world}-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True)
    config = {"scenario": scenario, "world": world, "out": str(out), "store": str(out / "pg_store"), **cfg}
    cfg_path = out / "cfg.json"
    cfg_path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }
    env.pop("DCP_CLOUD_HOST_ID", None)
    procs = []
    started = time.monotonic()
    for rank in range(world):
        with open(out / f"rank{rank}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", module, str(cfg_path), str(rank)],
                    cwd=ROOT,
                    env=env,
                    stdin=subprocess.DEVNULL,
                    stdout=log,
                    stderr=subprocess.STDOUT,
                    start_new_session=True,
                )
            )
    deadline = started + timeout
    timed_out = False
    try:
        while any(p.poll() is None for p in procs):
            now = time.monotonic()
            if now > deadline:
                timed_out = True
                break
            if any(p.returncode not in (None, 0) for p in procs):
                deadline = min(deadline, now + grace)
            time.sleep(0.05)
    finally:
        for proc in procs:
            dw._kill_group(proc)
    return dw.Job(out, world, [p.returncode for p in procs], timed_out, time.monotonic() - started)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    logging.getLogger("dcp_cloud").setLevel(logging.INFO)
    dw.SCENARIOS["share"] = scenario_share
    dw.main(sys.argv[1], int(sys.argv[2]))
