"""Opening the right store for a URL: the registry from URL scheme or filesystem class to backend."""

from __future__ import annotations

import logging
import os
import re
import sys
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import fsspec
import fsspec.config
from fsspec import AbstractFileSystem

from ..errors import DcpCloudError, StoreConfigError, StoreUnavailableError
from ..urls import has_credentials, normalize_url, redact_url, scrub_text, secret_values, url_scheme
from .base import ObjectStore
from .filesystems import FILESYSTEMS, configuration_key, owned
from .fsspec_store import FsspecStore
from .local import LocalStore

_SCHEME_PREFIX = re.compile(r"^[a-zA-Z][a-zA-Z0-9+.-]*://")

logger = logging.getLogger("dcp_cloud")

#: makes a backend's store: (filesystem, URL as shown, root, max_concurrency, max_attempts)
StoreFactory = Callable[[Any, str, str, int, int], ObjectStore]
#: prepares a backend's storage_options in place: (options, max_concurrency, max_attempts)
OptionsHook = Callable[[dict[str, Any], int, int], None]


@dataclass(frozen=True)
class Backend:
    """One row of the registry: the fsspec filesystem class a store serves, the URL schemes
    that build such a filesystem, and how to prepare their options and make the store.

    The class is named by module and class name and looked up only in modules already
    imported, so matching a filesystem never imports s3fs, gcsfs or adlfs.
    """

    module: str
    class_name: str
    make: StoreFactory
    schemes: tuple[str, ...] = ()
    #: the dcp-cloud extra that installs the fsspec backend ("" when it comes with fsspec)
    extra: str = ""
    prepare: OptionsHook | None = None
    #: whether filesystems of this row are shared per process (see
    #: :mod:`dcp_cloud.store.filesystems`): async filesystems that run every request on
    #: fsspec's one I/O loop, so any thread may use them
    shared: bool = False

    def serves(self, filesystem: AbstractFileSystem) -> bool:
        """Whether ``filesystem`` is an instance of this row's class (subclasses included)."""
        cls = getattr(sys.modules.get(self.module), self.class_name, None)
        return isinstance(cls, type) and isinstance(filesystem, cls)


def _local_store(fs: Any, shown: str, root: str, max_concurrency: int, max_attempts: int) -> ObjectStore:
    return LocalStore(shown, root, max_concurrency)


def _s3_store(fs: Any, shown: str, root: str, max_concurrency: int, max_attempts: int) -> ObjectStore:
    from .s3 import S3Store

    _require_bucket(fs, shown, root, "bucket", "s3://BUCKET/PREFIX")
    return S3Store(fs, shown, root, max_concurrency, max_attempts)


def _gcs_store(fs: Any, shown: str, root: str, max_concurrency: int, max_attempts: int) -> ObjectStore:
    from .gcs import GCSStore

    _require_bucket(fs, shown, root, "bucket", "gs://BUCKET/PREFIX")
    return GCSStore(fs, shown, root, max_concurrency, max_attempts)


def _azure_store(fs: Any, shown: str, root: str, max_concurrency: int, max_attempts: int) -> ObjectStore:
    from .azure import AzureBlobStore

    _require_bucket(fs, shown, root, "container", "az://CONTAINER/PREFIX")
    return AzureBlobStore(fs, shown, root, max_concurrency, max_attempts)


def _fsspec_store(fs: Any, shown: str, root: str, max_concurrency: int, max_attempts: int) -> ObjectStore:
    return FsspecStore(fs, shown, root, max_concurrency)


def _require_bucket(fs: Any, shown: str, root: str, noun: str, form: str) -> None:
    if not fs.split_path(root)[0]:
        raise StoreConfigError(f"{shown}: the URL names no {noun}; use {form}")


#: botocore connection pool size of an S3 client, at least
S3_POOL_CONNECTIONS = 64


def _prepare_s3(options: dict[str, Any], max_concurrency: int, max_attempts: int) -> None:
    """Size botocore's connection pool for the concurrency and set its retries (see
    :mod:`dcp_cloud.store.s3` for who retries), unless the caller's ``config_kwargs`` say.

    The pool holds at least ``S3_POOL_CONNECTIONS``, so that writers and readers of different
    concurrency (32 and 16 by default) share one client: connections open only when used, and
    each store's own semaphore bounds its requests."""
    config = dict(options.get("config_kwargs") or {})
    config.setdefault("max_pool_connections", max(S3_POOL_CONNECTIONS, max_concurrency))
    config.setdefault("retries", {"mode": "standard", "total_max_attempts": max_attempts})
    options["config_kwargs"] = config


