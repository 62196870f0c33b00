"""A checkpoint as it lies on a store: its ``.metadata``, its manifest, the keys it references.

Data flow: :meth:`StoredCheckpoint.read_metadata` fetches ``.metadata`` (or a rank-local
``__<rank>.metadata``) and unpickles it with the restricted unpickler
(:meth:`~StoredCheckpoint.parse_metadata`); an absent one gets one diagnosis (nothing here, or
a save that never committed). From that metadata :meth:`~StoredCheckpoint.save_id_of` decides
whether dcp_cloud wrote the checkpoint, :meth:`~StoredCheckpoint.data_keys`,
:meth:`~StoredCheckpoint.referenced_keys` and :meth:`~StoredCheckpoint.references` say which
objects and saves it needs, and :meth:`~StoredCheckpoint.read_manifest` fetches the save's
manifest. Writing goes the other way through :mod:`dcp_cloud.checkpoint.commit`, which
:meth:`~StoredCheckpoint.commit`, :meth:`~StoredCheckpoint.discard`,
:meth:`~StoredCheckpoint.release_intent` and :meth:`~StoredCheckpoint.retire_generation_before`
expose. The loader, the writer, ownership (gc, prune) and the tools (info, verify, copy) all go
through here, so each of these questions has one answer and each failure one message. A
``StoredCheckpoint`` may stand for a checkpoint in a folder of the store (``folder``): its
keys are then relative to that folder.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch.distributed as dist
from torch.distributed.checkpoint.metadata import Metadata

from ..errors import (
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    IncompleteCheckpointError,
)
from ..store import ObjectStore
from ..store.keys import join
from . import layout
from .confine import confine_key, is_confined
from .manifest import Manifest
from .metadata import load_metadata

logger = logging.getLogger("dcp_cloud")

__all__ = ["References", "StoredCheckpoint", "checksum_mismatch", "checksum_mismatch_text"]


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


@dataclass(frozen=True)
class References:
    """What one committed ``.metadata`` needs, keys relative to its checkpoint's folder.

    Attributes:
        keys: every data object it locates.
        saves: the save ids it names: those its data keys lie under, and its own save id
            when that has the exact form of one (even with no data under it).
    """

    keys: frozenset[str]
    saves: frozenset[str]


class StoredCheckpoint:
    """The checkpoint in ``folder`` of ``store`` (its root by default), read through the
    checkpoint's own files."""

    def __init__(self, store: ObjectStore, folder: str = "") -> None:
        self.store = store
        self.folder = folder.strip("/")

    @property
    def url(self) -> str:
        """Where the checkpoint lies: the store's URL, and its folder when it has one."""
        return f"{self.store.url}/{self.folder}" if self.folder else self.store.url

    def key(self, name: str) -> str:
        """The store key of the checkpoint's object ``name`` (a key relative to its folder)."""
        return join(self.folder, name)

    def where(self, name: str) -> str:
        """The checkpoint's object ``name`` as error messages name it (its full URL)."""
        return f"{self.url}/{name}"

    # -- reading .metadata ---------------------------------------------------------------------

    def parse_metadata(self, data: bytes, name: str = layout.METADATA_KEY) -> Metadata:
        """``data`` read from the checkpoint's metadata object ``name``, unpickled safely and
        checked field by field (:class:`CorruptCheckpointError` or
        :class:`UnsafeCheckpointError` say what is wrong)."""
        return load_metadata(data, self.where(name))

    def read_metadata(self, rank: int | None = None) -> Metadata:
        """The checkpoint's ``.metadata`` (``__<rank>.metadata`` when ``rank`` is given),
        unpickled safely.

        Raises:
            IncompleteCheckpointError: data objects exist but no ``.metadata``.
            CheckpointNotFoundError: nothing checkpoint-like at the URL.
        """
        return self.parse_metadata(self.read_metadata_bytes(rank), layout.metadata_key(rank))

    def read_metadata_bytes(self, rank: int | None = None) -> bytes:
        """The raw bytes of ``.metadata`` (``__<rank>.metadata``), with the same diagnosis as
        :meth:`read_metadata` when it is absent."""
        name = layout.metadata_key(rank)
        data = self.read_committed(name)
        if data is None:
            raise self.missing_error(name)
        return data

    def read_committed(self, name: str = layout.METADATA_KEY) -> bytes | None:
        """The raw bytes of the committed metadata object ``name``, or None when there is none."""
        store = self.store
        try:
            return store.run(store.get(self.key(name)))
        except FileNotFoundError:
            return None

    def is_committed(self, name: str = layout.METADATA_KEY) -> bool:
        """Whether the metadata object ``name`` exists (one request, nothing read)."""
        return self.store.run(self.store.exists(self.key(name)))

    def replaced_metadata(self, data: bytes, name: str = layout.METADATA_KEY) -> Metadata | None:
        """``data`` of a committed ``name`` that a new checkpoint replaces, parsed; None (and a
        warning) when it cannot be read or is refused: it is replaced, but nothing it names is
        ever cleaned up after."""
        try:
            return self.parse_metadata(data, name)
        except Exception as exc:
            logger.warning("not cleaning up after the replaced checkpoint: %s", exc)
            return None

    def read_replaced(self, name: str = layout.METADATA_KEY) -> Metadata | None:
        """The committed ``name`` a new checkpoint would replace, or None when there is none
        (or it cannot be read; see :meth:`replaced_metadata`)."""
        data = self.read_committed(name)
        return None if data is None else self.replaced_metadata(data, name)

    def read_references(self, name: str = layout.METADATA_KEY) -> References | None:
        """What the committed ``name`` needs (:meth:`references`), or None when there is none.

        Raises:
            DcpCloudError: it cannot be read, is refused, or names a key outside the checkpoint.
        """
        data = self.read_committed(name)
        if data is None:
            return None
        return self.references(self.parse_metadata(data, name), self.where(name))

    def missing_error(self, name: str = layout.METADATA_KEY) -> CheckpointNotFoundError:
        """Why the metadata object ``name`` is absent: a save that never committed (data
        objects but no ``.metadata``; decided by rank 0 alone, which lists the checkpoint), or
        no checkpoint at all."""
        store = self.store
        if name != layout.METADATA_KEY:
            return CheckpointNotFoundError(
                f"{self.url}: no {name} either (rank-local metadata of use_collectives=False)"
            )
        if _is_rank_zero():
            objects = store.run(store.list_objects(self.folder + "/" if self.folder else ""))
            data = [o.key for o in objects if o.key.endswith(layout.DATA_SUFFIX)]
            if data:
                return IncompleteCheckpointError(
                    f"{self.url}: {len(data)} data objects but no .metadata: a save that never "
                    "committed (crashed or still running). Load an earlier checkpoint; "
                    "`dcp-cloud gc` removes the debris."
                )
        return CheckpointNotFoundError(
            f"{self.url}: no checkpoint here (no .metadata). Check the URL, or save first; "
            "`dcp-cloud ls` lists the checkpoints under a prefix."
        )

    def exists_error(self, name: str = layout.METADATA_KEY) -> CheckpointExistsError:
        """The error of a save that would replace the committed ``name`` with overwrite=False."""
        return CheckpointExistsError(
            f"{self.url}: a checkpoint is already committed here ({name} exists) and "
            "overwrite=False. Save to a new URL, delete the old checkpoint, or pass overwrite=True."
        )

    # -- what a .metadata says -----------------------------------------------------------------

    @staticmethod
    def claimed_save_id(metadata: Metadata) -> str | None:
        """The save id ``metadata`` claims (its ``storage_meta``), proven or not; see
        :meth:`save_id_of` for one that is."""
        save_id = getattr(metadata.storage_meta, "save_id", None)
        return save_id if isinstance(save_id, str) and save_id else None

    @classmethod
    def save_id_of(cls, metadata: Metadata) -> str | None:
        """The save id of a checkpoint written by dcp_cloud, None for any other: dcp_cloud's
        metadata names a save id and places data under it."""
        save_id = cls.claimed_save_id(metadata)
        if save_id is not None and any(
            layout.save_id_of_key(path) == save_id for path in _relative_paths(metadata)
        ):
            return save_id
        return None

    @classmethod
    def written_by_dcp_cloud(cls, metadata: Metadata) -> bool:
        """Whether dcp_cloud wrote the checkpoint ``metadata`` describes (it has a manifest)."""
        return cls.save_id_of(metadata) is not None

    @staticmethod
    def located_items(metadata: Metadata) -> Iterator[tuple[Any, str, Any]]:
        """``(index, key, info)`` of every item whose locator names a data object by a string
        key (confined or not): its storage_data index, ``info.relative_path`` and the
        storage info itself (``offset``, ``length``)."""
        storage_data: Any = metadata.storage_data
        if not isinstance(storage_data, dict):
            return
        for index, info in storage_data.items():
            key = getattr(info, "relative_path", None)
            if isinstance(key, str):
                yield index, key, info

    @staticmethod
    def data_keys(metadata: Metadata) -> set[str]:
        """The data objects ``metadata`` locates that lie inside the checkpoint (a crafted
        locator is left out; :meth:`confined_data_keys` refuses one)."""
        return {path for path in _relative_paths(metadata) if is_confined(path)}

    @staticmethod
    def confined_data_keys(metadata: Metadata, where: str) -> set[str]:
        """Every data object ``metadata`` locates; :class:`UnsafeCheckpointError` naming the
        first locator outside the checkpoint (``where`` names the file it came from)."""
        return {confine_key(locator, where) for locator in _locators(metadata)}

    @classmethod
    def referenced_keys(cls, metadata: Metadata) -> set[str]:
        """Every object a committed checkpoint needs: its data objects inside the checkpoint,
        and, for dcp_cloud's, its save's manifest and intent record."""
        keys = cls.data_keys(metadata)
        save_id = cls.claimed_save_id(metadata)
        if save_id is not None and any(layout.save_id_of_key(k) == save_id for k in keys):
            keys.add(layout.manifest_key(save_id))
            keys.add(layout.intent_key(save_id))
        return keys

    @classmethod
    def references(cls, metadata: Metadata, where: str) -> References:
        """The data keys and saves ``metadata`` names (see :class:`References`), refusing a
        locator outside the checkpoint (:class:`UnsafeCheckpointError`, naming ``where``)."""
        keys = cls.confined_data_keys(metadata, where)
        saves = {save_id for save_id in map(layout.save_id_of_key, keys) if save_id}
        own = cls.claimed_save_id(metadata)
        if own is not None and layout.is_save_id(own):
            saves.add(own)
        return References(frozenset(keys), frozenset(saves))

    # -- the manifest --------------------------------------------------------------------------

    def read_manifest(self, save_id: str) -> Manifest:
        """The manifest of save ``save_id``, schema-checked.

        Raises:
            CorruptCheckpointError: it is missing or unreadable (the message says which);
                :class:`UnsafeCheckpointError` when it is crafted.
        """
        store = self.store
        name = layout.manifest_key(save_id)
        where = self.where(name)
        try:
            data = store.run(store.get(self.key(name)))
        except FileNotFoundError:
            raise CorruptCheckpointError(f"{where} is missing") from None
        return Manifest.from_json(data, where, save_id)

    # -- writing: the commit protocol (dcp_cloud.checkpoint.commit) ------------------------------
    # commit.py proves ownership through dcp_cloud.checkpoint.ownership, which itself reads
    # .metadata through this class, so it is imported where it is used.

    def refuse_if_committed(self, name: str = layout.METADATA_KEY) -> None:
        """:meth:`exists_error` when the metadata object ``name`` is committed already."""
        if self.is_committed(name):
            raise self.exists_error(name)

    def commit(
        self, name: str, manifest: Manifest, metadata: Metadata, *, overwrite: bool, previous: Metadata | None
    ) -> None:
        """Write ``manifest`` and then ``metadata`` as ``name`` (the commit); see
        :func:`dcp_cloud.checkpoint.commit.commit`."""
        from . import commit

        commit.commit(self, name, manifest, metadata, overwrite=overwrite, previous=previous)

    def discard(self, manifest: Manifest) -> None:
        """Delete the objects of a save that did not commit (best effort)."""
        from . import commit

        commit.discard(self, manifest)

    def release_intent(self, save_id: str) -> None:
        """Delete the intent record of a save that committed (best effort)."""
        from . import commit

        commit.release_intent(self, save_id)

    def retire_generation_before(self, previous: Metadata, current: Metadata) -> None:
        """After ``current`` replaced ``previous``: delete what ``previous`` had replaced, as
        far as records prove it ours (never raises); see
        :func:`dcp_cloud.checkpoint.commit.retire_generation_before`."""
        from . import commit

        commit.retire_generation_before(self, previous, current)


def _locators(metadata: Metadata) -> Iterator[Any]:
    """Every ``relative_path`` of ``metadata``'s storage_data, whatever its type."""
    storage_data: Any = metadata.storage_data
    if not isinstance(storage_data, dict):
        return iter(())
    return (getattr(info, "relative_path", None) for info in storage_data.values())


def _relative_paths(metadata: Metadata) -> list[str]:
    return [key for _, key, _ in StoredCheckpoint.located_items(metadata)]
