"""Shared reads through shared memory: ranks of one host hand each other bytes via /dev/shm.

The blocks themselves (one process): names, modes, links and sizes. Then one 4-rank job on gloo
(tests/share_worker.py) against the ``s3_server`` fixture: loads whose shared bytes travel
through /dev/shm alone, through /dev/shm and gloo (two simulated hosts), and loads where an
owner fails, a receiver fails, a rank fails before reading, or ranks disagree on
``share_reads``; after each, no block is left in /dev/shm.
"""

from __future__ import annotations

import os
import stat
import uuid
from pathlib import Path
from typing import Any

import pytest

from dcp_cloud.load import share_shm
from dcp_cloud.testing import S3Server

from . import share_worker as sw
from .test_shared_reads import Run, assert_bitwise, run_steps, url

pytestmark = [
    pytest.mark.timeout(300),
    pytest.mark.xdist_group(__name__),
    pytest.mark.skipif(share_shm.shm_domain("x") is None, reason="no usable /dev/shm"),
]

MiB = 1024 * 1024
BIG = {"rep_tensors": 4, "rep_rows": 768}  # 3 MiB tensors: shared as raw payloads
SMALL_ROUNDS = {"memory_budget": 10 * MiB, "part_size": 5 * MiB}


def _name() -> str:
    return share_shm.PREFIX + "test_" + uuid.uuid4().hex


@pytest.fixture
def name() -> Any:
    made = _name()
    yield made
    for leftover in (made, made + ".target"):
        path = Path(share_shm.shm_dir()) / leftover
        if path.is_symlink() or path.exists():
            path.unlink()


# -- blocks (one process) ----------------------------------------------------------------------


def test_block_is_private_and_sized(name: str) -> None:
    block = share_shm.create_block(name, 3 * 4096 + 5)
    assert block is not None
    info = os.lstat(Path(share_shm.shm_dir()) / name)
    assert stat.S_ISREG(info.st_mode) and stat.S_IMODE(info.st_mode) == 0o600
    assert info.st_size == 3 * 4096 + 5 and info.st_uid == os.geteuid()
    block.memory[:4] = b"abcd"
    peer = share_shm.open_block(name, 3 * 4096 + 5, owner=7)
    assert peer.memory[:4] == b"abcd"
    assert share_shm.unlink_block(name)
    assert not (Path(share_shm.shm_dir()) / name).exists()
    assert peer.memory[:4] == b"abcd"  # a mapping outlives the name


def test_block_never_takes_over_an_existing_name_or_link(name: str) -> None:
    path = Path(share_shm.shm_dir()) / name
    path.write_bytes(b"someone else's")
    assert share_shm.create_block(name, 4096) is None
    assert path.read_bytes() == b"someone else's"
    path.unlink()
    target = Path(share_shm.shm_dir()) / (name + ".target")
    target.write_bytes(b"target")
    path.symlink_to(target)
    assert share_shm.create_block(name, 4096) is None
    assert target.read_bytes() == b"target"  # the link was not followed


def test_receiver_refuses_what_the_owner_did_not_make(name: str) -> None:
    path = Path(share_shm.shm_dir()) / name
    with pytest.raises(share_shm.SharedBlockError, match="cannot open"):
        share_shm.open_block(name, 4096, owner=3)
    path.write_bytes(b"\0" * 4096)
    path.chmod(0o644)
    with pytest.raises(share_shm.SharedBlockError, match="mode 0600"):
        share_shm.open_block(name, 4096, owner=3)
    path.chmod(0o600)
    with pytest.raises(share_shm.SharedBlockError, match="4095 bytes"):
        share_shm.open_block(name, 4095, owner=3)
    assert share_shm.open_block(name, 4096, owner=3).size == 4096
    path.unlink()
    target = Path(share_shm.shm_dir()) / (name + ".target")
    target.write_bytes(b"\0" * 4096)
    target.chmod(0o600)
    path.symlink_to(target)
    with pytest.raises(share_shm.SharedBlockError, match="cannot open"):
        share_shm.open_block(name, 4096, owner=3)
    # unlinking removes neither a link nor what it points to
    assert not share_shm.unlink_block(name)
    assert path.is_symlink() and target.exists()


def test_full_shm_falls_back(name: str) -> None:
    free = os.statvfs(share_shm.shm_dir())
    assert share_shm.create_block(name, free.f_bavail * free.f_frsize + (1 << 40)) is None
    assert not (Path(share_shm.shm_dir()) / name).exists()


def test_names_and_domains() -> None:
    assert share_shm.block_name("t", 0, 1) == share_shm.block_name("t", 0, 1)
    names = {share_shm.block_name(t, r, o) for t in ("t", "u") for r in (0, 1) for o in (0, 1)}
    assert len(names) == 8 and all(n.startswith(share_shm.PREFIX) for n in names)
    assert share_shm.shm_domain("a") != share_shm.shm_domain("b")
    assert share_shm.shm_domain("a") == share_shm.shm_domain("a")


