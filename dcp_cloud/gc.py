"""Garbage collection: the debris of saves that never committed.

A save that crashed or lost its commit leaves data objects under its ``save-*`` folder that no
``.metadata`` references, and possibly multipart uploads that were never completed or aborted.
``collect_garbage`` finds both under a prefix (one checkpoint, or a run holding many) and removes
what is older than a grace period: a save still in progress has recent objects and uploads, and
is never touched.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from . import layout
from .errors import DcpCloudError
from .safe_pickle import load_metadata
from .store import ObjectInfo, ObjectStore, open_store

logger = logging.getLogger("dcp_cloud")

DEFAULT_GRACE_SECONDS = 6 * 3600


@dataclass
class GcReport:
    """What ``collect_garbage`` found and did (keys are relative to the URL)."""

    url: str
    dry_run: bool
    deleted: list[str] = field(default_factory=list)
    bytes_freed: int = 0
    aborted_uploads: list[str] = field(default_factory=list)
    kept_recent: list[str] = field(default_factory=list)
    unreadable_metadata: list[str] = field(default_factory=list)


def _split_save(key: str) -> tuple[str, str] | None:
    """(checkpoint folder, save id) of a key inside a ``save-*`` folder, else None."""
    parts = key.split("/")
    for i, part in enumerate(parts[:-1]):
        if part.startswith(layout.SAVE_ID_PREFIX):
            return "/".join(parts[:i]), part
    return None


def _is_metadata(name: str) -> bool:
    return name == layout.METADATA_KEY or (name.startswith("__") and name.endswith(".metadata"))


def _referenced_saves(
    store: ObjectStore, objects: list[ObjectInfo], report: GcReport
) -> set[tuple[str, str]]:
    """(folder, save id) pairs that some committed metadata points into; folders whose
    metadata cannot be read count as referencing every save in them."""
    referenced: set[tuple[str, str]] = set()
    for obj in objects:
        folder, _, name = obj.key.rpartition("/")
        if not _is_metadata(name) or _split_save(obj.key) is not None:
            continue
        try:
            metadata = load_metadata(store.run(store.get(obj.key)), f"{store.url}/{obj.key}")
        except (DcpCloudError, FileNotFoundError) as exc:
            report.unreadable_metadata.append(obj.key)
            logger.warning("gc: keeping every save under %r: %s", folder or ".", exc)
            referenced.add((folder, "*"))
            continue
        for info in (metadata.storage_data or {}).values():
            save_id = layout.save_id_of_key(getattr(info, "relative_path", ""))
            if save_id:
                referenced.add((folder, save_id))
    return referenced


def collect_garbage(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    dry_run: bool = False,
) -> GcReport:
    """Remove uncommitted saves and stale multipart uploads under ``url``.

    Only objects inside ``save-*`` folders that no ``.metadata`` beside them references are
    candidates, and only when the newest of them is older than ``grace_seconds``; incomplete
    multipart uploads are aborted when they were started more than ``grace_seconds`` ago.
    Committed checkpoints, and anything not written by dcp_cloud, are never touched.
    """
    store = open_store(url, storage_options, filesystem)
    report = GcReport(url=store.url, dry_run=dry_run)
    now = time.time()
    objects = store.run(store.list_objects(""))
    referenced = _referenced_saves(store, objects, report)

    saves: dict[tuple[str, str], list[ObjectInfo]] = {}
    for obj in objects:
        located = _split_save(obj.key)
        if located is not None:
            saves.setdefault(located, []).append(obj)

    doomed: list[ObjectInfo] = []
    for (folder, save_id), members in sorted(saves.items()):
        if (folder, save_id) in referenced or (folder, "*") in referenced:
            continue
        newest = max((m.modified or now) for m in members)
        if now - newest < grace_seconds:
            report.kept_recent.append(f"{folder}/{save_id}".lstrip("/"))
            continue
        doomed.extend(members)

    report.deleted = [o.key for o in doomed]
    report.bytes_freed = sum(o.size for o in doomed)
    stale = [u for u in store.run(store.list_uploads("")) if now - u.last_activity >= grace_seconds]
    report.aborted_uploads = [u.key for u in stale]
    if not dry_run:
        if doomed:
            store.run(store.delete(report.deleted))
        for upload in stale:
            store.run(store.abort_upload(upload.upload))
    logger.info(
        "dcp_cloud gc %s: %s %d objects (%.1f MB), %d stale uploads; kept %d recent saves",
        store.url,
        "would delete" if dry_run else "deleted",
        len(report.deleted),
        report.bytes_freed / 1e6,
        len(report.aborted_uploads),
        len(report.kept_recent),
    )
    return report
