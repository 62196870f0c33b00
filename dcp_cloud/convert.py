"""Converting a DCP checkpoint into one file: ``torch.save`` or safetensors.

The whole state dict is loaded into this process's memory (as torch's ``dcp_to_torch_save``
does), with sharded tensors reassembled to their global shapes, so run it on one machine with
enough RAM for the checkpoint.
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping
from typing import Any

import torch
from fsspec import AbstractFileSystem

from .errors import StoreConfigError
from .reader import CloudStorageReader
from .urls import redact_url


def load_full_state_dict(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    **reader_kwargs: Any,
) -> dict[str, Any]:
    """The checkpoint's whole state dict, rebuilt from its metadata, on CPU in this process.

    Nested values come back nested, as they were saved. Every item's CRC32C is checked.
    """
    # torch's own recipe (format_utils.dcp_to_torch_save); private, so imported only here
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state_dict: dict[str, Any] = {}
    reader = CloudStorageReader(url, storage_options=storage_options, filesystem=filesystem, **reader_kwargs)
    _load_state_dict(state_dict, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True)
    return state_dict


def to_torch_save(
    url: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
) -> dict[str, Any]:
    """Write the checkpoint at ``url`` to the local file ``out`` with ``torch.save``; returns
    the state dict written (load it back with ``torch.load(out, weights_only=False)`` when
    it holds non-tensor values)."""
    state_dict = load_full_state_dict(url, storage_options=storage_options, filesystem=filesystem)
    torch.save(state_dict, os.fspath(out))
    return state_dict


def flatten_tensors(
    state_dict: Mapping[str, Any], prefix: str = ""
) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Tensors of a nested state dict under dotted keys, and the other values (which
    safetensors cannot hold) under theirs."""
    tensors: dict[str, torch.Tensor] = {}
    skipped: dict[str, Any] = {}
    for key, value in state_dict.items():
        name = f"{prefix}{key}"
        if isinstance(value, torch.Tensor):
            tensors[name] = value
        elif isinstance(value, Mapping):
            inner, rest = flatten_tensors(value, name + ".")
            tensors.update(inner)
            skipped.update(rest)
        elif isinstance(value, (list, tuple)):
            inner, rest = flatten_tensors({str(i): v for i, v in enumerate(value)}, name + ".")
            tensors.update(inner)
            skipped.update(rest)
        else:
            skipped[name] = value
    return tensors, skipped


def to_safetensors(
    url: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
) -> list[str]:
    """Write the checkpoint's tensors to the local safetensors file ``out`` (nested keys joined
    with dots). Non-tensor values are left out; their keys are returned, and they are also kept
    in the file's metadata under ``dcp_cloud.non_tensors`` when JSON can hold them."""
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise StoreConfigError(
            "safetensors is not installed; run: pip install 'dcp-cloud[safetensors]' (or pip install safetensors)"
        ) from exc
    state_dict = load_full_state_dict(url, storage_options=storage_options, filesystem=filesystem)
    tensors, skipped = flatten_tensors(state_dict)
    shared: set[int] = set()
    contiguous: dict[str, torch.Tensor] = {}
    for name, tensor in tensors.items():
        tensor = tensor.detach().cpu().contiguous()
        pointer = tensor.untyped_storage().data_ptr()
        if tensor.numel() and pointer in shared:
            tensor = tensor.clone()  # safetensors refuses tensors that share memory
        shared.add(pointer)
        contiguous[name] = tensor
    metadata = {"format": "pt", "dcp_cloud.source": redact_url(os.fspath(url))}
    try:
        metadata["dcp_cloud.non_tensors"] = json.dumps(skipped, sort_keys=True)
    except (TypeError, ValueError):
        pass
    save_file(contiguous, os.fspath(out), metadata=metadata)
    return sorted(skipped)
