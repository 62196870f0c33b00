"""How a checkpoint maps onto object keys.

A checkpoint at ``<url>`` holds, relative to that prefix::

    .metadata                          DCP's pickled Metadata: the commit marker, written last
    __<rank>.metadata                  per-rank metadata when saved with use_collectives=False
    <save_id>/__<rank>_<n>.distcp      data objects of one save, packed torch.save items
    <save_id>/manifest.json            our manifest: sizes and CRC32C of every item
    <save_id>/intent.json              our intent record while the save runs: the data keys it
                                       will write and its lease (see dcp_cloud.checkpoint.ownership)

Every save writes its data under a fresh ``save_id``, so a save never overwrites bytes that a
committed ``.metadata`` points to. Keys are POSIX and relative, exactly what torch's
``FileSystemReader`` joins onto a local folder, so a downloaded checkpoint loads without us.
"""

from __future__ import annotations

import hashlib
import re
import secrets
import time
from collections.abc import Callable

from ..store.keys import key_problem

METADATA_KEY = ".metadata"
MANIFEST_NAME = "manifest.json"
INTENT_NAME = "intent.json"
DATA_SUFFIX = ".distcp"
SAVE_ID_PREFIX = "save-"
#: exactly what :func:`new_save_id` makes; a folder merely named ``save-...`` is not a save
_SAVE_ID = re.compile(r"save-\d{8}T\d{6}Z-[0-9a-f]{8}")
#: the commit markers: ``.metadata`` and rank-local ``__<rank>.metadata``
_METADATA_NAME = re.compile(r"^(?:\.metadata|__\d+\.metadata)$")


def metadata_key(rank: int | None = None) -> str:
    """Key of the metadata object; rank-local when ``rank`` is given (use_collectives=False)."""
    return METADATA_KEY if rank is None else f"__{rank}.metadata"


def is_metadata_name(name: str) -> bool:
    """Whether a file name is DCP's commit marker: ``.metadata`` or rank-local ``__N.metadata``."""
    return isinstance(name, str) and _METADATA_NAME.match(name) is not None


def new_save_id() -> str:
    """A save-unique, time-sortable id, e.g. ``save-20261122T200102Z-3f9a1c0b``."""
    stamp = time.strftime("%Y%m%dT%H%M%SZ", time.gmtime())
    return f"{SAVE_ID_PREFIX}{stamp}-{secrets.token_hex(4)}"


def is_save_id(name: str) -> bool:
    """Whether ``name`` has the exact form of a save id that :func:`new_save_id` makes."""
    return isinstance(name, str) and _SAVE_ID.fullmatch(name) is not None


def intent_key(save_id: str) -> str:
    """Key of the intent record a save writes before its first data object."""
    return f"{save_id}/{INTENT_NAME}"


def data_key(save_id: str, file_prefix: str, index: int) -> str:
    """Key of the ``index``-th data object that a rank writes in one save."""
    return f"{save_id}/{file_prefix}{index}{DATA_SUFFIX}"


def manifest_key(save_id: str) -> str:
    """Key of the manifest of one save."""
    return f"{save_id}/{MANIFEST_NAME}"


def save_id_of_key(key: str) -> str | None:
    """The save id a data or manifest key belongs to, or None for keys outside any save."""
    head, sep, _ = key.partition("/")
    if sep and is_save_id(head):
        return head
    return None


class HashPrefix:
    """Spreads ranks' data objects over ``16 ** width`` key prefixes by a hash of the rank.

    S3 scales request rates per key prefix; thousands of ranks writing under one prefix can
    draw ``503 SlowDown`` until S3 repartitions. ``HashPrefix(2)`` puts rank r's objects under
    ``<save_id>/<2 hex digits>/__r_0.distcp``.
    """

    def __init__(self, width: int = 2) -> None:
        if not 1 <= width <= 8:
            raise ValueError(f"HashPrefix width must be 1..8 hex digits, got {width}")
        self.width = width

    def __call__(self, rank: int) -> str:
        digest = hashlib.blake2b(str(rank).encode(), digest_size=4).hexdigest()
        return digest[: self.width] + "/"

    def __repr__(self) -> str:
        return f"HashPrefix({self.width})"


class ReversedRankPrefix:
    """Puts rank r's objects under its zero-padded rank number reversed (rank 12 -> ``2100/``):
    the fastest-changing digit comes first, so consecutive ranks land on different prefixes."""

    def __init__(self, digits: int = 4) -> None:
        if not 1 <= digits <= 12:
            raise ValueError(f"ReversedRankPrefix digits must be 1..12, got {digits}")
        self.digits = digits

    def __call__(self, rank: int) -> str:
        return f"{rank:0{self.digits}d}"[::-1] + "/"

    def __repr__(self) -> str:
        return f"ReversedRankPrefix({self.digits})"


def rank_file_prefix(rank: int, strategy: Callable[[int], str] | None = None) -> str:
    """The part of a data key between the save id and the object's index, for one rank."""
    spread = strategy(rank) if strategy is not None else ""
    if spread and not spread.endswith("/"):
        spread += "/"
    prefix = f"{spread}__{rank}_"
    problem = key_problem(prefix)
    if problem is not None:
        raise ValueError(
            f"key prefix {spread!r} for rank {rank} makes data keys start with {prefix!r}, which "
            f"{problem}; key_prefix must return plain relative folders such as 'ab/'"
        )
    return prefix
