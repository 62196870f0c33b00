"""Multi-rank saves and loads with real processes on gloo (see tests/dist_worker.py).

Every scenario starts one Python process per rank (``python -m tests.dist_worker``); ranks write
what they saw to files and the assertions run here. S3 runs on the moto server of the
``s3_server`` fixture (whose log shows what each save sent); a subset also runs on local folders.
"""

from __future__ import annotations

import hashlib
import math
import shutil
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import CloudStorageReader, CorruptCheckpointError
from dcp_cloud.checkpoint.manifest import Manifest
from dcp_cloud.testing import S3Server, ServerRequest

from . import dist_worker as dw
from .conftest import BUCKET, SERVERS, Server
from .helpers import assert_same, failure_text, failure_types

# the module-scoped fixtures are built once: all of the module on one pytest-xdist worker
pytestmark = [pytest.mark.timeout(600), pytest.mark.xdist_group(__name__)]

PUT_KINDS = {"put_object", "create_multipart_upload", "upload_part", "complete_multipart_upload"}
# client-side counter kinds (dcp_cloud.store) -> the server's name for the same request
CLIENT_TO_SERVER = {
    "put": "put_object",
    "get": "get_object",
    "get_range": "get_object",
    "head": "head",
    "list": "list_objects",
    "delete": "delete_objects",
    "start_upload": "create_multipart_upload",
    "upload_part": "upload_part",
    "complete_upload": "complete_multipart_upload",
    "abort_upload": "abort_multipart_upload",
}


# -- helpers -----------------------------------------------------------------------------------


@dataclass
class Location:
    store: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    server: Server | None = None

    def reader(self, url: str | None = None) -> CloudStorageReader:
        return CloudStorageReader(url or self.url, storage_options=self.storage_options)

    def objects(self) -> dict[str, int]:
        """Every object under the checkpoint: key -> size (listed through fsspec)."""
        return dw.list_objects(self.url, self.storage_options)

    def get(self, key: str) -> bytes:
        data = dw.read_object(self.url, self.storage_options, key)
        assert data is not None, f"{self.url}/{key} does not exist"
        return data


def new_location(store: str, request: pytest.FixtureRequest, tmp_path: Path) -> Location:
    name = f"dist-{uuid.uuid4().hex[:12]}"
    if store in SERVERS:
        scheme, fixture = SERVERS[store]
        server = request.getfixturevalue(fixture)
        return Location(store, f"{scheme}://{BUCKET}/{name}/ckpt", server.storage_options, server)
    return Location("file", str(tmp_path / name / "ckpt"))


def save_id_of(metadata: Any) -> str:
    assert metadata.storage_meta is not None
    return str(metadata.storage_meta.save_id)


def chunk_sizes(n: int, world: int) -> list[int]:
    """Local sizes of a dim of n split by DTensor's Shard on ``world`` ranks (torch.chunk rule)."""
    step = math.ceil(n / world)
    return [max(0, min(step, n - i * step)) for i in range(world)]


def expected_state(version: int) -> dict[str, Any]:
    return {**dw.full_tensors(version), **dw.extras(version)}


def assert_loaded(loaded: dict[str, Any], version: int, rank: int, world: int, placement: str) -> None:
    """A rank's report (dist_worker.describe) matches ``version``, sharded as asked."""
    expected = expected_state(version)
    for key, value in expected.items():
        assert_same(value, loaded[key], f"rank {rank}: {key}")
    dim = 0 if placement == "shard0" else 1
    for key in dw.DTENSORS:
        shape = list(expected[key].shape)
        shape[dim] = chunk_sizes(shape[dim], world)[rank]
        assert loaded[f"{key}.local_shape"] == tuple(shape), f"rank {rank}: {key} local shape"
        assert loaded[f"{key}.placements"] == f"(Shard(dim={dim}),)"


