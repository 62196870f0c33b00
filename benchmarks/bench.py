"""Side-by-side benchmark of DCP save and load against S3 (a local moto server by default).

Run from the repository root::

    .venv/bin/python -m benchmarks.bench --size-mib 1024 --rounds 3

Every contender saves and loads the same seeded, model-shaped state dict on the same server.
Each measurement runs in a fresh child process (``--worker``) that builds its data, records its
RSS, times one save or load, and prints one JSON line. The parent alternates the contenders'
order across rounds, counts the server's requests per measurement, and reports medians as a
table on stdout and as ``benchmarks/results/latest.json`` and ``latest.md``.

Contenders:
    dcp_cloud          CloudStorageWriter / CloudStorageReader
    fsspec_t1          torch FsspecWriter(thread_count=1) / FsspecReader
    fsspec_t8          torch FsspecWriter(thread_count=8) / FsspecReader
    s3torchconnector   S3StorageWriter / S3StorageReader (thread_count=8), when installed
    raw                the same bytes as 8 parallel multipart uploads and 8 threads of 16 MiB
                       ranged GETs with a plain boto3 client: the ceiling of this setup
"""

from __future__ import annotations

import argparse
import concurrent.futures
import datetime
import gc
import importlib
import importlib.metadata
import json
import os
import platform
import resource
import shlex
import statistics
import subprocess
import sys
import threading
import time
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import psutil
import torch
import torch.distributed.checkpoint as dcp

MiB = 1024 * 1024
REPO_ROOT = Path(__file__).resolve().parent.parent
RESULTS_DIR = Path(__file__).resolve().parent / "results"
BASELINE = "dcp_cloud"
ALL_CONTENDERS = ("dcp_cloud", "fsspec_t1", "fsspec_t8", "s3torchconnector", "raw")
REGION = "us-east-1"
RAW_STREAMS = 8
RAW_PART_SIZE = 16 * MiB
RSS_SAMPLE_INTERVAL_S = 0.01

# -- workload -----------------------------------------------------------------------------------

HIDDEN = 1024
LARGE_COUNT = 4
LARGE_SHARE = 0.5
MEDIUM_COUNT = 48
MEDIUM_SHARE = 0.45
TINY_COUNT = 300
TINY_NUMELS = (256, 1024, 4096)


@dataclass(frozen=True)
class TensorSpec:
    """Name, shape and dtype of one generated tensor."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype

    @property
    def nbytes(self) -> int:
        return _numel(self.shape) * torch.empty((), dtype=self.dtype).element_size()


def _numel(shape: tuple[int, ...]) -> int:
    n = 1
    for dim in shape:
        n *= dim
    return n


def _rows(nbytes: float, dtype: torch.dtype) -> int:
    return max(1, round(nbytes / (HIDDEN * torch.empty((), dtype=dtype).element_size())))


def tensor_specs(size_mib: int) -> list[TensorSpec]:
    """The tensors of a model-shaped state dict of about ``size_mib`` MiB.

    A few large fp32 matrices (embeddings, output head) hold half the bytes, many medium fp32
    and bf16 matrices (projections) most of the rest, and a few hundred tiny fp32 and bf16
    vectors (norms, biases) the remainder.
    """
    total = size_mib * MiB
    specs: list[TensorSpec] = []
    for i in range(TINY_COUNT):
        dtype = torch.float32 if i % 2 == 0 else torch.bfloat16
        numel = TINY_NUMELS[i % len(TINY_NUMELS)]
        specs.append(TensorSpec(f"model.layers.{i // 6}.norm_{i % 6}.weight", (numel,), dtype))
    for i in range(MEDIUM_COUNT):
        dtype = torch.float32 if i % 3 == 0 else torch.bfloat16
        rows = _rows(total * MEDIUM_SHARE / MEDIUM_COUNT, dtype)
        specs.append(TensorSpec(f"model.layers.{i // 4}.proj_{i % 4}.weight", (rows, HIDDEN), dtype))
    remaining = total - sum(s.nbytes for s in specs)
    large_rows = _rows(max(remaining, 0) / LARGE_COUNT, torch.float32)
    for i in range(LARGE_COUNT):
        specs.append(TensorSpec(f"model.large_{i}.weight", (large_rows, HIDDEN), torch.float32))
    return specs


def non_tensor_entries() -> dict[str, Any]:
    """The state dict's non-tensor entries: counters, a string and a small config dict."""
    return {
        "step": 123_456,
        "epoch": 7,
        "run_name": "bench-run-0001",
        "optim_config": {"lr": 3e-4, "betas": (0.9, 0.95), "weight_decay": 0.1, "name": "adamw"},
    }


