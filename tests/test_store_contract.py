"""The store contract: what every ObjectStore does, checked the same way on every store.

Each test runs against S3 (moto's server), GCS (fake-gcs-server), Azure (Azurite), a local folder
and fsspec's memory filesystem, through :func:`dcp_cloud.store.open_store`, as fsspec's
``tests/abstract`` suite does for filesystems. A store that parts from the contract fails here by
name, whatever the layers above it happen to exercise.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterator
from typing import Any

import pytest

from dcp_cloud.errors import BucketNotFoundError, UnsafeCheckpointError
from dcp_cloud.options import MIN_PART_SIZE
from dcp_cloud.store import ObjectStore, open_store

from .conftest import BUCKET, Target, make_target

#: an object whose every byte tells where it lies
BODY = bytes(range(256)) * 4
#: stores whose parts (all but the last) must hold at least 5 MiB
_LARGE_PARTS = {"s3"}
#: stores that keep started, unfinished uploads where ``list_uploads`` finds them
_KEEPS_UPLOADS = {"s3", "gcs", "azure", "file"}
_BUCKET_STORES = {"s3", "gcs", "azure"}


@pytest.fixture
def store(target: Target) -> Iterator[ObjectStore]:
    """The store at the target's URL."""
    yield open_store(target.url, target.storage_options)


@pytest.fixture(params=sorted(_BUCKET_STORES))
def bucket_target(request: pytest.FixtureRequest, tmp_path: Any) -> Target:
    """A fresh URL on each store that has buckets (the cloud stores)."""
    return make_target(request.param, request, tmp_path)


@pytest.fixture
def bucket_store(bucket_target: Target) -> ObjectStore:
    return open_store(bucket_target.url, bucket_target.storage_options)


@pytest.fixture(params=sorted(_BUCKET_STORES | {"file"}))
def conditional_store(request: pytest.FixtureRequest, tmp_path: Any) -> ObjectStore:
    """A store that enforces ``if_absent`` atomically (memory:// checks it best-effort only)."""
    target = make_target(request.param, request, tmp_path)
    return open_store(target.url, target.storage_options)


def run(store: ObjectStore, coro: Any) -> Any:
    return store.run(coro)


def keys_of(store: ObjectStore, prefix: str = "") -> dict[str, int]:
    return {o.key: o.size for o in run(store, store.list_objects(prefix))}


# -- whole objects --------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["bytes", "bytearray", "memoryview", "empty"])
def test_put_then_get_returns_the_same_bytes(store: ObjectStore, kind: str) -> None:
    body: Any = {
        "bytes": BODY,
        "bytearray": bytearray(BODY),
        "memoryview": memoryview(bytearray(BODY))[3:-5],
        "empty": b"",
    }[kind]
    run(store, store.put("obj/x.bin", body))
    got = run(store, store.get("obj/x.bin"))
    assert isinstance(got, bytes) and got == bytes(body)
    assert run(store, store.exists("obj/x.bin"))
    assert keys_of(store) == {"obj/x.bin": len(body)}


def test_put_pieces_writes_the_pieces_as_one_object(store: ObjectStore) -> None:
    buffer = bytearray(BODY * 3)
    pieces = [memoryview(buffer)[: len(BODY)], b"", bytes(BODY[::-1]), memoryview(buffer)[7:300]]
    run(store, store.put_pieces("obj/pieces.bin", pieces))
    expected = b"".join(bytes(p) for p in pieces)
    assert run(store, store.get("obj/pieces.bin")) == expected
    assert keys_of(store) == {"obj/pieces.bin": len(expected)}


def test_put_replaces_an_object_whole(store: ObjectStore) -> None:
    run(store, store.put("x", BODY))
    run(store, store.put("x", b"short"))
    assert run(store, store.get("x")) == b"short"


@pytest.mark.parametrize(
    ("start", "end"),
    [(0, 10), (500, 700), (1000, 1024), (1020, 1100), (1023, 1024), (0, 1024)],
    ids=["start", "middle", "end", "past-end", "last-byte", "whole"],
)
def test_get_range_returns_the_bytes_there(store: ObjectStore, start: int, end: int) -> None:
    run(store, store.put("r", BODY))
    assert run(store, store.get_range("r", start, end)) == BODY[start:end]


