"""The benchmark's workloads and the medium workload's settings: shapes, sizes, determinism,
names, stream counts and targets; the fixed-cost measurement's summary; short end-to-end runs
against the moto server each harness starts itself."""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from benchmarks.catalog import DCP_CLOUD_LOCAL_CONCURRENCY, DCP_CLOUD_MAX_CONCURRENCY, MiB
from benchmarks.cli import parse_args
from benchmarks.fixed_cost import RoundResult, summarize, table_cells
from benchmarks.runner import contender_streams, default_name
from benchmarks.summary import Row
from benchmarks.tables import TABLE_HEADER
from benchmarks.tables import table_cells as bench_cells
from benchmarks.targets import EMULATED_SAVE, evaluate_targets
from benchmarks.workloads import (
    TINY_COUNT,
    build_state_dict,
    raw_parts,
    tensor_bytes,
    tensor_specs,
    workload_info,
)

REPO = Path(__file__).resolve().parent.parent

ROW_SLACK = 1024 * 4  # one fp32 row of the generated matrices: sizes are whole rows


def _medium(specs: list) -> list:
    return [s for s in specs if s.nbytes > 64 * 1024]


def test_medium_workload_at_256_mib_is_mostly_1_to_8_mib_tensors() -> None:
    specs = tensor_specs(256, "medium")
    medium = _medium(specs)
    total = sum(s.nbytes for s in specs)
    assert abs(total - 256 * MiB) <= ROW_SLACK
    assert len(specs) - len(medium) == TINY_COUNT == 300
    assert 50 <= len(medium) <= 60  # the case: about 55 tensors of 1-8 MiB
    assert all(MiB - ROW_SLACK <= s.nbytes <= 8 * MiB for s in medium)
    assert sum(s.nbytes for s in medium) >= 0.99 * total
    by_dtype = {d: sum(s.nbytes for s in medium if s.dtype == d) for d in (torch.float32, torch.bfloat16)}
    assert min(by_dtype.values()) >= 0.25 * total  # a real mix of fp32 and bf16
    assert {round(s.nbytes / MiB) for s in medium} == set(range(1, 9))  # every size from 1 to 8 MiB
    assert len({s.name for s in specs}) == len(specs)


@pytest.mark.parametrize("size_mib", [8, 9, 32, 100, 1024])
def test_medium_workload_keeps_its_shape_at_every_size(size_mib: int) -> None:
    specs = tensor_specs(size_mib, "medium")
    medium = _medium(specs)
    assert abs(sum(s.nbytes for s in specs) - size_mib * MiB) <= ROW_SLACK
    assert medium and all(MiB - ROW_SLACK <= s.nbytes <= 8 * MiB for s in medium)
    assert sum(s.nbytes for s in medium) > 0.5 * size_mib * MiB
    info = workload_info(size_mib, "medium")
    assert info["workload"] == "medium"
    assert info["tensors_1_to_8_mib"] >= len(medium) - 1  # the last one may be a row under 1 MiB
    assert info["largest_tensor_bytes"] <= 8 * MiB


def test_model_workload_is_the_default_and_keeps_its_large_tensors() -> None:
    assert tensor_specs(256) == tensor_specs(256, "model")
    large = [s for s in tensor_specs(256) if s.name.startswith("model.large_")]
    assert len(large) == 4 and all(s.nbytes > 8 * MiB for s in large)
    assert (
        workload_info(256)["largest_tensor_bytes"]
        > 8 * MiB
        >= workload_info(256, "medium")["largest_tensor_bytes"]
    )


def test_medium_state_dict_is_seeded() -> None:
    first, again, other = (build_state_dict(16, seed, "medium") for seed in (0, 0, 1))
    tensors = [k for k, v in first.items() if isinstance(v, torch.Tensor)]
    assert all(torch.equal(first[k].view(torch.uint8), again[k].view(torch.uint8)) for k in tensors)
    assert not all(torch.equal(first[k], other[k]) for k in tensors)
    assert tensor_bytes(first) == sum(s.nbytes for s in tensor_specs(16, "medium"))
    assert raw_parts(first) == raw_parts(again)  # the raw contenders move the same bytes
    assert sum(len(p) for p in raw_parts(first)) == tensor_bytes(first)


