"""Which objects under a prefix dcp_cloud wrote, and which committed checkpoints still need.

A bucket or folder holds more than our saves: other runs, users' own files, checkpoints written
by other tools. Names prove nothing, so deleting (gc, prune, overwrite cleanup) works from
records instead:

* An object is *ours* only when it lies in a folder named with a strict save id
  (:func:`layout.is_save_id`), that folder holds our intent record or manifest (parsed, of our
  format, naming that very save id), and the record accounts for the object's key: the intent's
  data-key shapes, the manifest's listed objects, the records themselves.
* An object is *referenced* when a committed ``.metadata`` (or rank-local ``__N.metadata``)
  anywhere under the prefix names it, or names its save. A ``.metadata`` that cannot be read,
  or names a key outside its own folder, protects everything below its folder.
* A save in flight holds a lease: its intent record is written before any data object, and
  re-written every ``lease_seconds / 3`` while it runs. A save whose lease is live is never
  deleted, whatever grace period the caller asks for.

Records are read before any ``.metadata``: a save that commits while a scan runs either still
shows its live intent, or its commit is visible to the ``.metadata`` reads that follow.

Data flow: the writer records an :class:`Intent` and keeps it alive with a :class:`Heartbeat`
while it saves; gc, prune and overwrite cleanup call :func:`scan`, which lists the prefix, reads
each save folder's records (:func:`read_save`) and then what every ``.metadata`` it found
references (:meth:`StoredCheckpoint.read_references
<dcp_cloud.checkpoint.stored.StoredCheckpoint.read_references>`, the one reading of a committed
checkpoint), and :func:`collectable` decides per save from that :class:`Scan` whether it may
go. The commit protocol (:mod:`dcp_cloud.checkpoint.commit`) reads records through
:func:`read_save` to prove what an older generation left is ours before deleting it.
"""

from __future__ import annotations

import functools
import json
import logging
import math
import re
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from .._version import __version__
from ..store import ObjectInfo, ObjectStore, PendingUpload
from ..store.keys import join
from . import layout
from .confine import is_confined
from .manifest import Manifest
from .stored import StoredCheckpoint

logger = logging.getLogger("dcp_cloud")

INTENT_FORMAT = "dcp_cloud.intent"
INTENT_VERSION = 1
#: how long a save's lease lasts past its last heartbeat. Heartbeats come every third of it, so
#: two may be missed (a stalled store, a slow PUT retried for a minute) before gc may collect
#: the save; a save killed outright is collectable this long after its last heartbeat.
DEFAULT_LEASE_SECONDS = 600.0
#: longest lease a record may claim: a forged record keeps its save at most this long (twice
#: over where the writer's clock runs ahead of the store's) after the store last saw it renewed
MAX_LEASE_SECONDS = 7 * 86400.0
#: most data-key shapes an intent record may list (one per rank)
_MAX_FILE_PREFIXES = 1_000_000
#: largest records read by size in the listing: a larger intent or manifest is not ours, and a
#: larger ``.metadata`` keeps everything below its folder (nothing planted can exhaust memory)
MAX_INTENT_BYTES = 64 * 1024 * 1024
MAX_MANIFEST_BYTES = 512 * 1024 * 1024
MAX_METADATA_BYTES = 1024 * 1024 * 1024
_RANK_PREFIX = re.compile(r"__(\d+)_$")
#: what :func:`layout.rank_file_prefix` makes: optional spreading folders, then ``__<rank>_``
_FILE_PREFIX = re.compile(r"^(?:[^/]+/)*__\d+_$")
#: the only data keys a save writes, relative to its folder: ``<file prefix><n>.distcp``
_DATA_NAME = re.compile(r"^((?:[^/]+/)*__\d+_)\d+" + re.escape(layout.DATA_SUFFIX) + "$")