def load_plain(loc: Location, url: str | None = None) -> dict[str, Any]:
    """Load a checkpoint in this (non-distributed) process into full, plain tensors."""
    out: dict[str, Any] = {k: torch.zeros_like(v) for k, v in dw.full_tensors(0).items()}
    out.update(dw.extras(-1))
    dcp.load(out, storage_reader=loc.reader(url))
    return out


def split_log(requests: list[ServerRequest], names: list[str]) -> dict[str, list[ServerRequest]]:
    """Split a job's requests at the marker requests dist_worker sends after each phase."""
    phases: dict[str, list[ServerRequest]] = {}
    current: list[ServerRequest] = []
    pending = list(names)
    for req in requests:
        if pending and req.path.endswith(f"/__marker_{pending[0]}"):
            phases[pending.pop(0)] = current
            current = []
        else:
            current.append(req)
    assert not pending, f"markers {pending} not found in the server log"
    phases["rest"] = current
    return phases


@dataclass
class SaveRun:
    """One save_load job: saved v1, overwrote with v2 (same writer), loaded."""

    loc: Location
    world: int
    job: dw.Job
    results: list[dict[str, Any]]
    phases: dict[str, list[ServerRequest]]


class SavedCheckpoints:
    """Module-wide cache of save_load jobs, so that load-side tests reuse the checkpoints."""

    def __init__(self, request: pytest.FixtureRequest, tmp_path: Path) -> None:
        self.request = request
        self.tmp_path = tmp_path
        self.runs: dict[tuple[str, int], SaveRun] = {}

    def get(self, store: str, world: int) -> SaveRun:
        if (store, world) not in self.runs:
            loc = new_location(store, self.request, self.tmp_path)
            logged = isinstance(loc.server, S3Server)  # only the S3 server keeps a request log
            before = len(loc.server.requests()) if logged else 0
            job = dw.launch(
                "save_load", world, self.tmp_path, url=loc.url, storage_options=loc.storage_options
            )
            job.check()
            phases = split_log(loc.server.requests()[before:], ["save1", "save2"]) if logged else {}
            self.runs[(store, world)] = SaveRun(loc, world, job, job.results(), phases)
        return self.runs[(store, world)]


@pytest.fixture(scope="module")
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> SavedCheckpoints:
    return SavedCheckpoints(request, tmp_path_factory.mktemp("dist"))


# -- 1. save and load on several ranks ---------------------------------------------------------


@pytest.mark.parametrize(
    "store,world",
    [
        ("s3", 2),
        ("s3", 4),
        ("gcs", 2),
        ("azure", 2),
        ("file", 2),
        pytest.param("file", 4, marks=pytest.mark.slow),
    ],
)
def test_multi_rank_save_overwrite_and_load(saved: SavedCheckpoints, store: str, world: int) -> None:
    run = saved.get(store, world)
    for rank, result in enumerate(run.results):
        assert_loaded(result["loaded"], 2, rank, world, "shard0")
    # every rank reported the coordinator's save id; the overwrite kept v1's objects (all ranks')
    # whole for loads in flight, as the one generation retained, and added nothing else
    sid1, sid2 = run.results[0]["save1_save_id"], run.results[0]["save2_save_id"]
    assert sid1 != sid2
    assert all(r["save1_save_id"] == sid1 and r["save2_save_id"] == sid2 for r in run.results)
    keys = set(run.loc.objects())
    expected = {".metadata", f"{sid2}/manifest.json"} | {f"{sid2}/__{r}_0.distcp" for r in range(world)}
    retained = {f"{sid1}/manifest.json"} | {f"{sid1}/__{r}_0.distcp" for r in range(world)}
    assert keys == expected | retained
    metadata = run.loc.reader().read_metadata()
    assert save_id_of(metadata) == sid2
    assert {info.relative_path for info in metadata.storage_data.values()} == expected - {
        ".metadata",
        f"{sid2}/manifest.json",
    }


# -- 2. resharding -----------------------------------------------------------------------------


