"""Reading a checkpoint's ``.metadata`` pickle without trusting it.

``.metadata`` is a pickle, and unpickling runs whatever callables the pickle names. A checkpoint
from a bucket someone else can write to must not be able to run code here, so this unpickler
admits only DCP's metadata classes, torch's dtype/layout/size objects, paths and plain
containers, and refuses anything else with :class:`UnsafeCheckpointError`. What it returns is
then checked field by field (types, ranges, every locator confined to the checkpoint), so a
pickle made only of allowed classes cannot point a load anywhere else either.
"""

from __future__ import annotations

import io
import math
import pickle
from typing import Any, TypeGuard

import torch

from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from ..store.keys import key_problem

_ALLOWED: dict[str, frozenset[str]] = {
    "torch.distributed.checkpoint.metadata": frozenset(
        {
            "Metadata",
            "TensorStorageMetadata",
            "BytesStorageMetadata",
            "ChunkStorageMetadata",
            "TensorProperties",
            "MetadataIndex",
            "StorageMeta",
            "_MEM_FORMAT_ENCODING",
        }
    ),
    "torch.distributed.checkpoint.filesystem": frozenset({"_StorageInfo", "_StoragePrefix"}),
    "torch.serialization": frozenset({"_get_layout"}),
    "torch._utils": frozenset({"_get_layout"}),
    "pathlib": frozenset(
        {"Path", "PosixPath", "WindowsPath", "PurePosixPath", "PureWindowsPath", "PurePath"}
    ),
    "collections": frozenset({"OrderedDict"}),
    "builtins": frozenset({"set", "frozenset", "slice", "complex"}),
}

_TORCH_VALUE_TYPES = (torch.dtype, torch.layout, torch.memory_format)


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if module == "torch":
            if name == "Size":
                return torch.Size
            value = getattr(torch, name, None)
            if isinstance(value, _TORCH_VALUE_TYPES):
                # Pickles name dtypes as globals, e.g. torch.float32; return the value itself.
                return value
        elif name in _ALLOWED.get(module, ()):
            return super().find_class(module, name)
        raise UnsafeCheckpointError(
            f"refusing {module}.{name}: .metadata may only reference DCP metadata classes"
        )


def load_metadata(data: bytes, where: str) -> Any:
    """Unpickle ``.metadata`` bytes read from ``where`` with the restricted unpickler."""
    from torch.distributed.checkpoint.metadata import Metadata

    try:
        obj = _MetadataUnpickler(io.BytesIO(data)).load()
    except UnsafeCheckpointError as exc:
        raise UnsafeCheckpointError(
            f"{where} is not a plain DCP metadata pickle ({exc}). It may have been crafted to run "
            "code; it was not loaded. Only load checkpoints from stores you trust to be intact."
        ) from None
    except Exception as exc:
        raise CorruptCheckpointError(
            f"{where} is corrupt or truncated ({len(data)} bytes; {type(exc).__name__}: {exc}). "
            "Re-save the checkpoint or load an earlier one."
        ) from exc
    if not isinstance(obj, Metadata):
        raise CorruptCheckpointError(
            f"{where} holds a {type(obj).__name__}, not DCP Metadata; is this a DCP checkpoint?"
        )
    _MetadataCheck(where).check(obj)
    return obj


#: offsets, lengths and byte counts are below this (torch's own limit is int64)
_LIMIT = 2**63
#: list indices in planner_data may exceed the number of values by this much
_INDEX_SLACK = 2**16
#: the deepest planner_data path accepted
_MAX_DEPTH = 256


