"""CheckpointManager: numbered checkpoints of one training run, with discovery and retention.

    manager = CheckpointManager("s3://bucket/run1", keep_last=3)
    manager.save(step, state_dict)                 # -> s3://bucket/run1/step-0000001000
    step = manager.load(state_dict)                # the newest committed step

Each step is an ordinary dcp_cloud checkpoint at ``<root>/step-<10 digits>``. Discovery costs one
listing of the root, on the coordinator only (rank 0 when torch.distributed is initialized),
whose result is broadcast to the other ranks; ``load``, ``latest`` and ``steps`` are therefore
collective when a process group is up, and every rank must call them. Retention runs on the
coordinator alone, after a save has committed.
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import inspect
import logging
import os
import pickle
import re
import threading
import time
from typing import Any

import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from fsspec import AbstractFileSystem
from torch.distributed.checkpoint.state_dict_saver import AsyncSaveResponse

from ..checkpoint import layout, ownership
from ..errors import CheckpointNotFoundError, DcpCloudError
from ..load.reader import CloudStorageReader
from ..save.writer import CloudStorageWriter
from ..store import ObjectStore, open_store
from ..urls import redact_url
from .catalog import summarize

logger = logging.getLogger("dcp_cloud")

STEP_DIGITS = 10
_STEP_FOLDER = re.compile(r"^step-(\d+)$")
_READER_OPTIONS = frozenset(inspect.signature(CloudStorageReader.__init__).parameters) - {
    "self",
    "url",
    "storage_options",
    "filesystem",
}


def step_folder(step: int) -> str:
    """The folder name of a step: ``step-`` and the step zero-padded to 10 digits."""
    if step < 0:
        raise ValueError(f"step must be >= 0, got {step}")
    return f"step-{step:0{STEP_DIGITS}d}"


def committed_steps(store: ObjectStore) -> list[int]:
    """Committed steps directly under the store's root, ascending; one listing."""
    steps = []
    for found in summarize(store.run(store.list_objects(""))):
        match = _STEP_FOLDER.match(found.path)
        # only the manager's own spelling: step-5 beside step-0000000005 is someone else's
        if match and found.committed and step_folder(int(match.group(1))) == found.path:
            steps.append(int(match.group(1)))
    return sorted(steps)


def delete_step(store: ObjectStore, step: int) -> int:
    """Delete one step's checkpoint: its ``.metadata`` files first (so that a partial deletion
    never leaves something that looks committed), then the saves of ours directly in its folder
    (see :mod:`dcp_cloud.checkpoint.ownership`). A checkpoint nested in the step's folder, user files there,
    objects of other tools and a save in flight (live lease) are kept. Returns the number of
    objects deleted."""
    folder = step_folder(step)

    def own_marker(key: str) -> bool:
        head, _, name = key.rpartition("/")
        return head == folder and layout.is_metadata_name(name)

    found = ownership.scan(store, folder + "/", retiring=own_marker)
    markers = [o.key for o in found.objects if own_marker(o.key)]
    now = time.time()
    doomed = [
        save
        for save in found.saves
        if save.folder == folder and not found.is_referenced(save) and not save.lease_live(now)
    ]
    if markers:
        store.run(store.delete(markers))
    for save in doomed:
        for upload in save.uploads:
            store.run(store.abort_upload(upload.upload))
    keys = [key for save in doomed for key in save.deletion_order()]
    if keys:
        store.run(store.delete(keys))
    return len(markers) + len(keys)


def _distributed(group: dist.ProcessGroup | None) -> bool:
    return dist.is_available() and dist.is_initialized() and dist.get_world_size(group) > 1


class _RemoteError(DcpCloudError):
    """An error the coordinator hit during discovery, re-raised on the other ranks."""