def _finite(value: Any, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ValueError(f"intent field {name!r} must be a finite number")
    return float(value)


@dataclass(frozen=True)
class Intent:
    """A save's intent record (``<save_id>/intent.json``): which keys it will write, and its lease.

    Attributes:
        save_id: the save this record belongs to.
        file_prefixes: per rank, the part of a data key between the save id and the object's
            number: the save writes ``<save_id>/<file_prefix><n>.distcp`` and nothing else.
        created: when the save started (writer's clock).
        heartbeat: when the writer last renewed the lease (writer's clock).
        lease_seconds: how long past ``heartbeat`` the save counts as alive.
    """

    save_id: str
    file_prefixes: tuple[str, ...]
    created: float
    heartbeat: float
    lease_seconds: float = DEFAULT_LEASE_SECONDS

    def to_json(self) -> bytes:
        return json.dumps(
            {
                "format": INTENT_FORMAT,
                "version": INTENT_VERSION,
                "save_id": self.save_id,
                "dcp_cloud_version": __version__,
                "created": self.created,
                "heartbeat": self.heartbeat,
                "lease_seconds": self.lease_seconds,
                "file_prefixes": list(self.file_prefixes),
            }
        ).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Intent:
        """Parse and validate a record; ``ValueError`` says what is wrong with it."""
        try:
            doc = json.loads(data)
        except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as exc:
            raise ValueError(f"not JSON ({type(exc).__name__})") from None
        if not isinstance(doc, dict) or doc.get("format") != INTENT_FORMAT:
            raise ValueError(f"not a {INTENT_FORMAT} document")
        if doc.get("version") != INTENT_VERSION:
            raise ValueError(f"intent version {doc.get('version')!r} is not {INTENT_VERSION}")
        save_id = doc.get("save_id")
        if not isinstance(save_id, str) or not layout.is_save_id(save_id):
            raise ValueError("intent names no valid save id")
        prefixes = doc.get("file_prefixes")
        if not isinstance(prefixes, list) or len(prefixes) > _MAX_FILE_PREFIXES:
            raise ValueError("intent file_prefixes must be a list")
        for prefix in prefixes:
            if not isinstance(prefix, str) or not _FILE_PREFIX.match(prefix) or not is_confined(prefix):
                raise ValueError(f"intent file prefix {prefix!r} is not a data key prefix of ours")
        lease = _finite(doc.get("lease_seconds"), "lease_seconds")
        if not 0 < lease <= MAX_LEASE_SECONDS:
            raise ValueError(f"intent lease_seconds must be in (0, {MAX_LEASE_SECONDS:g}]")
        return cls(
            save_id=save_id,
            file_prefixes=tuple(prefixes),
            created=_finite(doc.get("created"), "created"),
            heartbeat=_finite(doc.get("heartbeat"), "heartbeat"),
            lease_seconds=lease,
        )

    def accounts_for(self, inner: str) -> bool:
        """Whether ``inner`` (a key relative to the save folder) is a data key of this save."""
        match = _DATA_NAME.match(inner)
        return match is not None and match.group(1) in self._prefix_set

    @functools.cached_property
    def _prefix_set(self) -> frozenset[str]:
        return frozenset(self.file_prefixes)


def _folder_of(key: str) -> str:
    return key.rpartition("/")[0]


def _under(key: str, folder: str) -> bool:
    """Whether ``key`` lies below ``folder`` ("" is the scanned prefix itself)."""
    return not folder or key.startswith(folder + "/")


@dataclass
class SaveFolder:
    """One ``<folder>/<save_id>/`` that holds a record of ours (keys relative to the store root)."""

    folder: str
    save_id: str
    intent: Intent | None = None
    intent_modified: float | None = None
    manifest: Manifest | None = None
    #: listed objects under the save folder whose keys its records account for
    owned: list[ObjectInfo] = field(default_factory=list)
    #: this save's pending uploads (multipart, local temp files) whose keys are ours
    uploads: list[PendingUpload] = field(default_factory=list)

    @property
    def path(self) -> str:
        return join(self.folder, self.save_id)

    @property
    def proven(self) -> bool:
        return self.intent is not None or self.manifest is not None

    def record_keys(self) -> set[str]:
        """Keys of the records (relative to the store root), listed or not."""
        return {
            join(self.folder, layout.intent_key(self.save_id)),
            join(self.folder, layout.manifest_key(self.save_id)),
        }

    def accounts_for(self, key: str) -> bool:
        """Whether ``key`` (relative to the store root) is an object this save wrote."""
        if not self.proven or not key.startswith(self.path + "/"):
            return False
        inner = key[len(self.path) + 1 :]
        if layout.is_metadata_name(inner.rpartition("/")[2]):
            return False  # a commit marker is never part of a save's own objects
        if inner in (layout.INTENT_NAME, layout.MANIFEST_NAME):
            return True
        if not _DATA_NAME.match(inner):
            return False  # a name our writer never gives a data object
        if self.intent is not None and self.intent.accounts_for(inner):
            return True
        return self.manifest is not None and f"{self.save_id}/{inner}" in self.manifest.objects

    def marker_keys(self) -> list[str]:
        """The ``.metadata`` keys that would commit this save: ``.metadata`` in its checkpoint
        folder, and ``__<rank>.metadata`` when all its data comes from one rank."""
        keys = [join(self.folder, layout.METADATA_KEY)]
        prefixes = set(self.intent.file_prefixes) if self.intent is not None else set()
        prefixes.update(m.group(1) for m in map(_DATA_NAME.match, (o.key for o in self.owned)) if m)
        ranks = {m.group(1) for m in map(_RANK_PREFIX.search, prefixes) if m}
        if len(ranks) == 1:
            keys.append(join(self.folder, layout.metadata_key(int(ranks.pop()))))
        return keys

    def lease_live(self, now: float) -> bool:
        """Whether the save may still be running: an intent renewed within its lease.

        The store's modification time of the record counts (a writer whose clock runs behind
        still holds its lease), and so does the writer's heartbeat, but at most one lease past
        the store's time (a clock ahead, or a forged record, cannot extend it further)."""
        if self.intent is None:
            return False
        lease = self.intent.lease_seconds
        last = self.intent.heartbeat
        if self.intent_modified is not None:
            last = max(self.intent_modified, min(last, self.intent_modified + lease))
        return now - last < lease

    def newest(self) -> float | None:
        """When the save last wrote anything (objects and pending uploads)."""
        times = [o.modified for o in self.owned if o.modified is not None]
        times += [u.last_activity for u in self.uploads]
        return max(times) if times else None

    def deletion_order(self) -> list[str]:
        """Owned keys with the records last, so a partial deletion still leaves proof."""
        records = self.record_keys()
        keys = sorted(o.key for o in self.owned)
        return [k for k in keys if k not in records] + [k for k in keys if k in records]


@dataclass
class Scan:
    """What one listing under a prefix shows about ownership and references."""

    objects: list[ObjectInfo]
    saves: list[SaveFolder]
    #: keys named by some committed ``.metadata``
    referenced: set[str] = field(default_factory=set)
    #: (folder, save id) of saves some committed ``.metadata`` points into
    referenced_saves: set[tuple[str, str]] = field(default_factory=set)
    #: folders whose ``.metadata`` could not be read or was refused: everything below is kept
    protected_folders: set[str] = field(default_factory=set)
    #: ``.metadata`` keys that could not be read or were refused
    unreadable_metadata: list[str] = field(default_factory=list)

    def is_referenced(self, save: SaveFolder) -> bool:
        """Whether a committed checkpoint may need anything of ``save``: it names the save or
        one of its objects, or a ``.metadata`` that could not be read lies above the save
        folder or above one of its objects."""
        if (save.folder, save.save_id) in self.referenced_saves:
            return True
        if any(_under(save.path + "/x", folder) for folder in self.protected_folders):
            return True
        if any(_under(o.key, folder) for o in save.owned for folder in self.protected_folders):
            return True
        return any(key in self.referenced for key in (o.key for o in save.owned)) or any(
            key in self.referenced for key in save.record_keys()
        )


def _save_candidates(key: str) -> Iterable[tuple[str, str]]:
    """Every (folder, save id) that ``key`` could belong to: each strict save-id segment."""
    parts = key.split("/")
    for i, part in enumerate(parts[:-1]):
        if layout.is_save_id(part):
            yield "/".join(parts[:i]), part


def _read(store: ObjectStore, key: str) -> bytes | None:
    try:
        return store.run(store.get(key))
    except FileNotFoundError:
        return None


def _fits(size: int | None, limit: int) -> bool:
    return size is None or size <= limit


def _load_records(
    store: ObjectStore,
    save: SaveFolder,
    modified: dict[str, float | None],
    intent: bool = True,
    sizes: dict[str, int] | None = None,
) -> None:
    """Read a save folder's intent (unless ``intent`` is False) and manifest; a record that is
    missing, malformed, oversized (by the listed ``sizes``) or names another save proves
    nothing."""
    sizes = sizes or {}
    intent_key = join(save.folder, layout.intent_key(save.save_id))
    data = _read(store, intent_key) if intent and _fits(sizes.get(intent_key), MAX_INTENT_BYTES) else None
    if data is not None:
        try:
            record = Intent.from_json(data)
            if record.save_id == save.save_id:
                save.intent = record
                save.intent_modified = modified.get(intent_key)
        except ValueError as exc:
            logger.warning(
                "%s/%s is not a dcp_cloud intent record (%s); not ours", store.url, intent_key, exc
            )
    manifest_key = join(save.folder, layout.manifest_key(save.save_id))
    data = _read(store, manifest_key) if _fits(sizes.get(manifest_key), MAX_MANIFEST_BYTES) else None
    if data is not None:
        try:
            manifest = Manifest.from_json(data)
            if manifest.save_id == save.save_id:
                save.manifest = manifest
        except Exception as exc:
            logger.warning("%s/%s is not a dcp_cloud manifest (%s); not ours", store.url, manifest_key, exc)


def read_save(store: ObjectStore, folder: str, save_id: str, intent: bool = True) -> SaveFolder:
    """The records of one save folder (not listed: its ``owned`` list stays empty); the intent
    only when ``intent`` (a committed save keeps only its manifest)."""
    save = SaveFolder(folder, save_id)
    _load_records(store, save, {}, intent)
    return save


def _read_references(store: ObjectStore, key: str, scan: Scan, size: int | None = None) -> None:
    """Note what one committed ``.metadata`` needs; protect its whole folder if it cannot be
    read (or is larger than ``MAX_METADATA_BYTES`` by its listed ``size``) or names keys
    outside that folder."""
    folder, _, name = key.rpartition("/")
    try:
        if not _fits(size, MAX_METADATA_BYTES):
            raise ValueError(f"it is {size} bytes, more than the {MAX_METADATA_BYTES} read")
        references = StoredCheckpoint(store, folder).read_references(name)
    except Exception as exc:
        scan.unreadable_metadata.append(key)
        scan.protected_folders.add(folder)
        logger.warning("dcp_cloud: keeping everything under %r: %s", folder or ".", exc)
        return
    if references is None:  # not committed (or deleted since the listing)
        return
    scan.referenced_saves.update((folder, save_id) for save_id in references.saves)
    scan.referenced.update(join(folder, path) for path in references.keys)


def scan(store: ObjectStore, prefix: str = "", retiring: Callable[[str], bool] | None = None) -> Scan:
    """List everything under ``prefix`` and find our saves (with their pending uploads) and
    what committed checkpoints reference. Reads every save record, then every ``.metadata``
    except those ``retiring`` says are about to be deleted (their references do not count)."""
    # Keys our writer never makes (``..``/``.``/empty segments, which some stores allow) are
    # never ours, and no request is made for them.
    objects = [o for o in store.run(store.list_objects(prefix)) if is_confined(o.key)]
    uploads = [u for u in store.run(store.list_uploads(prefix)) if is_confined(u.key)]
    modified = {o.key: o.modified for o in objects}
    sizes = {o.key: o.size for o in objects}
    saves: dict[tuple[str, str], SaveFolder] = {}
    for obj in objects:
        name = obj.key.rpartition("/")[2]
        if name in (layout.INTENT_NAME, layout.MANIFEST_NAME):
            folder, _, save_id = _folder_of(obj.key).rpartition("/")
            if layout.is_save_id(save_id) and (folder, save_id) not in saves:
                saves[(folder, save_id)] = SaveFolder(folder, save_id)
    for save in saves.values():
        _load_records(store, save, modified, sizes=sizes)
    proven = {k: s for k, s in saves.items() if s.proven}
    for obj in objects:
        owner = _owner(obj.key, proven)
        if owner is not None:
            owner.owned.append(obj)
    for upload in uploads:
        owner = _owner(upload.key, proven)
        if owner is not None:
            owner.uploads.append(upload)
    result = Scan(objects=objects, saves=sorted(proven.values(), key=lambda s: s.path))
    # After the records (see the module docstring): the listed markers, and those a save's
    # checkpoint folder may have gained since the listing (a save committing meanwhile).
    markers = [o.key for o in objects if layout.is_metadata_name(o.key.rpartition("/")[2])]
    for save in result.saves:
        markers += save.marker_keys()
    for key in dict.fromkeys(markers):
        if not (retiring and retiring(key)):
            _read_references(store, key, result, sizes.get(key))
    return result


def _owner(key: str, saves: dict[tuple[str, str], SaveFolder]) -> SaveFolder | None:
    for candidate in _save_candidates(key):
        save = saves.get(candidate)
        if save is not None and save.accounts_for(key):
            return save
    return None


def collectable(save: SaveFolder, result: Scan, now: float, grace_seconds: float) -> str | None:
    """Why ``save`` must be kept (``"referenced"``, ``"lease"``, ``"recent"``), or None when
    it may be deleted."""
    if result.is_referenced(save):
        return "referenced"
    if save.lease_live(now):
        return "lease"
    newest = save.newest()
    if newest is not None and now - newest < grace_seconds:
        return "recent"
    return None


class Heartbeat:
    """Keeps a save's lease alive: re-writes its intent record every third of the lease from a
    daemon thread until :meth:`stop`. Holds no reference to the writer, so it never keeps a
    writer (or the process) alive."""

    def __init__(self, store: ObjectStore, key: str, intent: Intent) -> None:
        self._store = store
        self._key = key
        self._intent = intent
        self._stopped = threading.Event()
        self._thread = threading.Thread(target=self._run, name="dcp-cloud-lease", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        interval = self._intent.lease_seconds / 3
        while not self._stopped.wait(interval):
            renewed = Intent(
                self._intent.save_id,
                self._intent.file_prefixes,
                self._intent.created,
                time.time(),
                self._intent.lease_seconds,
            )
            try:
                if not self._stopped.is_set():
                    self._store.run(self._store.put(self._key, renewed.to_json()))
            except Exception as exc:  # the next beat retries; the lease tolerates two misses
                logger.warning(
                    "%s: renewing the lease of save %s failed: %s", self._store.url, self._intent.save_id, exc
                )

    def stop(self, wait: float = 0.0) -> None:
        """Stop renewing (the lease then runs out on its own); waits up to ``wait`` seconds for
        a renewal in flight, so that it cannot land after the caller removes the record."""
        self._stopped.set()
        if wait and self._thread is not threading.current_thread():
            self._thread.join(wait)
