"""Finding checkpoints under a prefix from one listing.

A prefix (a run folder, a bucket) may hold many checkpoints. Each is a folder holding
``.metadata`` (committed) and/or save folders of ours (a folder named with a strict save id that
holds our intent record or manifest: a save in progress, or one that never committed:
incomplete). torch's own ``FileSystemWriter`` layout (``__0_0.distcp`` beside ``.metadata``) is
recognised too. Any other folder is an ordinary folder, whatever its name: ``run/save-best`` with
a ``.metadata`` is a committed checkpoint of its own, and checkpoints nested inside another one's
folder are listed separately. :func:`summarize` groups the objects of one recursive LIST into
:class:`CheckpointSummary` records, without reading any object.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from typing import Any

from fsspec import AbstractFileSystem

from ..checkpoint import layout
from ..store import ObjectInfo, open_store
from ..store.keys import join

COMMITTED = "committed"
INCOMPLETE = "incomplete"

#: folder names that carry a training step: ``step-0000000100``, ``step_100``, ``step100``
_STEP_NAME = re.compile(r"^(?:global_)?step[-_]?(\d+)$")


@dataclass(frozen=True)
class CheckpointSummary:
    """One checkpoint found under a prefix.

    Attributes:
        path: its folder relative to the listed prefix ("" for the prefix itself).
        status: ``"committed"`` (``.metadata`` exists) or ``"incomplete"`` (data only).
        step: the step number parsed from the folder name (``step-<N>``), or None.
        size: bytes of all its objects (replaced generations and debris included).
        objects: how many objects it has.
        modified: when ``.metadata`` was written (committed), else its newest object's time.
    """

    path: str
    status: str
    step: int | None
    size: int
    objects: int
    modified: float | None

    @property
    def committed(self) -> bool:
        return self.status == COMMITTED

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def step_of(folder_name: str) -> int | None:
    """The step number in a checkpoint folder's last path component, or None."""
    match = _STEP_NAME.match(folder_name.rsplit("/", 1)[-1])
    return int(match.group(1)) if match else None


def save_folders(keys: Iterable[str]) -> set[str]:
    """Save folders (``<folder>/<save id>``) that a listing shows holding a record of ours."""
    found = set()
    for key in keys:
        head, _, name = key.rpartition("/")
        if name in (layout.INTENT_NAME, layout.MANIFEST_NAME) and layout.is_save_id(head.rpartition("/")[2]):
            found.add(head)
    return found


def committed_folders(keys: Iterable[str]) -> set[str]:
    """Folders that a listing shows holding a commit marker (``.metadata``, ``__N.metadata``)."""
    return {head for head, _, name in (key.rpartition("/") for key in keys) if layout.is_metadata_name(name)}


def checkpoint_folder(
    key: str, saves: set[str] | None = None, committed: set[str] | None = None
) -> str | None:
    """The checkpoint folder a key belongs to, or None for keys that are not checkpoint parts.

    The innermost enclosing folder decides: one holding a commit marker (``committed``, see
    :func:`committed_folders`) is a checkpoint of its own, even inside another checkpoint's
    save folder; a save folder of ours (``saves``, see :func:`save_folders`) belongs to the
    checkpoint around it. Without ``saves``, every folder named with a strict save id counts
    as one.
    """
    parts = key.split("/")
    name = parts[-1]
    part = layout.is_metadata_name(name) or name.endswith(layout.DATA_SUFFIX)
    for i in range(len(parts) - 1, 0, -1):
        folder = "/".join(parts[:i])
        if committed is not None and folder in committed:
            return folder if part else None
        if layout.is_save_id(parts[i - 1]) and (saves is None or folder in saves):
            return "/".join(parts[: i - 1])
    return "/".join(parts[:-1]) if part else None


def summarize(objects: Iterable[ObjectInfo]) -> list[CheckpointSummary]:
    """Group one listing's objects into checkpoints, sorted by step (then path)."""
    objects = list(objects)
    saves = save_folders(o.key for o in objects)
    committed = committed_folders(o.key for o in objects)
    groups: dict[str, list[ObjectInfo]] = {}
    for obj in objects:
        folder = checkpoint_folder(obj.key, saves, committed)
        if folder is not None:
            groups.setdefault(folder, []).append(obj)
    found = []
    for folder, members in groups.items():
        marker = join(folder, layout.METADATA_KEY)
        commit = next((m for m in members if m.key == marker), None)
        times = [m.modified for m in members if m.modified is not None]
        found.append(
            CheckpointSummary(
                path=folder,
                status=COMMITTED if commit is not None else INCOMPLETE,
                step=step_of(folder) if folder else None,
                size=sum(m.size for m in members),
                objects=len(members),
                modified=commit.modified if commit is not None else (max(times) if times else None),
            )
        )
    return sorted(found, key=lambda c: (c.step is None, c.step or 0, c.path))


def list_checkpoints(
    url: str | os.PathLike[str],
    *,
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
) -> list[CheckpointSummary]:
    """Every checkpoint under ``url`` (committed or not), from one recursive listing."""
    store = open_store(url, storage_options, filesystem)
    return summarize(store.run(store.list_objects("")))
