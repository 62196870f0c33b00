"""Shared reads: a distributed load fetches each stored byte once per job (or host), not per rank.

Real processes on gloo (tests/share_worker.py), the S3 server of the ``s3_server`` fixture. Each
load reaches the server through its own counting proxy (benchmarks/proxy.py), so the bytes the
server sent for that load are counted on the server's side; ``.metadata`` GETs come from the
server's request log, split by the marker request each step ends with.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import torch

from benchmarks.proxy import ProxyProcess
from dcp_cloud.load.share import Segment, SharePlan, assign_shares
from dcp_cloud.testing import S3Server

from . import dist_worker as dw
from . import share_worker as sw
from .conftest import BUCKET

# the module-scoped fixtures are built once: all of the module on one pytest-xdist worker
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group(__name__)]

MiB = 1024 * 1024
BIG = {"rep_tensors": 4, "rep_rows": 768}


def url(name: str) -> str:
    return f"s3://{BUCKET}/share-{uuid.uuid4().hex[:10]}/{name}"


@dataclass
class Run:
    """One multi-rank job of steps: its results per rank, the server's requests and proxied
    bytes of each load step."""

    job: dw.Job
    results: list[dict[str, Any]]
    metadata_gets: dict[str, int]
    served: dict[str, int]
    sizes: dict[str, int]

    def step(self, name: str) -> list[dict[str, Any]]:
        return [r[name] for r in self.results]


def run_steps(
    server: S3Server,
    world: int,
    workdir: Path,
    steps: list[dict[str, Any]],
    expect_ok: bool = True,
    **cfg: Any,
) -> Run:
    """Run the steps on ``world`` ranks; each load step gets a counting proxy of its own."""
    proxies: dict[str, ProxyProcess] = {}
    try:
        for step in steps:
            if step["op"] != "save":
                proxies[step["name"]] = ProxyProcess(server.endpoint_url, 0, 0).start()
                step["endpoint"] = proxies[step["name"]].url
        before = len(server.requests())
        job = sw.launch(world, workdir, storage_options=server.storage_options, steps=steps, **cfg)
        served = {name: int(p.counts()["bytes_down"]) for name, p in proxies.items()}
    finally:
        for proxy in proxies.values():
            proxy.stop()
    results = [job.result(r) for r in range(world)] if expect_ok else []
    metadata_gets: dict[str, int] = {}
    if expect_ok:
        job.check()
        phases = _split(server.requests()[before:], [s["name"] for s in steps])
        metadata_gets = {
            name: sum(1 for r in reqs if r.kind == "get_object" and r.path.endswith("/.metadata"))
            for name, reqs in phases.items()
        }
    sizes = {s["url"]: sum(dw.list_objects(s["url"], server.storage_options).values()) for s in steps}
    return Run(job, results, metadata_gets, served, sizes)


def _split(requests: list[Any], names: list[str]) -> dict[str, list[Any]]:
    phases: dict[str, list[Any]] = {}
    current: list[Any] = []
    pending = list(names)
    for req in requests:
        if pending and req.path.endswith(f"/__marker_{pending[0]}"):
            phases[pending.pop(0)] = current
            current = []
        else:
            current.append(req)
    return phases


def assert_bitwise(loaded: dict[str, Any], kind: str, where: str, **sizes: int) -> None:
    expected = sw.full_state(kind, **sizes)
    assert set(loaded) == set(expected), where
    for key, value in expected.items():
        got = loaded[key]
        if isinstance(value, torch.Tensor):
            assert got.dtype == value.dtype and got.shape == value.shape, f"{where}: {key}"
            assert torch.equal(got.view(torch.uint8), value.view(torch.uint8)), f"{where}: {key} differs"
        else:
            assert got == value, f"{where}: {key}"


@pytest.fixture(scope="module")
def four_ranks(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> Run:
    """One 4-rank job: saves a replicated, a sharded and a mixed state, then loads them with
    sharing (job scope), without it, per host (two simulated hosts), and with an owner failing."""
    rep, dt, mix, big, torch_rep = url("rep"), url("dt"), url("mix"), url("big"), url("torch")
    steps: list[dict[str, Any]] = [
        {"op": "save", "name": "save_rep", "url": rep, "kind": "rep"},
        {"op": "save", "name": "save_dt", "url": dt, "kind": "dt"},
        {"op": "save", "name": "save_mix", "url": mix, "kind": "mix"},
        # a 10 MiB budget: the 12 MiB of shared items take two rounds
        {
            "op": "load",
            "name": "rep_job",
            "url": rep,
            "kind": "rep",
            "reader": {"memory_budget": 10 * MiB, "part_size": 5 * MiB},
        },
        {"op": "load", "name": "rep_off", "url": rep, "kind": "rep", "share_reads": "off"},
        # 3 MiB tensors, over half a 5 MiB part: shared as raw bytes, straight into destinations
        {"op": "save", "name": "save_big", "url": big, "kind": "rep", "sizes": BIG},
        {
            "op": "load",
            "name": "big_job",
            "url": big,
            "kind": "rep",
            "sizes": BIG,
            "reader": {"memory_budget": 10 * MiB, "part_size": 5 * MiB},
        },
        {"op": "load", "name": "dt_job", "url": dt, "kind": "dt"},
        {"op": "load", "name": "mix_job", "url": mix, "kind": "mix"},
        {
            "op": "load",
            "name": "rep_host",
            "url": rep,
            "kind": "rep",
            "share_reads": "host",
            "host_ids": ["a", "a", "b", "b"],
        },
        # written by torch's FsspecWriter: no manifest, items shared whole
        {"op": "fsspec_save", "name": "save_torch", "url": torch_rep, "kind": "rep"},
        {"op": "load", "name": "torch_job", "url": torch_rep, "kind": "rep"},
        # no checkpoint there: the coordinator's error reaches every rank
        {"op": "load", "name": "missing", "url": url("missing"), "kind": "rep", "report": False},
        {
            "op": "load",
            "name": "rep_fail",
            "url": rep,
            "kind": "rep",
            "fail_rank": 1,
            "fail_mode": "fail",
            "report": False,
        },
    ]
    return run_steps(s3_server, 4, tmp_path_factory.mktemp("share4"), steps)


def test_replicated_load_reads_each_byte_once(four_ranks: Run) -> None:
    run = four_ranks
    size = next(v for k, v in run.sizes.items() if k.endswith("/rep"))
    for rank, result in enumerate(run.step("rep_job")):
        assert result["error"] is None, result["error"]
        assert_bitwise(result["state"], "rep", f"rank {rank}")
    assert run.served["rep_job"] <= 1.15 * size, (run.served["rep_job"], size)
    assert run.metadata_gets["rep_job"] <= 2
    # the same load unshared: every rank reads it all (what the counter would show without sharing)
    for rank, result in enumerate(run.step("rep_off")):
        assert_bitwise(result["state"], "rep", f"rank {rank} (off)")
    assert run.served["rep_off"] >= 3.5 * size
    assert run.metadata_gets["rep_off"] == 4


def test_large_tensors_shared_straight_into_destinations(four_ranks: Run) -> None:
    run = four_ranks
    size = next(v for k, v in run.sizes.items() if k.endswith("/big"))
    for rank, result in enumerate(run.step("big_job")):
        assert result["error"] is None, result["error"]
        assert_bitwise(result["state"], "rep", f"rank {rank}", **BIG)
    assert run.served["big_job"] <= 1.15 * size, (run.served["big_job"], size)
    # each rank receives what it does not fetch: the large tensors' raw bytes travel alone (no
    # archive around them), with the small items
    received = [r["received"] for r in run.step("big_job")]
    assert 3 * 12 * MiB <= sum(received) <= 3 * (12 * MiB + 64 * 1024), received
    # four 3 MiB tensors, four owners: one each
    assert all(2 * MiB < 12 * MiB + 64 * 1024 - r <= 10 * MiB for r in received), received


def test_checkpoint_written_by_torch_is_shared(four_ranks: Run) -> None:
    run = four_ranks
    size = next(v for k, v in run.sizes.items() if k.endswith("/torch"))
    for rank, result in enumerate(run.step("torch_job")):
        assert result["error"] is None, result["error"]
        assert_bitwise(result["state"], "rep", f"rank {rank}")
    assert run.served["torch_job"] <= 1.15 * size, (run.served["torch_job"], size)
    assert run.metadata_gets["torch_job"] <= 2


def test_missing_checkpoint_fails_on_every_rank_with_one_read(four_ranks: Run) -> None:
    run = four_ranks
    for rank, result in enumerate(run.step("missing")):
        error = result["error"]
        assert error is not None, f"rank {rank} loaded a checkpoint that does not exist"
        assert all("no checkpoint here (no .metadata)" in text for text in error["failures"].values()), error
    # the coordinator looked once for .metadata (and torch's retry with rank-local metadata
    # looks once per rank for __<rank>.metadata)
    assert run.metadata_gets["missing"] <= 1


def test_sharded_load_unchanged(four_ranks: Run) -> None:
    run = four_ranks
    size = next(v for k, v in run.sizes.items() if k.endswith("/dt"))
    for rank, result in enumerate(run.step("dt_job")):
        assert result["error"] is None, result["error"]
        assert_bitwise(result["state"], "dt", f"rank {rank}")
    assert run.served["dt_job"] <= 1.15 * size
    assert run.metadata_gets["dt_job"] <= 2


def test_mixed_load(four_ranks: Run) -> None:
    run = four_ranks
    size = next(v for k, v in run.sizes.items() if k.endswith("/mix"))
    for rank, result in enumerate(run.step("mix_job")):
        assert result["error"] is None, result["error"]
        assert_bitwise(result["state"], "mix", f"rank {rank}")
    assert run.served["mix_job"] <= 1.15 * size


def test_host_scope_reads_once_per_host(four_ranks: Run) -> None:
    run = four_ranks
    size = next(v for k, v in run.sizes.items() if k.endswith("/rep"))
    for rank, result in enumerate(run.step("rep_host")):
        assert result["error"] is None, result["error"]
        assert_bitwise(result["state"], "rep", f"rank {rank}")
    # two simulated hosts of two ranks: each host reads the checkpoint once
    assert 1.8 * size <= run.served["rep_host"] <= 2.3 * size, (run.served["rep_host"], size)


def test_owner_failure_stops_every_rank(four_ranks: Run) -> None:
    results = four_ranks.step("rep_fail")
    for rank, result in enumerate(results):
        error = result["error"]
        assert error is not None, f"rank {rank} loaded although rank 1 failed"
        assert error["type"] == "CheckpointException"
        assert "injected fetch failure on rank 1" in error["failures"][1]
        if rank != 1:
            assert "PeerReadError" in error["failures"][rank], error["failures"]
        assert result["seconds"] < 20, f"rank {rank} took {result['seconds']:.1f} s to fail"


@pytest.mark.slow
def test_resharding(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> None:
    """Saved on 2 ranks, loaded on 3 (shards overlap: shared); saved on 4, loaded on 2."""
    two, four = url("dt2"), url("dt4")
    workdir = tmp_path_factory.mktemp("reshard")
    run_steps(s3_server, 4, workdir, [{"op": "save", "name": "s4", "url": four, "kind": "mix"}])
    run2 = run_steps(
        s3_server,
        2,
        workdir,
        [
            {"op": "save", "name": "s2", "url": two, "kind": "mix"},
            {"op": "load", "name": "l42", "url": four, "kind": "mix"},
        ],
    )
    run3 = run_steps(s3_server, 3, workdir, [{"op": "load", "name": "l23", "url": two, "kind": "mix"}])
    for run, name, src in ((run2, "l42", four), (run3, "l23", two)):
        for rank, result in enumerate(run.step(name)):
            assert result["error"] is None, result["error"]
            assert_bitwise(result["state"], "mix", f"{name} rank {rank}")
        size = sum(dw.list_objects(src, s3_server.storage_options).values())
        assert run.served[name] <= 1.15 * size, (name, run.served[name], size)


@pytest.mark.slow
def test_owner_killed(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> None:
    """An owner SIGKILLed in its shared fetch: the other ranks raise, within the bound."""
    rep = url("rep")
    workdir = tmp_path_factory.mktemp("kill")
    run_steps(s3_server, 3, workdir, [{"op": "save", "name": "s", "url": rep, "kind": "rep"}])
    step = {
        "op": "load",
        "name": "kill",
        "url": rep,
        "kind": "rep",
        "fail_rank": 2,
        "fail_mode": "kill",
        "share_timeout": 15.0,
    }
    before = set(sw.shm_blocks())
    run = run_steps(s3_server, 3, workdir, [step], expect_ok=False, pg_timeout=20, grace=60)
    assert run.job.returncodes[2] == -9
    # the dead owner's shared-memory block (made before its fetch) was swept by its peers
    assert set(sw.shm_blocks()) - before == set()
    for rank in (0, 1):
        result = run.job.result(rank)["kill"]
        assert result["error"] is not None, f"rank {rank} loaded although rank 2 died"
        assert result["seconds"] < 45, f"rank {rank} took {result['seconds']:.1f} s to fail"


# -- planning (no processes) -------------------------------------------------------------------


def _slot(key: str, i: int, n: int = MiB) -> tuple[str, int, int]:
    return (key, i * n, n)


def test_assignment_balances_owners_and_bounds_rounds() -> None:
    items = {_slot("a", i) for i in range(12)} | {_slot("b", i) for i in range(12)}
    plans = assign_shares(
        [set(items)] * 4, [[0, 1, 2, 3]], (0, 1, 2, 3), budget=5 * MiB, max_range=2 * MiB, gap=0, timeout=9.0
    )
    plan = plans[0]
    assert isinstance(plan, SharePlan) and all(p == plan for p in plans)
    owned = {r: sum(s.size for s in plan.segments if s.owner == r) for r in range(4)}
    assert sum(owned.values()) == 24 * MiB
    assert max(owned.values()) - min(owned.values()) <= 2 * MiB, owned
    for segments in plan.rounds():
        assert sum(s.size for s in segments) <= 5 * MiB
        assert len({s.owner for s in segments}) > 1  # owners fetch side by side
    for r in range(4):
        assert plan.slots_of(r) == items
    for segment in plan.segments:
        assert set(segment.receivers) == {0, 1, 2, 3} - {segment.owner}


def test_assignment_shares_only_what_several_ranks_need() -> None:
    own = [{_slot("r0", 0)}, {_slot("r1", 0)}, {_slot("r2", 0)}]
    common = _slot("c", 0)
    needs = [own[0] | {common}, own[1] | {common}, own[2]]
    plans = assign_shares(needs, [[0, 1, 2]], (10, 11, 12), budget=8 * MiB, max_range=MiB, gap=0, timeout=9.0)
    plan = plans[0]
    assert plan is not None
    assert plan.segments == (Segment(0, 10, "c", 0, MiB, ((0, MiB),), (11,)),)
    assert plan.slots_of(12) == set()
    # per host: ranks alone on their host share nothing
    assert assign_shares(
        needs, [[0], [1], [2]], (0, 1, 2), budget=8 * MiB, max_range=MiB, gap=0, timeout=9.0
    ) == [
        None,
        None,
        None,
    ]


def test_share_reads_option_is_checked() -> None:
    from dcp_cloud import CloudStorageReader, StoreConfigError

    with pytest.raises(StoreConfigError, match="share_reads"):
        CloudStorageReader("memory://b/x", share_reads="everyone")  # type: ignore[arg-type]
