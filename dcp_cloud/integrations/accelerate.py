"""HF accelerate: FSDP ``SHARDED_STATE_DICT`` checkpoints on an object store.

accelerate's FSDP checkpoint functions (``accelerate.utils.fsdp_utils.save_fsdp_model``,
``save_fsdp_optimizer``, ``load_fsdp_model``, ``load_fsdp_optimizer``, which
``Accelerator.save_state``/``load_state`` and the Transformers Trainer call) create a local folder
with ``os.makedirs`` and pass ``dist_cp.FileSystemWriter(ckpt_dir)`` /
``dist_cp.FileSystemReader(ckpt_dir)`` to DCP, so neither a URL nor :func:`dcp_cloud.install`
reaches them. This module redirects those two names::

    from dcp_cloud.integrations import accelerate as dcp_accelerate

    dcp_accelerate.save_state(accelerator, "s3://bucket/run1/step-1000")
    dcp_accelerate.load_state(accelerator, "s3://bucket/run1/step-1000")

:func:`save_state` runs ``accelerator.save_state`` on a private local folder while
:func:`redirect` sends every DCP folder accelerate writes in it (``pytorch_model_fsdp_<i>``,
``optimizer_<i>``) to the same relative path under the URL through
:class:`~dcp_cloud.CloudStorageWriter`; then each rank uploads the small files accelerate wrote
there itself (RNG states, schedulers, samplers, custom objects). :func:`load_state` downloads those
small files and loads the DCP folders from the URL with :class:`~dcp_cloud.CloudStorageReader`.

:func:`redirect` alone serves code that saves to a local folder of its own (e.g. a Trainer's
``output_dir``): only the DCP folders go to the object store, everything else stays local.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ..errors import UnsafeCheckpointError
from ..load.reader import CloudStorageReader
from ..save.writer import CloudStorageWriter
from ..store import open_store
from ..urls import redact_url
from .install import _accepted

if TYPE_CHECKING:
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

__all__ = ["load_state", "redirect", "save_state"]


@dataclass(frozen=True)
class _Route:
    root: str  # absolute local folder
    url: str
    writer_options: dict[str, Any] = field(default_factory=dict)
    reader_options: dict[str, Any] = field(default_factory=dict)

    def target(self, path: str | os.PathLike[str]) -> str | None:
        """The URL for local ``path`` when it is ``root`` or inside it, else None."""
        relative = os.path.relpath(os.path.abspath(os.fspath(path)), self.root)
        if relative == os.curdir:
            return self.url
        if relative == os.pardir or relative.startswith(os.pardir + os.sep) or os.path.isabs(relative):
            return None
        return f"{self.url}/{Path(relative).as_posix()}"


_lock = threading.Lock()
_routes: list[_Route] = []
_originals: dict[str, Any] = {}


def _find(path: Any) -> tuple[_Route, str] | None:
    if not isinstance(path, (str, os.PathLike)):
        return None
    with _lock:
        routes = list(_routes)
    for route in reversed(routes):  # the innermost redirect wins
        url = route.target(path)
        if url is not None:
            return route, url
    return None


def _routing_classes() -> tuple[type[FileSystemWriter], type[FileSystemReader]]:
    """Subclasses of torch's FileSystemWriter/Reader whose constructor returns a dcp_cloud
    writer/reader for a path under a redirected folder, and torch's own class otherwise."""
    from torch.distributed.checkpoint import FileSystemReader, FileSystemWriter

    class RoutedFileSystemWriter(FileSystemWriter):
        def __new__(cls, path: Any, *args: Any, **kwargs: Any) -> Any:
            found = _find(path)
            if found is None:
                return FileSystemWriter(path, *args, **kwargs)
            route, url = found
            return CloudStorageWriter(url, **route.writer_options)

    class RoutedFileSystemReader(FileSystemReader):
        def __new__(cls, path: Any, *args: Any, **kwargs: Any) -> Any:
            found = _find(path)
            if found is None:
                return FileSystemReader(path, *args, **kwargs)
            route, url = found
            return CloudStorageReader(url, **route.reader_options)

    return RoutedFileSystemWriter, RoutedFileSystemReader


