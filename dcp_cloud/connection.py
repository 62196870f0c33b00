"""What the writer and the reader share: a URL, how to reach its store, and the transfer knobs."""

from __future__ import annotations

import os
from typing import Any

from fsspec import AbstractFileSystem

from .options import TransferOptions
from .store import ObjectStore, open_store
from .urls import is_supported_url


class StoreConnection:
    """Holds the checkpoint URL and opens its store lazily.

    Picklable (for ``async_save``'s PROCESS mode and for launchers that ship objects to workers):
    the open store is dropped on pickling and reopened on first use.
    """

    def __init__(
        self,
        url: str | os.PathLike[str],
        storage_options: dict[str, Any] | None,
        filesystem: AbstractFileSystem | None,
        options: TransferOptions,
    ) -> None:
        self.url = os.fspath(url)
        self.storage_options = dict(storage_options or {})
        self.filesystem = filesystem
        self.options = options
        self._store: ObjectStore | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_store"] = None
        return state

    @property
    def store(self) -> ObjectStore:
        """The store at ``url``, opened on first use."""
        if self._store is None:
            self._store = open_store(
                self.url,
                self.storage_options,
                self.filesystem,
                self.options.max_concurrency,
                self.options.max_attempts,
                self.options.deadline,
            )
        return self._store

    def _set_url(self, checkpoint_id: str | os.PathLike[str] | None) -> None:
        """Point at ``checkpoint_id`` (DCP's reset); a falsy id keeps the current URL."""
        if checkpoint_id:
            new_url = os.fspath(checkpoint_id)
            if new_url != self.url:
                self.url = new_url
                self._store = None

    @classmethod
    def validate_checkpoint_id(cls, checkpoint_id: str | os.PathLike[str]) -> bool:
        return is_supported_url(os.fspath(checkpoint_id))
