"""The DCP contenders: which StorageWriter and StorageReader each contender name stands for.

    dcp_cloud              CloudStorageWriter / CloudStorageReader
    dcp_cloud_unverified   the same, loading with verify_checksums=False (opt-in)
    fsspec_t1, fsspec_t8   torch FsspecWriter(thread_count=1 or 8) / FsspecReader
    s3torchconnector       S3StorageWriter / S3StorageReader (thread_count=8), S3 only
    filesystem_t1, _t8     torch FileSystemWriter(thread_count=1 or 8) / FileSystemReader

The byte contenders (raw, transport) are in ``benchmarks.ceilings``. Each factory takes the
``WorkerSpec`` of one measurement and runs in the worker process.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from benchmarks.catalog import REGION, UNVERIFIED, MiB


@dataclass(frozen=True)
class WorkerSpec:
    """What one worker process measures; travels to the child as JSON."""

    contender: str
    op: str  # "save", "load" or "async_save"
    url: str  # s3://, gs:// or az://bucket/prefix, or a local directory for the file store
    size_mib: int
    seed: int
    part_size_mib: int | None  # dcp_cloud's, None: its default
    endpoint_url: str
    storage_options: dict[str, Any]
    raw_streams: int = 16
    raw_part_mib: int = 16  # the byte contenders' part size
    workload: str = "model"  # benchmarks.workloads: "model" or "medium"
    max_concurrency: int | None = None  # dcp_cloud's, None: its default
    memory_budget_mib: int | None = None  # dcp_cloud's, None: its default
    profile: str | None = None  # py-spy output path: record the timed operation
    profile_format: str = "raw"


def _dcp_cloud_kwargs(spec: WorkerSpec) -> dict[str, Any]:
    kwargs: dict[str, Any] = {"part_size": spec.part_size_mib * MiB} if spec.part_size_mib else {}
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