def _split_options(options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    writer_keys, reader_keys = _accepted(CloudStorageWriter), _accepted(CloudStorageReader)
    unknown = sorted(set(options) - writer_keys - reader_keys)
    if unknown:
        raise TypeError(
            f"unknown option(s) {', '.join(unknown)}: pass keyword arguments of CloudStorageWriter "
            "or CloudStorageReader (e.g. storage_options, part_size, max_concurrency)"
        )
    return (
        {k: v for k, v in options.items() if k in writer_keys},
        {k: v for k, v in options.items() if k in reader_keys},
    )


@contextlib.contextmanager
def redirect(local_dir: str | os.PathLike[str], url: str, **options: Any) -> Iterator[None]:
    """Within the block, ``torch.distributed.checkpoint.FileSystemWriter(path)`` and
    ``FileSystemReader(path)`` for a ``path`` inside ``local_dir`` build a
    :class:`~dcp_cloud.CloudStorageWriter` / :class:`~dcp_cloud.CloudStorageReader` for the same
    relative path under ``url`` instead (``<local_dir>/optimizer_0`` -> ``<url>/optimizer_0``).

    That is how accelerate's FSDP checkpoint functions pick their storage. Other paths get
    torch's classes unchanged; constructor arguments besides the path are ignored for redirected
    paths (``options`` apply instead). Nested and concurrent redirects are allowed (the innermost
    matching one wins); torch's names are restored when the last one ends.

    Args:
        local_dir: the folder accelerate is given (``save_state``/``load_state``'s directory, a
            Trainer's ``output_dir``).
        url: where its DCP folders go, e.g. ``"s3://bucket/run1/step-1000"``.
        **options: keyword arguments for the writer and reader (``storage_options``,
            ``part_size``, ``max_concurrency``, ``verify_checksums``, ...).
    """
    import torch.distributed.checkpoint as dist_cp

    writer_options, reader_options = _split_options(options)
    CloudStorageWriter(url, **writer_options)  # a bad URL or option fails here, not mid-save
    route = _Route(os.path.abspath(os.fspath(local_dir)), url.rstrip("/"), writer_options, reader_options)
    with _lock:
        if not _routes:
            writer_cls, reader_cls = _routing_classes()
            _originals["FileSystemWriter"] = dist_cp.FileSystemWriter
            _originals["FileSystemReader"] = dist_cp.FileSystemReader
            dist_cp.FileSystemWriter = writer_cls  # type: ignore[misc]
            dist_cp.FileSystemReader = reader_cls  # type: ignore[misc]
        _routes.append(route)
    try:
        yield
    finally:
        with _lock:
            _routes.remove(route)
            if not _routes:
                dist_cp.FileSystemWriter = _originals.pop("FileSystemWriter")  # type: ignore[misc]
                dist_cp.FileSystemReader = _originals.pop("FileSystemReader")  # type: ignore[misc]


def _check_accelerator(accelerator: Any) -> None:
    if getattr(getattr(accelerator, "project_configuration", None), "automatic_checkpoint_naming", False):
        raise ValueError(
            "dcp_cloud's accelerate save_state/load_state need the checkpoint URL: "
            "ProjectConfiguration(automatic_checkpoint_naming=True) makes accelerate pick a local "
            "folder itself; turn it off and pass a URL per checkpoint (e.g. .../step-<N>)"
        )


def save_state(accelerator: Any, url: str, **options: Any) -> str:
    """``accelerator.save_state()`` to ``url``: FSDP sharded model and optimizer states through
    :class:`~dcp_cloud.CloudStorageWriter` (``<url>/pytorch_model_fsdp_<i>``,
    ``<url>/optimizer_<i>``), the other files accelerate writes (RNG states, schedulers, samplers,
    custom objects) uploaded next to them by the rank that wrote them. Collective: every rank
    calls it with the same ``url``; it returns when every rank's files are stored.

    ``options`` go to the writer (``storage_options``, ``part_size``, ...); keyword arguments of
    ``accelerator.save_state`` itself go in ``save_kwargs={...}``. Returns ``url``.
    """
    _check_accelerator(accelerator)
    save_kwargs = options.pop("save_kwargs", {})
    writer_options, _ = _split_options(options)
    store = open_store(url, writer_options.get("storage_options"), writer_options.get("filesystem"))
    staging = tempfile.mkdtemp(prefix="dcp-cloud-accelerate-")
    try:
        with redirect(staging, url, **options):
            accelerator.save_state(staging, **save_kwargs)
        for path in sorted(Path(staging).rglob("*")):
            if path.is_file():
                key = path.relative_to(staging).as_posix()
                store.run(store.put(key, path.read_bytes()))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    accelerator.wait_for_everyone()
    return url


def load_state(accelerator: Any, url: str, **options: Any) -> None:
    """``accelerator.load_state()`` from ``url`` (written by :func:`save_state`): the FSDP
    sharded states through :class:`~dcp_cloud.CloudStorageReader`, the other files downloaded
    from the top level of ``url`` into a private local folder first. Collective.

    ``options`` go to the reader (``storage_options``, ``verify_checksums``, ...); keyword
    arguments of ``accelerator.load_state`` itself go in ``load_kwargs={...}``.

    accelerate unpickles the objects registered with ``register_for_checkpointing``
    (``custom_checkpoint_<i>.pkl``) with ``weights_only=False``, which runs whatever code the file
    names; a checkpoint holding such a file is refused unless ``trust_pickles=True`` says it
    comes from a trusted writer.

    Raises:
        UnsafeCheckpointError: the checkpoint has ``custom_checkpoint_*.pkl`` files and
            ``trust_pickles`` is not True.
    """
    _check_accelerator(accelerator)
    load_kwargs = options.pop("load_kwargs", {})
    _, reader_options = _split_options(options)
    store = open_store(url, reader_options.get("storage_options"), reader_options.get("filesystem"))
    # accelerate's own files sit at the top level; the DCP folders stay remote
    names = [
        info.key
        for info in store.run(store.list_objects(""))
        if "/" not in info.key and info.key not in ("", os.curdir, os.pardir)
    ]
    # any letter case: on a case-insensitive disk accelerate's custom_checkpoint_0.pkl opens it
    unsafe = sorted(n for n in names if n.casefold().startswith("custom_checkpoint_"))
    if unsafe and not reader_options.get("trust_pickles", False):
        raise UnsafeCheckpointError(
            f"{redact_url(url)} holds {', '.join(unsafe)}, which accelerate unpickles with "
            "weights_only=False (running any code they name); pass trust_pickles=True only if "
            "you trust whoever wrote this checkpoint"
        )
    staging = tempfile.mkdtemp(prefix="dcp-cloud-accelerate-")
    try:
        for name in names:
            (Path(staging) / name).write_bytes(store.run(store.get(name)))
        with redirect(staging, url, **options):
            accelerator.load_state(staging, **load_kwargs)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