def build_state_dict(size_mib: int, seed: int) -> dict[str, Any]:
    """The benchmark state dict: seeded, so every process builds the same bytes."""
    generator = torch.Generator().manual_seed(seed)
    state_dict: dict[str, Any] = {}
    for spec in tensor_specs(size_mib):
        state_dict[spec.name] = torch.randn(spec.shape, dtype=spec.dtype, generator=generator)
    state_dict.update(non_tensor_entries())
    return state_dict


def zeroed_like(state_dict: dict[str, Any]) -> dict[str, Any]:
    """A load target: zeroed tensors of the same shapes and dtypes, non-tensors blanked."""

    def blank(value: Any) -> Any:
        if isinstance(value, torch.Tensor):
            return torch.zeros_like(value)
        if isinstance(value, dict):
            return {k: None for k in value}
        return None

    return {k: blank(v) for k, v in state_dict.items()}


def tensor_bytes(state_dict: dict[str, Any]) -> int:
    """Bytes of tensor data in a state dict: the payload every throughput is computed from."""
    return sum(v.nbytes for v in state_dict.values() if isinstance(v, torch.Tensor))


def assert_same(expected: dict[str, Any], actual: dict[str, Any]) -> None:
    """Raise AssertionError unless ``actual`` equals ``expected`` bit for bit."""
    bad = []
    for key, want in expected.items():
        got = actual.get(key)
        if isinstance(want, torch.Tensor):
            same = (
                isinstance(got, torch.Tensor)
                and got.dtype == want.dtype
                and got.shape == want.shape
                and torch.equal(got.view(torch.uint8), want.view(torch.uint8))
            )
        else:
            same = got == want
        if not same:
            bad.append(key)
    if bad:
        raise AssertionError(f"DATA MISMATCH after load in {len(bad)} entries, e.g. {bad[:5]}")


def _byte_view(tensor: torch.Tensor) -> memoryview:
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")


def raw_parts(state_dict: dict[str, Any]) -> list[bytes]:
    """The state dict's tensor bytes, concatenated and cut into RAW_PART_SIZE parts."""
    parts: list[bytes] = []
    chunk = bytearray()
    for value in state_dict.values():
        if not isinstance(value, torch.Tensor):
            continue
        view = _byte_view(value)
        while view:
            n = min(len(view), RAW_PART_SIZE - len(chunk))
            chunk += view[:n]
            view = view[n:]
            if len(chunk) == RAW_PART_SIZE:
                parts.append(bytes(chunk))
                chunk.clear()
    if chunk:
        parts.append(bytes(chunk))
    return parts