@pytest.mark.parametrize(
    ("start", "size"),
    [(0, 10), (500, 200), (1014, 10), (1020, 10), (0, 1024)],
    ids=["start", "middle", "end", "past-end", "whole"],
)
def test_read_into_fills_the_buffer_and_counts(store: ObjectStore, start: int, size: int) -> None:
    run(store, store.put("r", BODY))
    out = bytearray(b"\xee" * size)
    count = run(store, store.read_into("r", start, memoryview(out)))
    expected = BODY[start : start + size]
    assert count == len(expected)
    assert out[:count] == expected and out[count:] == b"\xee" * (size - count)


def test_an_empty_range_reads_nothing(store: ObjectStore) -> None:
    run(store, store.put("r", BODY))
    assert run(store, store.get_range("r", 100, 100)) == b""


def test_a_read_of_no_bytes_returns_zero(store: ObjectStore) -> None:
    run(store, store.put("r", BODY))
    store.max_attempts = 1  # fail fast where the store gets it wrong, rather than retry
    assert run(store, asyncio.wait_for(store.read_into("r", 100, memoryview(bytearray())), 5)) == 0


def test_reads_starting_past_the_end_return_nothing(store: ObjectStore) -> None:
    run(store, store.put("r", BODY))
    assert run(store, store.read_into("r", 2000, memoryview(bytearray(8)))) == 0
    assert run(store, store.get_range("r", 2000, 2010)) == b""


def requests_made(store: ObjectStore, call: Any) -> tuple[Any, int]:
    """``call()``'s result and how many requests (tries included) it sent."""
    before = store.counter.snapshot()
    result = run(store, call())
    after = store.counter.snapshot()
    return result, sum(after[0].values()) - sum(before[0].values()) + after[1] - before[1]


def test_cloud_stores_send_no_request_for_a_read_of_nothing(bucket_store: ObjectStore) -> None:
    store = bucket_store
    run(store, store.put("r", BODY))
    assert requests_made(store, lambda: store.get_range("r", 100, 100)) == (b"", 0)
    assert requests_made(store, lambda: store.get_range("r", 100, 50)) == (b"", 0)
    assert requests_made(store, lambda: store.read_into("r", 100, memoryview(bytearray()))) == (0, 0)


def test_exists_is_one_request_once_the_bucket_is_known(store: ObjectStore, target: Target) -> None:
    run(store, store.put("present", b"x"))
    assert requests_made(store, lambda: store.exists("present")) == (True, 1)
    assert requests_made(store, lambda: store.exists("absent")) == (False, 1)
    fresh = open_store(target.url, target.storage_options)
    answer, first = requests_made(fresh, lambda: fresh.exists("absent"))
    assert answer is False and first <= 2, "a missing object costs at most one bucket check"
    assert requests_made(fresh, lambda: fresh.exists("absent")) == (False, 1)


@pytest.mark.parametrize("operation", ["get", "get_range", "read_into"])
def test_reading_a_missing_object_raises_file_not_found(store: ObjectStore, operation: str) -> None:
    run(store, store.put("present", b"x"))
    call = {
        "get": lambda: store.get("absent"),
        "get_range": lambda: store.get_range("absent", 0, 4),
        "read_into": lambda: store.read_into("absent", 0, memoryview(bytearray(4))),
    }[operation]
    with pytest.raises(FileNotFoundError):
        run(store, call())
    assert not run(store, store.exists("absent"))


# -- listing and deleting -------------------------------------------------------------------------


def test_list_objects_recurses_under_a_prefix_with_sizes(store: ObjectStore) -> None:
    objects = {"a/b/c.bin": 3, "a/d.bin": 5, "e.bin": 0, "a/b/deeper/f.bin": 7}
    for key, size in objects.items():
        run(store, store.put(key, b"z" * size))
    listed = run(store, store.list_objects(""))
    assert {o.key: o.size for o in listed} == objects
    assert all(o.modified is None or o.modified > 0 for o in listed)
    assert keys_of(store, "a/") == {k: v for k, v in objects.items() if k.startswith("a/")}
    assert keys_of(store, "a/b/") == {k: v for k, v in objects.items() if k.startswith("a/b/")}
    assert keys_of(store, "nothing/") == {}


def test_list_objects_matches_keys_by_string_prefix(store: ObjectStore) -> None:
    for key in ("run/x", "run-2/y", "runner", "other"):
        run(store, store.put(key, b"1"))
    assert set(keys_of(store, "run")) == {"run/x", "run-2/y", "runner"}


