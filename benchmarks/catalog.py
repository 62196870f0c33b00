"""What the harness knows by name: stores, contenders, ops, and where results go.

Nothing here imports torch or a cloud client, so the command line can check its arguments
against these names before anything heavy loads.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

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
# The state dict's shapes (benchmarks.workloads) and the smallest size of each, in MiB
WORKLOADS = ("model", "medium")
DEFAULT_WORKLOAD = "model"
MIN_SIZE_MIB = {"model": 1, "medium": 8}
# dcp_cloud's writer's default max_concurrency (dcp_cloud.options.WRITER_MAX_CONCURRENCY), and
# where the server runs on this machine (WRITER_LOCAL_MAX_CONCURRENCY): the raw ceiling's default
# stream count. An emulated cloud stands for a remote store, so its runs pass the first.
DCP_CLOUD_MAX_CONCURRENCY = 64
DCP_CLOUD_LOCAL_CONCURRENCY = 8
# dcp_cloud's reader's default max_concurrency (a load's ranged GETs in flight), which is also
# the store layer's (the transport contender's)
DCP_CLOUD_READER_CONCURRENCY = 16


def writer_concurrency(args: Any) -> int:
    """dcp_cloud's writer's requests in flight in this run: --max-concurrency, else its default
    for the endpoint (a local server is on this machine; --endpoint-url is taken as remote)."""
    if args.max_concurrency:
        return int(args.max_concurrency)
    return DCP_CLOUD_MAX_CONCURRENCY if args.endpoint_url else DCP_CLOUD_LOCAL_CONCURRENCY


def reader_concurrency(args: Any) -> int:
    """dcp_cloud's reader's requests in flight in this run: --max-concurrency, else its default."""
    return int(args.max_concurrency) if args.max_concurrency else DCP_CLOUD_READER_CONCURRENCY


# The byte contenders' largest default part size (MiB): the raw ceiling's multipart parts and
# ranged GETs are as large as dcp_cloud's parts for the same bytes (dcp_cloud.save.sizing)
RAW_PART_MIB = 16


def raw_streams_used(raw_streams: int, raw_part_mib: int, tensor_bytes: int) -> int:
    """Streams the raw ceiling really runs: one object per stream, at least one part each, so
    no more than the number of parts."""
    return max(1, min(raw_streams, -(-tensor_bytes // (raw_part_mib * MiB))))


# Requests in flight at most of the contenders whose stream count is fixed (their thread counts;
# s3torchconnector's CRT client may open more connections than its 8 threads)
FIXED_STREAMS = {
    "fsspec_t1": 1,
    "fsspec_t8": 8,
    "s3torchconnector": 8,
    "filesystem_t1": 1,
    "filesystem_t8": 8,
}
REGION = "us-east-1"
# botocore's switch for S3 bodies without a SHA-256 signature (config_kwargs of s3fs/dcp_cloud)
UNSIGNED_PAYLOAD = {"s3": {"payload_signing_enabled": False}}
# The module every measurement's child process runs, and the one the report's command names
ENTRY_MODULE = "benchmarks.bench"
