"""dcp_cloud.checkpoint.manifest: the manifest document, its round trip and its schema."""

from __future__ import annotations

import json
import sys
from typing import Any

import pytest

from dcp_cloud.checkpoint.manifest import (
    FORMAT,
    VERSION,
    ItemRecord,
    Manifest,
    ManifestError,
    PayloadRecord,
    UnsafeManifestError,
)
from dcp_cloud.errors import CorruptCheckpointError, UnsafeCheckpointError

SAVE_ID = "save-20261122T200102Z-3f9a1c0b"
KEY = f"{SAVE_ID}/__0_0.distcp"
WHERE = "s3://b/ckpt/manifest.json"


def manifest() -> Manifest:
    return Manifest(
        save_id=SAVE_ID,
        objects={
            KEY: [ItemRecord(0, 100, 7), ItemRecord(100, 50, 2**32 - 1, PayloadRecord(10, 40, 9))],
            f"{SAVE_ID}/ab/__1_0.distcp": [ItemRecord(0, 3, 0)],
        },
        created=1700000000.5,
        torch_version="2.13.0",
        dcp_cloud_version="0.9",
        replaced={"save-20250101T000000Z-00000000/__0_0.distcp"},
    )


def document(**changes: Any) -> dict[str, Any]:
    """A valid manifest document as a dict, with top-level ``changes``."""
    doc = json.loads(manifest().to_json())
    doc.update(changes)
    return doc


def parse(doc: Any) -> Manifest:
    return Manifest.from_json(json.dumps(doc).encode(), WHERE)


def test_round_trip_keeps_every_field() -> None:
    original = manifest()
    data = original.to_json()
    doc = json.loads(data)
    assert doc["format"] == FORMAT and doc["version"] == VERSION
    assert doc["objects"][KEY]["size"] == 150
    assert doc["objects"][KEY]["items"] == [[0, 100, 7], [100, 50, 2**32 - 1, 10, 40, 9]]
    again = Manifest.from_json(data, WHERE, save_id=SAVE_ID)
    assert again == original
    assert again.to_json() == data


def test_sizes_and_index() -> None:
    m = manifest()
    assert m.object_size(KEY) == 150 and m.object_size("absent") == 0
    assert m.total_bytes == 153
    assert m.item_index()[(KEY, 100)].payload == PayloadRecord(10, 40, 9)


def test_an_empty_manifest_round_trips() -> None:
    empty = Manifest(save_id=SAVE_ID, created=1.0)
    assert Manifest.from_json(empty.to_json()) == empty


def test_version_1_documents_still_load() -> None:
    doc = document(version=1)
    del doc["byteorder"]
    doc["objects"][KEY]["items"] = [[0, 100, 7]]
    loaded = parse(doc)
    assert loaded.byteorder == sys.byteorder
    assert loaded.objects[KEY] == [ItemRecord(0, 100, 7)]


def test_unknown_fields_are_ignored() -> None:
    doc = document(future_field={"x": 1})
    doc["objects"][KEY]["checksum_kind"] = "crc32c"
    assert parse(doc) == manifest()


def test_a_newer_version_asks_for_an_upgrade() -> None:
    with pytest.raises(ManifestError, match="upgrade dcp-cloud"):
        parse(document(version=VERSION + 1))


def test_a_manifest_of_another_save_is_refused() -> None:
    with pytest.raises(ManifestError, match="another save"):
        Manifest.from_json(manifest().to_json(), WHERE, save_id="save-20261122T200102Z-00000000")


def _bad_item(items: list[Any]) -> dict[str, Any]:
    doc = document()
    doc["objects"][KEY]["items"] = items
    doc["objects"][KEY].pop("size")
    return doc


MALFORMED: dict[str, Any] = {
    "not json": b"{not json",
    "empty": b"",
    "a list": [],
    "a string": "manifest",
    "wrong format": document(format="other.manifest"),
    "no format": {k: v for k, v in document().items() if k != "format"},
    "no objects": {k: v for k, v in document().items() if k != "objects"},
    "objects as a list": document(objects=[]),
    "version as a string": document(version="2"),
    "save id not a string": document(save_id=7),
    "replaced as a string": document(replaced="x"),
    "bad byte order": document(byteorder="middle"),
    "created NaN": manifest().to_json().replace(b'"created": 1700000000.5', b'"created": NaN'),
    "four fields": _bad_item([[0, 1, 2, 3]]),
    "negative offset": _bad_item([[-1, 10, 0]]),
    "crc too large": _bad_item([[0, 10, 2**32]]),
    "offset as a float": _bad_item([[0.0, 10, 0]]),
    "offset as a bool": _bad_item([[True, 10, 0]]),
    "offset as a string": _bad_item([["0", 10, 0]]),
    "offset past 2**63": _bad_item([[2**63, 10, 0]]),
    "payload outside its item": _bad_item([[0, 10, 0, 5, 6, 0]]),
    "size short of its items": document(objects={KEY: {"size": 99, "items": [[0, 100, 7]]}}),
    "object entry not an object": document(objects={KEY: [[0, 100, 7]]}),
}


@pytest.mark.parametrize("case", sorted(MALFORMED))
def test_malformed_documents_are_corrupt_checkpoints(case: str) -> None:
    doc = MALFORMED[case]
    data = doc if isinstance(doc, bytes) else json.dumps(doc).encode()
    with pytest.raises(ManifestError) as caught:
        Manifest.from_json(data, WHERE)
    assert isinstance(caught.value, CorruptCheckpointError) and isinstance(caught.value, ValueError)
    assert WHERE in str(caught.value)


def test_deeply_nested_documents_are_refused_without_recursion_errors() -> None:
    data = b'{"objects": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"
    with pytest.raises(ManifestError):
        Manifest.from_json(data, WHERE)


def test_errors_list_the_problems_found() -> None:
    doc = _bad_item([[-1, 10, 0]])
    doc["save_id"] = 7
    with pytest.raises(ManifestError) as caught:
        parse(doc)
    message = str(caught.value)
    assert "save_id" in message and f"objects.{KEY}.items.0" in message


@pytest.mark.parametrize("key", ["../x.distcp", "/abs", "a//b", "s3://other/x", f"{SAVE_ID}/../../x"])
@pytest.mark.parametrize("entry", ["object", "replaced"])
def test_keys_outside_the_checkpoint_are_refused(key: str, entry: str) -> None:
    doc = document()
    if entry == "object":
        doc["objects"][key] = {"size": 1, "items": [[0, 1, 0]]}
    else:
        doc["replaced"] = ["fine/key", key]
    with pytest.raises(UnsafeManifestError) as caught:
        parse(doc)
    assert isinstance(caught.value, UnsafeCheckpointError)
    assert repr(key) in str(caught.value) and entry in str(caught.value)


def test_item_record_from_json_checks_its_length() -> None:
    assert ItemRecord.from_json([1, 2, 3]) == ItemRecord(1, 2, 3)
    assert ItemRecord.from_json([1, 2, 3, 4, 5, 6]).payload == PayloadRecord(4, 5, 6)
    with pytest.raises(ValueError, match="3 or 6 fields"):
        ItemRecord.from_json([1, 2])
