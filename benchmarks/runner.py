"""Running a benchmark: the rounds of the comparison, the scaling series, the profiles.

``run_benchmark`` opens the endpoint, runs every measurement (each one a worker process, see
``benchmarks.worker``), summarizes the medians, checks the targets, prints the tables and
writes the results files.
"""

from __future__ import annotations

import argparse
import shlex
import sys
import tempfile
import time

import psutil

from benchmarks.catalog import (
    ASYNC_CONTENDERS,
    BASELINE,
    CONTENDERS,
    DEFAULT_WORKLOAD,
    EMULATORS,
    ENTRY_MODULE,
    FIXED_STREAMS,
    TORCH_T8,
    MiB,
    raw_streams_used,
    reader_concurrency,
    writer_concurrency,
)
from benchmarks.contenders import WorkerSpec, available_contenders
from benchmarks.endpoints import Endpoint, open_endpoint
from benchmarks.measurement import Measurement, show_measurement
from benchmarks.report import RunRecord, code_version, write_results
from benchmarks.summary import Row, summarize
from benchmarks.tables import (
    SCALING_HEADER,
    TABLE_HEADER,
    TARGETS_HEADER,
    scaling_cells,
    table_cells,
    targets_cells,
    text_table,
)
from benchmarks.targets import Target, evaluate_targets
from benchmarks.worker import measure
from benchmarks.workloads import workload_info


def setting_text(args: argparse.Namespace, endpoint: Endpoint | None = None) -> str:
    """One line that says where and how this run measured."""
    if args.store == "file":
        where = f"local disk ({endpoint.url if endpoint else args.file_dir or tempfile.gettempdir()})"
    elif args.endpoint_url:
        where = f"S3 endpoint {args.endpoint_url}"
    elif args.store == "gcs":
        where = "fake-gcs-server (GCS emulator) on 127.0.0.1"
    elif args.store == "azure":
        where = "Azurite (Azure Blob emulator) on 127.0.0.1"
    else:
        where = f"{args.server} S3 server on 127.0.0.1"
    if args.latency_ms or args.bandwidth_mbps:
        cap = f"{args.bandwidth_mbps:g} MB/s per connection" if args.bandwidth_mbps else "no bandwidth cap"
        where += f", emulated cloud: +{args.latency_ms:g} ms per request, {cap}"
    elif args.proxy:
        where += ", through the counting proxy (no latency, no cap)"
    if args.unsigned_payload:
        where += "; botocore clients send bodies unsigned (with a CRC32), as over HTTPS"
    return where


def default_name(args: argparse.Namespace) -> str:
    """The results' file name when --name is not given, from the setting: e.g. moto-1024mib."""
    if args.store == "file":
        base = "file"
    elif args.endpoint_url:
        base = "external"
    else:
        base = args.server if args.store == "s3" else EMULATORS[args.store]
    if args.latency_ms or args.bandwidth_mbps:
        base += f"-lat{args.latency_ms:g}ms-bw{args.bandwidth_mbps:g}MBps"
    if args.unsigned_payload:
        base += "-unsigned"
    if args.workload != DEFAULT_WORKLOAD:
        base += f"-{args.workload}"
    if args.scaling:
        return f"scaling-{base}"
    return f"{base}-{args.size_mib}mib"


def contender_streams(contender: str, args: argparse.Namespace, size_mib: int, op: str = "save") -> int:
    """Requests ``contender`` keeps in flight at most in ``op``: dcp_cloud's max_concurrency
    (its writer's in saves, its reader's in loads), the raw ceiling's --raw-streams (no more than
    its parts), the transport's (its store's: --max-concurrency, else 16; no more than the
    parts), the torch classes' thread counts."""
    concurrency = reader_concurrency(args) if op == "load" else writer_concurrency(args)
    if contender in ("raw", "transport"):
        tensor_bytes = workload_info(size_mib, args.workload)["tensor_bytes"]
        streams = args.raw_streams if contender == "raw" else reader_concurrency(args)
        return raw_streams_used(streams, args.raw_part_mib, tensor_bytes)
    return FIXED_STREAMS.get(contender, concurrency)


