"""Copying a committed checkpoint between any two stores, with the destination's commit last.

The data objects and the manifest are copied in parallel (large objects as multipart uploads of
ranged reads, ``part_size`` bytes at a time), and ``.metadata`` is written at the destination
only after all of them are in place: until then the destination shows nothing new, exactly as
after a save that has not committed. Objects of replaced generations and debris are not copied.

Every key copied comes from the source's own files (``.metadata`` locators, the manifest's
save id), so each is confined to the checkpoint (:func:`dcp_cloud.checkpoint.confine.confine_key`) before
anything is read or written; on a local folder, source or destination, the resolved path of
each object (symbolic links followed) must also lie inside that folder.
"""

from __future__ import annotations

import concurrent.futures
import logging
import os
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

from fsspec import AbstractFileSystem
from torch.distributed.checkpoint.metadata import Metadata

from ..checkpoint import layout
from ..checkpoint.confine import is_confined
from ..checkpoint.manifest import Manifest
from ..checkpoint.stored import StoredCheckpoint
from ..errors import CheckpointExistsError, CorruptCheckpointError, DcpCloudError, UnsafeCheckpointError
from ..options import MiB
from ..store import ObjectStore, open_store
from ..store.local import LocalStore

logger = logging.getLogger("dcp_cloud")


@dataclass
class CopyReport:
    """What ``copy_checkpoint`` copied."""

    src: str
    dst: str
    objects: int = 0
    bytes: int = 0
    seconds: float = 0.0
    replaced: bool = False

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _check_inside(store: ObjectStore, key: str) -> None:
    """On a local folder: refuse ``key`` when its resolved path (symbolic links followed)
    leaves the folder, so a link planted in the folder cannot redirect a read or a write."""
    if not isinstance(store, LocalStore):
        return
    root = os.path.realpath(store.root)
    path = os.path.realpath(os.path.join(store.root, *key.split("/")))
    if os.path.commonpath([root, path]) != root:
        raise UnsafeCheckpointError(
            f"{store.url}: the object {key!r} resolves to a path outside that folder (a symbolic "
            "link on its way); nothing was copied through it. Remove the link, or copy to or "
            "from a folder without links."
        )


def _check_distinct(source: ObjectStore, target: ObjectStore, same_options: bool) -> None:
    """Refuse a copy onto its own source: the same local folder (links resolved), or the same
    URL of a store reached with the same options."""
    if isinstance(source, LocalStore) and isinstance(target, LocalStore):
        same = os.path.realpath(source.root) == os.path.realpath(target.root)
    else:
        same = same_options and source.url == target.url
    if same:
        raise CheckpointExistsError(
            f"{target.url}: the destination is the source checkpoint itself; copy to another URL."
        )


def _manifest_bytes(
    src: ObjectStore, metadata: Metadata, keys: set[str], replaced: set[str]
) -> tuple[str, bytes] | None:
    """The source manifest, rewritten to record what it replaces at the destination."""
    save_id = StoredCheckpoint.save_id_of(metadata)
    if save_id is None:
        return None
    key = layout.manifest_key(save_id)
    _check_inside(src, key)
    try:
        data = src.run(src.get(key))
    except FileNotFoundError:
        return None
    try:
        manifest = Manifest.from_json(data)
    except (ValueError, TypeError, AttributeError, KeyError, RecursionError, DcpCloudError):
        return key, data  # copied as it is: loading the copy reports it as the source would
    manifest.replaced = {k for k in replaced if is_confined(k)} - keys - {key}
    return key, manifest.to_json()


def _previous(dst: ObjectStore, overwrite: bool) -> tuple[bool, Metadata | None]:
    """Whether a checkpoint is committed at the destination (refused unless ``overwrite``), and
    its metadata when it can be read."""
    stored = StoredCheckpoint(dst)
    data = stored.read_committed()
    if data is None:
        return False, None
    if not overwrite:
        raise CheckpointExistsError(
            f"{dst.url}: a checkpoint is already committed there. Pick another destination, or "
            "pass overwrite=True (--overwrite) to replace it."
        )
    return True, stored.replaced_metadata(data)


