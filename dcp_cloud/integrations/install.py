"""``install()``: cloud checkpoint URLs in plain ``dcp.save`` / ``dcp.async_save`` / ``dcp.load``.

DCP picks a storage layer for a call that gives ``checkpoint_id`` and no
``storage_writer``/``storage_reader`` in ``torch.distributed.checkpoint._storage_utils._storage_setup``
(imported by name into ``state_dict_saver`` and ``state_dict_loader``); a cloud URL falls through
to torch's ``FsspecWriter``/``FsspecReader``. :func:`install` puts a small wrapper in those three
places: for a URL whose scheme is in :data:`CLOUD_SCHEMES` it builds a
:class:`~dcp_cloud.CloudStorageWriter` or :class:`~dcp_cloud.CloudStorageReader` with the
defaults given to :func:`install`; anything else goes to torch's own function unchanged.

``async_save`` is wrapped too: it hands ``checkpoint_id`` to an executor that may save in another
process (``AsyncCheckpointerType.PROCESS``), where no hook is installed, so for a cloud URL the
writer is built in the caller and passed on as ``storage_writer``.
"""

from __future__ import annotations

import functools
import inspect
import os
import threading
from collections.abc import Callable
from typing import Any

#: URL schemes that :func:`install` routes to dcp_cloud: S3 (``s3a`` is Hadoop's name for it),
#: GCS and Azure Blob / ADLS Gen2.
CLOUD_SCHEMES = frozenset({"s3", "s3a", "gs", "gcs", "az", "abfs", "abfss"})

_lock = threading.Lock()
#: (module, attribute name, torch's original, our hook) for each place a hook was put
_patched: list[tuple[Any, str, Any, Any]] = []
_writer_defaults: dict[str, Any] = {}
_reader_defaults: dict[str, Any] = {}
#: fsspec protocols whose listing cache install() switched off (and uninstall() restores)
_uncached: list[str] = []
#: fsspec's protocol names for the clouds of CLOUD_SCHEMES (s3fs, gcsfs, adlfs)
_CLOUD_PROTOCOLS = ("s3", "s3a", "gs", "gcs", "az", "abfs", "abfss")


def cloud_url(checkpoint_id: object) -> str | None:
    """``checkpoint_id`` as a string when it is a URL with one of :data:`CLOUD_SCHEMES`, else None."""
    if not isinstance(checkpoint_id, (str, os.PathLike)):
        return None
    text = os.fspath(checkpoint_id)
    if not isinstance(text, str):
        return None
    scheme, sep, _ = text.partition("://")
    return text if sep and scheme.lower() in CLOUD_SCHEMES else None


def _accepted(cls: type) -> frozenset[str]:
    """The keyword arguments ``cls`` takes besides the URL."""
    return frozenset(inspect.signature(cls).parameters) - {"url"}