def test_workloads_refuse_unknown_names_and_too_small_sizes() -> None:
    with pytest.raises(ValueError, match="unknown workload"):
        tensor_specs(64, "huge")
    with pytest.raises(ValueError, match="at least 8 MiB"):
        tensor_specs(4, "medium")
    with pytest.raises(SystemExit):
        parse_args(["--workload", "medium", "--size-mib", "4"])


def test_medium_results_have_their_own_names() -> None:
    assert default_name(parse_args(["--size-mib", "256"])) == "moto-256mib"
    assert default_name(parse_args(["--workload", "medium", "--size-mib", "256"])) == "moto-medium-256mib"
    emulated = [
        "--workload",
        "medium",
        "--server",
        "seaweedfs",
        "--latency-ms",
        "20",
        "--bandwidth-mbps",
        "25",
    ]
    assert (
        default_name(parse_args([*emulated, "--size-mib", "256"]))
        == "seaweedfs-lat20ms-bw25MBps-medium-256mib"
    )
    assert default_name(parse_args(["--workload", "medium", "--scaling", "64,256"])) == "scaling-moto-medium"


def test_raw_streams_follow_dcp_cloud_concurrency_unless_set() -> None:
    assert parse_args([]).raw_streams == 8  # the writer's default against a server on this machine
    emulated = parse_args(["--latency-ms", "20", "--size-mib", "256"])
    assert emulated.max_concurrency == emulated.raw_streams == 64  # stands for a remote store
    assert emulated.raw_part_mib == 5
    args = parse_args(["--workload", "medium", "--max-concurrency", "32", "--size-mib", "512"])
    assert args.raw_streams == 32 and args.raw_part_mib == 16  # the writer's parts at 512 MiB
    # 512 MiB is 32 parts of 16 MiB: one for each of the 32 streams
    assert contender_streams("raw", args, 512) == contender_streams("dcp_cloud", args, 512) == 32
    assert contender_streams("transport", args, 512) == 32
    # 256 MiB is 16 parts of 16 MiB: the raw ceiling cannot run more streams than parts...
    args = parse_args(["--workload", "medium", "--max-concurrency", "32", "--raw-part-mib", "16"])
    assert contender_streams("raw", args, 256) == 16
    # ...unless the parts are smaller
    args = parse_args(["--workload", "medium", "--max-concurrency", "32", "--raw-part-mib", "8"])
    assert contender_streams("raw", args, 256) == 32
    args = parse_args(["--max-concurrency", "32", "--raw-streams", "8"])
    assert (contender_streams("raw", args, 1024), contender_streams("dcp_cloud", args, 1024)) == (8, 32)
    assert contender_streams("fsspec_t8", args, 1024) == 8
    for bad in (["--max-concurrency", "0"], ["--raw-streams", "0"], ["--raw-part-mib", "4"]):
        with pytest.raises(SystemExit):
            parse_args(bad)
    assert parse_args(["--store", "file", "--raw-part-mib", "1"]).raw_part_mib == 1


def test_raw_streams_default_is_dcp_cloud_default_concurrency() -> None:
    from dcp_cloud.options import WRITER_LOCAL_MAX_CONCURRENCY, WRITER_MAX_CONCURRENCY

    assert DCP_CLOUD_MAX_CONCURRENCY == WRITER_MAX_CONCURRENCY
    assert DCP_CLOUD_LOCAL_CONCURRENCY == WRITER_LOCAL_MAX_CONCURRENCY == parse_args([]).raw_streams


def test_raw_parts_default_to_the_writer_part_size() -> None:
    assert parse_args([]).raw_part_mib == 16  # 1 GiB: 16 MiB parts
    assert parse_args(["--size-mib", "256", "--max-concurrency", "64"]).raw_part_mib == 5  # smaller
    assert parse_args(["--size-mib", "256"]).raw_part_mib == 16  # 8 connections: 16 parts
    assert parse_args(["--size-mib", "256", "--part-size-mib", "8"]).raw_part_mib == 8


def test_raw_parts_follow_the_part_size() -> None:
    state_dict = build_state_dict(8, 0, "medium")
    parts = raw_parts(state_dict, 5 * MiB)
    assert [len(p) for p in parts[:-1]] == [5 * MiB] * (len(parts) - 1) and 0 < len(parts[-1]) <= 5 * MiB
    assert b"".join(parts) == b"".join(raw_parts(state_dict))


