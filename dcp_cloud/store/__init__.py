"""Opening the right store for a URL."""

from __future__ import annotations

import logging
import os
import sys
from typing import Any

import fsspec
from fsspec import AbstractFileSystem

from ..errors import StoreConfigError
from ..urls import redact_url, url_scheme
from .base import MultipartUpload, ObjectInfo, ObjectStore, PendingUpload
from .fsspec_store import FsspecStore
from .local import LocalStore

logger = logging.getLogger("dcp_cloud")

__all__ = ["MultipartUpload", "ObjectInfo", "ObjectStore", "PendingUpload", "open_store", "redact_url"]

# The extra of dcp-cloud that installs each scheme's fsspec backend.
_EXTRAS = {
    "s3": "s3",
    "s3a": "s3",
    "gs": "gcs",
    "gcs": "gcs",
    "az": "azure",
    "abfs": "azure",
    "abfss": "azure",
    "adl": "azure",
}


def open_store(
    url: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    max_concurrency: int = 16,
    max_attempts: int = 10,
    deadline: float | None = None,
) -> ObjectStore:
    """The store for ``url``: S3 via s3fs, local folders, or any other fsspec filesystem.

    ``max_attempts`` bounds the tries of each request (botocore's standard retry mode for S3);
    ``deadline`` bounds the seconds each request may take, its retries included.
    """
    url = os.fspath(url)
    if not url:
        raise StoreConfigError("the checkpoint URL is empty; pass e.g. 's3://bucket/run1/step-100'")
    shown = redact_url(url)
    scheme = url_scheme(url)
    if filesystem is None:
        options = dict(storage_options or {})
        if scheme in ("s3", "s3a"):
            config = dict(options.get("config_kwargs") or {})
            config.setdefault("max_pool_connections", max(10, max_concurrency))
            config.setdefault("retries", {"mode": "standard", "total_max_attempts": max_attempts})
            options["config_kwargs"] = config
        if scheme in ("gs", "gcs"):
            _prepare_gcsfs(options)
        try:
            filesystem, root = fsspec.core.url_to_fs(url, **options)
        except ImportError as exc:
            extra = _EXTRAS.get(scheme)
            hint = (
                f"pip install 'dcp-cloud[{extra}]'"
                if extra
                else f"install the fsspec backend for {scheme}://"
            )
            raise StoreConfigError(
                f"{shown}: the {scheme}:// backend is not installed ({exc}). Run: {hint}"
            ) from exc
        except ValueError as exc:
            if "protocol" in str(exc).lower():
                raise StoreConfigError(
                    f"{shown}: unknown URL scheme {scheme!r}. Use s3://, gs://, az://, abfs://, "
                    "file://, memory://, a local path, or any scheme an installed fsspec backend "
                    "provides."
                ) from exc
            raise StoreConfigError(f"{shown}: {exc}") from exc
        except TypeError as exc:
            raise StoreConfigError(
                f"{shown}: storage_options were not accepted by the {scheme}:// backend ({exc})"
            ) from exc
    else:
        root = filesystem._strip_protocol(url)

    from fsspec.implementations.local import LocalFileSystem

    store: ObjectStore
    if isinstance(filesystem, LocalFileSystem):
        store = LocalStore(shown, root, max_concurrency)
    elif type(filesystem).__name__ == "S3FileSystem":
        from .s3 import S3Store

        bucket = filesystem.split_path(root)[0]
        if not bucket:
            raise StoreConfigError(f"{shown}: the URL names no bucket; use s3://BUCKET/PREFIX")
        store = S3Store(filesystem, shown, root, max_concurrency, max_attempts)
    elif _is_instance_of(filesystem, "gcsfs", "GCSFileSystem"):
        from .gcs import GCSStore

        if not filesystem.split_path(root)[0]:
            raise StoreConfigError(f"{shown}: the URL names no bucket; use gs://BUCKET/PREFIX")
        store = GCSStore(filesystem, shown, root, max_concurrency)
    elif _is_instance_of(filesystem, "adlfs", "AzureBlobFileSystem"):
        from .azure import AzureBlobStore

        if not filesystem.split_path(root)[0]:
            raise StoreConfigError(f"{shown}: the URL names no container; use az://CONTAINER/PREFIX")
        store = AzureBlobStore(filesystem, shown, root, max_concurrency, max_attempts)
    else:
        store = FsspecStore(filesystem, shown, root, max_concurrency)
    store.deadline = deadline
    return store


def _is_instance_of(filesystem: AbstractFileSystem, module: str, class_name: str) -> bool:
    """Whether ``filesystem`` is (a subclass of) ``module.class_name``, without importing it."""
    loaded = sys.modules.get(module)
    cls = getattr(loaded, class_name, None) if loaded is not None else None
    return isinstance(cls, type) and isinstance(filesystem, cls)


def _prepare_gcsfs(options: dict[str, Any]) -> None:
    """Switch off gcsfs's zonal-bucket probe for plain-HTTP endpoints (emulators).

    gcsfs reads GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT when it is imported; with it on, every request
    to an http:// endpoint first waits ~60 s on a gRPC probe that no emulator answers.
    """
    endpoint = str(options.get("endpoint_url") or os.environ.get("STORAGE_EMULATOR_HOST") or "")
    if not endpoint.startswith("http://"):
        return
    if "gcsfs" not in sys.modules:
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
    elif os.environ.get("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "true").lower() in ("true", "1"):
        logger.warning(
            "gcsfs was imported with GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT on; requests to the "
            "plain-HTTP endpoint %s may stall ~60 s each. Set GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false "
            "before importing gcsfs.",
            endpoint,
        )
