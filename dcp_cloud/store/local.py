"""Local folders (``file://`` and plain paths): atomic renames, parallel positional writes.

A multipart upload is a hidden temporary file that bytes are ``pwrite``-n into at their offsets:
straight from torch.save's memory (``write_in_place``, large writes split over threads), or as
parts; completing it fsyncs once and renames the file into place, which POSIX makes atomic.
Single-object writes go through the same temp-and-rename, so ``.metadata`` is never seen half
written.

Keys never lead outside the folder, symbolic links included: every operation checks that the
key's folder resolves inside the store's root (each folder once per store), and reads also
that the file itself does, so a crafted checkpoint whose data object is a link to a file
elsewhere is refused. The root itself may be a link (``latest -> step-100``).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import errno
import os
import re
import secrets
from collections.abc import Sequence
from typing import Any

from ..errors import StoreAccessError, UnsafeCheckpointError, UploadError
from .base import MultipartUpload, ObjectInfo, ObjectStore, PendingUpload
from .keys import join

# In-place writes larger than this are split over several threads.
_WRITE_CHUNK = 8 * 1024 * 1024
# The exact name of a write in progress: ``.<target name>.tmp-<8 hex digits>`` (see _temp_path).
# Other files, however their names look (``.draft.tmp-1234``), are ordinary objects.
_TEMP_NAME = re.compile(r"^\.(?P<target>.+)\.tmp-[0-9a-f]{8}$")


def _is_within(path: str, root: str) -> bool:
    return path == root or path.startswith(root.rstrip(os.sep) + os.sep)


def temp_target(name: str) -> str | None:
    """The file name an in-progress write named ``name`` will become, or None when ``name`` is
    not a temporary file of ours."""
    match = _TEMP_NAME.match(name)
    return match.group("target") if match else None


def _pieces_from(pieces: list[memoryview], skip: int) -> list[memoryview]:
    """The pieces with their first ``skip`` bytes (together) left out."""
    out: list[memoryview] = []
    for piece in pieces:
        if skip >= len(piece):
            skip -= len(piece)
            continue
        out.append(piece[skip:])
        skip = 0
    return out


class LocalStore(ObjectStore):
    """Store over a local folder."""

    supports_conditional_put = True
    reads_into_pieces = True

    def __init__(self, url: str, root: str, max_concurrency: int = 16, fsync: bool = True):
        super().__init__(url, os.path.abspath(root), max_concurrency)
        self.fsync = fsync
        self._writer_pool: concurrent.futures.ThreadPoolExecutor | None = None
        self._resolved_root: str | None = None
        #: existing folders already found to resolve inside the root
        self._inside_dirs: set[str] = set()

    def _writers(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._writer_pool is None:
            self._writer_pool = concurrent.futures.ThreadPoolExecutor(
                min(8, self.max_concurrency), thread_name_prefix="dcp-cloud-write"
            )
        return self._writer_pool

    def _file(self, key: str) -> str:
        """The file of ``key`` by name alone; a key that would leave the root (``..``,
        absolute) is refused."""
        segments = key.split("/")
        if key.startswith(("/", "\\")) or ".." in segments or "\\" in key or "\0" in key:
            raise UnsafeCheckpointError(
                f"{self.url}: refusing the key {key!r}, which leads outside the folder; keys are "
                "relative paths without '..' segments"
            )
        return join(self.root, key)

    def path(self, key: str) -> str:
        """The file of ``key``; a key that would leave the root (``..``, absolute, or a folder
        that is a symbolic link to somewhere outside it) is refused."""
        path = self._file(key)
        folder = os.path.dirname(path)
        if folder not in self._inside_dirs:
            if not self._resolves_inside(folder):
                raise self._link_error(key)
            if os.path.isdir(folder):
                self._inside_dirs.add(folder)
        return path

    def readable_path(self, key: str) -> str:
        """:meth:`path`, and the file itself must not be a link to somewhere outside the root."""
        path = self.path(key)
        if os.path.islink(path) and not self._resolves_inside(path):
            raise self._link_error(key)
        return path

    def _resolves_inside(self, path: str) -> bool:
        if self._resolved_root is None:
            root = os.path.realpath(self.root)
            if not os.path.isdir(self.root):
                return _is_within(os.path.realpath(path), root)
            self._resolved_root = root
        return _is_within(os.path.realpath(path), self._resolved_root)

    def _link_error(self, key: str) -> UnsafeCheckpointError:
        return UnsafeCheckpointError(
            f"{self.url}: refusing the key {key!r}: a symbolic link on its path leads outside "
            "the folder. A checkpoint's objects must lie inside its folder; the checkpoint may "
            "have been crafted, so do not load it from a folder you do not trust."
        )

    async def _call(self, kind: str, key: str, func: Any, *args: Any) -> Any:
        try:
            return await self._request(kind, asyncio.to_thread(func, *args))
        except OSError as exc:
            translated = self._translate_os_error(key, exc)
            if translated is exc:
                raise
            raise translated from exc

    def _translate_os_error(self, key: str, exc: OSError) -> OSError | UploadError:
        if isinstance(exc, PermissionError):
            return StoreAccessError(
                f"{self.url}: permission denied on {self._file(key)} ({exc.strerror}). "
                "Check the folder's owner and mode."
            )
        if exc.errno in (errno.ENOSPC, errno.EDQUOT):
            return UploadError(
                f"{self.url}: no space left writing {self._file(key)} ({exc.strerror}). Free "
                "space on that disk or save somewhere else; nothing was committed."
            )
        return exc

    def _temp_path(self, path: str) -> str:
        head, tail = os.path.split(path)
        return os.path.join(head, f".{tail}.tmp-{secrets.token_hex(4)}")

    def _sync_file(self, fd: int) -> None:
        if self.fsync:
            os.fsync(fd)

    def _put(self, path: str, data: bytes | bytearray | memoryview, if_absent: bool) -> None:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = self._temp_path(path)
        try:
            with open(tmp, "wb") as f:
                f.write(data)
                f.flush()
                self._sync_file(f.fileno())
            if if_absent:
                os.link(tmp, path)  # fails with FileExistsError, atomically
            else:
                os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)

    async def put(self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool = False) -> None:
        await self._call("put", key, self._put, self.path(key), data, if_absent)

    def _read(self, path: str, start: int | None, end: int | None) -> bytes:
        with open(path, "rb") as f:
            if start is None:
                return f.read()
            f.seek(start)
            data = f.read(end - start)  # type: ignore[operator]
        return data

    async def get(self, key: str) -> bytes:
        return await self._call("get", key, self._read, self.readable_path(key), None, None)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self._call("get_range", key, self._read, self.readable_path(key), start, end)

    @staticmethod
    def _read_into(path: str, start: int, out: memoryview | Sequence[memoryview]) -> int:
        pieces = [out] if isinstance(out, memoryview) else list(out)
        wanted = sum(len(p) for p in pieces)
        total = 0
        with open(path, "rb", buffering=0) as f:
            fd = f.fileno()
            while total < wanted:
                # at most IOV_MAX (1024 on Linux) buffers per call
                n = os.preadv(fd, _pieces_from(pieces, total)[:1024], start + total)
                if n == 0:
                    break
                total += n
        return total

    async def read_into(self, key: str, start: int, out: memoryview) -> int:
        return await self._call("get_range", key, self._read_into, self.readable_path(key), start, out)

    async def read_into_pieces(self, key: str, start: int, pieces: Sequence[memoryview]) -> int:
        return await self._call("get_range", key, self._read_into, self.readable_path(key), start, pieces)

    async def exists(self, key: str) -> bool:
        return await self._call("head", key, os.path.isfile, self.readable_path(key))

    def _list(self, prefix: str) -> list[ObjectInfo]:
        infos = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                full = os.path.join(dirpath, name)
                key = os.path.relpath(full, self.root).replace(os.sep, "/")
                if not key.startswith(prefix) or temp_target(name) is not None:
                    continue
                try:
                    st = os.stat(full)
                except FileNotFoundError:
                    continue
                infos.append(ObjectInfo(key, st.st_size, st.st_mtime))
        return sorted(infos, key=lambda i: i.key)

    async def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        return await self._call("list", prefix, self._list, prefix)

    def _delete(self, paths: list[str]) -> None:
        for path in paths:
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass

    async def delete(self, keys: list[str]) -> None:
        await self._call("delete", ",".join(keys), self._delete, [self.path(k) for k in keys])

    def _list_temp(self, prefix: str) -> list[PendingUpload]:
        found = []
        for dirpath, _dirs, files in os.walk(self.root):
            for name in files:
                target = temp_target(name)
                if target is None:
                    continue
                full = os.path.join(dirpath, name)
                final = os.path.join(dirpath, target)
                key = os.path.relpath(final, self.root).replace(os.sep, "/")
                if not key.startswith(prefix):
                    continue
                try:
                    started = os.stat(full).st_mtime
                except FileNotFoundError:
                    continue
                found.append(PendingUpload(key, started, MultipartUpload(key, (-1, full))))
        return found

    async def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        return await self._call("list", prefix, self._list_temp, prefix)

    def _open_temp(self, path: str) -> tuple[int, str]:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        tmp = self._temp_path(path)
        return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644), tmp

    async def start_upload(self, key: str) -> MultipartUpload:
        fd, tmp = await self._call("start_upload", key, self._open_temp, self.path(key))
        return MultipartUpload(key, (fd, tmp))

    def _pwrite_all(self, fd: int, data: bytes | bytearray | memoryview, offset: int) -> None:
        view = memoryview(data)
        while view:
            written = os.pwrite(fd, view, offset)
            view = view[written:]
            offset += written

    async def upload_part(
        self, upload: MultipartUpload, part_number: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        fd, _ = upload.state
        await self._call("upload_part", upload.key, self._pwrite_all, fd, data, offset)

    def write_in_place(
        self, upload: MultipartUpload, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        fd, _ = upload.state
        view = memoryview(data).cast("B")
        chunks = [(view[at : at + _WRITE_CHUNK], offset + at) for at in range(0, len(view), _WRITE_CHUNK)]
        self.counter.request("write", len(chunks))
        try:
            if len(chunks) <= 1:
                self._pwrite_all(fd, view, offset)
            else:  # a large tensor: several threads copy it into the page cache at once
                list(self._writers().map(lambda chunk: self._pwrite_all(fd, *chunk), chunks))
        except OSError as exc:
            translated = self._translate_os_error(upload.key, exc)
            if translated is exc:
                raise
            raise translated from exc

    def _complete(self, fd: int, tmp: str, path: str) -> None:
        try:
            self._sync_file(fd)
        finally:
            os.close(fd)
        os.replace(tmp, path)

    async def complete_upload(self, upload: MultipartUpload) -> None:
        fd, tmp = upload.state
        await self._call("complete_upload", upload.key, self._complete, fd, tmp, self.path(upload.key))

    @staticmethod
    def _abort(fd: int, tmp: str) -> None:
        if fd >= 0:
            try:
                os.close(fd)
            except OSError:
                pass
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass

    async def abort_upload(self, upload: MultipartUpload) -> None:
        fd, tmp = upload.state
        await asyncio.to_thread(self._abort, fd, tmp)
