"""dcp_cloud.checkpoint.layout: the keys a checkpoint is made of, and the rank prefix strategies."""

from __future__ import annotations

import re
import string

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcp_cloud.checkpoint import layout
from dcp_cloud.checkpoint.confine import is_confined
from dcp_cloud.checkpoint.layout import HashPrefix, ReversedRankPrefix, rank_file_prefix
from dcp_cloud.store.keys import join

SAVE_ID = "save-20261122T200102Z-3f9a1c0b"


def test_metadata_keys() -> None:
    assert layout.metadata_key() == ".metadata"
    assert layout.metadata_key(7) == "__7.metadata"


def test_keys_of_one_save_live_under_its_save_id() -> None:
    assert layout.data_key(SAVE_ID, "__3_", 2) == f"{SAVE_ID}/__3_2.distcp"
    assert layout.data_key(SAVE_ID, "ab/__3_", 0) == f"{SAVE_ID}/ab/__3_0.distcp"
    assert layout.manifest_key(SAVE_ID) == f"{SAVE_ID}/manifest.json"
    assert layout.intent_key(SAVE_ID) == f"{SAVE_ID}/intent.json"
    for key in (
        layout.data_key(SAVE_ID, "__0_", 0),
        layout.manifest_key(SAVE_ID),
        layout.intent_key(SAVE_ID),
    ):
        assert layout.save_id_of_key(key) == SAVE_ID and is_confined(key)


def test_new_save_ids_are_strict_unique_and_time_sortable() -> None:
    ids = [layout.new_save_id() for _ in range(50)]
    assert all(layout.is_save_id(i) for i in ids)
    assert len(set(ids)) == len(ids)
    stamp = re.compile(r"^save-(\d{8}T\d{6}Z)-")
    stamps = [stamp.match(i).group(1) for i in ids]  # type: ignore[union-attr]
    assert stamps == sorted(stamps)


@pytest.mark.parametrize(
    "name",
    [
        "save-",
        "save-foo",
        "save-20261122T200102Z-3f9a1c0",  # 7 hex digits
        "save-20261122T200102Z-3F9A1C0B",  # upper case
        "save-20261122T200102-3f9a1c0b",  # no Z
        "Save-20261122T200102Z-3f9a1c0b",
        f"{SAVE_ID}/x",
        f" {SAVE_ID}",
        "step-100",
        "",
    ],
)
def test_only_the_exact_save_id_form_is_a_save_id(name: str) -> None:
    assert not layout.is_save_id(name)
    if "/" not in name:
        assert layout.save_id_of_key(f"{name}/__0_0.distcp") is None


def test_a_save_id_with_a_trailing_newline_is_not_a_save_id() -> None:
    assert not layout.is_save_id(f"{SAVE_ID}\n")
    assert layout.save_id_of_key(f"{SAVE_ID}\n/__0_0.distcp") is None


@pytest.mark.parametrize("key", [".metadata", "__0.metadata", SAVE_ID, "run/save-x/__0_0.distcp", ""])
def test_keys_outside_a_save_have_no_save_id(key: str) -> None:
    assert layout.save_id_of_key(key) is None


def test_join() -> None:
    assert join("", "a/b") == "a/b"
    assert join("bucket/run", "a/b") == "bucket/run/a/b"
    assert join("bucket/run/", ".metadata") == "bucket/run/.metadata"


@pytest.mark.parametrize("width", [0, 9, -1])
def test_hash_prefix_width_is_bounded(width: int) -> None:
    with pytest.raises(ValueError, match="1..8"):
        HashPrefix(width)


@pytest.mark.parametrize("width", [1, 2, 8])
def test_hash_prefix_is_a_stable_hex_folder(width: int) -> None:
    spread = HashPrefix(width)
    for rank in range(64):
        prefix = spread(rank)
        assert len(prefix) == width + 1 and prefix.endswith("/")
        assert set(prefix[:-1]) <= set(string.hexdigits.lower())
        assert prefix == HashPrefix(width)(rank)
    assert repr(spread) == f"HashPrefix({width})"


def test_hash_prefix_spreads_consecutive_ranks() -> None:
    prefixes = {HashPrefix(2)(rank) for rank in range(512)}
    assert len(prefixes) > 200  # of 256 possible


def test_reversed_rank_prefix() -> None:
    assert ReversedRankPrefix(4)(12) == "2100/"
    assert ReversedRankPrefix(2)(7) == "70/"
    assert [ReversedRankPrefix(4)(r)[0] for r in range(10)] == list("0123456789")
    for digits in (0, 13):
        with pytest.raises(ValueError, match="1..12"):
            ReversedRankPrefix(digits)


def test_rank_file_prefix() -> None:
    assert rank_file_prefix(3) == "__3_"
    assert rank_file_prefix(3, lambda r: "") == "__3_"
    assert rank_file_prefix(3, lambda r: "x") == "x/__3_"
    assert rank_file_prefix(12, ReversedRankPrefix(4)) == "2100/__12_"
    assert rank_file_prefix(5, HashPrefix(2)) == HashPrefix(2)(5) + "__5_"


@pytest.mark.parametrize("spread", ["/abs/", "../up/", "a/../b/", ".."])
def test_rank_file_prefix_refuses_prefixes_that_leave_the_save(spread: str) -> None:
    with pytest.raises(ValueError, match="plain relative folders"):
        rank_file_prefix(1, lambda r: spread)


@pytest.mark.parametrize("spread", ["./", "a//", "a\\b/"])
def test_rank_file_prefix_refuses_every_prefix_that_makes_an_unconfined_key(spread: str) -> None:
    with pytest.raises(ValueError):
        rank_file_prefix(1, lambda r: spread)


@given(st.text(alphabet="ab./\\%_-", max_size=12), st.integers(0, 10_000))
def test_accepted_hash_and_plain_prefixes_make_confined_keys(spread: str, rank: int) -> None:
    for strategy in (HashPrefix(3), ReversedRankPrefix(5), None):
        key = layout.data_key(SAVE_ID, rank_file_prefix(rank, strategy), 0)
        assert is_confined(key) and layout.save_id_of_key(key) == SAVE_ID
    try:
        prefix = rank_file_prefix(rank, lambda r: spread)
    except ValueError:
        return
    key = layout.data_key(SAVE_ID, prefix, 0)
    assert ".." not in key.split("/") and layout.save_id_of_key(key) == SAVE_ID


@pytest.mark.parametrize("name", [".metadata", "__0.metadata", "__12.metadata"])
def test_commit_markers_are_metadata_names(name: str) -> None:
    assert layout.is_metadata_name(name)
    assert layout.is_metadata_name(layout.metadata_key(12)) and layout.is_metadata_name(layout.METADATA_KEY)


@pytest.mark.parametrize(
    "name", ["metadata", ".metadata.bak", "__x.metadata", "__.metadata", "a/.metadata", "__1_0.distcp", ""]
)
def test_other_names_are_not_metadata_names(name: str) -> None:
    assert not layout.is_metadata_name(name)
