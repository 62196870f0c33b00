"""What the cloud stores share, held by composition: a bucket (or container) and a key prefix."""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any
from urllib.parse import unquote

from ..errors import BucketNotFoundError, StoreConfigError


@dataclass(frozen=True)
class BucketPath:
    """A store root on a cloud: the bucket (or container) and the key prefix inside it.

    Translates between keys relative to the root and object names in the bucket.
    """

    bucket: str
    prefix: str

    @classmethod
    def of(cls, fs: Any, url: str, root: str) -> BucketPath:
        """The bucket and prefix of ``root`` as the fsspec filesystem ``fs`` splits it;
        ``StoreConfigError`` for a root with ``.``/``..`` segments (``url`` names it)."""
        bucket, prefix, _ = fs.split_path(root)
        place = cls(bucket, prefix.strip("/"))
        _check_root(url, place.bucket, place.prefix)
        return place

    def full_key(self, key: str) -> str:
        """The object's name in the bucket."""
        return f"{self.prefix}/{key}" if self.prefix else key

    def relative_key(self, name: str) -> str:
        """The key relative to the store root of an object named ``name`` in the bucket."""
        return name[len(self.prefix) + 1 :] if self.prefix else name

    def listing_prefix(self, prefix: str) -> str:
        """The bucket-level prefix that lists the keys starting with ``prefix``."""
        if prefix:
            return self.full_key(prefix)
        return f"{self.prefix}/" if self.prefix else ""


async def delete_each(keys: list[str], delete_one: Callable[[str], Awaitable[None]]) -> None:
    """Delete ``keys`` concurrently, one request each (stores without a batch delete), ignoring
    objects that are already gone but not a missing bucket."""

    async def delete(key: str) -> None:
        try:
            await delete_one(key)
        except FileNotFoundError as exc:
            if isinstance(exc, BucketNotFoundError):
                raise

    await asyncio.gather(*(delete(k) for k in keys))


def _check_root(url: str, bucket: str, prefix: str) -> None:
    """Refuse a root whose bucket or prefix has ``.``/``..`` segments: HTTP clients resolve them
    in a URL path, which would move the root into another folder, bucket or container."""
    segments = [bucket, *prefix.split("/")] if prefix else [bucket]
    if any(unquote(segment) in (".", "..") for segment in segments) or "/" in bucket:
        raise StoreConfigError(
            f"{url}: the URL's bucket and path may not hold '.' or '..' segments; name the "
            "checkpoint's folder directly (for example s3://bucket/run1/step-100)."
        )