class _MetadataCheck:
    """Checks every field of an unpickled ``Metadata`` that a load or a tool relies on."""

    def __init__(self, where: str) -> None:
        self.where = where

    def fail(self, what: str) -> CorruptCheckpointError:
        return CorruptCheckpointError(
            f"{self.where} is malformed: {what}. The checkpoint is damaged or was not written by "
            "torch.distributed.checkpoint; load an earlier one."
        )

    def check(self, metadata: Any) -> None:
        entries = getattr(metadata, "state_dict_metadata", None)
        if not isinstance(entries, dict):
            raise self.fail(f"state_dict_metadata is a {type(entries).__name__}, not a dict")
        for fqn, entry in entries.items():
            self.entry(fqn, entry)
        self.storage_data(getattr(metadata, "storage_data", None))
        self.planner_data(getattr(metadata, "planner_data", None), len(entries))
        self.storage_meta(getattr(metadata, "storage_meta", None))
        version = getattr(metadata, "version", None)
        if version is not None and not isinstance(version, str):
            raise self.fail(f"version is a {type(version).__name__}, not a string")

    def entry(self, fqn: Any, entry: Any) -> None:
        from torch.distributed.checkpoint.metadata import (
            BytesStorageMetadata,
            TensorProperties,
            TensorStorageMetadata,
        )

        if not isinstance(fqn, str):
            raise self.fail(f"a state dict key is a {type(fqn).__name__}, not a string")
        if isinstance(entry, BytesStorageMetadata):
            return
        if not isinstance(entry, TensorStorageMetadata):
            raise self.fail(f"{fqn!r} is described by a {type(entry).__name__}")
        properties = getattr(entry, "properties", None)
        dtype = getattr(properties, "dtype", None)
        if not isinstance(properties, TensorProperties) or not isinstance(dtype, torch.dtype):
            raise self.fail(f"{fqn!r} has no valid tensor properties (dtype)")
        size = self.shape(getattr(entry, "size", None), f"{fqn!r} size")
        if math.prod(size) * dtype.itemsize >= _LIMIT:
            raise self.fail(f"{fqn!r} has an impossible size {size}")
        chunks = getattr(entry, "chunks", None)
        if not isinstance(chunks, list):
            raise self.fail(f"{fqn!r} chunks is a {type(chunks).__name__}, not a list")
        for chunk in chunks:
            self.chunk(fqn, size, chunk)

    def chunk(self, fqn: str, size: tuple[int, ...], chunk: Any) -> None:
        from torch.distributed.checkpoint.metadata import ChunkStorageMetadata

        if not isinstance(chunk, ChunkStorageMetadata):
            raise self.fail(f"a chunk of {fqn!r} is a {type(chunk).__name__}")
        offsets = self.shape(getattr(chunk, "offsets", None), f"a chunk offset of {fqn!r}")
        sizes = self.shape(getattr(chunk, "sizes", None), f"a chunk size of {fqn!r}")
        if len(offsets) != len(size) or len(sizes) != len(size):
            raise self.fail(f"a chunk of {fqn!r} has {len(sizes)} dimensions, the tensor {len(size)}")
        if any(o + n > d for o, n, d in zip(offsets, sizes, size)):
            raise self.fail(f"a chunk of {fqn!r} at {offsets} of {sizes} lies outside its tensor {size}")

    def shape(self, value: Any, what: str) -> tuple[int, ...]:
        if not isinstance(value, (tuple, list)) or len(value) > 64:
            raise self.fail(f"{what} is not a shape")
        if not all(_is_offset(n) for n in value):
            raise self.fail(f"{what} {tuple(value)!r} holds something other than non-negative integers")
        return tuple(value)

    def storage_data(self, data: Any) -> None:
        from torch.distributed.checkpoint.filesystem import _StorageInfo
        from torch.distributed.checkpoint.metadata import MetadataIndex

        if data is None:
            return  # torch's default; a load then says there is nothing to read
        if not isinstance(data, dict):
            raise self.fail(f"storage_data is a {type(data).__name__}, not a dict")
        for index, info in data.items():
            if not isinstance(index, MetadataIndex) or not isinstance(index.fqn, str):
                raise self.fail(f"a storage_data key is a {type(index).__name__}, not a MetadataIndex")
            if not isinstance(info, _StorageInfo):
                raise self.fail(f"the locator of {index.fqn!r} is a {type(info).__name__}")
            path = getattr(info, "relative_path", None)
            problem = key_problem(path)
            if problem is not None:
                raise UnsafeCheckpointError(
                    f"{self.where} locates {index.fqn!r} at {path!r}, which {problem}: a "
                    "checkpoint's own files may only name objects inside that checkpoint. It was "
                    "not used; the checkpoint may have been crafted, so do not load it from a "
                    "store you do not trust."
                )
            offset, length = getattr(info, "offset", None), getattr(info, "length", None)
            if not _is_offset(offset) or not _is_offset(length) or offset + length >= _LIMIT:
                raise self.fail(f"the locator of {index.fqn!r} has offset {offset!r}, length {length!r}")
            transforms = getattr(info, "transform_descriptors", None)
            if transforms is not None and not (
                isinstance(transforms, (list, tuple)) and all(isinstance(t, str) for t in transforms)
            ):
                raise self.fail(f"the locator of {index.fqn!r} has malformed transform descriptors")

    def planner_data(self, data: Any, entries: int) -> None:
        """Each entry is a path of dict keys and list indices where torch's planners put the
        value back into a nested state dict. torch grows a list one element at a time up to
        an index, so indices are bounded by what a state dict of ``entries`` values can hold
        (plus slack for empty containers), and paths by a depth no state dict nears."""
        if data is None:
            return
        if not isinstance(data, dict):
            raise self.fail(f"planner_data is a {type(data).__name__}, not a dict")
        max_index = entries + _INDEX_SLACK
        for fqn, path in data.items():
            if (
                not isinstance(fqn, str)
                or not isinstance(path, (tuple, list))
                or not 0 < len(path) <= _MAX_DEPTH
                or not all(isinstance(p, str) or (_is_offset(p) and p < max_index) for p in path)
            ):
                raise self.fail(
                    f"planner_data of {fqn!r} is not a path of at most {_MAX_DEPTH} keys and "
                    f"indices below {max_index}"
                )

    def storage_meta(self, meta: Any) -> None:
        from torch.distributed.checkpoint.metadata import StorageMeta

        if meta is None:
            return
        if not isinstance(meta, StorageMeta):
            raise self.fail(f"storage_meta is a {type(meta).__name__}, not a StorageMeta")
        for name in ("save_id", "load_id"):
            value = getattr(meta, name, None)
            if value is not None and not isinstance(value, str):
                raise self.fail(f"storage_meta.{name} is a {type(value).__name__}, not a string")


def _is_offset(value: Any) -> TypeGuard[int]:
    """A non-negative int below 2**63 (bools are not numbers here)."""
    return isinstance(value, int) and not isinstance(value, bool) and 0 <= value < _LIMIT
