"""How a rank's bytes are cut into parts and data objects (dcp_cloud.save.sizing)."""

from __future__ import annotations

import pytest

from dcp_cloud import CloudStorageWriter
from dcp_cloud.options import MAX_PARTS, MIN_PART_SIZE
from dcp_cloud.save.sizing import save_sizes

MiB = 1024 * 1024
GiB = 1024 * MiB


def _defaults(total: int, concurrency: int = 64, **given: int) -> tuple[int, int]:
    sizes = save_sizes(
        total,
        part_size=given.get("part_size", 16 * MiB),
        object_size=given.get("object_size", 128 * MiB),
        max_concurrency=concurrency,
        part_size_given="part_size" in given,
        object_size_given="object_size" in given,
    )
    return sizes.part_size, sizes.object_size


@pytest.mark.parametrize("total", [0, 1, 3 * MiB, 40 * MiB, 256 * MiB, 700 * MiB, GiB, 8 * GiB, 10**13])
@pytest.mark.parametrize("concurrency", [1, 8, 32, 64, 500])
def test_sizes_stay_within_what_s3_accepts(total: int, concurrency: int) -> None:
    part, obj = _defaults(total, concurrency)
    assert MIN_PART_SIZE <= part <= 16 * MiB and part % MiB == 0
    assert part <= obj <= 128 * MiB and obj <= part * MAX_PARTS
    assert obj % part == 0 or obj == 128 * MiB


def test_small_ranks_get_smaller_parts_so_every_connection_has_one() -> None:
    assert _defaults(256 * MiB, concurrency=64) == (5 * MiB, 35 * MiB)  # 52 parts, 8 objects
    assert _defaults(512 * MiB, concurrency=64) == (8 * MiB, 64 * MiB)  # a part per connection
    assert _defaults(GiB, concurrency=64) == (16 * MiB, 128 * MiB)  # the defaults from here on
    assert _defaults(64 * GiB, concurrency=64) == (16 * MiB, 128 * MiB)
    assert _defaults(GiB, concurrency=16) == (16 * MiB, 128 * MiB)
    assert _defaults(GiB, concurrency=128) == (8 * MiB, 128 * MiB)
    assert _defaults(512 * MiB, concurrency=16) == (16 * MiB, 64 * MiB)


@pytest.mark.parametrize(
    ("total", "concurrency", "sizes_mib"),
    [
        (16 * MiB, 64, (5, 5)),  # four objects of one part: a PUT each, side by side
        (100 * MiB, 64, (5, 5)),
        (159 * MiB, 64, (5, 5)),  # 32 parts at most: an eighth of it is under four parts
        (160 * MiB, 64, (5, 20)),  # from here an eighth is at least four parts
        (256 * MiB, 8, (16, 16)),  # a server on this machine: 8 connections
        (511 * MiB, 8, (16, 16)),
        (512 * MiB, 8, (16, 64)),
    ],
)
def test_an_object_is_one_part_or_at_least_four(
    total: int, concurrency: int, sizes_mib: tuple[int, int]
) -> None:
    part, obj = _defaults(total, concurrency)
    assert (part // MiB, obj // MiB) == sizes_mib
    assert obj == part or obj >= 4 * part


def test_sizes_the_caller_gave_are_kept() -> None:
    assert _defaults(256 * MiB, part_size=16 * MiB) == (16 * MiB, 16 * MiB)  # 16 objects
    assert _defaults(GiB, part_size=16 * MiB) == (16 * MiB, 128 * MiB)
    assert _defaults(256 * MiB, object_size=64 * MiB) == (5 * MiB, 64 * MiB)
    assert _defaults(256 * MiB, part_size=6 * MiB, object_size=6 * MiB) == (6 * MiB, 6 * MiB)


def test_a_given_object_size_keeps_parts_within_the_part_limit() -> None:
    part, obj = _defaults(256 * MiB, object_size=100 * GiB, part_size=16 * MiB)
    assert obj == 100 * GiB and part * MAX_PARTS >= obj


def test_one_part_objects_follow_the_part() -> None:
    sizes = save_sizes(
        256 * MiB,
        part_size=16 * MiB,
        object_size=128 * MiB,
        max_concurrency=64,
        part_size_given=False,
        object_size_given=False,
        one_part_objects=True,
    )
    assert sizes.part_size == sizes.object_size == 5 * MiB


def test_writer_applies_the_sizes_only_to_stores_that_upload_parts(tmp_path: object) -> None:
    memory = CloudStorageWriter("memory://sizing/ckpt")
    assert memory.options.max_concurrency == 64
    assert memory.sizes_for(256 * MiB).part_size == 5 * MiB
    assert (
        CloudStorageWriter("memory://sizing/ckpt", part_size=16 * MiB).sizes_for(256 * MiB).part_size
        == 16 * MiB
    )
    local = CloudStorageWriter(str(tmp_path))
    assert local.sizes_for(256 * MiB).part_size == 16 * MiB  # local files write in place


@pytest.mark.parametrize(
    ("endpoint", "local"),
    [
        ("http://127.0.0.1:9000", True),
        ("http://127.8.0.1", True),
        ("http://localhost:4566", True),
        ("http://[::1]:9000", True),
        ("https://s3.us-east-1.amazonaws.com", False),
        ("http://10.0.0.5:9000", False),
        ("http://localhost.example.com", False),
        ("the store's endpoint", False),
        ("", False),
    ],
)
def test_loopback_endpoints_are_on_this_machine(endpoint: str, local: bool) -> None:
    from dcp_cloud.store.base import is_loopback_endpoint

    assert is_loopback_endpoint(endpoint) is local