def raw_objects(part_count: int) -> list[range]:
    """Which parts go to which of the RAW_STREAMS objects (contiguous runs of part indices)."""
    per_object = -(-part_count // RAW_STREAMS)
    return [
        range(start, min(start + per_object, part_count))
        for start in range(0, part_count, per_object)
    ]


# -- measuring memory ---------------------------------------------------------------------------


class PeakRss:
    """Samples this process's RSS in a background thread while active; keeps the peak."""

    def __init__(self, interval_s: float = RSS_SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


# -- contenders (run in the worker process) -----------------------------------------------------


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process measures; travels to the child as JSON."""

    contender: str
    op: str  # "save" or "load"
    url: str
    size_mib: int
    seed: int
    part_size_mib: int
    endpoint_url: str
    storage_options: dict[str, Any]


def _dcp_cloud_writer(spec: WorkerSpec) -> Any:
    from dcp_cloud import CloudStorageWriter

    return CloudStorageWriter(
        spec.url, storage_options=spec.storage_options, part_size=spec.part_size_mib * MiB
    )


def _dcp_cloud_reader(spec: WorkerSpec) -> Any:
    from dcp_cloud import CloudStorageReader

    return CloudStorageReader(
        spec.url, storage_options=spec.storage_options, part_size=spec.part_size_mib * MiB
    )


def _fsspec_writer(threads: int) -> Callable[[WorkerSpec], Any]:
    def make(spec: WorkerSpec) -> Any:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(spec.url, thread_count=threads, sync_files=False, **spec.storage_options)

    return make


def _fsspec_reader(spec: WorkerSpec) -> Any:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(spec.url, **spec.storage_options)


def _s3torch_config() -> Any:
    from s3torchconnector import S3ClientConfig

    return S3ClientConfig(force_path_style=True)  # custom endpoints (moto, MinIO) need path style


def _s3torch_writer(spec: WorkerSpec) -> Any:
    from s3torchconnector.dcp import S3StorageWriter

    return S3StorageWriter(
        region=REGION, path=spec.url, s3client_config=_s3torch_config(), thread_count=8
    )


def _s3torch_reader(spec: WorkerSpec) -> Any:
    from s3torchconnector.dcp import S3StorageReader

    return S3StorageReader(region=REGION, path=spec.url, s3client_config=_s3torch_config())


WRITERS: dict[str, Callable[[WorkerSpec], Any]] = {
    "dcp_cloud": _dcp_cloud_writer,
    "fsspec_t1": _fsspec_writer(1),
    "fsspec_t8": _fsspec_writer(8),
    "s3torchconnector": _s3torch_writer,
}
READERS: dict[str, Callable[[WorkerSpec], Any]] = {
    "dcp_cloud": _dcp_cloud_reader,
    "fsspec_t1": _fsspec_reader,
    "fsspec_t8": _fsspec_reader,
    "s3torchconnector": _s3torch_reader,
}


def _split_s3_url(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def _boto3_client(spec: WorkerSpec) -> Any:
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=spec.endpoint_url,
        region_name=REGION,
        aws_access_key_id=spec.storage_options.get("key"),
        aws_secret_access_key=spec.storage_options.get("secret"),
        config=Config(max_pool_connections=2 * RAW_STREAMS),
    )


def raw_save(parts: list[bytes], spec: WorkerSpec) -> None:
    """Upload ``parts`` as RAW_STREAMS objects, one multipart upload per thread."""
    client = _boto3_client(spec)
    bucket, prefix = _split_s3_url(spec.url)

    def upload(index: int, numbers: range) -> None:
        key = f"{prefix}/object-{index}"
        if len(numbers) == 1:
            client.put_object(Bucket=bucket, Key=key, Body=parts[numbers[0]])
            return
        upload_id = client.create_multipart_upload(Bucket=bucket, Key=key)["UploadId"]
        etags = []
        for number, part in enumerate(numbers, start=1):
            response = client.upload_part(
                Bucket=bucket, Key=key, UploadId=upload_id, PartNumber=number, Body=parts[part]
            )
            etags.append({"PartNumber": number, "ETag": response["ETag"]})
        client.complete_multipart_upload(
            Bucket=bucket, Key=key, UploadId=upload_id, MultipartUpload={"Parts": etags}
        )

    with concurrent.futures.ThreadPoolExecutor(RAW_STREAMS) as pool:
        futures = [pool.submit(upload, i, numbers) for i, numbers in enumerate(raw_objects(len(parts)))]
        for future in futures:
            future.result()


def raw_load(target: memoryview, part_sizes: list[int], spec: WorkerSpec) -> None:
    """Read the objects of ``raw_save`` into ``target`` with RAW_STREAMS threads of ranged GETs."""
    client = _boto3_client(spec)
    bucket, prefix = _split_s3_url(spec.url)
    starts = [0]
    for size in part_sizes:
        starts.append(starts[-1] + size)
    ranges = []  # (key, first byte in the object, first byte in target, length)
    for index, numbers in enumerate(raw_objects(len(part_sizes))):
        for number in numbers:
            offset = starts[number] - starts[numbers[0]]
            ranges.append((f"{prefix}/object-{index}", offset, starts[number], part_sizes[number]))

    def fetch(key: str, offset: int, into: int, length: int) -> None:
        response = client.get_object(
            Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}"
        )
        data = response["Body"].read()
        if len(data) != length:
            raise OSError(f"{key}: read {len(data)} of {length} bytes at {offset}")
        target[into : into + length] = data

    with concurrent.futures.ThreadPoolExecutor(RAW_STREAMS) as pool:
        futures = [pool.submit(fetch, *r) for r in ranges]
        for future in futures:
            future.result()


def _preimport(contender: str) -> None:
    """Import the contender's client libraries before timing: a one-off cost per process that
    some writers pay in their constructor and others inside the first save or load."""
    modules = {"raw": ["boto3"], "s3torchconnector": ["s3torchconnector.dcp"]}
    for module in modules.get(contender, ["s3fs"]):
        importlib.import_module(module)


@contextmanager
def _measured(result: dict[str, Any]) -> Iterator[None]:
    """Time the block and record its peak RSS above the RSS on entry into ``result``."""
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    with PeakRss() as rss:
        start = time.perf_counter()
        yield
        result["seconds"] = time.perf_counter() - start
    result["baseline_rss_mib"] = baseline / MiB
    result["peak_extra_rss_mib"] = max(0, rss.peak - baseline) / MiB
    result["maxrss_extra_mib"] = max(0, _max_rss_bytes() - baseline) / MiB


def run_worker(spec: WorkerSpec) -> dict[str, Any]:
    """Build the data, run one timed save or load, and return its figures (worker side)."""
    warnings.filterwarnings("ignore", message="torch.distributed is disabled")
    _preimport(spec.contender)
    expected = build_state_dict(spec.size_mib, spec.seed)
    result: dict[str, Any] = {"payload_bytes": tensor_bytes(expected)}
    if spec.contender == "raw":
        parts = raw_parts(expected)
        del expected
        if spec.op == "save":
            with _measured(result):
                raw_save(parts, spec)
        else:
            target = torch.zeros(sum(len(p) for p in parts), dtype=torch.uint8)
            view = _byte_view(target)
            with _measured(result):
                raw_load(view, [len(p) for p in parts], spec)
            start = 0
            for part in parts:
                if view[start : start + len(part)] != part:
                    raise AssertionError(f"DATA MISMATCH after raw load at byte {start}")
                start += len(part)
        return result
    if spec.op == "save":
        writer = WRITERS[spec.contender](spec)
        with _measured(result):
            dcp.save(expected, storage_writer=writer)
        stats = getattr(writer, "last_stats", None)
    else:
        target = zeroed_like(expected)
        reader = READERS[spec.contender](spec)
        with _measured(result):
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
    return result


# -- the parent: servers, rounds, reporting -----------------------------------------------------


@dataclass
class Endpoint:
    """Where the benchmark runs: its S3 endpoint, bucket, client options and request log."""

    url: str
    bucket: str
    storage_options: dict[str, Any]
    env: dict[str, str]
    server: Any = None  # dcp_cloud.testing.S3Server when running on moto

    def clear_requests(self) -> None:
        if self.server is not None:
            self.server.clear_requests()

    def request_counts(self) -> dict[str, int] | None:
        """Requests by kind since ``clear_requests``, or None without a server log."""
        if self.server is None:
            return None
        return dict(sorted(Counter(r.kind for r in self.server.requests()).items()))

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` in the bucket (outside any measurement)."""
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.url,
            region_name=REGION,
            aws_access_key_id=self.storage_options.get("key"),
            aws_secret_access_key=self.storage_options.get("secret"),
        )
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})


