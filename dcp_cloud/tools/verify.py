"""Checking a committed checkpoint without loading it into a model.

``verify_checkpoint`` reads ``.metadata`` and the manifest, lists the checkpoint once, and then:

- every data object that ``.metadata`` points to exists, with the size the manifest recorded
  (without a manifest: large enough for every item ``.metadata`` places in it);
- every item ``.metadata`` locates is recorded in the manifest with the same length;
- a checkpoint written by dcp_cloud has a valid manifest (a missing or unreadable one is a
  problem: its checksums cannot be checked);
- every item's CRC32C matches the manifest, reading the objects with concurrent ranged GETs of
  at most ``part_size`` bytes (at most ``max_concurrency * part_size`` bytes are held at once).

Problems are collected, not raised, so one run names everything that is wrong.
"""

from __future__ import annotations

import collections
import concurrent.futures
import os
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import crc32c
from fsspec import AbstractFileSystem
from torch.distributed.checkpoint.metadata import Metadata

from ..checkpoint import layout
from ..checkpoint.manifest import ItemRecord, Manifest
from ..checkpoint.stored import StoredCheckpoint, checksum_mismatch_text
from ..errors import CorruptCheckpointError
from ..options import MiB
from ..store import ObjectStore, open_store

MISSING = "missing"
SIZE = "size"
CHECKSUM = "checksum"
UNRECORDED = "unrecorded"
UNREADABLE = "unreadable"
MANIFEST = "manifest"


@dataclass(frozen=True)
class Problem:
    """One thing wrong with a checkpoint: the object (key relative to the checkpoint), what
    kind of problem, a message that names the object and tensors, and the tensors affected."""

    object: str
    kind: str
    message: str
    tensors: list[str] = field(default_factory=list)


@dataclass
class VerifyReport:
    """What ``verify_checkpoint`` checked and found."""

    url: str
    save_id: str | None = None
    has_manifest: bool = False
    objects: int = 0
    items: int = 0
    items_checksummed: int = 0
    bytes_read: int = 0
    problems: list[Problem] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)

    @property
    def ok(self) -> bool:
        return not self.problems

    def to_dict(self) -> dict[str, Any]:
        doc = asdict(self)
        doc["ok"] = self.ok
        return doc


@dataclass
class _Item:
    key: str
    offset: int
    length: int
    fqns: set[str]
    record: ItemRecord | None = None
    crc: int = 0
    #: CRC32C of the tensor's raw bytes (the manifest's payload record), checked as loads do
    payload_crc: int = 0

    @property
    def end(self) -> int:
        return self.offset + self.length


@dataclass(frozen=True)
class _Window:
    key: str
    start: int
    end: int
    items: list[_Item]


def _items_by_object(metadata: Metadata) -> dict[str, dict[int, _Item]]:
    """Items grouped by data object and offset; one item may hold several fqns' entries."""
    found: dict[str, dict[int, _Item]] = {}
    for index, key, info in StoredCheckpoint.located_items(metadata):
        items = found.setdefault(key, {})
        item = items.get(info.offset)
        if item is None:
            item = items[info.offset] = _Item(key, int(info.offset), int(info.length), set())
        item.fqns.add(getattr(index, "fqn", str(index)))
    return found


def _names(items: list[_Item]) -> list[str]:
    return sorted({fqn for item in items for fqn in item.fqns})


def _shown(names: list[str]) -> str:
    return ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")


def _read_manifest(store: ObjectStore, metadata: Metadata, report: VerifyReport) -> Manifest | None:
    report.save_id = StoredCheckpoint.claimed_save_id(metadata)
    save_id = StoredCheckpoint.save_id_of(metadata)
    if save_id is None:
        report.warnings.append(
            "not written by dcp_cloud (no manifest): checked existence and sizes only, no checksums"
        )
        return None
    key = layout.manifest_key(save_id)
    try:
        return StoredCheckpoint(store).read_manifest(save_id)
    except CorruptCheckpointError as exc:
        problem = str(exc).rstrip(".")
    report.problems.append(
        Problem(
            key,
            MANIFEST,
            f"{problem}: this checkpoint was written by dcp_cloud, but without its manifest no "
            "checksums can be checked (existence and sizes were). Load it only if you accept "
            "that: CloudStorageReader(..., verify_checksums=False).",
        )
    )
    return None


def _windows(items: list[_Item], part_size: int, gap: int) -> Iterator[_Window]:
    """Byte ranges covering ``items`` (one object's, sorted): neighbours closer than ``gap``
    share a range, and no range is longer than ``part_size``."""
    spans: list[tuple[int, int, list[_Item]]] = []
    for item in items:
        if spans and item.offset - spans[-1][1] <= gap:
            start, end, members = spans[-1]
            spans[-1] = (start, max(end, item.end), [*members, item])
        else:
            spans.append((item.offset, item.end, [item]))
    for start, end, members in spans:
        for a in range(start, end, part_size):
            b = min(a + part_size, end)
            yield _Window(members[0].key, a, b, [i for i in members if i.offset < b and i.end > a])


