"""Checks of a ``torch.save`` archive read from a checkpoint, before and after torch loads it.

A stored item is a zip archive whose ``data.pkl`` pickle builds the value from the archive's
records. A crafted archive can declare records far larger than itself, or name a global that
allocates any amount of memory, or build a storage of its own that holds uninitialized memory of
this process. :func:`check_archive_size` and :func:`allocating_global` refuse the first two
before ``torch.load`` runs, :func:`check_storages` the last one after it. Both the tensor
decoder (:mod:`dcp_cloud.load.decode`) and the non-tensor item rules
(:mod:`dcp_cloud.checkpoint.items`) rely on them.
"""

from __future__ import annotations

import _compat_pickle
import functools
import pickle
import pickletools
import warnings
from collections.abc import Set
from typing import IO, Any, cast

import torch

from ..buffers import ViewReader

_ZIP_MAGIC = b"PK\x03\x04"


class ArchiveError(pickle.UnpicklingError):
    """A torch.save archive that is unsafe to read or to use: not a zip archive, records that
    unpack to more bytes than it holds, or a pickle that builds memory of its own."""


def check_archive_size(data: bytes | bytearray | memoryview) -> None:
    """Refuse a zip archive whose records would unpack to more bytes than it holds.

    torch.save writes its records uncompressed, so a genuine archive is never smaller than
    its records. torch's reader allocates each record's declared size and inflates compressed
    ones, so a crafted archive of a few kilobytes could otherwise make ``torch.load`` allocate
    gigabytes. The sizes are read with torch's own zip reader, the one ``torch.load`` uses.
    Anything that is not a zip archive passes unchecked (callers refuse it, see
    :func:`archive_pickle`).
    """
    view = memoryview(data).cast("B")
    if bytes(view[:4]) != _ZIP_MAGIC:
        return
    try:
        reader = torch._C.PyTorchFileReader(cast(IO[bytes], ViewReader(view)))
        total = sum(reader.get_record_size(name) for name in reader.get_all_records())
    except RuntimeError as exc:
        raise ArchiveError(f"not a readable zip archive ({_first_line(str(exc))})") from None
    if total > len(view):
        raise ArchiveError(f"its records unpack to {total} bytes, more than the {len(view)} bytes it holds")


def archive_pickle(data: bytes | bytearray | memoryview) -> bytes:
    """The data.pkl record of a torch.save zip archive, read with torch's own zip reader.

    Raises:
        ArchiveError: ``data`` is not a zip archive with a data.pkl record (torch's legacy
            format included, which DCP never writes).
    """
    view = memoryview(data).cast("B")
    if bytes(view[:4]) != _ZIP_MAGIC:
        raise ArchiveError("not a torch.save zip archive")
    try:
        reader = torch._C.PyTorchFileReader(cast(IO[bytes], ViewReader(view)))
        return bytes(reader.get_record("data.pkl"))
    except RuntimeError as exc:
        raise ArchiveError(f"no readable data.pkl record ({_first_line(str(exc))})") from None


@functools.cache
def _allocating_globals() -> frozenset[str]:
    """Globals on torch's weights-only allow-list that a pickle can call with a number to
    allocate that much memory: ``bytearray(n)`` fills n bytes at once, the legacy tensor
    constructors (``torch.FloatTensor(n)``, ``torch.Tensor(n)``) reserve n elements of
    uninitialized memory. (The storage classes can too, but torch's own pickles name them:
    what they build is checked instead, see :func:`check_storages`.) torch.save never calls them that way; ``bytearray`` values and
    tensors with Python attributes name them."""
    names = {"builtins.bytearray", "torch.Tensor"}
    names.update(f"{cls.__module__}.{cls.__name__}" for cls in torch._tensor_classes)
    return frozenset(names)


