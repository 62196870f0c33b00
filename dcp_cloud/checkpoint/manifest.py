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
from functools import cache
from typing import Any

from ..errors import CorruptCheckpointError, UnsafeCheckpointError
from ..store.keys import key_problem

FORMAT = "dcp_cloud.manifest"
VERSION = 2  # 2: item payloads and the writer's byte order
_READABLE_VERSIONS = (1, 2)
#: offsets and lengths are below this (S3 objects are far smaller; torch's own limit is int64)
MAX_OFFSET = 2**63
#: how many of a document's problems an error lists
_SHOWN_PROBLEMS = 5


class ManifestError(CorruptCheckpointError, ValueError):
    """A manifest is not a valid dcp_cloud manifest document (also a ValueError)."""


class UnsafeManifestError(UnsafeCheckpointError, ValueError):
    """A manifest names a key outside its checkpoint (also a ValueError)."""


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
    def from_json(cls, data: bytes, where: str = "manifest.json", save_id: str | None = None) -> Manifest:
        """Parse and validate a manifest document read from ``where``.

        Every field is checked against the schema (types, ranges, each payload inside its
        item, each object's size covering its items), and every key it names is confined to
        the checkpoint. ``save_id``, when given, is the save folder the manifest was read from,
        which the document must name.

        Raises:
            ManifestError: the document is not a valid manifest (a :class:`CorruptCheckpointError`).
            UnsafeManifestError: it names a key outside the checkpoint (an
                :class:`UnsafeCheckpointError`).
        """
        doc = _parse(data, where)
        if doc.version not in _READABLE_VERSIONS:
            raise ManifestError(
                f"{where}: manifest version {doc.version} is not one this dcp_cloud understands "
                f"({', '.join(map(str, _READABLE_VERSIONS))}); upgrade dcp-cloud"
            )
        if save_id is not None and doc.save_id != save_id:
            raise ManifestError(
                f"{where} names the save {doc.save_id!r}, not the folder {save_id!r} it lies in: "
                "it belongs to another save"
            )
        objects: dict[str, list[ItemRecord]] = {}
        for key, entry in doc.objects.items():
            _confine(key, where, "object")
            records = [ItemRecord.from_json(list(fields)) for fields in entry.items]
            _check_records(key, entry.size, records, where)
            objects[key] = records
        for key in doc.replaced:
            _confine(key, where, "replaced")
        return cls(
            save_id=doc.save_id,
            objects=objects,
            created=doc.created,
            torch_version=doc.torch_version,
            dcp_cloud_version=doc.dcp_cloud_version,
            replaced=set(doc.replaced),
            # version 1 recorded no payloads, so its byte order never matters
            byteorder=doc.byteorder or sys.byteorder,
        )


def _confine(key: str, where: str, entry: str) -> None:
    problem = key_problem(key)
    if problem is not None:
        raise UnsafeManifestError(
            f"{where} names the {entry} key {key!r}, which {problem}: a checkpoint's own files may "
            "only name objects inside that checkpoint. It was not used; the checkpoint may have "
            "been crafted, so do not load it from a store you do not trust."
        )


def _check_records(key: str, size: int | None, records: list[ItemRecord], where: str) -> None:
    """Each payload lies inside its item, and the object's recorded size covers every item."""
    for record in records:
        payload = record.payload
        if payload is not None and payload.offset + payload.length > record.length:
            raise ManifestError(
                f"{where}: object {key!r} records a payload [{payload.offset}, "
                f"{payload.offset + payload.length}) outside its item of {record.length} bytes at "
                f"offset {record.offset}"
            )
    end = max((r.offset + r.length for r in records), default=0)
    if size is not None and size < end:
        raise ManifestError(
            f"{where}: object {key!r} is recorded as {size} bytes, but its items reach byte {end}"
        )


def _parse(data: bytes, where: str) -> Any:
    """The validated document, or :class:`ManifestError` listing what is wrong with it."""
    from pydantic import ValidationError

    try:
        return _document_type().validate_json(data)
    except ValidationError as exc:
        problems = [
            f"{_location(e['loc'])}: {e['msg']}" for e in exc.errors(include_url=False, include_input=False)
        ]
        shown = "; ".join(problems[:_SHOWN_PROBLEMS])
        more = f" and {len(problems) - _SHOWN_PROBLEMS} more" if len(problems) > _SHOWN_PROBLEMS else ""
        raise ManifestError(
            f"{where} is not a valid {FORMAT} document ({len(data)} bytes: {shown}{more})"
        ) from None
    except (ValueError, RecursionError, MemoryError) as exc:  # defensive: never leak these
        raise ManifestError(f"{where} is not a valid {FORMAT} document ({type(exc).__name__})") from None


def _location(loc: tuple[Any, ...]) -> str:
    """A field's place in the document, without pydantic's names for union members."""
    return ".".join(str(part) for part in loc if not str(part).startswith("tuple[")) or "document"


@cache
def _document_type() -> Any:
    """The manifest's schema as a pydantic type adapter (built once, on first use: pydantic
    is imported only when a manifest is read)."""
    from typing import Annotated, Literal

    from pydantic import BaseModel, ConfigDict, Field, TypeAdapter

    offset = Annotated[int, Field(strict=True, ge=0, lt=MAX_OFFSET)]
    crc = Annotated[int, Field(strict=True, ge=0, lt=2**32)]
    text = Annotated[str, Field(strict=True, max_length=4096)]
    record = tuple[offset, offset, crc] | tuple[offset, offset, crc, offset, offset, crc]

    class ObjectDoc(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        size: offset | None = None
        items: list[record]

    class ManifestDoc(BaseModel):
        model_config = ConfigDict(strict=True, extra="ignore")
        format: Literal["dcp_cloud.manifest"]
        version: Annotated[int, Field(strict=True)]
        save_id: text
        created: Annotated[float, Field(strict=False, allow_inf_nan=False)] = 0.0
        torch_version: text = ""
        dcp_cloud_version: text = ""
        replaced: list[str] = []
        byteorder: Literal["little", "big"] | None = None
        objects: dict[str, ObjectDoc]

    return TypeAdapter(ManifestDoc)