def copy_checkpoint(
    src: str | os.PathLike[str],
    dst: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    dst_storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    dst_filesystem: AbstractFileSystem | None = None,
    overwrite: bool = False,
    part_size: int = 16 * MiB,
    max_concurrency: int = 16,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> CopyReport:
    """Copy the committed checkpoint at ``src`` to ``dst`` (any two URLs or local folders).

    ``dst_storage_options`` defaults to ``storage_options``. Raises
    :class:`CheckpointNotFoundError` when ``src`` has no ``.metadata``,
    :class:`CorruptCheckpointError` when an object it references is missing, and
    :class:`CheckpointExistsError` when ``dst`` holds a committed checkpoint and not
    ``overwrite``, and :class:`UnsafeCheckpointError`, before anything is copied, when the
    source's files name a key outside the checkpoint or a local folder's symbolic link leads
    outside it. A replaced destination checkpoint's objects are left for the next save or
    ``collect_garbage`` to remove, so loads still reading it finish. ``progress`` is called
    with the bytes of each transfer, ``on_total`` once with the bytes to copy.
    """
    started = time.monotonic()
    source = open_store(src, storage_options, filesystem, max_concurrency)
    options = storage_options if dst_storage_options is None else dst_storage_options
    target = open_store(dst, options, dst_filesystem, max_concurrency)
    report = CopyReport(src=source.url, dst=target.url)
    _check_distinct(source, target, dst_storage_options is None and dst_filesystem is filesystem)
    _check_inside(source, layout.METADATA_KEY)

    stored = StoredCheckpoint(source)
    metadata_bytes = stored.read_metadata_bytes()
    metadata = stored.parse_metadata(metadata_bytes)
    keys = StoredCheckpoint.confined_data_keys(metadata, stored.where(layout.METADATA_KEY))
    for key in sorted(keys):
        _check_inside(source, key)
        _check_inside(target, key)
    _check_inside(target, layout.METADATA_KEY)
    sizes = {o.key: o.size for o in source.run(source.list_objects("")) if o.key in keys}
    missing = sorted(k for k in keys if k not in sizes)
    if missing:
        raise CorruptCheckpointError(
            f"{source.url}: {len(missing)} data objects that .metadata references are missing "
            f"(first: {missing[0]}); not copying a damaged checkpoint. Run `dcp-cloud verify`."
        )
    report.replaced, previous = _previous(target, overwrite)
    existing = {o.key for o in target.run(target.list_objects(""))}
    manifest = _manifest_bytes(
        source, metadata, keys, StoredCheckpoint.data_keys(previous) if previous else set()
    )
    if manifest is not None:
        _check_inside(target, manifest[0])

    if on_total is not None:
        on_total(sum(sizes[k] for k in keys))
    copied: list[str] = []
    try:
        _copy_objects(source, target, sorted(keys), sizes, part_size, max_concurrency, progress, copied)
        if manifest is not None:
            target.run(target.put(manifest[0], manifest[1]))
            copied.append(manifest[0])
        target.run(target.put(layout.METADATA_KEY, metadata_bytes))  # the commit, last
    except BaseException:
        fresh = [k for k in copied if k not in existing]
        if fresh:
            try:
                target.run(target.delete(fresh))
            except Exception:  # debris for gc; the copy failed either way
                pass
        raise
    report.objects = len(copied) + 1
    report.bytes = sum(sizes[k] for k in keys)
    report.seconds = time.monotonic() - started
    return report


def _copy_objects(
    source: ObjectStore,
    target: ObjectStore,
    keys: list[str],
    sizes: dict[str, int],
    part_size: int,
    workers: int,
    progress: Callable[[int], None] | None,
    copied: list[str],
) -> None:
    """Copy ``keys`` with ``workers`` byte-moving threads; objects over ``part_size`` go as
    multipart uploads. Appends each completed key to ``copied``."""

    def whole(key: str) -> None:
        data = source.run(source.get(key))
        target.run(target.put(key, data))
        if progress is not None:
            progress(len(data))

    def part(upload: Any, number: int, start: int, end: int) -> None:
        data = source.run(source.get_range(upload.key, start, end))
        if len(data) != end - start:
            raise CorruptCheckpointError(
                f"{source.url}/{upload.key}: read {len(data)} of {end - start} bytes at offset "
                f"{start}; the object changed or is truncated"
            )
        target.run(target.upload_part(upload, number, start, data))
        if progress is not None:
            progress(len(data))

    with (
        concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dcp-cp-io") as io_pool,
        concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="dcp-cp-obj") as obj_pool,
    ):

        def one(key: str) -> str:
            size = sizes[key]
            if size <= part_size:
                io_pool.submit(whole, key).result()
                return key
            upload = target.run(target.start_upload(key))
            try:
                ranges = [(a, min(a + part_size, size)) for a in range(0, size, part_size)]
                parts = [io_pool.submit(part, upload, n, a, b) for n, (a, b) in enumerate(ranges, 1)]
                concurrent.futures.wait(parts)
                for future in parts:
                    future.result()
                target.run(target.complete_upload(upload))
            except BaseException:
                target.run(target.abort_upload(upload))
                raise
            return key

        futures = [obj_pool.submit(one, key) for key in keys]
        try:
            for future in concurrent.futures.as_completed(futures):
                copied.append(future.result())
        except BaseException:
            for future in futures:
                future.cancel()
            for future in futures:
                if not future.cancelled():
                    try:
                        copied.append(future.result())
                    except BaseException:
                        pass
            raise