def _rows(save: dict[str, float], load: dict[str, float], streams: dict[str, int]) -> list[Row]:
    rows = []
    for op, speeds in (("save", save), ("load", load)):
        for contender, gb in speeds.items():
            rows.append(
                Row(contender, op, 1, 256, 1.0, gb, peak_extra_rss_mib=100.0, streams=streams[contender])
            )
    return rows


def _verdicts(args: argparse.Namespace, rows: list[Row]) -> dict[str, bool | None]:
    return {t.goal: t.holds for t in evaluate_targets(rows, args)}


def test_medium_targets_in_the_emulated_cloud_compare_raw_at_equal_streams() -> None:
    emulated = ["--workload", "medium", "--server", "seaweedfs", "--latency-ms", "20"]
    args = parse_args([*emulated, "--size-mib", "256"])
    streams = {"dcp_cloud": 16, "fsspec_t8": 8, "raw": 16}
    rows = _rows(
        {"dcp_cloud": 0.40, "fsspec_t8": 0.09, "raw": 0.45}, {"dcp_cloud": 0.31, "fsspec_t8": 0.1}, streams
    )
    verdicts = _verdicts(args, rows)
    assert verdicts["save: dcp_cloud >= 4x FsspecWriter t8 (" + EMULATED_SAVE + ")"] is True
    same = "save: dcp_cloud >= 0.9x raw PUT ceiling (emulated cloud) with the same number of streams"
    assert verdicts[same] is False  # 0.40 / 0.45 = 0.89
    assert verdicts["load: dcp_cloud >= 3x FsspecReader t8 (emulated cloud)"] is True
    # a ceiling with other streams than dcp_cloud's concurrency is not compared
    rows = _rows({"dcp_cloud": 0.4, "raw": 0.2}, {}, {**streams, "raw": 8})
    args = parse_args([*emulated, "--size-mib", "256", "--raw-streams", "8"])
    target = next(t for t in evaluate_targets(rows, args) if t.goal == same)
    assert target.holds is None and target.measured.endswith("rerun with --raw-streams 16")
    # too few parts for the streams: the hint asks for smaller parts as well
    args = parse_args([*emulated, "--size-mib", "64"])
    target = next(t for t in evaluate_targets(rows, args) if t.goal == same)
    assert target.holds is None and target.measured.endswith("--raw-streams 16 --raw-part-mib 5")


def test_medium_targets_on_seaweedfs_and_moto() -> None:
    streams = {"dcp_cloud": 16, "fsspec_t8": 8, "raw": 16}
    rows = _rows({"dcp_cloud": 0.16, "fsspec_t8": 0.1}, {"dcp_cloud": 0.32, "fsspec_t8": 0.1}, streams)
    seaweed = _verdicts(
        parse_args(["--workload", "medium", "--server", "seaweedfs", "--size-mib", "256"]), rows
    )
    assert seaweed["save: dcp_cloud >= 1.5x FsspecWriter t8 (SeaweedFS)"] is True
    assert seaweed["load: dcp_cloud >= 1.5x FsspecReader t8 (SeaweedFS)"] is True
    rows = _rows({"dcp_cloud": 0.09, "fsspec_t8": 0.1}, {"dcp_cloud": 0.32, "fsspec_t8": 0.1}, streams)
    moto = _verdicts(parse_args(["--workload", "medium", "--size-mib", "256"]), rows)
    assert moto["save: dcp_cloud >= 1x FsspecWriter t8 (moto: never slower)"] is False
    assert moto["load: dcp_cloud >= 1x FsspecReader t8 (moto: never slower)"] is True
    assert moto["load: dcp_cloud >= 1x s3torchconnector (moto: never slower)"] is None  # not measured
    # the model workload keeps its own targets
    model = _verdicts(parse_args(["--size-mib", "256"]), rows)
    assert "load: dcp_cloud >= 10x FsspecReader t8" in model


def test_bench_table_says_how_many_streams_each_contender_used() -> None:
    rows = _rows({"dcp_cloud": 0.4, "raw": 0.5}, {}, {"dcp_cloud": 32, "raw": 32})
    cells = bench_cells(rows, "the proxy")
    column = TABLE_HEADER.index("streams")
    assert [c[column] for c in cells] == ["32", "32"]


