"""The rule for a safe relative key, and how a key joins a store's root.

A key is safe when it names an object inside a root however a client library or server treats
it: relative, normalized, no ``.``/``..`` segments (plain or percent-encoded), no empty
segments, no scheme, drive or other bucket, no backslashes or control characters, at most
:data:`MAX_KEY_LENGTH` bytes. Nothing is rewritten: a key not already in that form is refused.
Every store operation applies this rule (:func:`dcp_cloud.store.base.check_key`), and so does
every check of keys that come from a checkpoint's own files
(:mod:`dcp_cloud.checkpoint.confine`).
"""

from __future__ import annotations

import re
from typing import Any
from urllib.parse import unquote

#: longest key accepted (S3's own limit is 1024 bytes for a whole name)
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


def join(root: str, key: str) -> str:
    """Join a store root path and a relative key."""
    if not root:
        return key
    return f"{root.rstrip('/')}/{key}"
