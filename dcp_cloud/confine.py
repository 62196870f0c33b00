"""Keys that come from a checkpoint's own files, confined to the checkpoint.

A checkpoint's ``.metadata`` locators, its manifest's object keys and its ``replaced`` list are
input from whoever could write to the store. Before any of them is read, written, deleted or
turned into a local path, :func:`confine_key` checks that it names an object inside the
checkpoint: relative, normalized, no ``.``/``..`` segments (plain or percent-encoded), no empty
segments, no scheme, drive or other bucket, no backslashes or control characters. Nothing is
rewritten: a key that is not already in that form is refused, so what is stored is what is used
and what messages show.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from .errors import UnsafeCheckpointError

#: longest key accepted from a checkpoint's files (S3's own limit is 1024 bytes for a whole name)
MAX_KEY_LENGTH = 1024

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")


def key_problem(key: Any) -> str | None:
    """Why ``key`` is not a confined relative key, or None when it is one."""
    if not isinstance(key, str):
        return f"is a {type(key).__name__}, not a string"
    if not key:
        return "is empty"
    if len(key.encode("utf-8", "surrogatepass")) > MAX_KEY_LENGTH:
        return f"is longer than {MAX_KEY_LENGTH} bytes"
    if _CONTROL.search(key):
        return "holds a control character"
    if "\\" in key:
        return "holds a backslash"
    if "://" in key:
        return "names a URL, not a key inside the checkpoint"
    if key.startswith("/") or key.startswith("~"):
        return "is an absolute path"
    segments = key.split("/")
    if segments[0].endswith(":"):
        return "starts with a drive or scheme"
    for segment in segments:
        if segment == "":
            return "has an empty path segment"
        if unquote(segment) in (".", ".."):
            return f"has a {segment!r} segment"
    # a client or server that percent-decodes keys must not find a traversal either
    decoded = unquote(key)
    if decoded != key:
        if "\\" in decoded or decoded.startswith("/") or _CONTROL.search(decoded):
            return "holds a percent-encoded separator or control character that escapes the checkpoint"
        if any(part in (".", "..") for part in decoded.split("/")):
            return "has a percent-encoded '.' or '..' segment"
    return None


def confine_key(key: Any, where: str) -> str:
    """``key`` itself if it names an object inside the checkpoint, else
    :class:`UnsafeCheckpointError` naming the key and where it came from."""
    problem = key_problem(key)
    if problem is not None:
        raise UnsafeCheckpointError(
            f"{where} names the key {key!r}, which {problem}: a checkpoint's own files may only "
            "name objects inside that checkpoint. It was not used; the checkpoint may have been "
            "crafted, so do not load it from a store you do not trust."
        )
    return key


def confine_keys(keys: Iterable[Any], where: str) -> list[str]:
    """Every key confined (see :func:`confine_key`), in order."""
    return [confine_key(key, where) for key in keys]


def is_confined(key: Any) -> bool:
    """Whether ``key`` would pass :func:`confine_key`."""
    return key_problem(key) is None
