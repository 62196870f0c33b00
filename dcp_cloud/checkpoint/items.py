"""Non-tensor items (DCP's BYTE_IO) of a checkpoint, made safe to unpickle.

They are ``torch.save`` archives that torch's load planner unpickles with
``weights_only=False``. :func:`safe_item_bytes` loads them under torch's weights-only rules
first and hands the planner a fresh archive of what that produced, so the planner never
unpickles bytes from the checkpoint itself.
"""

from __future__ import annotations

import contextlib
import io
import pickle
import re
import warnings
from collections.abc import Sequence
from typing import IO, Any, cast

import torch

from ..buffers import ViewReader
from ..errors import UnsafeCheckpointError
from .archive import ArchiveError, allocating_global, archive_pickle, check_archive_size, check_storages

_REFUSED_GLOBAL = re.compile(r"GLOBAL ([\w.<>]+)")


def safe_item_bytes(
    data: bytes | memoryview, fqn: str, where: str, safe_globals: Sequence[Any] = ()
) -> io.BytesIO:
    """A ``torch.save`` archive of the non-tensor item ``fqn`` stored in ``data``, safe to unpickle.

    ``data`` is loaded with ``torch.load(weights_only=True)`` (torch's allow-list, what
    ``torch.serialization.add_safe_globals`` added, and ``safe_globals``), and what that produced
    is saved again: the archive returned holds only objects the allow-list admitted, whatever
    parser tricks ``data`` plays.

    Raises:
        UnsafeCheckpointError: ``data`` names a global outside the allow-list, or is not an
            archive the weights-only loader can read.
    """
    allowed = (
        contextlib.nullcontext() if not safe_globals else torch.serialization.safe_globals(list(safe_globals))
    )
    out = io.BytesIO()
    try:
        check_archive_size(data)
        _check_allocating_globals(archive_pickle(data), safe_globals, fqn, where)
        with allowed, warnings.catch_warnings():
            warnings.filterwarnings("ignore", "Detected pickle protocol", UserWarning)
            value = torch.load(cast(IO[bytes], ViewReader(data)), weights_only=True)
        check_storages(value, data)
        # a value the weights-only loader built can still be too deep to pickle again
        torch.save(value, out)
    except UnsafeCheckpointError:
        raise
    except ArchiveError as exc:
        raise _unreadable_item(fqn, where, exc) from None
    except pickle.UnpicklingError as exc:
        raise _unsafe_item(fqn, where, str(exc)) from None
    except Exception as exc:
        raise _unreadable_item(fqn, where, exc) from None
    out.seek(0)
    return out


def _unreadable_item(fqn: str, where: str, exc: Exception) -> UnsafeCheckpointError:
    return UnsafeCheckpointError(
        f"{where}: the non-tensor item {fqn!r} is not a torch.save archive that torch's "
        f"weights-only loader can read ({type(exc).__name__}: {_first_line(str(exc))}), so it "
        "was not unpickled. If you trust this checkpoint and its store, load it with "
        "CloudStorageReader(..., trust_pickles=True)."
    )


def _global_names(values: Sequence[Any]) -> set[str]:
    """``module.name`` of each object in an allow-list (entries may be ``(object, name)``)."""
    names = set()
    for value in values:
        if isinstance(value, tuple):
            names.add(str(value[1]))
            value = value[0]
        names.add(f"{getattr(value, '__module__', '')}.{getattr(value, '__qualname__', '')}")
    return names


def _check_allocating_globals(pickled: bytes, safe_globals: Sequence[Any], fqn: str, where: str) -> None:
    """Refuse a pickle naming a global that can allocate memory at will (see
    :func:`dcp_cloud.checkpoint.archive.allocating_global`) unless the user allowed it."""
    allowed = _global_names([*safe_globals, *torch.serialization.get_safe_globals()])
    try:
        full = allocating_global(pickled, allowed)
    except ValueError as exc:
        raise pickle.UnpicklingError(f"malformed data.pkl ({exc})") from None
    if full is not None:
        short = full.removeprefix("builtins.")
        raise UnsafeCheckpointError(
            f"{where}: the non-tensor item {fqn!r} names {full}, which a crafted pickle can "
            "call to allocate any amount of memory, so it was not unpickled. If the item "
            f"is meant to hold one, allow it: CloudStorageReader(..., safe_globals=[{short}]) "
            "or torch.serialization.add_safe_globals; or, only for a checkpoint and store "
            "you trust, CloudStorageReader(..., trust_pickles=True)."
        )


def _unsafe_item(fqn: str, where: str, message: str) -> UnsafeCheckpointError:
    found = _REFUSED_GLOBAL.search(message)
    what = (
        f"the global {found.group(1)}"
        if found
        else f"what weights-only rules refuse ({_first_line(message)})"
    )
    name = found.group(1) if found else "<the class>"
    return UnsafeCheckpointError(
        f"{where}: the non-tensor item {fqn!r} names {what}, which is not on the allow-list of "
        "torch's weights-only unpickler; it was not unpickled (a crafted checkpoint can run code "
        "this way). To allow it: torch.serialization.add_safe_globals([" + name + "]), or "
        "CloudStorageReader(..., safe_globals=[" + name + "]); or, only for a checkpoint and "
        "store you trust, CloudStorageReader(..., trust_pickles=True)."
    )


def _first_line(text: str) -> str:
    """The reason in one of torch's multi-paragraph load errors: the first line of what follows
    "WeightsUnpickler error:", else the first line."""
    _, marker, reason = text.partition("WeightsUnpickler error:")
    lines = [line.strip() for line in (reason if marker else text).splitlines() if line.strip()]
    return lines[0][:300] if lines else ""