@contextmanager
def open_endpoint(endpoint_url: str | None, bucket: str) -> Iterator[Endpoint]:
    """A moto server with ``bucket`` created, or the external endpoint given (bucket must exist)."""
    if endpoint_url:
        yield Endpoint(
            url=endpoint_url,
            bucket=bucket,
            storage_options={"endpoint_url": endpoint_url, "client_kwargs": {"region_name": REGION}},
            env={"AWS_ENDPOINT_URL": endpoint_url},
        )
        return
    from dcp_cloud.testing import S3Server

    with S3Server() as server:
        server.create_bucket(bucket)
        yield Endpoint(server.endpoint_url, bucket, server.storage_options, server.env, server)


@dataclass
class Measurement:
    """One save or load of one contender in one round, as the parent saw it."""

    contender: str
    op: str
    round: int
    url: str
    seconds: float | None = None
    payload_bytes: int = 0
    peak_extra_rss_mib: float | None = None
    maxrss_extra_mib: float | None = None
    requests: dict[str, int] | None = None
    client_stats: dict[str, Any] | None = None
    error: str | None = None

    @property
    def gb_per_s(self) -> float | None:
        return self.payload_bytes / self.seconds / 1e9 if self.seconds else None


def measure(spec: WorkerSpec, round_index: int, endpoint: Endpoint, timeout_s: float) -> Measurement:
    """Run one worker process for ``spec`` and collect its figures and the server's requests."""
    m = Measurement(spec.contender, spec.op, round_index, spec.url)
    endpoint.clear_requests()
    command = [sys.executable, "-m", "benchmarks.bench", "--worker", json.dumps(asdict(spec))]
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
    if done.returncode != 0:
        tail = done.stderr.strip().splitlines()[-1:] or [f"exit code {done.returncode}"]
        m.error = tail[0][:300]
        return m
    result = json.loads(done.stdout.strip().splitlines()[-1])
    m.seconds = result["seconds"]
    m.payload_bytes = result["payload_bytes"]
    m.peak_extra_rss_mib = result["peak_extra_rss_mib"]
    m.maxrss_extra_mib = result["maxrss_extra_mib"]
    m.client_stats = result.get("client_stats")
    return m