def _prepare_gcs(options: dict[str, Any], max_concurrency: int, max_attempts: int) -> None:
    _prepare_gcsfs(options)


#: The backends, first match wins; a filesystem no row serves gets the generic FsspecStore.
BACKENDS: tuple[Backend, ...] = (
    Backend("fsspec.implementations.local", "LocalFileSystem", _local_store, ("file", "local")),
    Backend("s3fs", "S3FileSystem", _s3_store, ("s3", "s3a"), "s3", _prepare_s3, shared=True),
    Backend("gcsfs", "GCSFileSystem", _gcs_store, ("gs", "gcs"), "gcs", _prepare_gcs, shared=True),
    Backend(
        "adlfs", "AzureBlobFileSystem", _azure_store, ("az", "abfs", "abfss", "adl"), "azure", shared=True
    ),
)
GENERIC = Backend("fsspec", "AbstractFileSystem", _fsspec_store)


def _backend_for(filesystem: AbstractFileSystem) -> Backend:
    """The registry row that serves ``filesystem`` (the generic store when none does)."""
    return next((backend for backend in BACKENDS if backend.serves(filesystem)), GENERIC)


def _backend_for_scheme(scheme: str) -> Backend | None:
    """The registry row whose filesystem a URL scheme builds, if one does."""
    return next((backend for backend in BACKENDS if scheme in backend.schemes), None)


def open_store(
    url: str | os.PathLike[str],
    storage_options: dict[str, Any] | None = None,
    filesystem: AbstractFileSystem | None = None,
    max_concurrency: int = 16,
    max_attempts: int = 10,
    deadline: float | None = None,
    retry_window: float | None = None,
) -> ObjectStore:
    """The store for ``url``: S3 via s3fs, local folders, or any other fsspec filesystem.

    ``max_attempts`` bounds the tries of each request (botocore's standard retry mode for S3);
    ``deadline`` bounds the seconds each request may take, its retries included;
    ``retry_window`` (None: the store's default) bounds the seconds after a request's first
    failure within which it is tried again.

    The URL is first put in normal form by :func:`dcp_cloud.urls.normalize_url`, the single rule
    for every store, so the keys used are the keys messages show:

    - credentials as URL user-info (``s3://KEY:SECRET@bucket/run``) are refused with a
      :class:`StoreConfigError` that tells you to pass them in ``storage_options`` or the
      store's environment variables; they are never echoed. Azure's
      ``abfs://container@account.dfs.core.windows.net/...`` is an authority, not user-info;
    - a query string (``?...``) is refused: SAS tokens and other options go in
      ``storage_options``;
    - ``.``, ``..`` and empty (``//``) path segments are refused on object stores, where they
      would become literal parts of keys; trailing ``/`` are dropped;
    - a local path (plain, ``file://``) is made absolute with :func:`os.path.abspath`.
    """
    local_paths = filesystem is None or _is_local(filesystem)
    url = normalize_url(url, local_paths)
    shown = redact_url(url)
    scheme = url_scheme(url)
    _check_endpoint(storage_options or {}, shown)
    if filesystem is None:
        filesystem, root = _make_filesystem(
            url, shown, scheme, storage_options, (max_concurrency, max_attempts)
        )
    else:
        _require_scheme_served(filesystem, url, scheme, shown)
        root = filesystem._strip_protocol(url)

    store = _backend_for(filesystem).make(filesystem, shown, root, max_concurrency, max_attempts)
    store.deadline = deadline
    if retry_window is not None:
        store.retry_window = retry_window
    return store


def _require_scheme_served(filesystem: AbstractFileSystem, url: str, scheme: str, shown: str) -> None:
    """Refuse a URL whose scheme the given filesystem does not serve (an S3 filesystem for a
    gs:// URL, a local one for s3://, which would make ``./s3:/bucket`` a local folder)."""
    protocol = filesystem.protocol
    protocols = (protocol,) if isinstance(protocol, str) else tuple(protocol)
    if _SCHEME_PREFIX.match(url) and scheme not in protocols:
        raise StoreConfigError(
            f"{shown}: the filesystem given ({type(filesystem).__name__}, for "
            f"{', '.join(p + '://' for p in protocols)}) does not serve {scheme}:// URLs; pass a "
            "filesystem for this URL's store, or none to have dcp_cloud open one"
        )