class CheckpointManager:
    """Numbered checkpoints under one root URL: save, find, load, and keep the last N.

    Args:
        root_url: the run's prefix, e.g. ``s3://bucket/run1``; step N is saved at
            ``<root_url>/step-<N zero-padded to 10 digits>``.
        keep_last: keep this many newest committed steps and delete older ones after each
            save commits (None keeps everything). The newest committed step and saves still
            in flight are never deleted.
        storage_options: passed to the fsspec filesystem (endpoint, credentials, region).
        filesystem: an existing fsspec filesystem to use instead of ``storage_options``.
        process_group: the group that saves and loads together (default: the world).
        **writer_kwargs: passed to :class:`CloudStorageWriter` (``part_size``,
            ``max_concurrency``, ...); those the reader also takes are passed to it too.
    """

    def __init__(
        self,
        root_url: str | os.PathLike[str],
        *,
        keep_last: int | None = None,
        storage_options: dict[str, Any] | None = None,
        filesystem: AbstractFileSystem | None = None,
        process_group: dist.ProcessGroup | None = None,
        **writer_kwargs: Any,
    ) -> None:
        if keep_last is not None and keep_last < 1:
            raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}")
        self.root_url = os.fspath(root_url).rstrip("/")
        self.keep_last = keep_last
        self.storage_options = dict(storage_options or {})
        self.filesystem = filesystem
        self.process_group = process_group
        self.writer_kwargs = writer_kwargs
        self._store: ObjectStore | None = None
        self._lock = threading.Lock()
        self._in_flight: dict[int, int] = {}
        self._pending: list[concurrent.futures.Future[Any]] = []

    def __repr__(self) -> str:
        return f"CheckpointManager({redact_url(self.root_url)!r}, keep_last={self.keep_last})"

    @property
    def store(self) -> ObjectStore:
        """The store at the root URL, opened on first use."""
        if self._store is None:
            self._store = open_store(self.root_url, self.storage_options, self.filesystem)
        return self._store

    def step_url(self, step: int) -> str:
        """The URL of one step's checkpoint."""
        return f"{self.root_url}/{step_folder(step)}"

    @property
    def is_coordinator(self) -> bool:
        """Whether this process lists and deletes (rank 0 of the group, or a lone process)."""
        if not (dist.is_available() and dist.is_initialized()):
            return True
        return dist.get_rank(self.process_group) == 0

    # -- discovery ------------------------------------------------------------------------------

    def steps(self) -> list[int]:
        """Committed steps, ascending. Collective under torch.distributed: one listing on the
        coordinator, broadcast to the other ranks."""
        result: list[Any] = [None]
        if self.is_coordinator:
            try:
                result[0] = ("ok", committed_steps(self.store))
            except Exception as exc:
                if not _distributed(self.process_group):
                    raise
                result[0] = ("error", _picklable(exc))
        if _distributed(self.process_group):
            source = dist.get_global_rank(self.process_group, 0) if self.process_group else 0
            dist.broadcast_object_list(result, src=source, group=self.process_group)
        status, value = result[0]
        if status == "error":
            raise value
        return list(value)

    def latest(self) -> int | None:
        """The newest committed step, or None when there is none (collective, like ``steps``)."""
        found = self.steps()
        return found[-1] if found else None

    # -- save and load --------------------------------------------------------------------------

    def save(self, step: int, state_dict: dict[str, Any], async_: bool = False) -> Any:
        """Save ``state_dict`` as ``step`` (collective, like ``dcp.save``).

        With ``async_=True`` the save goes through ``dcp.async_save`` and this returns a future
        that completes once the save has committed and retention has run (its result is
        ``dcp.async_save``'s). Otherwise it returns None after both.
        """
        writer = CloudStorageWriter(
            self.step_url(step),
            storage_options=self.storage_options,
            filesystem=self.filesystem,
            **self.writer_kwargs,
        )
        self._begin(step)
        if not async_:
            try:
                dcp.save(state_dict, storage_writer=writer, process_group=self.process_group)
            finally:
                self._end(step)
            self._retain_quietly(step)
            return None
        try:
            response = dcp.async_save(state_dict, storage_writer=writer, process_group=self.process_group)
        except BaseException:
            self._end(step)
            raise
        upload: Any = response.upload_completion if isinstance(response, AsyncSaveResponse) else response
        done: concurrent.futures.Future[Any] = concurrent.futures.Future()

        def committed(future: Any) -> None:
            self._end(step)
            try:
                value = future.result()
            except BaseException as exc:
                done.set_exception(exc)
                return
            self._retain_quietly(step)
            done.set_result(value)

        with self._lock:
            self._pending = [f for f in self._pending if not f.done()] + [done]
        upload.add_done_callback(committed)
        if isinstance(response, AsyncSaveResponse):
            return dataclasses.replace(response, upload_completion=done)
        return done

    def wait(self) -> None:
        """Wait for this manager's async saves (and their retention) to finish; raises the
        first failure."""
        with self._lock:
            pending = list(self._pending)
        for future in pending:
            future.result()

    def load(self, state_dict: dict[str, Any], step: int | None = None) -> int:
        """Load ``step`` (default: the newest committed one) into ``state_dict`` in place and
        return the step loaded. Collective, like ``dcp.load``.

        Raises:
            CheckpointNotFoundError: no committed step under the root (or not ``step``).
        """
        found = self.steps()
        if step is None:
            if not found:
                raise CheckpointNotFoundError(
                    f"{redact_url(self.root_url)}: no committed checkpoint (no step-*/.metadata). "
                    "Check the URL, or save a step first."
                )
            step = found[-1]
        elif step not in found:
            shown = ", ".join(map(str, found[-5:])) or "none"
            raise CheckpointNotFoundError(
                f"{redact_url(self.root_url)}: step {step} is not committed there "
                f"(newest committed steps: {shown}). Pick one of those, or omit step for the latest."
            )
        reader_kwargs = {k: v for k, v in self.writer_kwargs.items() if k in _READER_OPTIONS}
        reader = CloudStorageReader(
            self.step_url(step),
            storage_options=self.storage_options,
            filesystem=self.filesystem,
            **reader_kwargs,
        )
        dcp.load(state_dict, storage_reader=reader, process_group=self.process_group)
        return step

    # -- retention ------------------------------------------------------------------------------

    def prune(self, keep_last: int | None = None, *, dry_run: bool = False) -> list[int]:
        """Delete committed steps older than the newest ``keep_last`` (default: the manager's),
        except saves this manager has in flight. Runs on the coordinator only (other ranks
        return ``[]`` without listing). Returns the steps deleted (or that would be)."""
        return self._prune(self.keep_last if keep_last is None else keep_last, dry_run, set())

    def _prune(self, keep: int | None, dry_run: bool, protect: set[int]) -> list[int]:
        if keep is None or not self.is_coordinator:
            return []
        if keep < 1:
            raise ValueError(f"keep_last must be >= 1, got {keep}")
        found = committed_steps(self.store)
        with self._lock:
            busy = set(self._in_flight)
        kept = set(found[-keep:]) | busy | protect
        doomed = [s for s in found if s not in kept]
        if dry_run:
            return doomed
        for step in doomed:
            count = delete_step(self.store, step)
            logger.info(
                "dcp_cloud retention: deleted %s (%d objects)", redact_url(self.step_url(step)), count
            )
        return doomed

    def _retain_quietly(self, step: int) -> None:
        """Retention after ``step`` committed (which is kept even when older steps are newer);
        a failure is logged, never raised (the save itself succeeded)."""
        if self.keep_last is None:
            return
        try:
            self._prune(self.keep_last, False, {step})
        except Exception as exc:
            logger.warning(
                "%s: step %d is committed, but deleting older steps failed (%s); they are kept, "
                "and the next save or `dcp-cloud prune` retries",
                redact_url(self.root_url),
                step,
                exc,
            )

    def _begin(self, step: int) -> None:
        with self._lock:
            self._in_flight[step] = self._in_flight.get(step, 0) + 1

    def _end(self, step: int) -> None:
        with self._lock:
            left = self._in_flight.get(step, 0) - 1
            if left > 0:
                self._in_flight[step] = left
            else:
                self._in_flight.pop(step, None)


def _picklable(exc: BaseException) -> BaseException:
    """``exc`` if it survives pickling (for the broadcast), else a DcpCloudError with its text."""
    try:
        pickle.loads(pickle.dumps(exc))
        return exc
    except Exception:
        return _RemoteError(f"{type(exc).__name__}: {exc}")


__all__ = ["CheckpointManager", "committed_steps", "delete_step", "step_folder"]
