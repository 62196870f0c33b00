"""Shared reads under attack: crafted and damaged checkpoints, odd process groups, hurried users.

Real processes on gloo (tests/share_attack_worker.py) against the ``s3_server`` fixture. A
crafted ``.metadata`` must meet every check with sharing that it meets without (the same error
on every rank, nothing loaded, no pickle run, no allocation of a size it declares); loads on
subgroups, with empty plans, custom planners, ``no_dist`` or one host per rank must load
bit-exact or share nothing, and never hang.
"""

from __future__ import annotations

import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from dcp_cloud.testing import S3Server

from . import share_attack_worker as aw
from . import share_worker as sw
from .conftest import BUCKET

# the module-scoped fixtures are built once: all of the module on one pytest-xdist worker
pytestmark = [pytest.mark.timeout(300), pytest.mark.xdist_group(__name__)]

MiB = 1024 * 1024
SMALL = {"rep_tensors": 4, "rep_rows": 64}  # 256 KiB tensors: buffered items
BIG = {"rep_tensors": 2, "rep_rows": 768}  # 3 MiB tensors: shared as raw payloads
PAYLOAD_READER = {"memory_budget": 10 * MiB, "part_size": 5 * MiB}


def url(name: str) -> str:
    return f"s3://{BUCKET}/attack-{uuid.uuid4().hex[:10]}/{name}"


def run(
    server: S3Server, world: int, workdir: Path, steps: list[dict[str, Any]], **cfg: Any
) -> list[dict[str, Any]]:
    job = aw.launch(world, workdir, storage_options=server.storage_options, steps=steps, **cfg)
    assert not job.timed_out, f"the job hung ({job.seconds:.0f} s):\n" + "\n".join(
        job.log(r)[-3000:] for r in range(world)
    )
    job.check()
    return [job.result(r) for r in range(world)]


def failures(result: dict[str, Any]) -> dict[int, str]:
    error = result["error"]
    assert error is not None, "loaded a checkpoint it must refuse"
    return error.get("failures") or {-1: f"{error['type']}: {error['text']}"}


def error_types(result: dict[str, Any]) -> set[str]:
    return {text.split(":", 1)[0] for text in failures(result).values()}


def assert_loaded(
    result: dict[str, Any], kind: str, where: str, sizes: dict[str, int], keys: list[str] | None = None
) -> None:
    assert result["error"] is None, f"{where}: {result['error']}"
    expected = sw.full_state(kind, **sizes)
    loaded = result["state"]
    for key in keys if keys is not None else list(expected):
        value = expected[key]
        if isinstance(value, torch.Tensor):
            assert torch.equal(loaded[key].view(torch.uint8), value.view(torch.uint8)), f"{where}: {key}"
        else:
            assert loaded[key] == value, f"{where}: {key}"


# -- crafted and damaged checkpoints (2 ranks, one job) ------------------------------------------

CRAFTED = {
    # a huge item in a small object: the unshared path probes its end before it allocates;
    # "giant" is more than this machine can map, "huge" is mappable (8 GiB)
    "giant": {"fqn": "rep.w0", "kind": "length", "value": 1 << 44},
    "huge": {"fqn": "rep.w0", "kind": "length", "value": 1 << 33},
    "negative": {"fqn": "rep.w1", "kind": "length", "value": -4096},
    "zero": {"fqn": "rep.w1", "kind": "length", "value": 0},
    "overlap": {"fqn": "rep.w1", "kind": "offset_of", "other": "rep.w0", "value": 64},
    "outside": {"fqn": "rep.w0", "kind": "path", "value": "../escape/__0_0.distcp"},
}


