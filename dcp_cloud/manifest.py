"""Our own record of a save, beside DCP's ``.metadata``: sizes and checksums.

It is a small JSON object at ``<save_id>/manifest.json``, written by the coordinator just before
``.metadata``. Readers that don't know it (torch's FileSystemReader) ignore it; our reader uses it
to check every item's CRC32C and every object's size, and to read large tensors' bytes straight
into their destination (each tensor item records where its raw bytes lie).
"""

from __future__ import annotations

import json
import sys
import time
from dataclasses import dataclass, field
from typing import Any

FORMAT = "dcp_cloud.manifest"
VERSION = 2  # 2: item payloads and the writer's byte order
_READABLE_VERSIONS = (1, 2)


@dataclass(frozen=True)
class PayloadRecord:
    """Where a tensor item's raw bytes (its storage, row-major, contiguous) lie in the item."""

    #: from the item's first byte
    offset: int
    length: int
    crc32c: int


@dataclass(frozen=True)
class ItemRecord:
    """One serialized item inside a data object."""

    offset: int
    length: int
    crc32c: int
    payload: PayloadRecord | None = None

    def to_json(self) -> list[int]:
        fields = [self.offset, self.length, self.crc32c]
        if self.payload is not None:
            fields += [self.payload.offset, self.payload.length, self.payload.crc32c]
        return fields

    @classmethod
    def from_json(cls, fields: list[Any]) -> ItemRecord:
        if len(fields) not in (3, 6):
            raise ValueError(f"an item record has 3 or 6 fields, not {len(fields)}")
        offset, length, crc = (int(f) for f in fields[:3])
        payload = PayloadRecord(*(int(f) for f in fields[3:])) if len(fields) == 6 else None
        return cls(offset, length, crc, payload)


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
    #: byte order of the machine that wrote the payloads (torch.save writes native order)
    byteorder: str = sys.byteorder

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
            "byteorder": self.byteorder,
            "objects": {
                key: {
                    "size": self.object_size(key),
                    "items": [r.to_json() for r in records],
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
        version = doc.get("version", 0)
        if version not in _READABLE_VERSIONS:
            raise ValueError(
                f"manifest version {version} is not one this dcp_cloud understands "
                f"({', '.join(map(str, _READABLE_VERSIONS))}); upgrade dcp-cloud"
            )
        objects = {
            key: [ItemRecord.from_json(fields) for fields in entry["items"]]
            for key, entry in doc["objects"].items()
        }
        return cls(
            save_id=doc["save_id"],
            objects=objects,
            created=float(doc.get("created", 0.0)),
            torch_version=doc.get("torch_version", ""),
            dcp_cloud_version=doc.get("dcp_cloud_version", ""),
            replaced=set(doc.get("replaced", [])),
            # version 1 recorded no payloads, so its byte order never matters
            byteorder=doc.get("byteorder", sys.byteorder),
        )
