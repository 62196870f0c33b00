"""Loading ``.metadata`` without trusting it.

``.metadata`` is a pickle, and unpickling runs whatever callables the pickle names. A checkpoint
from a bucket someone else can write to must not be able to run code here, so this unpickler
admits only DCP's metadata classes, torch's dtype/layout/size objects, paths and plain
containers, and refuses anything else with :class:`UnsafeCheckpointError`.
"""

from __future__ import annotations

import io
import pickle
from typing import Any

import torch

from .errors import CorruptCheckpointError, UnsafeCheckpointError

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
    return obj