@dataclass
class Row:
    """Medians over rounds of one contender's save or load."""

    contender: str
    op: str
    rounds: int
    seconds: float | None = None
    gb_per_s: float | None = None
    vs_baseline: float | None = None  # this contender's GB/s / dcp_cloud's
    baseline_vs: float | None = None  # dcp_cloud's GB/s / this contender's
    peak_extra_rss_mib: float | None = None
    requests: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)


def summarize(measurements: list[Measurement], contenders: list[str]) -> list[Row]:
    """Median seconds, GB/s, peak RSS and requests per (contender, op), with ratios to dcp_cloud."""
    rows = []
    for op in ("save", "load"):
        for contender in contenders:
            mine = [m for m in measurements if m.contender == contender and m.op == op]
            row = Row(contender, op, len(mine), errors=[f"round {m.round}: {m.error}" for m in mine if m.error])
            ok = [m for m in mine if m.error is None]
            if ok and not row.errors:
                row.seconds = statistics.median(m.seconds for m in ok if m.seconds)
                row.gb_per_s = ok[0].payload_bytes / row.seconds / 1e9
                row.peak_extra_rss_mib = statistics.median(m.peak_extra_rss_mib or 0.0 for m in ok)
                kinds = sorted({k for m in ok for k in (m.requests or {})})
                row.requests = {
                    k: round(statistics.median((m.requests or {}).get(k, 0) for m in ok)) for k in kinds
                }
            rows.append(row)
    for row in rows:
        base = next((r for r in rows if r.contender == BASELINE and r.op == row.op), None)
        if base and base.gb_per_s and row.gb_per_s:
            row.vs_baseline = row.gb_per_s / base.gb_per_s
            row.baseline_vs = base.gb_per_s / row.gb_per_s
    return rows


TABLE_HEADER = (
    "contender",
    "op",
    "GB/s",
    "vs dcp_cloud",
    "dcp_cloud vs it",
    "s (median)",
    "peak extra RSS MiB",
    "requests by kind",
)


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def table_cells(rows: list[Row]) -> list[tuple[str, ...]]:
    """One tuple of display strings per row, in TABLE_HEADER order."""
    cells = []
    for r in rows:
        if r.errors:
            cells.append((r.contender, r.op, "FAILED", "-", "-", "-", "-", "; ".join(r.errors)))
            continue
        requests = " ".join(f"{k}={v}" for k, v in r.requests.items()) or "n/a"
        cells.append(
            (
                r.contender,
                r.op,
                _fmt(r.gb_per_s, ".3f"),
                _fmt(r.vs_baseline, ".2f", "x"),
                _fmt(r.baseline_vs, ".2f", "x"),
                _fmt(r.seconds, ".2f"),
                _fmt(r.peak_extra_rss_mib, ".0f"),
                requests,
            )
        )
    return cells


