"""Multi-rank scenarios for tests/test_distributed.py, run as real processes on gloo.

The parent (a test) calls :func:`launch`, which starts one ``python -m tests.dist_worker CFG RANK``
process per rank. Each rank joins a gloo process group through a ``file://`` store, runs one
scenario and writes what it saw to ``<out>/rank<R>.pt`` (read back with :func:`Job.result`); an
unexpected error goes to ``<out>/rank<R>.err`` and exit code 1. The parent asserts.

This module is import-safe (``async_save``'s PROCESS mode re-imports the main module in its
child), and everything a child process must unpickle (planners) lives at its top level.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import time
import traceback
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

import torch

ROOT = Path(__file__).resolve().parent.parent

# ---------------------------------------------------------------------------------------------
# The checkpointed state: the same on every rank for a given version (seeded), so the parent can
# rebuild the expected full tensors without talking to the ranks.

MiB = 1024 * 1024


def full_tensors(version: int) -> dict[str, torch.Tensor]:
    """Global (unsharded) tensors of one version of the test state."""
    g = torch.Generator().manual_seed(1000 + version)
    return {
        # 10 rows: uneven on 3 ranks (4, 4, 2) and on 4 ranks (3, 3, 3, 1)
        "dt": torch.randn(10, 6, generator=g),
        # 9 rows bf16: on 4 ranks the last shard is empty (3, 3, 3, 0)
        "dt2": torch.randn(9, 4, generator=g).to(torch.bfloat16),
        # replicated plain tensor, 256 KiB: large enough that a duplicate upload shows
        "rep": torch.randn(256, 256, generator=g),
        "rep_i": torch.arange(1000, dtype=torch.int64) * (version + 1),
    }


def extras(version: int) -> dict[str, Any]:
    """Non-tensor values (saved as pickled BYTE_IO items)."""
    return {
        "step": 100 + version,
        "tag": f"v{version}",
        "cfg": {"lr": 0.5 * version, "name": f"run{version}"},
    }


DTENSORS = ("dt", "dt2")
PLAINS = ("rep", "rep_i")


def make_state(mesh: Any, version: int, placement: str = "shard0") -> dict[str, Any]:
    from torch.distributed.tensor import Shard, distribute_tensor

    place = [Shard(0) if placement == "shard0" else Shard(1)]
    full = full_tensors(version)
    state: dict[str, Any] = {k: distribute_tensor(full[k], mesh, place) for k in DTENSORS}
    state.update({k: full[k].clone() for k in PLAINS})
    state.update(extras(version))
    return state


def make_target(mesh: Any, placement: str = "shard0") -> dict[str, Any]:
    """A load target shaped like make_state, holding other values (zeros, version -1 extras)."""
    from torch.distributed.tensor import Shard, distribute_tensor

    place = [Shard(0) if placement == "shard0" else Shard(1)]
    full = full_tensors(0)
    state: dict[str, Any] = {k: distribute_tensor(torch.zeros_like(full[k]), mesh, place) for k in DTENSORS}
    state.update({k: torch.zeros_like(full[k]) for k in PLAINS})
    state.update(extras(-1))
    return state


def describe(state: dict[str, Any]) -> dict[str, Any]:
    """What a rank reports about a loaded state: full tensors (collective!), local shapes, values."""
    out: dict[str, Any] = {}
    for key, value in state.items():
        if key in DTENSORS:
            out[key] = value.full_tensor().clone()
            out[f"{key}.local_shape"] = tuple(value.to_local().shape)
            out[f"{key}.placements"] = str(value.placements)
        elif isinstance(value, torch.Tensor):
            out[key] = value.clone()
        else:
            out[key] = value
    return out


# ---------------------------------------------------------------------------------------------
# Planners. Module-level classes so that async_save's PROCESS child can unpickle them.

from torch.distributed.checkpoint.default_planner import DefaultSavePlanner  # noqa: E402


class FailingPlanner(DefaultSavePlanner):
    """resolve_data raises on ``rank`` at its ``at``-th call (a late item, after some uploads)."""

    def __init__(self, rank: int, at: int = 2) -> None:
        super().__init__()
        self.fail_rank = rank
        self.at = at
        self.calls = 0

    def resolve_data(self, write_item: Any) -> Any:
        import torch.distributed as dist

        self.calls += 1
        if dist.get_rank() == self.fail_rank and self.calls >= self.at:
            raise RuntimeError(f"injected failure on rank {self.fail_rank} at item {write_item.index.fqn}")
        return super().resolve_data(write_item)


class KillingPlanner(DefaultSavePlanner):
    """On ``rank``, resolve_data SIGKILLs its own process at the first item after ``after``
    (so ``after``'s bytes are already in the upload stream)."""

    def __init__(self, rank: int, after: str, mark: str | None = None) -> None:
        super().__init__()
        self.kill_rank = rank
        self.after = after
        self.mark = mark
        self.armed = False

    def resolve_data(self, write_item: Any) -> Any:
        import torch.distributed as dist

        if dist.get_rank() == self.kill_rank:
            if self.armed:
                if self.mark:
                    Path(self.mark).write_text(write_item.index.fqn)
                time.sleep(0.5)  # let parts of the open multipart upload reach the server
                os.kill(os.getpid(), signal.SIGKILL)
            self.armed = write_item.index.fqn == self.after
        return super().resolve_data(write_item)


class GatedPlanner(DefaultSavePlanner):
    """resolve_data waits until ``<gate_dir>/open_<rank>`` exists (at most ``limit`` s, then fails).

    The rank creates that file only after ``async_save`` returned: the upload cannot finish
    before the call returns, so ``future.done()`` right after the call is deterministically False,
    and a blocking ``async_save`` would fail (not hang) after ``limit`` seconds.
    """

    def __init__(self, gate_dir: str, limit: float = 60.0) -> None:
        super().__init__()
        self.gate_dir = gate_dir
        self.limit = limit

    def resolve_data(self, write_item: Any) -> Any:
        import torch.distributed as dist

        gate = Path(self.gate_dir) / f"open_{dist.get_rank()}"
        deadline = time.monotonic() + self.limit
        while not gate.exists():
            if time.monotonic() > deadline:
                raise TimeoutError(f"{gate} never opened: async_save blocked until the upload?")
            time.sleep(0.01)
        return super().resolve_data(write_item)


# ---------------------------------------------------------------------------------------------
# Scenarios. Each gets (cfg, rank, world, mesh) and returns the dict the rank reports.


def _writer(cfg: dict[str, Any], url: str | None = None, **kwargs: Any) -> Any:
    from dcp_cloud import CloudStorageWriter

    return CloudStorageWriter(url or cfg["url"], storage_options=cfg["storage_options"], **kwargs)


def _reader(cfg: dict[str, Any], url: str | None = None, **kwargs: Any) -> Any:
    from dcp_cloud import CloudStorageReader

    return CloudStorageReader(url or cfg["url"], storage_options=cfg["storage_options"], **kwargs)


def _save(state: dict[str, Any], writer: Any, **kwargs: Any) -> tuple[str, dict[str, int]]:
    """dcp.save; returns the committed save id (from the Metadata every rank gets back) and the
    store requests this rank sent (the writer's public stats)."""
    import torch.distributed.checkpoint as dcp

    metadata = dcp.save(state, storage_writer=writer, **kwargs)
    stats = writer.last_stats
    assert metadata.storage_meta is not None and metadata.storage_meta.save_id is not None
    return metadata.storage_meta.save_id, {**stats.requests, "retries": stats.retries}


def _marker(cfg: dict[str, Any], name: str) -> None:
    """An unsigned request the parent finds in the S3 server's log: splits the log into phases."""
    import urllib.error
    import urllib.request

    endpoint = cfg["storage_options"].get("endpoint_url")
    if not endpoint or not cfg["url"].startswith("s3://"):
        return
    try:
        urllib.request.urlopen(
            f"{endpoint}/{cfg['url'].removeprefix('s3://')}/__marker_{name}", timeout=10
        ).close()
    except urllib.error.HTTPError:
        pass


def read_object(url: str, storage_options: dict[str, Any], key: str) -> bytes | None:
    """An object under ``url`` through fsspec (independent of dcp_cloud's store), or None."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **storage_options)
    try:
        return bytes(fs.cat_file(f"{root.rstrip('/')}/{key}"))
    except FileNotFoundError:
        return None


def list_objects(url: str, storage_options: dict[str, Any]) -> dict[str, int]:
    """Every object under ``url`` (key relative to it -> size) through fsspec."""
    import fsspec

    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **storage_options)
    root = root.rstrip("/")
    try:
        found = fs.find(root, detail=True)
    except FileNotFoundError:
        return {}
    return {
        path[len(root) + 1 :]: int(info["size"]) for path, info in found.items() if info["type"] == "file"
    }


def _metadata_digest(cfg: dict[str, Any]) -> str | None:
    data = read_object(cfg["url"], cfg["storage_options"], ".metadata")
    return None if data is None else hashlib.sha256(data).hexdigest()


def _failure(exc: BaseException) -> dict[str, Any]:
    from torch.distributed.checkpoint.api import CheckpointException

    out: dict[str, Any] = {"type": type(exc).__name__, "text": str(exc)[:4000]}
    if isinstance(exc, CheckpointException):
        out["failures"] = {
            int(rank): f"{type(err).__name__}: {err}" for rank, (err, _tb) in exc.failures.items()
        }
    return out


def scenario_save_load(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """Save v1 (fresh URL), overwrite with v2 using the same writer, load; count requests."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    writer = _writer(cfg)
    result: dict[str, Any] = {}
    for phase, version in (("save1", 1), ("save2", 2)):
        save_id, requests = _save(make_state(mesh, version), writer)
        result[f"{phase}_save_id"] = save_id
        result[f"{phase}_requests"] = requests
        dist.barrier()
        if rank == 0:
            _marker(cfg, phase)
        dist.barrier()
    target = make_target(mesh)
    dcp.load(target, storage_reader=_reader(cfg))
    result["loaded"] = describe(target)
    return result


def scenario_load(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[int, Any]:
    """Load each (url, storage_options, placement) of cfg["loads"] into a fresh target; report
    what came back."""
    import torch.distributed.checkpoint as dcp

    from dcp_cloud import CloudStorageReader

    out: dict[int, Any] = {}
    for i, (url, options, placement) in enumerate(cfg["loads"]):
        target = make_target(mesh, placement)
        dcp.load(target, storage_reader=CloudStorageReader(url, storage_options=options))
        out[i] = describe(target)
    return out


def scenario_no_collectives(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """use_collectives=False: each rank saves its own state and loads it back."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    def own(value: int) -> dict[str, Any]:
        return {
            "w": torch.full((64, 8), float(value)),
            "shared": torch.arange(16, dtype=torch.float32),
            "who": {"rank": value, "name": f"rank-{value}"},
        }

    save_id, _ = _save(own(rank), _writer(cfg), use_collectives=False)
    dist.barrier()
    target = {"w": torch.zeros(64, 8), "shared": torch.zeros(16), "who": {"rank": -1, "name": ""}}
    dcp.load(target, storage_reader=_reader(cfg))
    return {"expected": own(rank), "loaded": target, "save_id": save_id}


def scenario_fail_save(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """Commit v1, then a v2 save whose planner raises on one rank, then an overwrite=False save;
    then load."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp

    dcp.save(make_state(mesh, 1), storage_writer=_writer(cfg))
    dist.barrier()
    result: dict[str, Any] = {"digest_v1": _metadata_digest(cfg) if rank == 0 else None}
    try:
        dcp.save(make_state(mesh, 2), storage_writer=_writer(cfg), planner=FailingPlanner(cfg["fail_rank"]))
        result["error"] = None
    except BaseException as exc:  # CheckpointException is a BaseException
        result["error"] = _failure(exc)
    dist.barrier()
    result["digest_after"] = _metadata_digest(cfg) if rank == 0 else None
    # overwrite=False where a checkpoint is committed: refused before any rank uploads
    before = set(list_objects(cfg["url"], cfg["storage_options"])) if rank == 0 else set()
    dist.barrier()
    try:
        dcp.save(make_state(mesh, 3), storage_writer=_writer(cfg, overwrite=False))
        result["exists_error"] = None
    except BaseException as exc:
        result["exists_error"] = _failure(exc)
    dist.barrier()
    if rank == 0:
        result["new_objects"] = sorted(set(list_objects(cfg["url"], cfg["storage_options"])) - before)
        result["digest_after_exists"] = _metadata_digest(cfg)
    target = make_target(mesh)
    dcp.load(target, storage_reader=_reader(cfg))
    result["loaded"] = describe(target)
    return result


def scenario_kill_save(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """Commit v1, then a v2 save during which one rank SIGKILLs itself mid-upload.

    The surviving ranks report what the save raised and exit without teardown (a collective
    with a dead peer can hang or abort); the parent kills anything left.
    """
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.tensor import Shard, distribute_tensor

    out = Path(cfg["out"])
    dcp.save(make_state(mesh, 1), storage_writer=_writer(cfg, part_size=5 * MiB))
    dist.barrier()
    digest = _metadata_digest(cfg) if rank == 0 else None
    # The 12 MiB shard is each rank's first tensor item: the victim has sent multipart parts of
    # it (5 MiB parts) when it dies at its next item. One object per rank (a small save would
    # otherwise make objects of one part), so the shard is in the rank's first object.
    state = {"big": distribute_tensor(torch.ones(world * 3 * MiB), mesh, [Shard(0)]), **make_state(mesh, 2)}
    planner = KillingPlanner(cfg["kill_rank"], after="big", mark=str(out / "killed_at"))
    started = time.monotonic()
    writer = _writer(cfg, part_size=5 * MiB, object_size=64 * MiB)
    try:
        dcp.save(state, storage_writer=writer, planner=planner)
        error = None
    except BaseException as exc:
        error = _failure(exc)
    report = {"digest_v1": digest, "error": error, "seconds": time.monotonic() - started}
    torch.save(report, out / f"rank{rank}.pt")
    os._exit(0)


def scenario_async(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """Three async saves: gated (proves the call returns before the upload), a second one after
    the first completed, and one that fails; THREAD or PROCESS mode."""
    import torch.distributed as dist
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType

    mode = cfg["mode"]
    if mode == "thread":
        kwargs: dict[str, Any] = {"process_group": dist.new_group(backend="gloo")}
    else:
        kwargs = {"async_checkpointer_type": AsyncCheckpointerType.PROCESS}
    gate_dir = Path(cfg["out"]) / "gates"
    gate_dir.mkdir(exist_ok=True)
    result: dict[str, Any] = {}

    # 1. gated save of v1; the live state is then mutated before the upload may start
    state = make_state(mesh, 1)
    writer = _writer(cfg)
    started = time.perf_counter()
    future: Any = dcp.async_save(state, storage_writer=writer, planner=GatedPlanner(str(gate_dir)), **kwargs)
    result["blocked_s"] = time.perf_counter() - started
    result["done_at_return"] = future.done()
    result["future_type"] = type(future).__name__
    with torch.no_grad():
        for key in DTENSORS:
            state[key]._local_tensor.add_(1000)
        for key in PLAINS:
            state[key].add_(1000)
    (gate_dir / f"open_{rank}").touch()
    future.result(timeout=120)
    result["total_s"] = time.perf_counter() - started
    dist.barrier()
    target = make_target(mesh)
    dcp.load(target, storage_reader=_reader(cfg))
    result["loaded1"] = describe(target)

    # 2. a second async save (v2, same URL: replaces v1) after the first completed
    future = dcp.async_save(make_state(mesh, 2), storage_writer=_writer(cfg), **kwargs)
    future.result(timeout=120)
    dist.barrier()
    target = make_target(mesh)
    dcp.load(target, storage_reader=_reader(cfg))
    result["loaded2"] = describe(target)

    # 3. a failing async save surfaces its error on the future
    if mode == "thread":
        future = dcp.async_save(
            make_state(mesh, 3), storage_writer=_writer(cfg), planner=FailingPlanner(1), **kwargs
        )
    else:
        future = dcp.async_save(make_state(mesh, 3), storage_writer=_writer(cfg, cfg["bad_url"]), **kwargs)
    try:
        future.result(timeout=120)
        result["error"] = None
    except BaseException as exc:
        result["error"] = _failure(exc)
    dist.barrier()
    target = make_target(mesh)
    dcp.load(target, storage_reader=_reader(cfg))
    result["loaded3"] = describe(target)
    return result


# -- FSDP2 ------------------------------------------------------------------------------------


class AppState:
    """Stateful wrapper: model + optimizer through the distributed state_dict API."""

    def __init__(self, model: Any, optim: Any) -> None:
        self.model = model
        self.optim = optim

    def state_dict(self) -> dict[str, Any]:
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_sd, optim_sd = get_state_dict(self.model, self.optim)
        return {"model": model_sd, "optim": optim_sd}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        from torch.distributed.checkpoint.state_dict import set_state_dict

        set_state_dict(
            self.model, self.optim, model_state_dict=state["model"], optim_state_dict=state["optim"]
        )


def _fsdp_model(mesh: Any, seed: int) -> tuple[Any, Any]:
    from torch import nn
    from torch.distributed.fsdp import fully_shard

    torch.manual_seed(seed)
    # 20 and 6 rows: uneven shards on 4 ranks (6 -> 2, 2, 2, 0)
    model = nn.Sequential(nn.Linear(12, 20), nn.ReLU(), nn.Linear(20, 6))
    for layer in (model[0], model[2]):
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    optim = torch.optim.Adam(model.parameters(), lr=0.01)
    return model, optim


def _fsdp_step(model: Any, optim: Any) -> torch.Tensor:
    """One step on a fixed batch. Every rank uses the same full batch, so the loss is the same
    on every rank and for every world size (forward uses the all-gathered, unchanged params)."""
    g = torch.Generator().manual_seed(7)
    x, y = torch.randn(32, 12, generator=g), torch.randn(32, 6, generator=g)
    optim.zero_grad()
    loss = torch.nn.functional.mse_loss(model(x), y)
    loss.backward()
    optim.step()
    return loss.detach().clone()


def _full_state(model: Any, optim: Any) -> dict[str, Any]:
    """Full, CPU state dicts (collective; complete on rank 0 only)."""
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_state_dict

    model_sd, optim_sd = get_state_dict(
        model, optim, options=StateDictOptions(full_state_dict=True, cpu_offload=True)
    )
    # deep copy: some values alias live tensors (Adam's "step"; every tensor on one rank)
    return copy.deepcopy({"model": model_sd, "optim": optim_sd})


def scenario_fsdp_save(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """Train 1 step, save, then keep going (the uninterrupted reference) for 2 more steps."""
    import torch.distributed.checkpoint as dcp

    model, optim = _fsdp_model(mesh, seed=0)
    losses = [_fsdp_step(model, optim)]
    dcp.save({"app": AppState(model, optim), "epoch": 7}, storage_writer=_writer(cfg))
    after1 = _full_state(model, optim)
    losses.append(_fsdp_step(model, optim))
    after2 = _full_state(model, optim)
    losses.append(_fsdp_step(model, optim))
    return {"losses": losses, "after1": after1, "after2": after2}


def scenario_fsdp_resume(cfg: dict[str, Any], rank: int, world: int, mesh: Any) -> dict[str, Any]:
    """A differently initialised model resumes from the checkpoint, then trains 2 steps."""
    import torch.distributed.checkpoint as dcp

    model, optim = _fsdp_model(mesh, seed=1234)
    _fsdp_step(model, optim)  # optimizer state exists and differs from the saved one
    state = {"app": AppState(model, optim), "epoch": 0}
    dcp.load(state, storage_reader=_reader(cfg))
    loaded = _full_state(model, optim)
    losses = [_fsdp_step(model, optim)]
    after2 = _full_state(model, optim)
    losses.append(_fsdp_step(model, optim))
    return {"epoch": state["epoch"], "loaded": loaded, "losses": losses, "after2": after2}


SCENARIOS: dict[str, Any] = {
    "save_load": scenario_save_load,
    "load": scenario_load,
    "no_collectives": scenario_no_collectives,
    "fail_save": scenario_fail_save,
    "kill_save": scenario_kill_save,
    "async": scenario_async,
    "fsdp_save": scenario_fsdp_save,
    "fsdp_resume": scenario_fsdp_resume,
}


def main(cfg_path: str, rank: int) -> None:
    import warnings

    warnings.simplefilter("ignore")
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh

    cfg = json.loads(Path(cfg_path).read_text())
    world = cfg["world"]
    out = Path(cfg["out"])
    torch.set_num_threads(1)
    try:
        dist.init_process_group(
            "gloo",
            init_method=f"file://{cfg['store']}",
            rank=rank,
            world_size=world,
            timeout=timedelta(seconds=cfg.get("pg_timeout", 60)),
        )
        mesh = init_device_mesh("cpu", (world,))
        result = SCENARIOS[cfg["scenario"]](cfg, rank, world, mesh)
        torch.save(result, out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.stderr.write(traceback.format_exc())
        sys.stderr.flush()
        os._exit(1)  # no teardown: peers may be stuck in a collective; the parent cleans up
    dist.barrier()  # every rank is done with the store and with its peers
    # Skip gloo's teardown: even after the barrier, destroying the process group or the
    # interpreter's exit now and then dies with "terminate called without an active exception"
    # (SIGABRT; seen in CI), after the result is safely written.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


# ---------------------------------------------------------------------------------------------
# Parent side


@dataclasses.dataclass
class Job:
    """A finished (or timed-out and killed) multi-rank run."""

    out: Path
    world: int
    returncodes: list[int | None]
    timed_out: bool
    seconds: float

    def log(self, rank: int) -> str:
        path = self.out / f"rank{rank}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def result(self, rank: int) -> Any:
        path = self.out / f"rank{rank}.pt"
        assert path.exists(), (
            f"rank {rank} wrote no result (exit {self.returncodes[rank]}):\n{self.log(rank)[-4000:]}"
        )
        return torch.load(path, weights_only=False)

    def results(self) -> list[Any]:
        return [self.result(r) for r in range(self.world)]

    def describe(self) -> str:
        parts = [f"exit codes {self.returncodes}, timed out: {self.timed_out}, {self.seconds:.1f} s"]
        for rank in range(self.world):
            parts.append(f"--- rank {rank} ---\n{self.log(rank)[-3000:]}")
        return "\n".join(parts)

    def check(self) -> Job:
        assert not self.timed_out and all(rc == 0 for rc in self.returncodes), self.describe()
        return self


def launch(
    scenario: str, world: int, workdir: Path, timeout: float = 180.0, grace: float = 30.0, **cfg: Any
) -> Job:
    """Run ``scenario`` on ``world`` ranks, each a ``python -m tests.dist_worker`` process.

    Waits at most ``timeout`` seconds (``grace`` seconds once a rank has failed), then kills
    whatever is left: each rank leads its own session, so helpers it spawned (async_save's
    PROCESS child) go too.
    """
    out = Path(workdir) / f"{scenario}-w{world}-{uuid.uuid4().hex[:8]}"
    out.mkdir(parents=True)
    config = {"scenario": scenario, "world": world, "out": str(out), "store": str(out / "pg_store"), **cfg}
    cfg_path = out / "cfg.json"
    cfg_path.write_text(json.dumps(config))
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
        "OMP_NUM_THREADS": "1",
        "MASTER_ADDR": "127.0.0.1",  # async_save PROCESS mode: its child's TCPStore
        "TORCH_CPP_LOG_LEVEL": "ERROR",
    }
    procs = []
    started = time.monotonic()
    for rank in range(world):
        with open(out / f"rank{rank}.log", "wb") as log:
            procs.append(
                subprocess.Popen(
                    [sys.executable, "-m", "tests.dist_worker", str(cfg_path), str(rank)],
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
                # a rank died: the others get ``grace`` seconds to notice, then are killed
                deadline = min(deadline, now + grace)
            time.sleep(0.05)
    finally:
        for proc in procs:
            _kill_group(proc)
    return Job(out, world, [p.returncode for p in procs], timed_out, time.monotonic() - started)


def _kill_group(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session this rank leads (the rank and any helper it spawned)."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait()


if __name__ == "__main__":
    main(sys.argv[1], int(sys.argv[2]))