def _split_defaults(defaults: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """``defaults`` split into the writer's and the reader's keyword arguments, each checked by
    building one (stores open lazily, so nothing is contacted)."""
    from ..load.reader import CloudStorageReader
    from ..save.writer import CloudStorageWriter

    writer_keys, reader_keys = _accepted(CloudStorageWriter), _accepted(CloudStorageReader)
    unknown = sorted(set(defaults) - writer_keys - reader_keys)
    if unknown:
        raise TypeError(
            f"dcp_cloud.install() got unknown option(s) {', '.join(unknown)}; it takes the keyword "
            f"arguments of CloudStorageWriter ({', '.join(sorted(writer_keys))}) and "
            f"CloudStorageReader ({', '.join(sorted(reader_keys))})"
        )
    writer = {k: v for k, v in defaults.items() if k in writer_keys}
    reader = {k: v for k, v in defaults.items() if k in reader_keys}
    probe = "memory://dcp-cloud-install-check/ckpt"
    CloudStorageWriter(probe, **writer)
    CloudStorageReader(probe, **reader)
    return writer, reader


def _installed_defaults(reader: bool) -> dict[str, Any] | None:
    """The installed reader (or writer) options, or None when :func:`install` is not in effect
    (a hook still called after :func:`uninstall`: a reference held elsewhere, a call in flight)."""
    with _lock:
        if not _patched:
            return None
        return _reader_defaults if reader else _writer_defaults


def make_storage(checkpoint_id: str, reader: bool, defaults: dict[str, Any]) -> Any:
    """The dcp_cloud writer (or reader) for ``checkpoint_id``, built with ``defaults``."""
    from ..load.reader import CloudStorageReader
    from ..save.writer import CloudStorageWriter

    storage: Any
    if reader:
        storage = CloudStorageReader(checkpoint_id, **defaults)
    else:
        storage = CloudStorageWriter(checkpoint_id, **defaults)
    storage.reset(checkpoint_id)
    return storage


def _hook_storage_setup(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def _storage_setup(storage: Any, checkpoint_id: Any, reader: bool = False) -> Any:
        url = None if storage else cloud_url(checkpoint_id)
        defaults = None if url is None else _installed_defaults(reader)
        if url is None or defaults is None:
            return original(storage, checkpoint_id, reader=reader)
        return make_storage(url, reader, defaults)

    return _storage_setup


def _hook_async_save(original: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(original)
    def async_save(*args: Any, **kwargs: Any) -> Any:
        bound = inspect.signature(original).bind_partial(*args, **kwargs)
        url = cloud_url(bound.arguments.get("checkpoint_id"))
        defaults = None if url is None else _installed_defaults(reader=False)
        if url is not None and defaults is not None and bound.arguments.get("storage_writer") is None:
            bound.arguments["storage_writer"] = make_storage(url, False, defaults)
        return original(*bound.args, **bound.kwargs)

    return async_save


def _targets() -> list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]]:
    """Where the hooks go: (module, attribute, wrapper factory). Raises when torch's layout is
    not the one this hook was written for, rather than hooking half of it."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import _storage_utils, state_dict_loader, state_dict_saver

    places: list[tuple[Any, str, Callable[[Callable[..., Any]], Callable[..., Any]]]] = [
        (_storage_utils, "_storage_setup", _hook_storage_setup),
        (state_dict_saver, "_storage_setup", _hook_storage_setup),
        (state_dict_loader, "_storage_setup", _hook_storage_setup),
        (state_dict_saver, "async_save", _hook_async_save),
        (dcp, "async_save", _hook_async_save),
    ]
    for module, name, _ in places:
        if not callable(getattr(module, name, None)):
            raise RuntimeError(
                f"dcp_cloud.install(): {module.__name__}.{name} is missing in this torch "
                f"(torch {_torch_version()}); DCP's storage auto-detection has changed. Pass "
                "storage_writer=CloudStorageWriter(url) / storage_reader=CloudStorageReader(url) "
                "explicitly, and report the torch version to dcp_cloud."
            )
    params = list(inspect.signature(_storage_utils._storage_setup).parameters)
    if params[:3] != ["storage", "checkpoint_id", "reader"]:
        raise RuntimeError(
            f"dcp_cloud.install(): torch {_torch_version()} changed _storage_setup's signature to "
            f"{params}; pass storage_writer/storage_reader explicitly instead of install()."
        )
    return places


def _torch_version() -> str:
    import torch

    return str(torch.__version__)


def install(**defaults: Any) -> None:
    """Route DCP calls with a cloud ``checkpoint_id`` and no storage writer/reader to dcp_cloud.

    Afterwards ``dcp.save``, ``dcp.async_save`` and ``dcp.load`` (and every framework that calls
    them with ``checkpoint_id=url``) save to and load from ``s3://``, ``s3a://``, ``gs://``,
    ``gcs://``, ``az://``, ``abfs://`` and ``abfss://`` URLs with
    :class:`~dcp_cloud.CloudStorageWriter` / :class:`~dcp_cloud.CloudStorageReader`. Local paths,
    other schemes and calls that pass their own ``storage_writer``/``storage_reader`` keep
    torch's behaviour.

    Args:
        **defaults: keyword arguments for the writers and readers it builds, e.g.
            ``storage_options={"endpoint_url": ...}``, ``part_size``, ``max_concurrency``
            (both classes), ``overwrite``, ``object_size`` (writer only), ``verify_checksums``
            (reader only). Each class gets the ones it accepts. Without them, each cloud's
            standard credential chain and environment apply.

    Frameworks list, check and purge checkpoint folders through their own fsspec filesystem
    while dcp_cloud writes the checkpoints with its own client, so a cached listing would hide
    new checkpoints from them. Unless fsspec's configuration already says otherwise for a
    protocol, ``install()`` sets ``use_listings_cache=False`` for the cloud protocols in
    ``fsspec.config.conf`` (filesystems created afterwards list afresh); ``uninstall()``
    restores it.

    Idempotent: calling it again replaces the defaults and hooks nothing twice.

    Raises:
        TypeError: an option neither class accepts.
        ValueError, StoreConfigError: an option value either class refuses.
        RuntimeError: this torch's DCP internals are not the ones the hook supports (nothing is
            hooked then).
    """
    global _writer_defaults, _reader_defaults
    writer, reader = _split_defaults(dict(defaults))
    with _lock:
        _writer_defaults, _reader_defaults = writer, reader
        if _patched:
            return
        for module, name, make_hook in _targets():
            original = getattr(module, name)
            hook = make_hook(original)
            _patched.append((module, name, original, hook))
            setattr(module, name, hook)
        _disable_listing_caches()


def uninstall() -> None:
    """Undo :func:`install`: DCP's own storage auto-detection again. Does nothing when not
    installed. A place someone else re-patched after :func:`install` is left as they set it."""
    global _writer_defaults, _reader_defaults
    with _lock:
        while _patched:
            module, name, original, hook = _patched.pop()
            if getattr(module, name, None) is hook:
                setattr(module, name, original)
        _writer_defaults, _reader_defaults = {}, {}
        _restore_listing_caches()


def _disable_listing_caches() -> None:
    import fsspec.config

    for protocol in _CLOUD_PROTOCOLS:
        options = fsspec.config.conf.setdefault(protocol, {})
        if "use_listings_cache" not in options:
            options["use_listings_cache"] = False
            _uncached.append(protocol)


def _restore_listing_caches() -> None:
    import fsspec.config

    while _uncached:
        protocol = _uncached.pop()
        options = fsspec.config.conf.get(protocol, {})
        if options.get("use_listings_cache") is False:
            del options["use_listings_cache"]
        if not options:
            fsspec.config.conf.pop(protocol, None)


def is_installed() -> bool:
    """Whether :func:`install` is in effect."""
    return bool(_patched)