def verify_checkpoint(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    checksums: bool = True,
    part_size: int = 8 * MiB,
    max_concurrency: int = 16,
    progress: Callable[[int], None] | None = None,
    on_total: Callable[[int], None] | None = None,
) -> VerifyReport:
    """Check that the committed checkpoint at ``url`` is whole and intact (see module doc).

    ``progress`` is called with the bytes of each range read, and ``on_total`` once, before
    reading, with about how many bytes will be read (for a progress bar). Raises :class:`CheckpointNotFoundError` (or
    :class:`IncompleteCheckpointError`) when there is no ``.metadata``; everything else found
    wrong is in ``report.problems``.
    """
    store = open_store(url, storage_options, filesystem, max_concurrency)
    report = VerifyReport(url=store.url)
    metadata = StoredCheckpoint(store).read_metadata()
    by_object = _items_by_object(metadata)
    manifest = _read_manifest(store, metadata, report)
    report.has_manifest = manifest is not None
    report.objects = len(by_object)
    report.items = sum(len(items) for items in by_object.values())
    sizes = {o.key: o.size for o in store.run(store.list_objects(""))}

    to_read: list[_Item] = []
    for key, items in sorted(by_object.items()):
        ordered = sorted(items.values(), key=lambda i: i.offset)
        where = f"{store.url}/{key}"
        if key not in sizes:
            names = _names(ordered)
            report.problems.append(
                Problem(key, MISSING, f"{where} is missing (tensors {_shown(names)})", names)
            )
            continue
        size = sizes[key]
        needed = max(i.end for i in ordered)
        recorded = manifest.object_size(key) if manifest is not None and key in manifest.objects else None
        expected = recorded if recorded is not None else needed
        if size < needed or (recorded is not None and size != recorded):
            cut = [i for i in ordered if i.end > size]
            names = _names(cut)
            state = "truncated" if size < expected else "larger than recorded"
            detail = f"; tensors past its end: {_shown(names)}" if names else ""
            report.problems.append(
                Problem(key, SIZE, f"{where} is {state}: {size} bytes, expected {expected}{detail}", names)
            )
        records = manifest.item_index() if manifest is not None else {}
        for item in ordered:
            if manifest is not None:
                item.record = records.get((key, item.offset))
                if item.record is None or item.record.length != item.length:
                    names = _names([item])
                    report.problems.append(
                        Problem(
                            key,
                            UNRECORDED,
                            f"{where}: bytes [{item.offset}, {item.end}) holding {_shown(names)} are "
                            "not recorded in the manifest as .metadata places them",
                            names,
                        )
                    )
                    continue
            if checksums and item.record is not None and item.end <= size:
                to_read.append(item)

    if on_total is not None:
        on_total(sum(i.length for i in to_read))
    if to_read:
        _check_crcs(store, to_read, part_size, max_concurrency, report, progress)
    return report


def _check_crcs(
    store: ObjectStore,
    items: list[_Item],
    part_size: int,
    lookahead: int,
    report: VerifyReport,
    progress: Callable[[int], None] | None,
) -> None:
    """Read the items' bytes in order, ``lookahead`` ranges in flight, and compare CRC32Cs."""
    by_key: dict[str, list[_Item]] = collections.defaultdict(list)
    for item in items:
        by_key[item.key].append(item)
    windows = (w for key in sorted(by_key) for w in _windows(by_key[key], part_size, MiB))
    in_flight: collections.deque[tuple[_Window, concurrent.futures.Future[bytes]]] = collections.deque()
    failed: set[str] = set()

    def fail(window: _Window, kind: str, what: str) -> None:
        failed.add(window.key)
        names = _names(window.items)
        report.problems.append(
            Problem(window.key, kind, f"{store.url}/{window.key}: {what}; tensors {_shown(names)}", names)
        )

    def fill() -> None:
        while len(in_flight) < lookahead:
            window = next(windows, None)
            if window is None:
                return
            in_flight.append((window, store.submit(store.get_range(window.key, window.start, window.end))))

    fill()
    while in_flight:
        window, future = in_flight.popleft()
        fill()
        try:
            data = future.result()
        except (OSError, ValueError) as exc:
            if window.key not in failed:
                fail(
                    window,
                    UNREADABLE,
                    f"reading bytes [{window.start}, {window.end}) failed ({type(exc).__name__}: {exc})",
                )
            continue
        if window.key in failed:
            continue
        if len(data) != window.end - window.start:
            fail(
                window,
                SIZE,
                f"read {len(data)} of {window.end - window.start} bytes at offset {window.start} "
                "(changed while verifying?)",
            )
            continue
        report.bytes_read += len(data)
        if progress is not None:
            progress(len(data))
        view = memoryview(data)
        for item in window.items:
            a = max(item.offset, window.start)
            b = min(item.end, window.end)
            item.crc = crc32c.crc32c(view[a - window.start : b - window.start], item.crc)
            payload = item.record.payload if item.record is not None else None
            if payload is not None:
                p_start = item.offset + payload.offset
                pa, pb = max(p_start, window.start), min(p_start + payload.length, window.end)
                if pa < pb:
                    item.payload_crc = crc32c.crc32c(
                        view[pa - window.start : pb - window.start], item.payload_crc
                    )
            if b == item.end:
                _finish(store, item, report)


def _finish(store: ObjectStore, item: _Item, report: VerifyReport) -> None:
    assert item.record is not None
    report.items_checksummed += 1
    payload = item.record.payload
    if item.crc != item.record.crc32c or (payload is not None and item.payload_crc != payload.crc32c):
        names = _names([item])
        report.problems.append(
            Problem(
                item.key,
                CHECKSUM,
                checksum_mismatch_text(f"{store.url}/{item.key}", item.offset, item.end, _shown(names)),
                names,
            )
        )
