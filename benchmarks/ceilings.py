"""The byte contenders: the raw ceiling and dcp_cloud's transport, without DCP.

    raw        the workload's tensor bytes cut into parts of --raw-part-mib (16 MiB), as N
               objects (N = --raw-streams, at most one per part), N threads of one client each
               way: on S3 plain boto3 multipart uploads and a ranged GET per part; on GCS and
               Azure the fsspec client (``pipe_file`` or a file written part by part, ranged
               ``cat_file``); on file pwrite+fsync into N files and preadv
    transport  the same objects through dcp_cloud's store layer (its client, one event loop)

Each saver takes the parts of ``benchmarks.workloads.raw_parts``; each loader fills one flat
buffer from the objects its saver wrote. Both run in the worker process.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import itertools
import os
from collections.abc import Callable
from typing import Any

from benchmarks.catalog import REGION, MiB
from benchmarks.contenders import WorkerSpec
from benchmarks.workloads import raw_objects, raw_ranges


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

    ranges = raw_ranges(part_sizes, spec.raw_streams)
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

    ranges = raw_ranges(part_sizes, spec.raw_streams)
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
        with fs.open(path, "wb", block_size=spec.raw_part_mib * MiB) as out:
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

    ranges = raw_ranges(part_sizes, spec.raw_streams)
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
        await asyncio.gather(*(fetch(*r) for r in raw_ranges(part_sizes, spec.raw_streams)))

    store.run(fetch_all())
