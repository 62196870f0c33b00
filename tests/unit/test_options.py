"""dcp_cloud.options.TransferOptions: defaults and the bounds on part and object sizes."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from dcp_cloud.options import MAX_PARTS, MIN_PART_SIZE, MiB, TransferOptions


def test_defaults_are_valid_and_within_the_bounds() -> None:
    options = TransferOptions()
    assert options.part_size >= MIN_PART_SIZE
    assert options.memory_budget >= 2 * options.part_size
    assert options.part_size <= options.object_size <= options.max_object_size
    assert options.max_object_size == options.part_size * MAX_PARTS


def test_the_smallest_valid_options() -> None:
    options = TransferOptions(
        part_size=MIN_PART_SIZE,
        memory_budget=2 * MIN_PART_SIZE,
        object_size=MIN_PART_SIZE,
        max_concurrency=1,
        max_attempts=1,
        coalesce_gap=0,
        retry_window=0,
    )
    assert options.max_object_size == MIN_PART_SIZE * 10_000


def test_largest_object_size_is_part_size_times_max_parts() -> None:
    TransferOptions(part_size=5 * MiB, object_size=5 * MiB * MAX_PARTS, memory_budget=10 * MiB)
    with pytest.raises(ValueError, match="object_size"):
        TransferOptions(part_size=5 * MiB, object_size=5 * MiB * MAX_PARTS + 1, memory_budget=10 * MiB)


@pytest.mark.parametrize(
    ("changes", "names"),
    [
        ({"part_size": MIN_PART_SIZE - 1}, "5 MiB"),
        ({"max_concurrency": 0}, "max_concurrency"),
        ({"memory_budget": 32 * MiB - 1}, "memory_budget"),
        ({"part_size": 8 * MiB, "memory_budget": 64 * MiB, "object_size": 8 * MiB - 1}, "object_size"),
        ({"deadline": 0}, "deadline"),
        ({"deadline": -1.0}, "deadline"),
        ({"retry_window": -0.1}, "retry_window"),
        ({"max_attempts": 0}, "max_attempts"),
        ({"coalesce_gap": -1}, "coalesce_gap"),
    ],
)
def test_invalid_options_are_refused_naming_the_option(changes: dict[str, Any], names: str) -> None:
    with pytest.raises(ValueError, match=names):
        TransferOptions(**changes)


def test_options_are_immutable() -> None:
    options = TransferOptions()
    with pytest.raises(dataclasses.FrozenInstanceError):
        options.part_size = MIN_PART_SIZE  # type: ignore[misc]
    assert dataclasses.replace(options, part_size=32 * MiB).part_size == 32 * MiB