def _make_filesystem(
    url: str, shown: str, scheme: str, storage_options: dict[str, Any] | None, settings: tuple[int, int]
) -> tuple[AbstractFileSystem, str]:
    """The fsspec filesystem for ``url`` and the root path in it, with the backend's options
    prepared (``settings``: max_concurrency, max_attempts); errors of ours, scrubbed of secrets."""
    secrets = secret_values(storage_options or {})
    options = dict(storage_options or {})
    backend = _backend_for_scheme(scheme)
    if backend is not None and backend.prepare is not None:
        backend.prepare(options, *settings)
    try:
        if (
            backend is not None
            and backend.shared
            and "::" not in url
            and not options.get("skip_instance_cache")
        ):
            filesystem, root = _shared_filesystem(url, scheme, options)
        else:
            filesystem, root = fsspec.core.url_to_fs(url, **options)
    except ImportError as exc:
        hint = (
            f"pip install 'dcp-cloud[{backend.extra}]'"
            if backend is not None and backend.extra
            else f"install the fsspec backend for {scheme}://"
        )
        raise StoreConfigError(
            f"{shown}: the {scheme}:// backend is not installed ({scrub_text(str(exc), secrets)}). "
            f"Run: {hint}"
        ) from None
    except ValueError as exc:
        if "protocol" in str(exc).lower():
            raise StoreConfigError(
                f"{shown}: unknown URL scheme {scheme!r}. Use s3://, gs://, az://, abfs://, "
                "file://, memory://, a local path, or any scheme an installed fsspec backend "
                "provides."
            ) from None
        raise StoreConfigError(f"{shown}: {scrub_text(str(exc), secrets)}") from None
    except TypeError as exc:
        raise StoreConfigError(
            f"{shown}: storage_options were not accepted by the {scheme}:// backend "
            f"({scrub_text(str(exc), secrets)})"
        ) from None
    except Exception as exc:  # a backend that checks its credentials while it is built
        raise _setup_error(exc, shown, scheme, secrets) from None
    return filesystem, root


def _shared_filesystem(url: str, scheme: str, options: dict[str, Any]) -> tuple[AbstractFileSystem, str]:
    """The process's filesystem for this configuration (built on first use) and the root path
    in it: one client per endpoint, credentials and client settings, reused by every store.
    (Options with ``skip_instance_cache=True`` bypass this cache as they bypass fsspec's.)"""
    cls = fsspec.get_filesystem_class(scheme)
    # fsspec.config's defaults apply to every filesystem fsspec builds, so they are part of the
    # configuration; the copy is the cache's own, out of reach of the caller's later edits
    options = owned(fsspec.config.apply_config(cls, dict(options)))
    options.pop("skip_instance_cache", None)
    key, objects = configuration_key(cls, {"options": options, "from_url": cls._get_kwargs_from_urls(url)})

    def build() -> AbstractFileSystem:
        # fsspec's own cache is per thread; this one is per process, so it owns the instance
        filesystem: AbstractFileSystem = fsspec.core.url_to_fs(
            url, **{**options, "skip_instance_cache": True}
        )[0]
        return filesystem

    filesystem = FILESYSTEMS.get(key, [*objects, options], build)
    return filesystem, filesystem._strip_protocol(url)


def _check_endpoint(options: dict[str, Any], shown: str) -> None:
    """Refuse an ``endpoint_url`` that is not a string or that carries user-info credentials:
    clients either reject those late with an obscure error or send them on every request."""
    endpoint = options.get("endpoint_url")
    if endpoint is None:
        return
    if not isinstance(endpoint, str):
        raise StoreConfigError(
            f"{shown}: storage_options['endpoint_url'] must be a string such as "
            f"'http://127.0.0.1:9000', not {type(endpoint).__name__}"
        )
    if has_credentials(endpoint) or "?" in endpoint:
        raise StoreConfigError(
            f"{shown}: storage_options['endpoint_url'] ({redact_url(endpoint)}) carries "
            "credentials or a query string; give only scheme, host and port, and pass "
            "credentials as their own options (S3: key/secret) or environment variables."
        )


def _setup_error(exc: Exception, shown: str, scheme: str, secrets: list[str]) -> DcpCloudError:
    """A scrubbed error of ours for a backend that failed while it was being built."""
    text = scrub_text(f"{type(exc).__name__}: {exc}", secrets)
    if isinstance(exc, (ConnectionError, TimeoutError)) or "Connection" in type(exc).__name__:
        return StoreUnavailableError(
            f"{shown}: the {scheme}:// backend could not reach its service while starting "
            f"({text}). Check the network, the endpoint and the credentials in storage_options."
        )
    return StoreConfigError(
        f"{shown}: the {scheme}:// backend could not be set up with these storage_options "
        f"({text}). Check the credentials and options."
    )


def _is_local(filesystem: AbstractFileSystem) -> bool:
    from fsspec.implementations.local import LocalFileSystem

    return isinstance(filesystem, LocalFileSystem)


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
            redact_url(endpoint),
        )
