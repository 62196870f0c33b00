"""Shared helpers for the tests."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint.api import CheckpointException


def failure_text(exc: BaseException) -> str:
    """Everything a CheckpointException (or any error) says, causes included."""
    parts = [str(exc)]
    if isinstance(exc, CheckpointException):
        for error, _trace in exc.failures.values():
            parts.append(f"{type(error).__name__}: {error}")
    return "\n".join(parts)


def failure_types(exc: BaseException) -> set[type]:
    """The exception types behind a CheckpointException (the error itself otherwise)."""
    if isinstance(exc, CheckpointException):
        return {type(error) for error, _trace in exc.failures.values()}
    return {type(exc)}


def assert_same(expected: Any, actual: Any, path: str = "") -> None:
    """Bitwise equality of nested state dicts (tensors compared by bytes, dtype and shape)."""
    if isinstance(expected, torch.Tensor):
        assert isinstance(actual, torch.Tensor), f"{path}: not a tensor"
        assert actual.dtype == expected.dtype, f"{path}: dtype {actual.dtype} != {expected.dtype}"
        assert actual.shape == expected.shape, f"{path}: shape {actual.shape} != {expected.shape}"
        e = expected.detach().contiguous().view(-1).view(torch.uint8) if expected.numel() else expected
        a = actual.detach().contiguous().view(-1).view(torch.uint8) if actual.numel() else actual
        assert torch.equal(e, a), f"{path}: values differ"
    elif isinstance(expected, dict):
        assert set(actual) == set(expected), f"{path}: keys {set(actual)} != {set(expected)}"
        for key in expected:
            assert_same(expected[key], actual[key], f"{path}.{key}")
    elif isinstance(expected, (list, tuple)):
        assert len(actual) == len(expected), f"{path}: length differs"
        for i, (e, a) in enumerate(zip(expected, actual)):
            assert_same(e, a, f"{path}[{i}]")
    else:
        assert actual == expected, f"{path}: {actual!r} != {expected!r}"


def zeros_like_state(state: Any) -> Any:
    """A load target with the same structure: tensors zeroed, other values replaced."""
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state.contiguous()) if state.numel() else torch.empty_like(state)
    if isinstance(state, dict):
        return {k: zeros_like_state(v) for k, v in state.items()}
    if isinstance(state, list):
        return [zeros_like_state(v) for v in state]
    return None


def put_torch_checkpoint(store: Any, folder: str, state: dict[str, Any], tmp_path: Path) -> None:
    """Save ``state`` with torch's own FileSystemWriter and upload its files to ``folder`` of
    ``store``: a checkpoint written by another tool."""
    local = tmp_path / f"torch-{folder.replace('/', '-')}"
    dcp.save(state, storage_writer=FileSystemWriter(str(local)))
    for path in local.rglob("*"):
        if path.is_file():
            store.run(store.put(f"{folder}/{path.relative_to(local).as_posix()}", path.read_bytes()))