def test_fixed_cost_summary_takes_medians_of_per_round_differences() -> None:
    results = [
        RoundResult(0, save_s=0.30, load_s=0.10, put_s=0.10, get_s=0.05, save_requests={"put": 4}),
        RoundResult(1, save_s=0.25, load_s=0.08, put_s=0.15, get_s=0.04, save_requests={"put": 4}),
        RoundResult(2, save_s=0.50, load_s=0.30, put_s=0.10, get_s=0.05, save_requests={"put": 4}),
    ]
    summary = summarize(results)
    assert summary["save_overhead_ms"]["median"] == pytest.approx(200.0)  # 200, 100, 400
    assert summary["load_overhead_ms"]["median"] == pytest.approx(50.0)  # 50, 40, 250
    assert summary["save"]["median"] == pytest.approx(300.0)
    cells = {c[0]: c for c in table_cells(summary)}
    assert cells["save - raw PUT"][6] == "MISSED"  # 200 ms > 150 ms
    assert cells["load - raw GET"][6] == "holds"
    assert cells["save - raw PUT"][7].startswith("4: put=4")


@pytest.mark.slow
def test_fixed_cost_runs_against_moto(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "benchmarks.fixed_cost", "--rounds", "2", "--tensors", "2", "--tensor-mib", "1",
        "--results-dir", str(tmp_path), "--name", "fc",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "fc.json").read_text())
    assert report["tensor_bytes"] == 2 * MiB and len(report["rounds"]) == 2
    for r in report["rounds"]:
        assert r["save_s"] > 0 and r["load_s"] > 0 and r["put_s"] > 0 and r["get_s"] > 0
        assert r["server_requests"]["put"] == {"put_object": 1}  # the raw PUT is one request
        assert r["server_requests"]["get"] == {"get_object": 1}
        assert sum(r["save_requests"].values()) >= 2  # data and commit at least
        assert r["save_overhead_ms"] == pytest.approx((r["save_s"] - r["put_s"]) * 1000)
    assert "| save - raw PUT |" in (tmp_path / "fc.md").read_text()


@pytest.mark.slow
def test_bench_medium_workload_runs_every_byte_and_dcp_contender_on_moto(tmp_path: Path) -> None:
    command = [
        sys.executable, "-m", "benchmarks.bench", "--workload", "medium", "--size-mib", "16", "--rounds", "1",
        "--contenders", "dcp_cloud,fsspec_t8,raw,transport", "--ops", "save,load",
        "--raw-streams", "2", "--raw-part-mib", "5",
        "--no-plot", "--results-dir", str(tmp_path),
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    report = json.loads((tmp_path / "moto-medium-16mib.json").read_text())
    assert report["workloads"]["16"]["workload"] == "medium"
    rows = {(r["contender"], r["op"]): r for r in report["summary"]}
    assert set(rows) == {
        (c, op) for c in ("dcp_cloud", "fsspec_t8", "raw", "transport") for op in ("save", "load")
    }
    for row in rows.values():
        assert not row["errors"], row
        assert row["gb_per_s"] > 0
    # 16 MiB in 5 MiB parts: 4 parts, as 2 objects of 2 parts each (real multipart uploads)
    multipart = {"create_multipart_upload": 2, "upload_part": 4, "complete_multipart_upload": 2}
    assert rows["raw", "save"]["requests"] == rows["transport", "save"]["requests"] == multipart
    assert rows["raw", "load"]["requests"] == {"get_object": 4}
    streams = {c: rows[c, "save"]["streams"] for c in ("dcp_cloud", "fsspec_t8", "raw", "transport")}
    assert streams == {"dcp_cloud": 8, "fsspec_t8": 8, "raw": 2, "transport": 4}
    assert "medium workload" in (tmp_path / "moto-medium-16mib.md").read_text()


def test_load_rows_count_the_readers_streams() -> None:
    local = parse_args(["--size-mib", "1024"])
    assert contender_streams("dcp_cloud", local, 1024, "save") == 8  # the writer, server on this machine
    assert contender_streams("dcp_cloud", local, 1024, "load") == 16  # the reader's default
    assert contender_streams("transport", local, 1024, "save") == 16  # the store layer's default
    given = parse_args(["--size-mib", "1024", "--max-concurrency", "24"])
    assert contender_streams("dcp_cloud", given, 1024, "load") == 24
    assert contender_streams("fsspec_t8", given, 1024, "load") == 8
