"""What a checkpoint holds, from its ``.metadata`` alone: tensors (dtype, shape, size) and the
keys of non-tensor values. Reads one object; no tensor data is fetched."""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from fsspec import AbstractFileSystem
from torch.distributed.checkpoint.metadata import BytesStorageMetadata, Metadata, TensorStorageMetadata

from ..checkpoint.stored import StoredCheckpoint
from ..store import ObjectStore, open_store


@dataclass(frozen=True)
class TensorInfo:
    """One tensor of a checkpoint (its global shape; ``chunks`` is how many shards it has)."""

    fqn: str
    dtype: str
    shape: list[int]
    size: int
    chunks: int


@dataclass
class CheckpointInfo:
    """The contents of a checkpoint according to its ``.metadata``."""

    url: str
    save_id: str | None
    tensors: list[TensorInfo] = field(default_factory=list)
    objects: list[str] = field(default_factory=list)

    @property
    def tensor_bytes(self) -> int:
        return sum(t.size for t in self.tensors)

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["tensor_bytes"] = self.tensor_bytes
        return doc


def read_metadata(store: ObjectStore) -> Metadata:
    """The checkpoint's ``.metadata``, unpickled safely.

    Raises:
        IncompleteCheckpointError: data objects exist but no ``.metadata``.
        CheckpointNotFoundError: nothing checkpoint-like at the URL.
    """
    return StoredCheckpoint(store).read_metadata()


def _element_size(dtype: torch.dtype) -> int:
    return torch.empty((), dtype=dtype).element_size()


def describe(metadata: Metadata, url: str) -> CheckpointInfo:
    """A :class:`CheckpointInfo` of already-read metadata."""
    info = CheckpointInfo(url=url, save_id=StoredCheckpoint.claimed_save_id(metadata))
    for fqn, entry in sorted(metadata.state_dict_metadata.items()):
        if isinstance(entry, TensorStorageMetadata):
            dtype = entry.properties.dtype
            numel = 1
            for n in entry.size:
                numel *= n
            info.tensors.append(
                TensorInfo(
                    fqn=fqn,
                    dtype=str(dtype).removeprefix("torch."),
                    shape=list(entry.size),
                    size=numel * _element_size(dtype),
                    chunks=len(entry.chunks),
                )
            )
        elif isinstance(entry, BytesStorageMetadata):
            info.objects.append(fqn)
    return info


def checkpoint_info(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
) -> CheckpointInfo:
    """The tensors and non-tensor keys of the checkpoint at ``url``, from its ``.metadata``."""
    store = open_store(url, storage_options, filesystem)
    return describe(read_metadata(store), store.url)
