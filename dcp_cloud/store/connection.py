"""What the writer and the reader share: a URL, how to reach its store, and the transfer knobs."""

from __future__ import annotations

import os
from typing import Any

from fsspec import AbstractFileSystem

from ..options import TransferOptions
from ..urls import is_usable_url, normalize_url
from .base import ObjectStore
from .registry import open_store


class StoreConnection:
    """Holds the checkpoint URL and opens its store lazily.

    Picklable (for ``async_save``'s PROCESS mode and for launchers that ship objects to workers):
    the open store is dropped on pickling and reopened on first use, and so is one opened before
    a fork (its client's sessions belong to the parent's event loop). ``url`` is kept in the form
    :func:`~dcp_cloud.urls.normalize_url` gives (a local path made absolute), so a URL with
    credentials, a query string or ``..`` segments is refused here, before anything is written.

    Reopening is cheap: stores of one configuration share the process's filesystem and client
    (see :mod:`dcp_cloud.store.filesystems`), across ``reset()`` and new writers and readers.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None,
        filesystem: AbstractFileSystem | None,
        options: TransferOptions,
    ) -> None:
        self.filesystem = filesystem
        self.url = normalize_url(url, _local_paths(filesystem))
        self.storage_options = dict(storage_options or {})
        self.options = options
        self._store: ObjectStore | None = None
        self._store_pid = 0

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    @property
    def store(self) -> ObjectStore:
        """The store at ``url``, opened on first use."""
        if self._store is None or self._store_pid != os.getpid():
            self._store = None
            self._store = open_store(
                self.url,
                self.storage_options,
                self.filesystem,
                self.options.max_concurrency,
                self.options.max_attempts,
                self.options.deadline,
                self.options.retry_window,
            )
            self._store_pid = os.getpid()
            self._store_opened(self._store)
        return self._store

    def _store_opened(self, store: ObjectStore) -> None:
        """Called once a store is opened, before its first request (subclasses adjust it)."""

    def _set_url(self, checkpoint_id: str | os.PathLike[str] | None) -> None:
        """Point at ``checkpoint_id`` (DCP's reset); a falsy id keeps the current URL."""
        if checkpoint_id:
            new_url = normalize_url(checkpoint_id, _local_paths(self.filesystem))
            if new_url != self.url:
                self.url = new_url
                self._store = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        """Whether ``checkpoint_id`` is a URL this class can use (see ``normalize_url``)."""
        return is_usable_url(os.fspath(checkpoint_id))


def _local_paths(filesystem: AbstractFileSystem | None) -> bool:
    """Whether a plain path given with ``filesystem`` names a local file."""
    from fsspec.implementations.local import LocalFileSystem

    return filesystem is None or isinstance(filesystem, LocalFileSystem)
