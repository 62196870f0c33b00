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

from ..errors import CorruptCheckpointError, DcpCloudError, StoreConfigError
from ..load.reader import CloudStorageReader
from ..urls import redact_url


def load_full_state_dict(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    trust_pickles: bool = False,
    **reader_kwargs: Any,
) -> dict[str, Any]:
    """The checkpoint's whole state dict, rebuilt from its metadata, on CPU in this process.

    Nested values come back nested, as they were saved. Every item's CRC32C is checked.
    Non-tensor values are unpickled under torch's weights-only rules unless ``trust_pickles``
    (see :class:`CloudStorageReader`; ``reader_kwargs`` go to it too).

    Raises:
        DcpCloudError: the error of the load (a :class:`CorruptCheckpointError` when the
            checkpoint cannot be rebuilt), unwrapped from torch's ``CheckpointException``.
    """
    # torch's own recipe (format_utils.dcp_to_torch_save); private, so imported only here
    from torch.distributed.checkpoint.api import CheckpointException
    from torch.distributed.checkpoint.default_planner import _EmptyStateDictLoadPlanner
    from torch.distributed.checkpoint.state_dict_loader import _load_state_dict

    state_dict: dict[str, Any] = {}
    reader = CloudStorageReader(
        url,
        storage_options=storage_options,
        filesystem=filesystem,
        trust_pickles=trust_pickles,
        **reader_kwargs,
    )
    try:
        _load_state_dict(
            state_dict, storage_reader=reader, planner=_EmptyStateDictLoadPlanner(), no_dist=True
        )
    except CheckpointException as wrapped:
        raise _unwrapped(wrapped, reader, redact_url(os.fspath(url))) from None
    return state_dict


def _unwrapped(wrapped: BaseException, reader: CloudStorageReader, where: str) -> BaseException:
    """The one failure inside a single-process ``CheckpointException``: our own errors as
    they are (torch only quotes a failed metadata read), anything else the planner choked on
    as :class:`CorruptCheckpointError`."""
    failures = list(getattr(wrapped, "failures", {}).values())
    error = failures[0][0] if failures and isinstance(failures[0], tuple) else None
    if isinstance(error, AssertionError) and reader.metadata_error is not None:
        return reader.metadata_error
    if isinstance(error, DcpCloudError):
        return error
    if isinstance(error, Exception):
        return CorruptCheckpointError(
            f"{where}: the state dict cannot be rebuilt from this checkpoint "
            f"({type(error).__name__}: {error}). It is damaged or was not written by "
            "torch.distributed.checkpoint; load an earlier one."
        )
    return wrapped


def to_torch_save(
    url: str | os.PathLike[str],
    out: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    trust_pickles: bool = False,
) -> dict[str, Any]:
    """Write the checkpoint at ``url`` to the local file ``out`` with ``torch.save``; returns
    the state dict written (load it back with ``torch.load(out, weights_only=False)`` when
    it holds non-tensor values). Non-tensor values are read under torch's weights-only rules
    unless ``trust_pickles`` (see :class:`CloudStorageReader`)."""
    state_dict = load_full_state_dict(
        url, storage_options=storage_options, filesystem=filesystem, trust_pickles=trust_pickles
    )
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
    trust_pickles: bool = False,
) -> list[str]:
    """Write the checkpoint's tensors to the local safetensors file ``out`` (nested keys joined
    with dots). Non-tensor values are left out; their keys are returned, and they are also kept
    in the file's metadata under ``dcp_cloud.non_tensors`` when JSON can hold them. Non-tensor
    values are read under torch's weights-only rules unless ``trust_pickles``."""
    try:
        from safetensors.torch import save_file
    except ImportError as exc:
        raise StoreConfigError(
            "safetensors is not installed; run: pip install 'dcp-cloud[safetensors]' (or pip install safetensors)"
        ) from exc
    state_dict = load_full_state_dict(
        url, storage_options=storage_options, filesystem=filesystem, trust_pickles=trust_pickles
    )
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