def text_table(rows: list[Row]) -> str:
    """The results as an aligned plain-text table."""
    lines = [TABLE_HEADER, *table_cells(rows)]
    widths = [max(len(line[i]) for line in lines) for i in range(len(TABLE_HEADER) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines
    )


def markdown_table(rows: list[Row]) -> str:
    """The results as a Markdown table."""
    lines = [TABLE_HEADER, tuple("---" for _ in TABLE_HEADER), *table_cells(rows)]
    return "\n".join("| " + " | ".join(line) + " |" for line in lines)


def machine_info() -> dict[str, Any]:
    """The machine and library versions the numbers were taken on."""
    versions = {}
    for name in ("s3fs", "fsspec", "boto3", "moto", "s3torchconnector"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    return {
        "nproc": os.cpu_count(),
        "affinity_cpus": len(os.sched_getaffinity(0)),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
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


def workload_info(size_mib: int) -> dict[str, Any]:
    """What the generated state dict holds."""
    specs = tensor_specs(size_mib)
    by_dtype: Counter[str] = Counter()
    for s in specs:
        by_dtype[str(s.dtype).removeprefix("torch.")] += s.nbytes
    return {
        "tensors": len(specs),
        "non_tensor_entries": len(non_tensor_entries()),
        "tensor_bytes": sum(s.nbytes for s in specs),
        "bytes_by_dtype": dict(by_dtype),
        "largest_tensor_bytes": max(s.nbytes for s in specs),
    }


def available_contenders(requested: list[str]) -> list[str]:
    """``requested`` minus s3torchconnector when it cannot be imported (with a note on stdout)."""
    chosen = list(requested)
    if "s3torchconnector" in chosen:
        try:
            import s3torchconnector.dcp  # noqa: F401
        except ImportError:
            print("s3torchconnector: not installed")
            chosen.remove("s3torchconnector")
    return chosen


def run_benchmark(args: argparse.Namespace) -> int:
    """Run every round and write the results; returns the exit status (1 if anything failed)."""
    contenders = available_contenders(args.contenders)
    command = shlex.join([sys.executable, "-m", "benchmarks.bench", *sys.argv[1:]])
    workload = workload_info(args.size_mib)
    print(f"command: {command}")
    print(
        f"workload: {workload['tensors']} tensors + {workload['non_tensor_entries']} non-tensor "
        f"entries, {workload['tensor_bytes'] / MiB:.1f} MiB {workload['bytes_by_dtype']}"
    )
    code_at_start = code_version()
    print(f"dcp_cloud code: {code_at_start}")
    measurements: list[Measurement] = []
    started = time.time()
    with open_endpoint(args.endpoint_url, args.bucket) as endpoint:
        print(f"endpoint: {endpoint.url} ({'moto' if endpoint.server else 'external'})")
        for round_index in range(args.rounds):
            order = contenders if round_index % 2 == 0 else contenders[::-1]
            for contender in order:
                prefix = f"{contender}/{round_index}"
                endpoint.delete_prefix(prefix + "/")
                for op in ("save", "load"):
                    spec = WorkerSpec(
                        contender=contender,
                        op=op,
                        url=f"s3://{endpoint.bucket}/{prefix}",
                        size_mib=args.size_mib,
                        seed=args.seed,
                        part_size_mib=args.part_size_mib,
                        endpoint_url=endpoint.url,
                        storage_options=endpoint.storage_options,
                    )
                    m = measure(spec, round_index, endpoint, args.timeout_s)
                    measurements.append(m)
                    shown = m.error or f"{m.gb_per_s:.3f} GB/s, {m.seconds:.2f} s, +{m.peak_extra_rss_mib:.0f} MiB"
                    print(f"  round {round_index} {contender:16} {op}: {shown}", flush=True)
                    if op == "save" and m.error:
                        break  # nothing to load
                endpoint.delete_prefix(prefix + "/")
    code = code_at_start
    if code_version() != code_at_start:
        code = f"{code_at_start} -> {code_version()}"
        print(f"WARNING: the repository changed during the run ({code})", file=sys.stderr)
    rows = summarize(measurements, contenders)
    print()
    print(text_table(rows))
    write_results(args, command, code, workload, contenders, measurements, rows, time.time() - started)
    failed = [r for r in rows if r.errors]
    for r in failed:
        print(f"FAILED: {r.contender} {r.op}: {'; '.join(r.errors)}", file=sys.stderr)
    return 1 if failed else 0


def write_results(
    args: argparse.Namespace,
    command: str,
    code: str,
    workload: dict[str, Any],
    contenders: list[str],
    measurements: list[Measurement],
    rows: list[Row],
    elapsed_s: float,
) -> None:
    """Write results/latest.json and results/latest.md."""
    RESULTS_DIR.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    report = {
        "when": when,
        "command": command,
        "args": vars(args),
        "machine": machine,
        "code": code,
        "workload": workload,
        "contenders": contenders,
        "elapsed_s": elapsed_s,
        "summary": [asdict(r) for r in rows],
        "measurements": [{**asdict(m), "gb_per_s": m.gb_per_s} for m in measurements],
    }
    (RESULTS_DIR / "latest.json").write_text(json.dumps(report, indent=2) + "\n")
    markdown = "\n".join(
        [
            f"# DCP save/load benchmark ({when})",
            "",
            f"- command: `{command}` (code {code})",
            f"- machine: {machine['nproc']} CPUs, {machine['memory_gib']} GiB, {machine['platform']}, "
            f"Python {machine['python']}, torch {machine['torch']}",
            f"- workload: {workload['tensors']} tensors ({workload['tensor_bytes'] / MiB:.1f} MiB, "
            f"{workload['bytes_by_dtype']}) + {workload['non_tensor_entries']} non-tensor entries",
            f"- endpoint: {args.endpoint_url or 'local moto server'}; medians over {args.rounds} "
            "round(s), each measurement in a fresh process; GB/s = tensor bytes / wall seconds "
            "(1 GB = 1e9 bytes); peak extra RSS = peak RSS during the operation minus RSS "
            "after building the data",
            "",
            markdown_table(rows),
            "",
        ]
    )
    (RESULTS_DIR / "latest.md").write_text(markdown)
    print(f"\nwrote {RESULTS_DIR / 'latest.json'} and {RESULTS_DIR / 'latest.md'}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size-mib", type=int, default=1024, help="state dict size (default 1024)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds; medians are reported (default 3)")
    parser.add_argument(
        "--contenders",
        type=lambda s: [c.strip() for c in s.split(",") if c.strip()],
        default=list(ALL_CONTENDERS),
        help=f"comma-separated subset of {','.join(ALL_CONTENDERS)} (default: all)",
    )
    parser.add_argument(
        "--endpoint-url",
        default=None,
        help="use this S3 endpoint instead of a local moto server (credentials from AWS_* "
        "variables; the --bucket must exist)",
    )
    parser.add_argument("--bucket", default="bench", help="bucket name (default bench)")
    parser.add_argument("--part-size-mib", type=int, default=16, help="dcp_cloud part size (default 16)")
    parser.add_argument("--seed", type=int, default=0, help="state dict seed (default 0)")
    parser.add_argument(
        "--timeout-s", type=float, default=1800, help="limit per measurement (default 1800)"
    )
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    unknown = [c for c in args.contenders if c not in ALL_CONTENDERS]
    if unknown:
        parser.error(f"unknown contenders {unknown}; choose from {','.join(ALL_CONTENDERS)}")
    if len(args.bucket) < 3:
        parser.error("--bucket must be at least 3 characters")
    return args


def main(argv: list[str] | None = None) -> int:
    """Entry point: the benchmark, or (with --worker) one measurement printed as JSON."""
    args = parse_args(argv)
    if args.worker:
        result = run_worker(WorkerSpec(**json.loads(args.worker)))
        print(json.dumps(result))
        return 0
    return run_benchmark(args)


if __name__ == "__main__":
    sys.exit(main())
