"""The store layer: bytes only.

One small async :class:`ObjectStore` protocol (put with parallel parts, ranged get, list,
delete, conditional put), one module per backend, and :func:`open_store`, the registry from URL
scheme or filesystem class to backend. Nothing here knows what a checkpoint or a tensor is.
"""

from __future__ import annotations

from ..urls import redact_url
from .base import MultipartUpload, ObjectInfo, ObjectStore, PendingUpload
from .registry import open_store

__all__ = ["MultipartUpload", "ObjectInfo", "ObjectStore", "PendingUpload", "open_store", "redact_url"]
