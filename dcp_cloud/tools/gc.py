"""Garbage collection: the debris of saves that never committed.

A save that crashed or lost its commit leaves data objects under its save folder that no
``.metadata`` references, and possibly uploads that were never completed or aborted.
``collect_garbage`` finds them under a prefix (one checkpoint, or a run holding many) and removes
only what :mod:`dcp_cloud.checkpoint.ownership` proves dcp_cloud wrote: saves whose own records (intent,
manifest) account for every object deleted, that no committed ``.metadata`` anywhere under the
prefix references, whose lease has run out (a save in flight renews it), and whose newest object
is older than a grace period. User files, checkpoints of other tools and folders that merely look
like saves are never touched.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from typing import Any

from fsspec import AbstractFileSystem

from ..checkpoint import ownership
from ..store import open_store

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
    #: save folders kept because their lease is live or they are within the grace period
    kept_recent: list[str] = field(default_factory=list)
    unreadable_metadata: list[str] = field(default_factory=list)


def collect_garbage(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    grace_seconds: float = DEFAULT_GRACE_SECONDS,
    dry_run: bool = False,
) -> GcReport:
    """Remove uncommitted saves and their stale uploads under ``url``.

    A save is removed only when dcp_cloud's own records prove it wrote it, no committed
    ``.metadata`` under ``url`` (at any depth) references it, its lease has expired (a save in
    flight holds one, honoured whatever ``grace_seconds`` is), and its newest object or upload is
    older than ``grace_seconds``. Only objects its records account for are deleted, and only
    uploads of its keys are aborted. Committed checkpoints, and anything not written by
    dcp_cloud, are never touched.
    """
    store = open_store(url, storage_options, filesystem)
    report = GcReport(url=store.url, dry_run=dry_run)
    now = time.time()
    found = ownership.scan(store)
    report.unreadable_metadata = list(found.unreadable_metadata)
    doomed: list[ownership.SaveFolder] = []
    for save in found.saves:
        reason = ownership.collectable(save, found, now, grace_seconds)
        if reason is None:
            doomed.append(save)
        elif reason != "referenced":
            report.kept_recent.append(save.path)
    report.deleted = [key for save in doomed for key in save.deletion_order()]
    report.bytes_freed = sum(o.size for save in doomed for o in save.owned)
    stale = [u for save in doomed for u in save.uploads]
    report.aborted_uploads = [u.key for u in stale]
    if not dry_run:
        for upload in stale:
            store.run(store.abort_upload(upload.upload))
        for save in doomed:
            keys = save.deletion_order()
            if keys:
                store.run(store.delete(keys))
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
