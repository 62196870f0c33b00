"""dcp_cloud.checkpoint.confine: the one check for keys that come from a checkpoint's own files."""

from __future__ import annotations

import posixpath
from typing import Any
from urllib.parse import unquote

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcp_cloud.checkpoint.confine import confine_key, confine_keys, is_confined
from dcp_cloud.errors import CorruptCheckpointError, DcpCloudError, UnsafeCheckpointError
from dcp_cloud.store.keys import MAX_KEY_LENGTH, key_problem

CONFINED = [
    ".metadata",
    "__0.metadata",
    "save-20261122T200102Z-3f9a1c0b/__0_0.distcp",
    "save-20261122T200102Z-3f9a1c0b/ab/__12_3.distcp",
    "a/b/c",
    "..x",  # a name that begins with dots is a name
    "x..",
    "a/.hidden",
    "a b/c%20d",
    "ünïcode/κλειδί",
    "x" * MAX_KEY_LENGTH,
]

NOT_CONFINED = [
    ("", "empty"),
    ("..", "'..'"),
    (".", "'.'"),
    ("../x", "'..'"),
    ("a/../../x", "'..'"),
    ("a/..", "'..'"),
    ("./x", "'.'"),
    ("a/./b", "'.'"),
    ("%2e%2e/x", "'%2e%2e'"),
    ("a/%2E%2e/x", "'%2E%2e'"),
    ("%2e/x", "'%2e'"),
    ("/etc/passwd", "absolute"),
    ("~/x", "absolute"),
    ("a//b", "empty path segment"),
    ("a/", "empty path segment"),
    ("a\\..\\b", "backslash"),
    ("..\\x", "backslash"),
    ("s3://other-bucket/x", "URL"),
    ("file:///etc/passwd", "URL"),
    ("c:/windows", "drive"),
    ("C:", "drive"),
    ("a\x00b", "control"),
    ("a\nb", "control"),
    ("a\x7f", "control"),
    ("x" * (MAX_KEY_LENGTH + 1), "longer than"),
    ("é" * (MAX_KEY_LENGTH // 2 + 1), "longer than"),  # counted in UTF-8 bytes
]


@pytest.mark.parametrize("key", CONFINED)
def test_confined_keys_pass_unchanged(key: str) -> None:
    assert key_problem(key) is None and is_confined(key)
    assert confine_key(key, "manifest.json") is key


@pytest.mark.parametrize(("key", "problem"), NOT_CONFINED)
def test_keys_that_may_leave_the_checkpoint_are_refused(key: str, problem: str) -> None:
    found = key_problem(key)
    assert found is not None and problem in found
    assert not is_confined(key)
    with pytest.raises(UnsafeCheckpointError) as caught:
        confine_key(key, "s3://b/ckpt/.metadata")
    message = str(caught.value)
    assert repr(key) in message and "s3://b/ckpt/.metadata" in message


@pytest.mark.parametrize("key", [None, 3, b"a/b", ["a"], {"a": 1}])
def test_non_string_keys_are_refused(key: Any) -> None:
    assert "not a string" in (key_problem(key) or "")
    with pytest.raises(UnsafeCheckpointError):
        confine_key(key, ".metadata")


def test_the_error_is_a_corrupt_checkpoint_and_a_dcp_cloud_error() -> None:
    with pytest.raises(CorruptCheckpointError) as caught:
        confine_key("../x", ".metadata")
    assert isinstance(caught.value, DcpCloudError)


def test_confine_keys_keeps_order_and_stops_at_the_first_bad_key() -> None:
    assert confine_keys(["b", "a", "c/d"], "m") == ["b", "a", "c/d"]
    with pytest.raises(UnsafeCheckpointError, match="'../x'"):
        confine_keys(["a", "../x", "/y"], "m")


_SEGMENT = st.text(alphabet=st.characters(codec="utf-8"), min_size=0, max_size=8)


@given(st.lists(_SEGMENT, min_size=1, max_size=6).map("/".join))
def test_a_confined_key_stays_inside_the_checkpoint(key: str) -> None:
    """Whatever a key looks like, if it passes, joining it onto a root can not leave the root."""
    if not is_confined(key):
        with pytest.raises(UnsafeCheckpointError):
            confine_key(key, "x")
        return
    joined = posixpath.normpath(posixpath.join("/root/ckpt", key))
    assert joined == f"/root/ckpt/{key}", (key, joined)
    assert all(unquote(segment) not in (".", "..") for segment in key.split("/"))
    assert (
        "\\" not in key and "://" not in key and len(key.encode("utf-8", "surrogatepass")) <= MAX_KEY_LENGTH
    )


@given(
    st.lists(
        st.sampled_from(["a", "..", ".", "", "%2e%2e", "%2E.", "b\\c", "~", "x:"]), min_size=1, max_size=5
    )
)
def test_keys_built_from_dangerous_segments(segments: list[str]) -> None:
    key = "/".join(segments)
    dangerous = any(s in ("..", ".", "", "%2e%2e", "%2E.") for s in segments) or "\\" in key
    dangerous = dangerous or key.startswith("~") or segments[0].endswith(":")
    assert is_confined(key) is not dangerous


@pytest.mark.parametrize("key", ["..%2F..%2Fx", "a/..%2fsecret", "%2e%2e%2Fx"])
def test_percent_encoded_slashes_do_not_hide_dot_dot_segments(key: str) -> None:
    assert not is_confined(key)