def _spec(
    args: argparse.Namespace, endpoint: Endpoint, contender: str, op: str, prefix: str, size: int
) -> WorkerSpec:
    """What the worker of one measurement of ``contender``'s ``op`` at ``prefix`` does."""
    return WorkerSpec(
        contender=contender,
        op=op,
        url=endpoint.location(prefix),
        size_mib=size,
        seed=args.seed,
        part_size_mib=args.part_size_mib,
        endpoint_url=endpoint.url if endpoint.store != "file" else "",
        storage_options=endpoint.storage_options,
        raw_streams=args.raw_streams,
        raw_part_mib=args.raw_part_mib,
        workload=args.workload,
        max_concurrency=args.max_concurrency,
        memory_budget_mib=args.memory_budget_mib,
    )


def run_rounds(args: argparse.Namespace, endpoint: Endpoint, contenders: list[str]) -> list[Measurement]:
    """Every round of the comparison: each contender's ops in alternating contender order."""
    measurements: list[Measurement] = []
    for round_index in range(args.rounds):
        order = contenders if round_index % 2 == 0 else contenders[::-1]
        for contender in order:
            ops = [op for op in args.ops if op != "async_save" or contender in ASYNC_CONTENDERS]
            for op in ops:
                prefix = f"{contender}/{round_index}" + ("-async" if op == "async_save" else "")
                if op != "load":
                    endpoint.delete_prefix(prefix + "/")
                spec = _spec(args, endpoint, contender, op, prefix, args.size_mib)
                m = measure(spec, round_index, endpoint, args.timeout_s)
                measurements.append(m)
                print(f"  round {round_index} {contender:16} {op:10}: {show_measurement(m)}", flush=True)
                if op == "save" and m.error and "load" in ops:
                    ops.remove("load")  # nothing to load
                if op != "save" or "load" not in ops:
                    endpoint.delete_prefix(prefix + "/")
    return measurements


def run_profiles(args: argparse.Namespace, endpoint: Endpoint, name: str) -> list[Measurement]:
    """One extra save and load per profiled contender under py-spy (not part of the medians)."""
    out_dir = args.results_dir / "profiles"
    out_dir.mkdir(parents=True, exist_ok=True)
    ext = {"raw": "txt", "flamegraph": "svg", "speedscope": "json"}[args.profile_format]
    profiled = []
    for contender in args.profile_contenders:
        prefix = f"{contender}/profile"
        endpoint.delete_prefix(prefix + "/")
        for op in ("save", "load"):
            path = out_dir / f"{name}-{contender}-{op}.{ext}"
            spec = _spec(args, endpoint, contender, op, prefix, args.size_mib)
            m = measure(spec, -1, endpoint, args.timeout_s, path, args.profile_format)
            profiled.append(m)
            print(f"  profile {contender:16} {op:10}: {show_measurement(m)} -> {path}", flush=True)
            if args.profile_format == "raw" and path.exists():
                from benchmarks.profile_summary import summarize as summarize_profile

                summary = summarize_profile(path)
                path.with_suffix(".summary.txt").write_text(summary + "\n")
            if m.error:
                break
        endpoint.delete_prefix(prefix + "/")
    return profiled


def run_scaling(args: argparse.Namespace, endpoint: Endpoint, contenders: list[str]) -> list[Measurement]:
    """Saves at each size of --scaling; skips a size whose predicted memory is not available."""
    measurements: list[Measurement] = []
    for size in sorted(args.scaling):
        for round_index in range(args.rounds):
            order = contenders if round_index % 2 == 0 else contenders[::-1]
            for contender in order:
                prefix = f"scaling/{contender}/{size}/{round_index}"
                m = _memory_skip(measurements, contender, size, round_index, endpoint.location(prefix))
                if m is None:
                    endpoint.delete_prefix(prefix + "/")
                    spec = _spec(args, endpoint, contender, "save", prefix, size)
                    m = measure(spec, round_index, endpoint, args.timeout_s)
                    endpoint.delete_prefix(prefix + "/")
                measurements.append(m)
                print(
                    f"  {size:5} MiB round {round_index} {contender:16} save: {show_measurement(m)}",
                    flush=True,
                )
    return measurements


