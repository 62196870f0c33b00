"""Multi-rank workers for tests/test_shared_reads_attacks.py: shared reads under attack.

Same pattern as tests/share_worker.py (whose states and saves this reuses): the parent calls
:func:`launch`, which starts one ``python -m tests.share_attack_worker CFG RANK`` process per
rank; each rank runs ``cfg["steps"]`` and writes what it saw to ``<out>/rank<R>.pt``.

Steps (``op``): ``save`` / ``fsspec_save`` (as in share_worker); ``craft`` (rank 0 copies a
checkpoint and rewrites its ``.metadata`` or one data byte: a crafted or damaged checkpoint);
``new_group`` (every rank creates an ordinary process group of some ranks, as applications do);
``load`` (a ``dcp.load`` with a CloudStorageReader, optionally on a subgroup, ``no_dist``, a
custom planner).
"""

from __future__ import annotations

import io
import os
import pickle
import sys
import time
from pathlib import Path
from typing import Any

import torch

from tests import dist_worker as dw
from tests import share_worker as sw

ROOT = Path(__file__).resolve().parent.parent


class Planted:
    """A non-tensor value whose unpickling creates a file: proof that a pickle ran."""

    def __init__(self, path: str) -> None:
        self.path = path

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.path, "w"))


def _fs(url: str, options: dict[str, Any]) -> tuple[Any, str]:
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    return fs, root.rstrip("/")


def craft(step: dict[str, Any], options: dict[str, Any]) -> None:
    """Copy ``step["src"]`` to ``step["url"]`` and apply ``step["mutation"]`` there."""
    fs, src = _fs(step["src"], options)
    _, dst = _fs(step["url"], options)
    for path in fs.find(src):
        fs.pipe_file(dst + path[len(src) :], fs.cat_file(path))
    meta = pickle.loads(fs.cat_file(f"{dst}/.metadata"))
    m = step["mutation"]
    by_fqn = {index.fqn: (index, info) for index, info in meta.storage_data.items()}
    kind = m["kind"]
    if kind == "evil_metadata":
        fs.pipe_file(f"{dst}/.metadata", pickle.dumps(Planted(m["marker"])))
        return
    index, info = by_fqn[m["fqn"]]
    if kind == "flip_byte":
        # one byte of the item's stored bytes (at ``at`` of its length) changes
        key = f"{dst}/{info.relative_path}"
        data = bytearray(fs.cat_file(key))
        at = info.offset + int(info.length * m.get("at", 0.5))
        data[at] ^= 0x5A
        fs.pipe_file(key, bytes(data))
        return
    if kind == "length":
        info = _replace(info, length=int(m["value"]))
    elif kind == "offset_of":
        # overlap: start this item inside another one
        _, other = by_fqn[m["other"]]
        info = _replace(info, offset=other.offset + int(m["value"]))
    elif kind == "path":
        info = _replace(info, relative_path=m["value"])
    elif kind == "pickle":
        buf = io.BytesIO()
        torch.save(Planted(m["marker"]), buf)
        fs.pipe_file(f"{dst}/planted.distcp", buf.getvalue())
        info = _replace(info, relative_path="planted.distcp", offset=0, length=len(buf.getvalue()))
    else:
        raise ValueError(kind)
    meta.storage_data[index] = info
    fs.pipe_file(f"{dst}/.metadata", pickle.dumps(meta))


def _replace(info: Any, **changes: Any) -> Any:
    import dataclasses

    return dataclasses.replace(info, **changes)


def _planner(name: str | None) -> Any:
    """A custom LoadPlanner: ``reverse`` reads a rank's items in reverse order."""
    if name is None:
        return None
    from torch.distributed.checkpoint import DefaultLoadPlanner

    class Reversing(DefaultLoadPlanner):
        def create_local_plan(self) -> Any:
            import dataclasses

            plan = super().create_local_plan()
            return dataclasses.replace(plan, items=list(reversed(plan.items)))

    return Reversing()


def _load(
    step: dict[str, Any], cfg: dict[str, Any], rank: int, mesh: Any, groups: dict[str, Any]
) -> dict[str, Any]:
    import torch.distributed.checkpoint as dcp

    from dcp_cloud import CloudStorageReader

    result: dict[str, Any] = {"ran": False}
    members = step.get("ranks")
    if members is not None and rank not in members:
        return result
    if step.get("host_ids"):
        os.environ["DCP_CLOUD_HOST_ID"] = step["host_ids"][rank]
    reader = CloudStorageReader(
        step["url"],
        storage_options=dict(cfg["storage_options"]),
        share_reads=step.get("share_reads", "job"),
        share_timeout=step["share_timeouts"][rank]
        if "share_timeouts" in step
        else step.get("share_timeout", 30.0),
        **step.get("reader", {}),
    )
    target = sw.make_state(step["kind"], mesh, zeros=True, **step.get("sizes", {}))
    keep = step.get("keep")
    if keep is not None:
        # each rank loads only the keys it names (a rank naming none has an empty plan)
        target = {k: v for k, v in target.items() if any(k.startswith(p) for p in keep[rank])}
    kwargs: dict[str, Any] = {}
    if members is not None:
        kwargs["process_group"] = groups[step["group"]]
    if step.get("no_dist"):
        kwargs["no_dist"] = True
    peak = _vm_peak()
    started = time.monotonic()
    result["ran"] = True
    try:
        dcp.load(target, storage_reader=reader, planner=_planner(step.get("planner")), **kwargs)
        result["error"] = None
    except BaseException as exc:  # CheckpointException is a BaseException
        result["error"] = dw._failure(exc)
    result["seconds"] = time.monotonic() - started
    # address space this load added to the process's peak (mapped buffers, touched or not)
    result["vm_peak_growth"] = _vm_peak() - peak
    # a local (not gathered) view of what each rank loaded: plain tensors and values only
    if step.get("gather"):
        result["state"] = sw.describe(target)  # DTensors gathered: a collective of the mesh
    else:
        result["state"] = {k: (v.clone() if isinstance(v, torch.Tensor) else v) for k, v in target.items()}
    result["received"] = sw._received(reader)
    result["bytes"] = reader.last_stats.bytes if reader.last_stats else None
    return result


def _vm_peak() -> int:
    """The process's peak virtual memory size, bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmPeak:"):
            return int(line.split()[1]) * 1024
    return 0


def scenario_attack(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[str, Any]:
    import torch.distributed as dist

    out: dict[str, Any] = {}
    groups: dict[str, Any] = {}
    for step in cfg["steps"]:
        op = step["op"]
        if op in ("save", "fsspec_save"):
            out.update(sw.scenario_share({**cfg, "steps": [step]}, rank, world, mesh))
            continue
        if op == "craft":
            if rank == 0:
                craft(step, cfg["storage_options"])
        elif op == "new_group":
            groups[step["group"]] = dist.new_group(step["ranks"])
        elif op == "load":
            out[step["name"]] = _load(step, cfg, rank, mesh, groups)
        else:
            raise ValueError(op)
        dist.barrier()
    return out


def launch(world: int, workdir: Path, timeout: float = 180.0, grace: float = 30.0, **cfg: Any) -> dw.Job:
    """Run scenario_attack on ``world`` ranks (see :func:`tests.share_worker.launch_module`)."""
    return sw.launch_module("tests.share_attack_worker", "attack", world, workdir, timeout, grace, **cfg)


if __name__ == "__main__":
    import logging

    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    dw.SCENARIOS["attack"] = scenario_attack
    dw.main(sys.argv[1], int(sys.argv[2]))