@pytest.mark.parametrize("store,world", [("s3", 2), ("s3", 4), ("gcs", 2), ("azure", 2), ("file", 2)])
def test_reshard_to_one_plain_process(saved: SavedCheckpoints, store: str, world: int) -> None:
    run = saved.get(store, world)
    assert_same(expected_state(2), load_plain(run.loc))


def test_reshard_2_to_3_ranks_and_shard0_to_shard1(saved: SavedCheckpoints, tmp_path: Path) -> None:
    loads = [
        (run.loc.url, run.loc.storage_options, placement)
        for run in (saved.get("s3", 2), saved.get("file", 2))
        for placement in ("shard0", "shard1")
    ]
    job = dw.launch("load", 3, tmp_path, loads=loads).check()
    for rank, result in enumerate(job.results()):
        for i, (_, _, placement) in enumerate(loads):
            assert_loaded(result[i], 2, rank, 3, placement)


def test_reshard_4_to_2_ranks_and_shard0_to_shard1(saved: SavedCheckpoints, tmp_path: Path) -> None:
    run = saved.get("s3", 4)
    loads = [(run.loc.url, run.loc.storage_options, p) for p in ("shard0", "shard1")]
    job = dw.launch("load", 2, tmp_path, loads=loads).check()
    for rank, result in enumerate(job.results()):
        assert_loaded(result[0], 2, rank, 2, "shard0")
        assert_loaded(result[1], 2, rank, 2, "shard1")


# -- 3. FSDP2 + Adam ---------------------------------------------------------------------------


@pytest.fixture(scope="module")
def fsdp_saved(
    request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory
) -> tuple[Location, dict[str, Any]]:
    tmp = tmp_path_factory.mktemp("fsdp")
    loc = new_location("s3", request, tmp)
    job = dw.launch("fsdp_save", 2, tmp, url=loc.url, storage_options=loc.storage_options).check()
    results = job.results()
    assert torch.equal(results[0]["losses"][1], results[1]["losses"][1])  # same batch on every rank
    return loc, results[0]


@pytest.mark.slow
@pytest.mark.parametrize("world", [1, 4])
def test_fsdp2_adam_saved_on_2_resumes_on_other_world_sizes(
    fsdp_saved: tuple[Location, dict[str, Any]], world: int, tmp_path: Path
) -> None:
    loc, reference = fsdp_saved
    job = dw.launch("fsdp_resume", world, tmp_path, url=loc.url, storage_options=loc.storage_options).check()
    results = job.results()
    resumed = results[0]
    assert all(r["epoch"] == 7 for r in results)
    # model and Adam state (exp_avg, exp_avg_sq, step, param_groups) exactly as saved
    assert_same(reference["after1"], resumed["loaded"], "loaded")
    # the next step's loss is bitwise the uninterrupted run's: the forward sees the same params
    assert torch.equal(resumed["losses"][0], reference["losses"][1]), (resumed["losses"], reference["losses"])
    # ... and so is everything after it. Each rank trains on the same full batch, so every rank
    # holds the same gradient and the reduce-scatter's sum-then-average returns it unchanged for
    # 1, 2 and 4 ranks (checked: bitwise here, with one intra-op thread per rank). Should a
    # future torch reduce in a different order, compare with a few-ulp tolerance instead.
    assert_same(reference["after2"], resumed["after2"], "after2")
    assert torch.equal(resumed["losses"][1], reference["losses"][2])


# -- 4. replicated tensors are written once -----------------------------------------------------