def _memory_skip(
    earlier: list[Measurement], contender: str, size: int, round_index: int, url: str
) -> Measurement | None:
    """A skipped measurement when the save at ``size`` would need more memory than is free,
    predicted from the contender's earlier extra RSS per MiB; None when it fits."""
    per_mib = [
        m.peak_extra_rss_mib / m.size_mib
        for m in earlier
        if m.contender == contender and m.peak_extra_rss_mib is not None and m.size_mib
    ]
    need_mib = size * (1 + max(per_mib, default=1.0)) + 1024  # the data + the save's extra + margin
    available_mib = psutil.virtual_memory().available / MiB
    if need_mib <= 0.9 * available_mib:
        return None
    m = Measurement(contender, "save", round_index, url, size)
    m.error = (
        f"skipped: would need about {need_mib / 1024:.1f} GiB of memory, "
        f"{available_mib / 1024:.1f} GiB available"
    )
    return m


def run_benchmark(args: argparse.Namespace) -> int:
    """Run the comparison (or the scaling series) and write the results; returns the exit status."""
    if args.scaling:
        requested = args.scaling_contenders or [BASELINE, TORCH_T8[args.store]]
    else:
        requested = args.contenders or list(CONTENDERS[args.store])
    contenders = available_contenders(requested)
    name = args.name or default_name(args)
    command = shlex.join([sys.executable, "-m", ENTRY_MODULE, *sys.argv[1:]])
    print(f"command: {command}")
    sizes = sorted(args.scaling) if args.scaling else [args.size_mib]
    workloads = {size: workload_info(size, args.workload) for size in sizes}
    for size, w in workloads.items():
        print(
            f"{args.workload} workload {size} MiB: {w['tensors']} tensors + {w['non_tensor_entries']} "
            f"non-tensor entries, {w['tensor_bytes'] / MiB:.1f} MiB {w['bytes_by_dtype']}"
        )
    code_at_start = code_version()
    print(f"dcp_cloud code: {code_at_start}")
    started = time.time()
    profiled: list[Measurement] = []
    with open_endpoint(args) as endpoint:
        setting = setting_text(args, endpoint)
        print(f"setting: {setting}; requests counted by: {endpoint.request_source}")
        if args.scaling:
            measurements = run_scaling(args, endpoint, contenders)
        else:
            measurements = run_rounds(args, endpoint, contenders)
            if args.profile:
                profiled = run_profiles(args, endpoint, name)
    rows = summarize(measurements, contenders, ("save",) if args.scaling else tuple(args.ops))
    for row in rows:
        row.streams = contender_streams(row.contender, args, row.size_mib, row.op)
    code = _code_during(code_at_start)
    targets = evaluate_targets(rows, args)
    _print_tables(args, rows, targets, endpoint.request_source)
    record = RunRecord(
        name=name,
        command=command,
        code=code,
        setting=setting,
        request_source=endpoint.request_source,
        workloads=workloads,
        contenders=contenders,
        measurements=measurements,
        profiled=profiled,
        rows=rows,
        targets=targets,
        elapsed_s=time.time() - started,
    )
    write_results(args, record)
    failed = [r for r in rows if r.errors]
    for r in failed:
        print(f"FAILED: {r.contender} {r.op}: {'; '.join(r.errors)}", file=sys.stderr)
    return 1 if failed else 0


def _code_during(code_at_start: str) -> str:
    """The code version of the run: the one at its start, or "start -> end" (with a warning)
    when the repository changed while it ran."""
    if code_version() == code_at_start:
        return code_at_start
    code = f"{code_at_start} -> {code_version()}"
    print(f"WARNING: the repository changed during the run ({code})", file=sys.stderr)
    return code


def _print_tables(
    args: argparse.Namespace, rows: list[Row], targets: list[Target], request_source: str
) -> None:
    print()
    if args.scaling:
        print(text_table(SCALING_HEADER, scaling_cells(rows)))
    else:
        print(text_table(TABLE_HEADER, table_cells(rows, request_source)))
    print()
    print(text_table(TARGETS_HEADER, targets_cells(targets)))