# -- 4 ranks -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def job(s3_server: S3Server, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    rep, big = url("rep"), url("big")
    load = {"op": "load", "report": True}
    steps: list[dict[str, Any]] = [
        {"op": "save", "name": "save_rep", "url": rep, "kind": "rep"},
        {"op": "save", "name": "save_big", "url": big, "kind": "rep", "sizes": BIG},
        # 12 MiB of 768 KiB items in 10 MiB rounds: two rounds, buffered segments
        {**load, "name": "rep_mem", "url": rep, "kind": "rep", "reader": SMALL_ROUNDS},
        # 3 MiB payloads: straight from the block into each destination
        {**load, "name": "big_mem", "url": big, "kind": "rep", "sizes": BIG, "reader": SMALL_ROUNDS},
        # two simulated hosts, job scope: a host's bytes through /dev/shm, the other's over gloo
        {
            **load,
            "name": "two_hosts",
            "url": big,
            "kind": "rep",
            "sizes": BIG,
            "reader": SMALL_ROUNDS,
            "host_ids": ["a", "a", "b", "b"],
        },
        {**load, "name": "owner_fails", "url": rep, "kind": "rep", "fail_rank": 1, "fail_mode": "fail"},
        {**load, "name": "receiver_fails", "url": rep, "kind": "rep", "fail_rank": 2, "fail_mode": "map"},
        {
            **load,
            "name": "fails_before",
            "url": rep,
            "kind": "rep",
            "fail_rank": 3,
            "fail_mode": "before_read",
            "share_timeout": 3.0,
        },
        # last: a rank that does not share leaves the side group out of step
        {
            **load,
            "name": "disagree",
            "url": rep,
            "kind": "rep",
            "share_reads": ["job", "job", "off", "job"],
            "share_timeout": 3.0,
        },
    ]
    before = set(sw.shm_blocks())
    run = run_steps(s3_server, 4, tmp_path_factory.mktemp("shm4"), steps)
    after = set(sw.shm_blocks())
    return {"run": run, "leaked": after - before}


def _step(job: dict[str, Any], name: str) -> list[dict[str, Any]]:
    run: Run = job["run"]
    return run.step(name)


def _failures(result: dict[str, Any]) -> dict[int, str]:
    error = result["error"]
    assert error is not None, "loaded although a rank failed"
    return error["failures"]  # type: ignore[no-any-return]


def test_one_host_shares_through_memory(job: dict[str, Any]) -> None:
    run: Run = job["run"]
    for name, sizes in (("rep_mem", {}), ("big_mem", BIG)):
        results = _step(job, name)
        for rank, result in enumerate(results):
            assert result["error"] is None, result["error"]
            assert_bitwise(result["state"], "rep", f"{name} rank {rank}", **sizes)
            assert result["received"] > 0
            # every shared byte came through /dev/shm, none over gloo
            assert result["through_memory"] == result["received"], (name, rank, result)
            assert result["shm_left"] == [], result["shm_left"]
        size = next(v for k, v in run.sizes.items() if k.endswith("/big" if sizes else "/rep"))
        assert run.served[name] <= 1.15 * size, (name, run.served[name], size)
        assert run.metadata_gets[name] <= 2


def test_other_hosts_share_over_gloo(job: dict[str, Any]) -> None:
    run: Run = job["run"]
    for rank, result in enumerate(_step(job, "two_hosts")):
        assert result["error"] is None, result["error"]
        assert_bitwise(result["state"], "rep", f"rank {rank}", **BIG)
        # 3 of the 4 payloads come from peers: one of this host, two of the other
        assert 0 < result["through_memory"] < result["received"], result
        assert result["received"] - result["through_memory"] >= 2 * 3 * MiB, result
        assert result["shm_left"] == []
    size = next(v for k, v in run.sizes.items() if k.endswith("/big"))
    assert run.served["two_hosts"] <= 1.15 * size


def test_owner_failure_leaves_no_block(job: dict[str, Any]) -> None:
    for rank, result in enumerate(_step(job, "owner_fails")):
        texts = _failures(result)
        assert "injected fetch failure on rank 1" in texts[1]
        if rank != 1:
            assert "PeerReadError" in texts[rank], texts
        assert result["shm_left"] == []
        assert result["seconds"] < 20


def test_receiver_failure_leaves_no_block(job: dict[str, Any]) -> None:
    for rank, result in enumerate(_step(job, "receiver_fails")):
        texts = _failures(result)
        assert "injected mapping failure on rank 2" in texts[2], texts
        if rank != 2:
            assert "PeerReadError" in texts[rank], texts
        assert result["shm_left"] == []
        assert result["seconds"] < 20


def test_rank_failing_before_reading_is_named(job: dict[str, Any]) -> None:
    for rank, result in enumerate(_step(job, "fails_before")):
        texts = _failures(result)
        assert "injected failure before reading on rank 3" in texts[3]
        if rank != 3:
            assert "rank 3 did not reach the shared read within share_timeout=3 s" in texts[rank], texts
            assert "different share_reads" in texts[rank]
        assert result["seconds"] < 20, result["seconds"]


def test_ranks_disagreeing_on_share_reads_are_told(job: dict[str, Any]) -> None:
    for result in _step(job, "disagree"):
        texts = _failures(result)
        # the sharing ranks give up on the one that does not share, and say why
        said = " ".join(texts.values())
        assert "did not reach the shared read" in said and "different share_reads" in said, texts
        assert result["seconds"] < 20, result["seconds"]


def test_no_block_outlives_the_job(job: dict[str, Any]) -> None:
    assert job["leaked"] == set()
    run: Run = job["run"]
    made = [r for step in ("rep_mem", "big_mem") for r in run.step(step)]
    assert any(r["through_memory"] for r in made)  # blocks were made (and are gone)
