"""Our own record of a save, beside DCP's ``.metadata``: sizes and checksums.

It is a small JSON object at ``<save_id>/manifest.json``, written by the coordinator just before
``.metadata``. Readers that don't know it (torch's FileSystemReader) ignore it; our reader uses it
to check every item's CRC32C and every object's size.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import Any

FORMAT = "dcp_cloud.manifest"
VERSION = 1


@dataclass(frozen=True)
class ItemRecord:
    """One serialized item inside a data object."""

    offset: int
    length: int
    crc32c: int


@dataclass
class Manifest:
    """Sizes and checksums of one save's data objects, keyed by relative key."""

    save_id: str
    objects: dict[str, list[ItemRecord]] = field(default_factory=dict)
    created: float = field(default_factory=time.time)
    torch_version: str = ""
    dcp_cloud_version: str = ""
    #: objects of the checkpoint this save replaced, deleted when the next save commits
    replaced: set[str] = field(default_factory=set)

    def object_size(self, key: str) -> int:
        return max((r.offset + r.length for r in self.objects.get(key, ())), default=0)

    def item_index(self) -> dict[tuple[str, int], ItemRecord]:
        """Every item record keyed by (object key, offset)."""
        return {(k, r.offset): r for k, records in self.objects.items() for r in records}

    @property
    def total_bytes(self) -> int:
        return sum(self.object_size(k) for k in self.objects)

    def to_json(self) -> bytes:
        doc: dict[str, Any] = {
            "format": FORMAT,
            "version": VERSION,
            "save_id": self.save_id,
            "created": self.created,
            "torch_version": self.torch_version,
            "dcp_cloud_version": self.dcp_cloud_version,
            "replaced": sorted(self.replaced),
            "objects": {
                key: {
                    "size": self.object_size(key),
                    "items": [[r.offset, r.length, r.crc32c] for r in records],
                }
                for key, records in sorted(self.objects.items())
            },
        }
        return json.dumps(doc, indent=1).encode()

    @classmethod
    def from_json(cls, data: bytes) -> Manifest:
        doc = json.loads(data)
        if doc.get("format") != FORMAT:
            raise ValueError(f"not a {FORMAT} document")
        if doc.get("version", 0) > VERSION:
            raise ValueError(
                f"manifest version {doc['version']} is newer than this dcp_cloud understands "
                f"({VERSION}); upgrade dcp-cloud"
            )
        objects = {
            key: [ItemRecord(int(o), int(n), int(c)) for o, n, c in entry["items"]]
            for key, entry in doc["objects"].items()
        }
        return cls(
            save_id=doc["save_id"],
            objects=objects,
            created=float(doc.get("created", 0.0)),
            torch_version=doc.get("torch_version", ""),
            dcp_cloud_version=doc.get("dcp_cloud_version", ""),
            replaced=set(doc.get("replaced", [])),
        )