def test_an_empty_store_lists_nothing(store: ObjectStore) -> None:
    assert run(store, store.list_objects("")) == []
    assert keys_of(store, "x/") == {}


def test_delete_removes_present_keys_and_ignores_missing_ones(store: ObjectStore) -> None:
    for key in ("a", "b/c", "d"):
        run(store, store.put(key, b"1"))
    run(store, store.delete(["a", "b/c", "never-there", "b/never"]))
    assert keys_of(store) == {"d": 1}
    assert not run(store, store.exists("a")) and not run(store, store.exists("b/c"))
    run(store, store.delete([]))
    run(store, store.delete(["a"]))  # already gone
    assert keys_of(store) == {"d": 1}


# -- conditional put ------------------------------------------------------------------------------


def test_put_if_absent_refuses_an_existing_key(store: ObjectStore, target: Target) -> None:
    run(store, store.put("commit", b"first", if_absent=True))
    with pytest.raises(FileExistsError):
        run(store, store.put("commit", b"second", if_absent=True))
    assert run(store, store.get("commit")) == b"first"
    assert store.supports_conditional_put == (target.store != "memory")


def test_put_if_absent_lets_exactly_one_of_concurrent_writers_win(conditional_store: ObjectStore) -> None:
    store = conditional_store
    assert store.supports_conditional_put

    async def race() -> list[Any]:
        puts = [store.put("commit", f"writer-{i}".encode(), if_absent=True) for i in range(4)]
        return await asyncio.gather(*puts, return_exceptions=True)

    results = run(store, race())
    winners = [i for i, r in enumerate(results) if r is None]
    assert len(winners) == 1, results
    assert all(isinstance(r, FileExistsError) for r in results if r is not None), results
    assert run(store, store.get("commit")) == f"writer-{winners[0]}".encode()


# -- multipart uploads ----------------------------------------------------------------------------


def part_bodies(target: Target, count: int = 3) -> list[bytes]:
    """Distinct part bodies: all but the last of the store's minimum part size."""
    size = MIN_PART_SIZE if target.store in _LARGE_PARTS else 1000
    bodies = [bytes([65 + n]) * size for n in range(count - 1)]
    return bodies + [b"tail-" + bytes(range(256))]


async def send_parts(store: ObjectStore, upload: Any, bodies: list[bytes], order: list[int]) -> None:
    """Send parts (1-based numbers) concurrently, started in ``order``."""
    offsets = [sum(len(b) for b in bodies[:n]) for n in range(len(bodies))]
    await asyncio.gather(*(store.upload_part(upload, n, offsets[n - 1], bodies[n - 1]) for n in order))


def test_parts_sent_out_of_order_complete_in_part_order(store: ObjectStore, target: Target) -> None:
    bodies = part_bodies(target)
    upload = run(store, store.start_upload("big/obj.distcp"))
    run(store, send_parts(store, upload, bodies, [3, 1, 2]))
    run(store, store.complete_upload(upload))
    whole = b"".join(bodies)
    assert keys_of(store) == {"big/obj.distcp": len(whole)}
    assert run(store, store.get("big/obj.distcp")) == whole
    assert [u for u in run(store, store.list_uploads("")) if u.key == "big/obj.distcp"] == []


def test_an_upload_is_invisible_until_completed(store: ObjectStore, target: Target) -> None:
    bodies = part_bodies(target, 2)
    upload = run(store, store.start_upload("obj"))
    run(store, send_parts(store, upload, bodies, [1, 2]))
    assert not run(store, store.exists("obj"))
    assert keys_of(store) == {}


def test_parts_may_be_memoryviews_of_a_reused_buffer(store: ObjectStore, target: Target) -> None:
    bodies = part_bodies(target, 2)
    upload = run(store, store.start_upload("v"))
    buffer = bytearray(max(len(b) for b in bodies))
    offset = 0
    for number, body in enumerate(bodies, 1):
        buffer[: len(body)] = body
        run(store, store.upload_part(upload, number, offset, memoryview(buffer)[: len(body)]))
        offset += len(body)
    run(store, store.complete_upload(upload))
    assert run(store, store.get("v")) == b"".join(bodies)


