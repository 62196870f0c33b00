"""Keys that come from a checkpoint's own files, confined to the checkpoint.

A checkpoint's ``.metadata`` locators, its manifest's object keys and its ``replaced`` list are
input from whoever could write to the store. Before any of them is read, written, deleted or
turned into a local path, :func:`confine_key` checks that it names an object inside the
checkpoint by the rule of :func:`dcp_cloud.store.keys.key_problem` (relative, normalized, no
``.``/``..`` segments, no scheme, drive, backslash or control character), and raises
:class:`UnsafeCheckpointError` naming the key and where it came from. Nothing is rewritten: a
key that is not already in that form is refused, so what is stored is what is used and what
messages show.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from ..errors import UnsafeCheckpointError
from ..store.keys import key_problem


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