@pytest.fixture(scope="module")
def crafted(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    workdir = tmp_path_factory.mktemp("attack2")
    marker = str(workdir / "pickle-ran")
    torch_ckpt, ours, big = url("torch"), url("ours"), url("big")
    steps: list[dict[str, Any]] = [
        {"op": "fsspec_save", "name": "s_torch", "url": torch_ckpt, "kind": "rep", "sizes": SMALL},
        {"op": "save", "name": "s_ours", "url": ours, "kind": "rep", "sizes": SMALL},
        {"op": "save", "name": "s_big", "url": big, "kind": "rep", "sizes": BIG},
    ]
    for name, mutation in CRAFTED.items():
        target = url(name)
        steps.append({"op": "craft", "src": torch_ckpt, "url": target, "mutation": mutation})
        for scope in ("off", "job"):
            steps.append(
                {
                    "op": "load",
                    "name": f"{name}_{scope}",
                    "url": target,
                    "kind": "rep",
                    "sizes": SMALL,
                    "share_reads": scope,
                }
            )
    pickled, evil_meta = url("pickle"), url("evilmeta")
    flip_small, flip_big = url("flip_small"), url("flip_big")
    steps += [
        # a shared non-tensor item whose pickle would create a file
        {
            "op": "craft",
            "src": torch_ckpt,
            "url": pickled,
            "mutation": {"fqn": "rep.step", "kind": "pickle", "marker": marker},
        },
        {"op": "load", "name": "pickle_job", "url": pickled, "kind": "rep", "sizes": SMALL},
        # a .metadata that is a crafted pickle: refused on the coordinator, the error broadcast
        {
            "op": "craft",
            "src": torch_ckpt,
            "url": evil_meta,
            "mutation": {"kind": "evil_metadata", "marker": marker},
        },
        {"op": "load", "name": "evilmeta_job", "url": evil_meta, "kind": "rep", "sizes": SMALL},
        # one flipped byte in a shared buffered item, and in a shared raw payload
        {"op": "craft", "src": ours, "url": flip_small, "mutation": {"fqn": "rep.w2", "kind": "flip_byte"}},
        {"op": "load", "name": "flip_small_job", "url": flip_small, "kind": "rep", "sizes": SMALL},
        {"op": "craft", "src": big, "url": flip_big, "mutation": {"fqn": "rep.w1", "kind": "flip_byte"}},
        {
            "op": "load",
            "name": "flip_big_job",
            "url": flip_big,
            "kind": "rep",
            "sizes": BIG,
            "reader": PAYLOAD_READER,
        },
        {
            "op": "load",
            "name": "flip_big_host",
            "url": flip_big,
            "kind": "rep",
            "sizes": BIG,
            "reader": PAYLOAD_READER,
            "share_reads": "host",
            "host_ids": ["a", "a"],
        },
        # the same checkpoint unchecked loads (what it holds) on every rank alike
        {
            "op": "load",
            "name": "flip_big_unchecked",
            "url": flip_big,
            "kind": "rep",
            "sizes": BIG,
            "reader": {**PAYLOAD_READER, "verify_checksums": False},
        },
        # hurried users: one "host" per rank; a custom planner; ranks loading different keys
        {
            "op": "load",
            "name": "hosts_apart",
            "url": ours,
            "kind": "rep",
            "sizes": SMALL,
            "share_reads": "host",
            "host_ids": ["a", "b"],
        },
        {
            "op": "load",
            "name": "reversing",
            "url": big,
            "kind": "rep",
            "sizes": BIG,
            "reader": PAYLOAD_READER,
            "planner": "reverse",
        },
        {
            "op": "load",
            "name": "subsets",
            "url": ours,
            "kind": "rep",
            "sizes": SMALL,
            "keep": [["rep.w0", "rep.w1", "rep.b", "rep.step"], ["rep.w1", "rep.w2", "rep.cfg"]],
        },
        {
            "op": "load",
            "name": "empty_plan",
            "url": ours,
            "kind": "rep",
            "sizes": SMALL,
            "keep": [["rep."], []],
        },
        {"op": "load", "name": "no_dist", "url": ours, "kind": "rep", "sizes": SMALL, "no_dist": True},
    ]
    results = run(s3_server, 2, workdir, steps)
    return {"results": results, "marker": Path(marker)}


def step(crafted: dict[str, Any], name: str) -> list[dict[str, Any]]:
    return [r[name] for r in crafted["results"]]


@pytest.mark.parametrize("name", sorted(CRAFTED))
def test_crafted_locator_meets_the_same_checks_shared(crafted: dict[str, Any], name: str) -> None:
    """Every rank refuses the crafted checkpoint with sharing, with the error it raises without."""
    unshared = step(crafted, f"{name}_off")
    shared = step(crafted, f"{name}_job")
    for rank in range(2):
        expected = error_types(unshared[rank])
        assert expected - {"PeerReadError"}, unshared[rank]
        got = error_types(shared[rank])
        # the rank that hit it raises what the unshared load raises; a peer may say PeerReadError
        assert expected & got, (name, rank, unshared[rank]["error"], shared[rank]["error"])
        assert got <= expected | {"PeerReadError"}, (name, rank, shared[rank]["error"])
        assert shared[rank]["seconds"] < 30, shared[rank]["seconds"]
        # no rank maps a size the crafted .metadata declares before the store confirms it
        growth = shared[rank]["vm_peak_growth"]
        assert growth < 1 << 30, f"{name}: rank {rank} mapped {growth / 2**30:.1f} GiB"


def test_shared_pickle_is_made_safe_on_every_rank(crafted: dict[str, Any]) -> None:
    results = step(crafted, "pickle_job")
    for rank, result in enumerate(results):
        # each rank checks the item it received (or fetched) itself
        assert failures(result)[rank].startswith("UnsafeCheckpointError"), result["error"]
    assert not crafted["marker"].exists(), "a rank ran the crafted pickle"


def test_crafted_metadata_refused_on_every_rank(crafted: dict[str, Any]) -> None:
    for result in step(crafted, "evilmeta_job"):
        # dcp.load reports a failed read_metadata as an AssertionError quoting it
        texts = failures(result)
        assert len(texts) == 2 and all("crafted to run code" in t for t in texts.values()), texts
        assert result["seconds"] < 20
    assert not crafted["marker"].exists()


@pytest.mark.parametrize("name", ["flip_small_job", "flip_big_job", "flip_big_host"])
def test_corrupt_shared_item_raises_on_every_rank(crafted: dict[str, Any], name: str) -> None:
    for rank, result in enumerate(step(crafted, name)):
        texts = failures(result)
        # every rank needs the item, so every rank checks it itself
        assert "CorruptCheckpointError" in texts[rank], (rank, texts)
        assert "rep.w" in texts[rank]


def test_unchecked_load_is_the_same_on_every_rank(crafted: dict[str, Any]) -> None:
    r0, r1 = step(crafted, "flip_big_unchecked")
    assert r0["error"] is None and r1["error"] is None, (r0["error"], r1["error"])
    expected = sw.full_state("rep", **BIG)["rep.w1"]
    assert not torch.equal(r0["state"]["rep.w1"], expected)  # the flipped byte is loaded as is
    assert torch.equal(r0["state"]["rep.w1"], r1["state"]["rep.w1"])
    assert r0["received"] + r1["received"] > 0  # and it travelled between the ranks


def test_one_host_per_rank_shares_nothing(crafted: dict[str, Any]) -> None:
    for rank, result in enumerate(step(crafted, "hosts_apart")):
        assert_loaded(result, "rep", f"rank {rank}", SMALL)
        assert result["received"] == 0


def test_custom_planner_shares(crafted: dict[str, Any]) -> None:
    results = step(crafted, "reversing")
    for rank, result in enumerate(results):
        assert_loaded(result, "rep", f"rank {rank}", BIG)
    assert sum(r["received"] for r in results) >= 3 * MiB


def test_ranks_loading_different_keys(crafted: dict[str, Any]) -> None:
    keep = [["rep.w0", "rep.w1", "rep.b0", "rep.step"], ["rep.w1", "rep.w2", "rep.cfg"]]
    results = step(crafted, "subsets")
    expected = sw.full_state("rep", **SMALL)
    for rank, result in enumerate(results):
        keys = [k for k in expected if any(k.startswith(p) for p in keep[rank])]
        assert_loaded(result, "rep", f"rank {rank}", SMALL, keys=keys)
    # rep.w1 alone is needed by both: one of them received it
    assert 256 * 1024 <= sum(r["received"] for r in results) < 2 * 256 * 1024 + 4096


def test_rank_with_empty_plan(crafted: dict[str, Any]) -> None:
    r0, r1 = step(crafted, "empty_plan")
    assert_loaded(r0, "rep", "rank 0", SMALL)
    assert r1["error"] is None and r1["state"] == {}
    assert r0["received"] == 0 and r1["received"] == 0


def test_no_dist_in_a_distributed_job(crafted: dict[str, Any]) -> None:
    for rank, result in enumerate(step(crafted, "no_dist")):
        assert_loaded(result, "rep", f"rank {rank}", SMALL)
        assert result["received"] == 0


# -- process groups (4 ranks) --------------------------------------------------------------------


@pytest.mark.slow
def test_subgroup_load_then_world_load(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> None:
    """A load on a subgroup of ranks 0 and 1 (ranks 2 and 3 idle), then one on the whole world:
    both load, neither waits for the share timeout."""
    ckpt = url("groups")
    steps: list[dict[str, Any]] = [
        {"op": "save", "name": "s", "url": ckpt, "kind": "rep", "sizes": SMALL},
        {"op": "new_group", "group": "g01", "ranks": [0, 1]},
        {
            "op": "load",
            "name": "sub",
            "url": ckpt,
            "kind": "rep",
            "sizes": SMALL,
            "ranks": [0, 1],
            "group": "g01",
            "share_timeout": 15.0,
        },
        {"op": "load", "name": "world", "url": ckpt, "kind": "rep", "sizes": SMALL, "share_timeout": 15.0},
    ]
    results = run(s3_server, 4, tmp_path_factory.mktemp("groups"), steps)
    for rank in (0, 1):
        sub = results[rank]["sub"]
        assert_loaded(sub, "rep", f"sub rank {rank}", SMALL)
        assert sub["seconds"] < 10
    assert sum(results[r]["sub"]["received"] for r in (0, 1)) > 0
    assert not results[2]["sub"]["ran"]
    for rank in range(4):
        world = results[rank]["world"]
        assert_loaded(world, "rep", f"world rank {rank}", SMALL)
        assert world["seconds"] < 10, world["seconds"]


@pytest.mark.slow
def test_world_load_after_an_application_subgroup(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """An application made a process group of ranks 0 and 1 (as data/tensor parallel setups do);
    a load on the whole world must still share, not hang until the share timeout."""
    ckpt = url("appgroup")
    steps: list[dict[str, Any]] = [
        {"op": "save", "name": "s", "url": ckpt, "kind": "rep", "sizes": SMALL},
        {"op": "new_group", "group": "g01", "ranks": [0, 1]},
        {"op": "load", "name": "world", "url": ckpt, "kind": "rep", "sizes": SMALL, "share_timeout": 15.0},
    ]
    results = run(s3_server, 4, tmp_path_factory.mktemp("appgroup"), steps)
    for rank in range(4):
        world = results[rank]["world"]
        assert_loaded(world, "rep", f"rank {rank}", SMALL)
        assert world["seconds"] < 10, world["seconds"]


@pytest.mark.slow
def test_resharding_three_to_two_uneven(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """Saved on 3 ranks with uneven shards (97 and 9 rows), loaded on 2: the shard both new
    ranks overlap is shared, every tensor bit-exact."""
    ckpt = url("three")
    sizes = {"rep_tensors": 2, "rep_rows": 64, "dt_rows": 97}
    workdir = tmp_path_factory.mktemp("reshard32")
    run(s3_server, 3, workdir, [{"op": "save", "name": "s", "url": ckpt, "kind": "mix", "sizes": sizes}])
    results = run(
        s3_server,
        2,
        workdir,
        [{"op": "load", "name": "l", "url": ckpt, "kind": "mix", "sizes": sizes, "gather": True}],
    )
    for rank, result in enumerate(results):
        assert_loaded(result["l"], "mix", f"rank {rank}", sizes)
    assert sum(r["l"]["received"] for r in results) > 0


@pytest.mark.slow
def test_ranks_with_different_share_timeouts(
    s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory
) -> None:
    """A hurried user gives the ranks different ``share_timeout`` values: the load shares (or
    not) but does not wait out a timeout."""
    ckpt = url("timeouts")
    steps: list[dict[str, Any]] = [
        {"op": "save", "name": "s", "url": ckpt, "kind": "rep", "sizes": SMALL},
        {
            "op": "load",
            "name": "l",
            "url": ckpt,
            "kind": "rep",
            "sizes": SMALL,
            "share_timeouts": [12.0, 8.0],
        },
    ]
    results = run(s3_server, 2, tmp_path_factory.mktemp("timeouts"), steps)
    for rank, result in enumerate(results):
        assert_loaded(result["l"], "rep", f"rank {rank}", SMALL)
        assert result["l"]["seconds"] < 6, result["l"]["seconds"]