def test_a_completed_upload_replaces_an_existing_object(store: ObjectStore, target: Target) -> None:
    run(store, store.put("obj", b"old"))
    bodies = part_bodies(target, 2)
    upload = run(store, store.start_upload("obj"))
    run(store, send_parts(store, upload, bodies, [1, 2]))
    assert run(store, store.get("obj")) == b"old"
    run(store, store.complete_upload(upload))
    assert run(store, store.get("obj")) == b"".join(bodies)


def test_abort_leaves_nothing_visible(store: ObjectStore, target: Target) -> None:
    run(store, store.put("keep", b"k"))
    bodies = part_bodies(target)
    upload = run(store, store.start_upload("gone/obj.distcp"))
    run(store, send_parts(store, upload, bodies[:2], [1, 2]))
    run(store, store.abort_upload(upload))
    assert keys_of(store) == {"keep": 1}
    assert not run(store, store.exists("gone/obj.distcp"))
    assert run(store, store.list_uploads("")) == []
    run(store, store.abort_upload(upload))  # an upload already gone: no error


def test_list_uploads_shows_a_started_upload_until_it_is_aborted(store: ObjectStore, target: Target) -> None:
    bodies = part_bodies(target, 2)
    upload = run(store, store.start_upload("save/obj.distcp"))
    run(store, store.upload_part(upload, 1, 0, bodies[0]))
    pending = run(store, store.list_uploads(""))
    if target.store not in _KEEPS_UPLOADS:
        assert pending == []
    else:
        assert [p.key for p in pending] == ["save/obj.distcp"]
        assert pending[0].last_activity > 0
        assert run(store, store.list_uploads("save/")) != []
        assert run(store, store.list_uploads("elsewhere/")) == []
    assert keys_of(store) == {}, "an unfinished upload shows as an object"
    # the listed handle is enough to abort (gc has nothing else after a crash)
    for found in pending:
        run(store, store.abort_upload(found.upload))
    run(store, store.abort_upload(upload))
    assert run(store, store.list_uploads("")) == []
    assert keys_of(store) == {}


# -- errors ---------------------------------------------------------------------------------------


@pytest.fixture
def missing_bucket_store(bucket_target: Target) -> ObjectStore:
    url = bucket_target.url.replace(BUCKET, "no-such-bucket-here", 1)
    return open_store(url, bucket_target.storage_options)


@pytest.mark.parametrize("operation", ["put", "get", "get_range", "list_objects", "start_upload+part"])
def test_a_missing_bucket_raises_bucket_not_found(missing_bucket_store: ObjectStore, operation: str) -> None:
    store = missing_bucket_store

    async def call() -> Any:
        if operation == "put":
            return await store.put("k", b"1")
        if operation == "get":
            return await store.get("k")
        if operation == "get_range":
            return await store.get_range("k", 0, 1)
        if operation == "list_objects":
            return await store.list_objects("")
        upload = await store.start_upload("k")
        return await store.upload_part(upload, 1, 0, b"1")

    with pytest.raises(BucketNotFoundError) as caught:
        run(store, call())
    assert "no-such-bucket-here" in str(caught.value)


def test_exists_in_a_missing_bucket_raises_bucket_not_found(missing_bucket_store: ObjectStore) -> None:
    with pytest.raises(BucketNotFoundError):
        run(missing_bucket_store, missing_bucket_store.exists("k"))


_UNSAFE_KEYS = ["../x", "a/../../x", "/abs", "a//b", "./x", "a/%2e%2e/b", "c:/x", "s3://other/x"]


@pytest.mark.parametrize("key", _UNSAFE_KEYS)
def test_keys_outside_the_root_are_refused_before_any_request(store: ObjectStore, key: str) -> None:
    calls = [
        lambda: store.put(key, b"1"),
        lambda: store.put_pieces(key, [b"1", b"2"]),
        lambda: store.get(key),
        lambda: store.get_range(key, 0, 1),
        lambda: store.read_into(key, 0, memoryview(bytearray(1))),
        lambda: store.exists(key),
        lambda: store.delete(["fine", key]),
        lambda: store.start_upload(key),
        lambda: store.list_objects(key + "/"),
    ]
    before = store.counter.snapshot()
    for call in calls:
        with pytest.raises(UnsafeCheckpointError) as caught:
            run(store, call())
        assert repr(key) in str(caught.value)
    assert store.counter.snapshot() == before
