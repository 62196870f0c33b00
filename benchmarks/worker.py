"""One measurement in its own process: the parent's ``measure`` and the child's ``run_worker``.

The parent starts ``python -m benchmarks.bench --worker SPEC`` with the endpoint's environment;
the child imports the contender's client libraries, builds the workload, times one save, load
or async_save, checks what it loaded bit for bit, and prints its figures as one JSON line. The
parent reads that line and adds the requests the server or proxy counted meanwhile.
"""

from __future__ import annotations

import dataclasses
import importlib
import json
import os
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.distributed.checkpoint as dcp

from benchmarks.catalog import (
    BASELINE,
    BYTE_CONTENDERS,
    CLIENT_MODULES,
    ENTRY_MODULE,
    REPO_ROOT,
    SCHEMES,
    UNVERIFIED,
    MiB,
)
from benchmarks.ceilings import RAW_LOADERS, RAW_SAVERS, transport_load, transport_save
from benchmarks.contenders import READERS, WRITERS, WorkerSpec
from benchmarks.measurement import Measurement, measured
from benchmarks.workloads import (
    assert_same,
    build_state_dict,
    byte_view,
    raw_parts,
    tensor_bytes,
    zeroed_like,
)

if TYPE_CHECKING:
    from benchmarks.endpoints import Endpoint


def url_store(url: str) -> str:
    """The store of a worker's URL: s3, gcs or azure by scheme, else file (a local path)."""
    scheme, sep, _ = url.partition("://")
    stores = {s: store for store, s in SCHEMES.items()}
    return stores.get(scheme, "file") if sep else "file"


def _preimport(contender: str, store: str) -> None:
    """Import the contender's client libraries before timing: a one-off cost per process that
    some writers pay in their constructor and others inside the first save or load."""
    if store == "file":
        modules = ["dcp_cloud"] if contender in (BASELINE, UNVERIFIED) else []
    elif store == "s3":
        modules = {"raw": ["boto3"], "s3torchconnector": ["s3torchconnector.dcp"]}.get(contender, ["s3fs"])
    else:
        modules = [CLIENT_MODULES[store]]
    if contender == "transport":
        modules = [*modules, "dcp_cloud"]
    for module in modules:
        importlib.import_module(module)


def _wait_async(handle: Any) -> None:
    """Wait for what ``dcp.async_save`` returned: a Future, or an AsyncSaveResponse."""
    if hasattr(handle, "result"):
        handle.result()
        return
    for name in ("staging_completion", "upload_completion"):
        future = getattr(handle, name, None)
        if future is not None:
            future.result()


def run_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Build the data, run one timed save or load, and return its figures (worker side)."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    store = url_store(spec.url)
    _preimport(spec.contender, store)
    expected = build_state_dict(spec.size_mib, spec.seed, spec.workload)
    result: dict[str, Any] = {"payload_bytes": tensor_bytes(expected)}
    if spec.contender in BYTE_CONTENDERS:
        parts = raw_parts(expected, spec.raw_part_mib * MiB)
        del expected  # the byte contenders hold only the parts while they are measured
        _time_bytes(spec, store, parts, result)
    else:
        _time_dcp(spec, expected, result)
    return result


def _time_bytes(spec: WorkerSpec, store: str, parts: list[bytes], result: dict[str, Any]) -> None:
    """Time the raw ceiling's or the transport's save or load of ``parts``; check a load."""
    if spec.op == "save":
        save = RAW_SAVERS[store] if spec.contender == "raw" else transport_save
        with measured(result, spec.profile, spec.profile_format):
            save(parts, spec)
        return
    load = RAW_LOADERS[store] if spec.contender == "raw" else transport_load
    flat = torch.zeros(sum(len(p) for p in parts), dtype=torch.uint8)
    view = byte_view(flat)
    with measured(result, spec.profile, spec.profile_format):
        load(view, [len(p) for p in parts], spec)
    start = 0
    for part in parts:
        if view[start : start + len(part)] != part:
            raise AssertionError(f"DATA MISMATCH after raw load at byte {start}")
        start += len(part)


def _time_dcp(spec: WorkerSpec, expected: dict[str, Any], result: dict[str, Any]) -> None:
    """Time a DCP contender's save, async_save or load of ``expected``; check a load."""
    if spec.op in ("save", "async_save"):
        writer = WRITERS[spec.contender](spec)
        with measured(result, spec.profile, spec.profile_format):
            if spec.op == "save":
                dcp.save(expected, storage_writer=writer)
            else:
                called = time.perf_counter()
                handle = dcp.async_save(expected, storage_writer=writer)
                result["blocked_s"] = time.perf_counter() - called
                _wait_async(handle)
        stats = getattr(writer, "last_stats", None)
    else:
        target = zeroed_like(expected)
        reader = READERS[spec.contender](spec)
        with measured(result, spec.profile, spec.profile_format):
            dcp.load(target, storage_reader=reader)
        assert_same(expected, target)
        stats = getattr(reader, "last_stats", None)
    if stats is not None:
        result["client_stats"] = {
            "seconds": stats.seconds,
            "bytes": stats.bytes,
            "requests": stats.requests,
            "retries": stats.retries,
        }


def measure(
    spec: WorkerSpec,
    round_index: int,
    endpoint: Endpoint,
    timeout_s: float,
    profile_to: Path | None = None,
    profile_format: str = "raw",
) -> Measurement:
    """Run one worker process for ``spec`` and collect its figures and the server's requests."""
    m = Measurement(spec.contender, spec.op, round_index, spec.url, spec.size_mib)
    m.loadavg = round(os.getloadavg()[0], 2)
    endpoint.clear_requests()
    if profile_to is not None:
        spec = dataclasses.replace(spec, profile=str(profile_to), profile_format=profile_format)
        m.profile = str(profile_to)
    command = [sys.executable, "-m", ENTRY_MODULE, "--worker", json.dumps(asdict(spec))]
    try:
        done = subprocess.run(
            command,
            cwd=REPO_ROOT,
            env={**os.environ, **endpoint.env},
            capture_output=True,
            text=True,
            timeout=timeout_s,
        )
    except subprocess.TimeoutExpired:
        m.error = f"timed out after {timeout_s:.0f} s"
        return m
    m.requests = endpoint.request_counts()
    m.connections = endpoint.connection_counts()
    results = [line for line in done.stdout.splitlines() if line.startswith("{")]
    if done.returncode != 0 or not results:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        m.error = tail[0][:300]
        return m
    result = json.loads(results[-1])
    m.seconds = result["seconds"]
    m.blocked_s = result.get("blocked_s")
    m.cpu_s = result.get("cpu_s")
    m.payload_bytes = result["payload_bytes"]
    m.peak_extra_rss_mib = result["peak_extra_rss_mib"]
    m.maxrss_extra_mib = result["maxrss_extra_mib"]
    m.client_stats = result.get("client_stats")
    return m
