"""A checkpoint as it lies on a store: its ``.metadata``, its manifest, the keys it references.

Data flow: :meth:`StoredCheckpoint.read_metadata` fetches ``.metadata`` (or a rank-local
``.metadata.<rank>``) and unpickles it with the restricted unpickler; an absent one gets one
diagnosis (nothing here, or a save that never committed). From that metadata
:meth:`~StoredCheckpoint.save_id_of` decides whether dcp_cloud wrote the checkpoint,
:meth:`~StoredCheckpoint.data_keys` and :meth:`~StoredCheckpoint.referenced_keys` say which
objects it needs, and :meth:`~StoredCheckpoint.read_manifest` fetches the save's manifest.
The loader, the writer and the tools (info, verify, copy) all go through here, so each of these
questions has one answer and each failure one message.
"""

from __future__ import annotations

from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata

from ..errors import CheckpointNotFoundError, CorruptCheckpointError, IncompleteCheckpointError
from ..store import ObjectStore
from . import layout
from .confine import is_confined
from .manifest import Manifest
from .metadata import load_metadata

__all__ = ["StoredCheckpoint", "checksum_mismatch", "checksum_mismatch_text"]


def _is_rank_zero() -> bool:
    return not (dist.is_available() and dist.is_initialized()) or dist.get_rank() == 0


def checksum_mismatch_text(where: str, start: int, end: int, names: str) -> str:
    """What is wrong when bytes ``[start, end)`` of the object at ``where`` (holding ``names``)
    do not match their recorded checksum."""
    return f"{where}: checksum mismatch in bytes [{start}, {end}) holding {names}"


def checksum_mismatch(where: str, start: int, end: int, names: str) -> CorruptCheckpointError:
    """The error a load raises for bytes that do not match their recorded checksum."""
    return CorruptCheckpointError(
        f"{checksum_mismatch_text(where, start, end, names)}. The object is corrupt; load an "
        "earlier checkpoint (verify_checksums=False skips this check)."
    )


class StoredCheckpoint:
    """The checkpoint at the root of ``store``, read through the checkpoint's own files."""

    def __init__(self, store: ObjectStore) -> None:
        self.store = store

    def read_metadata(self, rank: int | None = None) -> Metadata:
        """The checkpoint's ``.metadata`` (``.metadata.<rank>`` when ``rank`` is given),
        unpickled safely.

        Raises:
            IncompleteCheckpointError: data objects exist but no ``.metadata``.
            CheckpointNotFoundError: nothing checkpoint-like at the URL.
        """
        data = self.read_metadata_bytes(rank)
        return load_metadata(data, f"{self.store.url}/{layout.metadata_key(rank)}")

    def read_metadata_bytes(self, rank: int | None = None) -> bytes:
        """The raw bytes of ``.metadata`` (``.metadata.<rank>``), with the same diagnosis as
        :meth:`read_metadata` when it is absent."""
        key = layout.metadata_key(rank)
        store = self.store
        try:
            return store.run(store.get(key))
        except FileNotFoundError:
            raise self.missing_error(key) from None

    def read_committed(self, key: str = layout.METADATA_KEY) -> bytes | None:
        """The raw bytes of the committed metadata object ``key``, or None when there is none."""
        store = self.store
        try:
            return store.run(store.get(key))
        except FileNotFoundError:
            return None

    def missing_error(self, key: str = layout.METADATA_KEY) -> CheckpointNotFoundError:
        """Why the metadata object ``key`` is absent: a save that never committed (data
        objects but no ``.metadata``; decided by rank 0 alone, which lists the store), or no
        checkpoint at all."""
        store = self.store
        if key != layout.METADATA_KEY:
            return CheckpointNotFoundError(
                f"{store.url}: no {key} either (rank-local metadata of use_collectives=False)"
            )
        if _is_rank_zero():
            objects = store.run(store.list_objects(""))
            data = [o.key for o in objects if o.key.endswith(layout.DATA_SUFFIX)]
            if data:
                return IncompleteCheckpointError(
                    f"{store.url}: {len(data)} data objects but no .metadata: a save that never "
                    "committed (crashed or still running). Load an earlier checkpoint; "
                    "`dcp-cloud gc` removes the debris."
                )
        return CheckpointNotFoundError(
            f"{store.url}: no checkpoint here (no .metadata). Check the URL, or save first; "
            "`dcp-cloud ls` lists the checkpoints under a prefix."
        )

    @staticmethod
    def save_id_of(metadata: Metadata) -> str | None:
        """The save id of a checkpoint written by dcp_cloud, None for any other: dcp_cloud's
        metadata names a save id and places data under it."""
        save_id = getattr(metadata.storage_meta, "save_id", None)
        if not isinstance(save_id, str) or not save_id:
            return None
        for path in _relative_paths(metadata):
            if layout.save_id_of_key(path) == save_id:
                return save_id
        return None

    @classmethod
    def written_by_dcp_cloud(cls, metadata: Metadata) -> bool:
        """Whether dcp_cloud wrote the checkpoint ``metadata`` describes (it has a manifest)."""
        return cls.save_id_of(metadata) is not None

    @staticmethod
    def data_keys(metadata: Metadata) -> set[str]:
        """The data objects ``metadata`` locates that lie inside the checkpoint (a crafted
        locator is left out; :func:`~dcp_cloud.checkpoint.confine.confine_key` refuses one)."""
        return {path for path in _relative_paths(metadata) if is_confined(path)}

    @classmethod
    def referenced_keys(cls, metadata: Metadata) -> set[str]:
        """Every object a committed checkpoint needs: its data objects inside the checkpoint,
        and, for dcp_cloud's, its save's manifest and intent record."""
        keys = cls.data_keys(metadata)
        save_id = getattr(metadata.storage_meta, "save_id", None)
        if isinstance(save_id, str) and any(layout.save_id_of_key(k) == save_id for k in keys):
            keys.add(layout.manifest_key(save_id))
            keys.add(layout.intent_key(save_id))
        return keys

    def read_manifest(self, save_id: str) -> Manifest:
        """The manifest of save ``save_id``, schema-checked.

        Raises:
            CorruptCheckpointError: it is missing or unreadable (the message says which);
                :class:`UnsafeCheckpointError` when it is crafted.
        """
        store = self.store
        key = layout.manifest_key(save_id)
        where = f"{store.url}/{key}"
        try:
            data = store.run(store.get(key))
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where} is missing") from None
        return Manifest.from_json(data, where, save_id)


def _relative_paths(metadata: Metadata) -> list[str]:
    storage_data: Any = metadata.storage_data
    if not isinstance(storage_data, dict):
        return []
    paths = (getattr(info, "relative_path", None) for info in storage_data.values())
    return [p for p in paths if isinstance(p, str)]