@pytest.mark.parametrize("world", [2, 4])
def test_replicated_values_are_written_once(saved: SavedCheckpoints, world: int) -> None:
    run = saved.get("s3", world)
    metadata = run.loc.reader().read_metadata()
    sid = save_id_of(metadata)
    infos = metadata.storage_data
    by_fqn = Counter(index.fqn for index in infos)
    for fqn in ["rep", "rep_i", "step", "tag", "cfg.lr", "cfg.name"]:
        assert by_fqn[fqn] == 1, fqn
    # the coordinator's manifest lists every item any rank wrote: a replicated item written by
    # two ranks would be listed twice (storage_data, a dict, would hide it)
    manifest = Manifest.from_json(run.loc.get(f"{sid}/manifest.json"))
    assert sum(len(records) for records in manifest.objects.values()) == len(infos)
    assert len({(i.relative_path, i.offset) for i in infos.values()}) == len(infos)
    # bytes stored = bytes of distinct items (+ < 64 bytes of alignment padding per item)
    objects = run.loc.objects()
    data_bytes = sum(
        size for key, size in objects.items() if key.startswith(f"{sid}/") and key.endswith(".distcp")
    )
    item_bytes = sum(i.length for i in infos.values())
    assert item_bytes <= data_bytes < item_bytes + 64 * len(infos)
    unique = sum(t.nbytes for t in dw.full_tensors(2).values())
    assert data_bytes < unique + 64 * 1024  # a second copy of "rep" alone is 256 KiB
    # the server saw one PUT per data object, from each rank, and nothing else for data
    data_puts = [r for r in run.phases["save2"] if r.kind in PUT_KINDS and r.path.endswith(".distcp")]
    assert sorted(r.path.rsplit("/", 1)[1] for r in data_puts) == [f"__{r}_0.distcp" for r in range(world)]


def test_manifest_checksums_cover_every_ranks_objects(saved: SavedCheckpoints, tmp_path: Path) -> None:
    """The coordinator's manifest holds the CRC32C of items other ranks wrote: a flipped byte in
    rank 1's object is caught at load."""
    run = saved.get("file", 2)
    copy = Location("file", str(tmp_path / "copy"))
    shutil.copytree(run.loc.url, copy.url)
    metadata = copy.reader().read_metadata()
    manifest = Manifest.from_json(copy.get(f"{save_id_of(metadata)}/manifest.json"))
    sizes = copy.objects()
    assert {k: manifest.object_size(k) for k in manifest.objects} == {
        k: v for k, v in sizes.items() if k.startswith(f"{save_id_of(metadata)}/") and k.endswith(".distcp")
    }
    index, info = next(
        (i, info)
        for i, info in metadata.storage_data.items()
        if info.relative_path.endswith("__1_0.distcp") and i.fqn == "dt"
    )
    path = Path(copy.url) / info.relative_path
    data = bytearray(path.read_bytes())
    data[info.offset + info.length - 2] ^= 0x01  # inside the tensor's bytes: decodes fine
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointException) as caught:
        load_plain(copy)
    assert CorruptCheckpointError in failure_types(caught.value)
    assert "checksum mismatch" in failure_text(caught.value)


# -- 5. use_collectives=False ----------------------------------------------------------------