def allocating_global(pickled: bytes, allowed: Set[str] = frozenset()) -> str | None:
    """The first global ``pickled`` names that can allocate memory at will and is not in
    ``allowed`` (``module.name``), or None.

    Raises:
        ValueError: ``pickled`` is not a well-formed pickle.
    """
    try:
        for opcode, arg, _ in pickletools.genops(pickled):
            if opcode.name != "GLOBAL":
                continue  # the only opcode torch's weights-only loader takes a global from
            module, _, name = str(arg).partition(" ")
            module, name = _compat_pickle.NAME_MAPPING.get((module, name), (module, name))
            module = _compat_pickle.IMPORT_MAPPING.get(module, module)
            full = f"{module}.{name}"
            if full in _allocating_globals() and full not in allowed:
                return full
    except EOFError as exc:
        raise ValueError(f"truncated pickle ({exc})") from None
    return None


def _storages(value: Any) -> list[torch.UntypedStorage]:
    """The distinct storages of the tensors and storages in ``value`` and in the plain
    containers (dicts, lists, tuples, sets) it holds, walked without recursion."""
    seen: set[int] = set()
    found: dict[int, torch.UntypedStorage] = {}
    stack = [value]
    while stack:
        item = stack.pop()
        if id(item) in seen:
            continue
        seen.add(id(item))
        storage: torch.UntypedStorage | None = None
        if isinstance(item, torch.Tensor):
            if item.layout == torch.strided and item.device.type != "meta":
                storage = item.untyped_storage()
            elif item.layout == torch.sparse_coo:
                stack.extend((item._indices(), item._values()))
        elif isinstance(item, torch.TypedStorage):
            storage = item._untyped_storage
        elif isinstance(item, torch.UntypedStorage):
            storage = item
        elif isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, (list, tuple, set, frozenset)):
            stack.extend(item)
        if storage is not None and storage.nbytes() and storage.device.type != "meta":
            found.setdefault(storage.data_ptr(), storage)
    return list(found.values())


def check_storages(value: Any, archive: bytes | bytearray | memoryview) -> None:
    """Every storage in what torch loaded from ``archive`` holds the bytes of one of its
    records (as stored, or with each element's bytes reversed, as torch reads an archive
    of the other byte order).

    torch's weights-only loader lets a pickle call a storage class to make a storage of its
    own, of any size, holding uninitialized memory of this process: such a value is refused
    before anything reads or copies that memory.

    Raises:
        ArchiveError: a storage is larger than the archive or none of its records.
    """
    view = memoryview(archive).cast("B")
    storages = _storages(value)
    total = sum(s.nbytes() for s in storages)
    if total > len(view):
        raise ArchiveError(f"its tensors hold {total} bytes, more than the {len(view)} bytes of the archive")
    if not storages:
        return
    reader = torch._C.PyTorchFileReader(cast(IO[bytes], ViewReader(view)))
    records: dict[int, list[torch.Tensor]] = {}
    for name in reader.get_all_records():
        size = reader.get_record_size(name)
        if name.startswith("data/") and size:
            start = reader.get_record_offset(name)  # type: ignore[attr-defined]  # stored bytes
            if start + size <= len(view):
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore", UserWarning)  # read-only buffer, only read
                    record = torch.frombuffer(view[start : start + size], dtype=torch.uint8)
                records.setdefault(size, []).append(record)
    for storage in storages:
        loaded = torch.empty((0,), dtype=torch.uint8).set_(storage)
        if not any(_same_bytes(loaded, record) for record in records.get(storage.nbytes(), [])):
            raise ArchiveError("a storage it builds is none of the archive's records")


def _same_bytes(loaded: torch.Tensor, record: torch.Tensor) -> bool:
    """``loaded`` is ``record``, or ``record`` with the bytes of each element of some size
    reversed (torch swaps them when the archive's byte order is not this machine's)."""
    if torch.equal(loaded, record):
        return True
    return any(
        torch.equal(loaded, record.view(-1, size).flip(1).reshape(-1))
        for size in (2, 4, 8, 16)
        if record.numel() % size == 0
    )


def _first_line(text: str) -> str:
    return text.strip().splitlines()[0][:200] if text.strip() else ""
