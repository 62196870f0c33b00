"""The generic store: any fsspec filesystem, through its synchronous API in worker threads.

Correct on every fsspec backend (memory, gcsfs, adlfs, ossfs, ...), if not tuned for any: a
multipart upload is written through one ``fs.open(key, "wb")`` stream, parts in order, and the
object appears when that stream closes. Filesystems whose write streams show the object as soon
as they open (fsspec's memory filesystem, which also cannot discard one) get their uploads'
parts held in memory instead, and written with one ``pipe_file`` on completion.
"""

from __future__ import annotations

import asyncio
from typing import Any

from fsspec import AbstractFileSystem

from ..errors import BucketNotFoundError, StoreAccessError
from .base import MultipartUpload, ObjectInfo, ObjectStore
from .keys import join


class _OrderedStream:
    """An open write stream that accepts parts in part-number order."""

    def __init__(self, stream: Any) -> None:
        self.stream = stream
        self.next_part = 1
        self.turn = asyncio.Condition()


class _HeldParts:
    """The parts of an upload held in memory until it completes (``MultipartUpload.parts``
    maps each part number to its bytes)."""


class FsspecStore(ObjectStore):
    """Store over any fsspec filesystem."""

    def __init__(self, fs: AbstractFileSystem, url: str, root: str, max_concurrency: int = 16):
        super().__init__(url, root, max_concurrency)
        self.fs = fs
        self._made_dirs: set[str] = set()
        #: whether uploads are held in memory until complete (see the module docstring)
        self._holds_uploads = _commits_on_open(fs)

    def path(self, key: str) -> str:
        return join(self.root, key)

    def _translate(self, exc: BaseException, key: str) -> BaseException:
        """Map a backend error to ours, naming the object."""
        where = self.path(key)
        if isinstance(exc, PermissionError):
            return StoreAccessError(
                f"{self.url}: access to {where} was refused ({exc}). Check the credentials and "
                "the permissions of the bucket or folder."
            )
        if isinstance(exc, FileNotFoundError) and "bucket" in str(exc).lower():
            return BucketNotFoundError(
                f"{self.url}: the bucket does not exist ({exc}). Create it, or fix the URL."
            )
        return exc

    async def _call(self, kind: str, key: str, func: Any, *args: Any, **kwargs: Any) -> Any:
        try:
            return await self._request(kind, asyncio.to_thread(func, *args, **kwargs))
        except (PermissionError, FileNotFoundError) as exc:
            translated = self._translate(exc, key)
            if translated is exc:
                raise
            raise translated from exc

    async def put(self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool = False) -> None:
        data = data if isinstance(data, bytes) else bytes(data)  # not every filesystem takes a view
        path = self.path(key)
        await self._ensure_parent(key, path)
        if if_absent:
            # Best effort: fsspec has no portable exclusive create. The writer also checks
            # before it uploads anything; stores with a real conditional PUT override this.
            await self._call("put", key, self._put_exclusive, path, data)
        else:
            await self._call("put", key, self.fs.pipe_file, path, data)

    def _put_exclusive(self, path: str, data: bytes) -> None:
        if self.fs.exists(path):
            raise FileExistsError(path)
        self.fs.pipe_file(path, data)

    async def get(self, key: str) -> bytes:
        return await self._call("get", key, self.fs.cat_file, self.path(key))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        data = await self._call("get_range", key, self.fs.cat_file, self.path(key), start=start, end=end)
        return bytes(data)

    async def exists(self, key: str) -> bool:
        return bool(await self._call("head", key, self.fs.exists, self.path(key)))

    async def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        # A prefix matches keys as a string ("run" matches "run-2/x" and "runner"): list the
        # folder it ends in, then filter.
        folder = prefix.rsplit("/", 1)[0] if "/" in prefix else ""
        base = self.path(folder) if folder else self.root
        try:
            found = await self._call("list", prefix, self.fs.find, base, detail=True)
        except FileNotFoundError:
            return []
        root = self.root.strip("/") + "/" if self.root.strip("/") else ""
        infos = []
        for path, info in found.items():
            if info.get("type", "file") == "directory":
                continue
            path = path.lstrip("/")
            key = path[len(root) :] if path.startswith(root) else path
            if not key.startswith(prefix):
                continue
            infos.append(ObjectInfo(key, int(info.get("size") or 0), _modified(info)))
        return sorted(infos, key=lambda i: i.key)

    async def delete(self, keys: list[str]) -> None:
        for key in keys:
            try:
                await self._call("delete", key, self.fs.rm_file, self.path(key))
            except FileNotFoundError:
                pass

    async def _ensure_parent(self, key: str, path: str) -> None:
        """Create the folder ``path`` goes into, once: filesystems with real folders (local
        disk, also behind wrappers such as DirFileSystem) refuse to write into a missing one;
        on object stores it is a no-op."""
        parent = path.rsplit("/", 1)[0] if "/" in path else ""
        if parent and parent not in self._made_dirs:
            await self._call("mkdir", key, self.fs.makedirs, parent, exist_ok=True)
            self._made_dirs.add(parent)

    async def start_upload(self, key: str) -> MultipartUpload:
        path = self.path(key)
        await self._ensure_parent(key, path)
        if self._holds_uploads:
            return MultipartUpload(key, _HeldParts())
        stream = await self._call("start_upload", key, self.fs.open, path, "wb")
        return MultipartUpload(key, _OrderedStream(stream))

    async def upload_part(
        self, upload: MultipartUpload, part_number: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        if isinstance(upload.state, _HeldParts):
            await self._request("upload_part", _hold(upload, part_number, data))
            return
        ordered: _OrderedStream = upload.state
        async with ordered.turn:
            await ordered.turn.wait_for(lambda: ordered.next_part == part_number)
        await self._call("upload_part", upload.key, ordered.stream.write, data)
        async with ordered.turn:
            ordered.next_part += 1
            ordered.turn.notify_all()

    async def complete_upload(self, upload: MultipartUpload) -> None:
        if isinstance(upload.state, _HeldParts):
            whole = b"".join(upload.parts[n] for n in sorted(upload.parts))
            upload.parts.clear()
            await self._call("complete_upload", upload.key, self.fs.pipe_file, self.path(upload.key), whole)
            return
        await self._call("complete_upload", upload.key, upload.state.stream.close)

    async def abort_upload(self, upload: MultipartUpload) -> None:
        if isinstance(upload.state, _HeldParts):
            upload.parts.clear()
            return
        stream = upload.state.stream
        discard = getattr(stream, "discard", None)
        try:
            if discard is not None:
                await asyncio.to_thread(discard)
            else:
                await asyncio.to_thread(stream.close)
                await self.delete([upload.key])
        except Exception:  # the upload is abandoned either way; gc removes leftovers
            pass


async def _hold(upload: MultipartUpload, part_number: int, data: bytes | bytearray | memoryview) -> None:
    """Keep a copy of a part (the caller reuses its buffer) until the upload completes."""
    upload.parts[part_number] = bytes(data)


def _commits_on_open(fs: AbstractFileSystem) -> bool:
    """Whether ``fs.open(path, "wb")`` makes the object visible at once (fsspec's memory
    filesystem, also behind a ``DirFileSystem``)."""
    from fsspec.implementations.memory import MemoryFileSystem

    seen = 0
    while fs is not None and seen < 8:
        if isinstance(fs, MemoryFileSystem):
            return True
        fs = getattr(fs, "fs", None)  # a wrapper's inner filesystem
        seen += 1
    return False


def _modified(info: dict[str, Any]) -> float | None:
    for name in ("mtime", "LastModified", "last_modified", "updated", "created"):
        value = info.get(name)
        if value is None:
            continue
        if hasattr(value, "timestamp"):
            return float(value.timestamp())
        try:
            return float(value)
        except (TypeError, ValueError):
            continue
    return None