@pytest.mark.parametrize("store", ["s3", "file"])
def test_use_collectives_false_writes_and_loads_rank_local_metadata(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    loc = new_location(store, request, tmp_path)
    job = dw.launch("no_collectives", 2, tmp_path, url=loc.url, storage_options=loc.storage_options).check()
    results = job.results()
    keys = set(loc.objects())
    assert "__0.metadata" in keys and "__1.metadata" in keys
    assert ".metadata" not in keys
    sids = [r["save_id"] for r in results]
    assert sids[0] != sids[1]
    assert keys == {"__0.metadata", "__1.metadata"} | {
        k for r, sid in enumerate(sids) for k in (f"{sid}/manifest.json", f"{sid}/__{r}_0.distcp")
    }
    for rank, result in enumerate(results):
        assert_same(result["expected"], result["loaded"], f"rank {rank}")
        assert result["loaded"]["who"]["rank"] == rank
        # each rank's metadata describes that rank's save only
        metadata = loc.reader().read_metadata(rank=rank)
        assert save_id_of(metadata) == sids[rank]


# -- 6. atomic across ranks ------------------------------------------------------------------


@pytest.mark.parametrize("store", ["s3", "gcs", "azure", "file"])
def test_one_rank_failing_fails_every_rank_and_commits_nothing(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    loc = new_location(store, request, tmp_path)
    job = dw.launch("fail_save", 2, tmp_path, url=loc.url, storage_options=loc.storage_options, fail_rank=1)
    results = job.check().results()
    for rank, result in enumerate(results):
        error = result["error"]
        assert error is not None and error["type"] == "CheckpointException", f"rank {rank}: {error}"
        assert "injected failure on rank 1" in error["failures"][1]
        assert_loaded(result["loaded"], 1, rank, 2, "shard0")  # v1, unchanged
    assert results[0]["digest_v1"] is not None and results[0]["digest_after"] == results[0]["digest_v1"]
    # then overwrite=False: every rank fails with the coordinator's CheckpointExistsError, and no
    # rank uploaded anything (the check runs in prepare_global_plan, before write_data)
    for rank, result in enumerate(results):
        error = result["exists_error"]
        assert error is not None and error["type"] == "CheckpointException", f"rank {rank}: {error}"
        assert error["failures"][0].startswith("CheckpointExistsError"), error
    assert results[0]["new_objects"] == []
    assert results[0]["digest_after_exists"] == results[0]["digest_v1"]
    assert_same(expected_state(1), load_plain(loc))
    manifests = [k for k in loc.objects() if k.endswith("manifest.json")]
    assert len(manifests) == 1  # only v1's: the failed save never reached the commit


@pytest.mark.slow
def test_sigkill_of_one_rank_mid_save_commits_nothing(request: pytest.FixtureRequest, tmp_path: Path) -> None:
    loc = new_location("s3", request, tmp_path)
    assert loc.server is not None
    before = len(loc.server.requests())
    job = dw.launch(
        "kill_save",
        2,
        tmp_path,
        timeout=120,
        grace=45,
        url=loc.url,
        storage_options=loc.storage_options,
        kill_rank=1,
        pg_timeout=20,
    )
    assert job.returncodes[1] == -9, job.describe()
    assert (job.out / "killed_at").exists(), "rank 1 was not killed by the planner"
    # rank 0 either saw the save fail (gloo notices the dead peer) or hung in a collective
    # and was killed by us; either way nothing was committed
    if job.returncodes[0] == 0:
        survivor = job.result(0)
        assert survivor["error"] is not None, "the save succeeded although rank 1 died"
        assert hashlib.sha256(loc.get(".metadata")).hexdigest() == survivor["digest_v1"]
    keys = loc.objects()
    assert len([k for k in keys if k.endswith("manifest.json")]) == 1
    assert_same(expected_state(1), load_plain(loc))
    # rank 1 died mid-upload: its multipart upload was started (and usually some parts sent) but
    # never completed, so no object of rank 1's new save exists
    metadata = loc.reader().read_metadata()
    committed = {info.relative_path for info in metadata.storage_data.values()}
    victim = [
        r
        for r in loc.server.requests()[before:]
        if r.path.endswith("/__1_0.distcp")
        and r.path.rsplit("/", 2)[1] not in {k.split("/")[0] for k in committed}
    ]
    kinds = Counter(r.kind for r in victim)
    assert kinds["create_multipart_upload"] == 1, kinds
    assert kinds["complete_multipart_upload"] == 0
    # the failed save's intent record stays for gc, beside rank 0's object
    debris = sorted(
        k
        for k in keys
        if k not in committed
        and k not in (".metadata",)
        and "manifest" not in k
        and not k.endswith("/intent.json")
    )
    # rank 0 finished its upload before the save failed: its object stays, unreferenced, for gc
    assert [k.rsplit("/", 1)[1] for k in debris] == ["__0_0.distcp"], debris


# -- 7. async_save ---------------------------------------------------------------------------


@pytest.mark.parametrize("mode", ["thread", pytest.param("process", marks=pytest.mark.slow)])
def test_async_save_on_two_ranks(mode: str, request: pytest.FixtureRequest, tmp_path: Path) -> None:
    loc = new_location("s3", request, tmp_path)
    bad_url = f"s3://no-such-bucket-{uuid.uuid4().hex[:8]}/ckpt"
    job = dw.launch(
        "async", 2, tmp_path, url=loc.url, storage_options=loc.storage_options, mode=mode, bad_url=bad_url
    ).check()
    for rank, result in enumerate(job.results()):
        # the upload waits for a gate this rank opens only after async_save returned
        assert result["future_type"] == "Future"
        assert result["done_at_return"] is False
        assert result["blocked_s"] < result["total_s"]
        # the staged copy was saved, not the live tensors mutated after the call
        assert_loaded(result["loaded1"], 1, rank, 2, "shard0")
        assert_loaded(result["loaded2"], 2, rank, 2, "shard0")
        error = result["error"]
        assert error is not None and error["type"] == "CheckpointException", error
        wanted = "injected failure on rank 1" if mode == "thread" else "BucketNotFoundError"
        assert any(wanted in text for text in error["failures"].values()), error
        assert_loaded(result["loaded3"], 2, rank, 2, "shard0")  # the failed save committed nothing
    print(
        f"\nasync_save {mode}: call blocked "
        + ", ".join(
            f"rank {r}: {res['blocked_s']:.3f} s of {res['total_s']:.3f} s"
            for r, res in enumerate(job.results())
        )
    )


# -- 8. requests per save as a function of the world size ------------------------------------------


def test_request_counts_by_world_size(saved: SavedCheckpoints) -> None:
    rows = []
    for world in (1, 2, 4):
        run = saved.get("s3", world)
        for phase in ("save1", "save2"):
            requests = run.phases[phase]
            server = Counter(r.kind for r in requests)
            clients = [Counter(r[f"{phase}_requests"]) for r in run.results]
            retries = sum(c.pop("retries", 0) for c in clients)
            # the server saw exactly what the ranks' clients counted: attribution is sound
            total: Counter[str] = Counter()
            for c in clients:
                for kind, n in c.items():
                    total[CLIENT_TO_SERVER[kind]] += n
            if not retries:
                assert server == total, (server, total)
            # only the coordinator reads on the save path, and nobody lists
            assert server["list_objects"] == 0
            for rank, c in enumerate(clients[1:], start=1):
                assert set(c) <= {"put", "start_upload", "upload_part", "complete_upload"}, (rank, c)
            # (the coordinator reads .metadata, and on overwrite the replaced save's manifest)
            reads = [r for r in requests if r.kind in ("head", "get_object")]
            assert all(r.path.endswith(("/.metadata", "/manifest.json")) for r in reads), reads
            puts = sum(n for k, n in server.items() if k in PUT_KINDS)
            assert puts == world + 3  # one data object per rank, the intent record, the manifest, .metadata
            rows.append(_row(world, phase, server))
    # reads do not grow with the world size
    for phase in ("save1", "save2"):
        read_counts = {(r[3], r[4]) for r in rows if r[1] == phase}
        assert len(read_counts) == 1, rows
    for world in (1, 2, 4):  # for information: the load that followed, all ranks together
        rows.append(_row(world, "load", Counter(r.kind for r in saved.get("s3", world).phases["rest"])))
    print("\nW  operation            PUT-class GET HEAD LIST DELETE total")
    labels = {"save1": "save1 (fresh URL)", "save2": "save2 (overwrite)", "load": "load (all ranks)"}
    for w, phase, puts, gets, heads, lists, deletes, total in rows:
        print(f"{w}  {labels[phase]:20} {puts:9} {gets:3} {heads:4} {lists:4} {deletes:6} {total:5}")


def _row(world: int, phase: str, server: Counter[str]) -> tuple[Any, ...]:
    puts = sum(n for k, n in server.items() if k in PUT_KINDS)
    kinds = ("get_object", "head", "list_objects", "delete_objects")
    return (world, phase, puts, *(server[k] for k in kinds), sum(server.values()))
