"""Azure Blob Storage, through the async ``BlobServiceClient`` that adlfs holds.

Parts of an object are staged as blocks, concurrently (``Put Block``), and the object appears
atomically when its block list is committed (``Put Block List``): Azure's own multipart upload.
Blocks never committed are invisible and Azure discards them after 7 days; ``list_uploads``
still reports blobs that hold only uncommitted blocks, so ``gc`` can drop them sooner.

No-overwrite commits send ``If-None-Match: *``; Azure answers 409 BlobAlreadyExists when the
blob exists. Ranged reads are ``Get Blob`` with an ``x-ms-range``.

Retries are ours (``ObjectStore._request``): 408, 429, 5xx, timeouts and refused connections,
one layer per request; the SDK's retry policy is set to no retries. Every call carries a
connection timeout of ``CONNECT_TIMEOUT`` and a per-read timeout of ``READ_TIMEOUT`` (adlfs's
``connection_timeout``/``read_timeout`` storage options override them).

Blob names are sent as the SDK quotes them; the HTTP client would resolve ``.``/``..`` segments
in a URL path, so such keys (and such store roots) are refused before any call is made: a key
cannot reach another container, whatever the credential (shared key or a SAS) allows.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from ..errors import BucketNotFoundError, StoreAccessError
from ..options import CONNECT_TIMEOUT, READ_TIMEOUT
from .base import MultipartUpload, ObjectInfo, ObjectStore, PendingUpload, redacted_endpoint
from .body import PartBody
from .bucket import BucketPath, delete_each


def block_id(upload_id: str, part_number: int) -> str:
    """The block id of one part (every id of a blob must have the same length)."""
    return base64.b64encode(f"{upload_id}-{part_number:06d}".encode()).decode()


class _MemoryviewSink:
    """A writable stream over a memoryview (or several, filled one after another), for the
    SDK's ``readinto``."""

    def __init__(self, out: memoryview | Sequence[memoryview]) -> None:
        self.pieces = [out] if isinstance(out, memoryview) else [p for p in out if len(p)]
        self.size = sum(len(p) for p in self.pieces)
        self.position = 0
        self._index = 0  # the piece being filled
        self._filled = 0  # bytes of it filled

    def write(self, data: bytes) -> int:
        if self.position + len(data) > self.size:
            raise ValueError("the blob returned more bytes than the range asked for")
        view = memoryview(data)
        while len(view):
            piece = self.pieces[self._index]
            take = min(len(view), len(piece) - self._filled)
            piece[self._filled : self._filled + take] = view[:take]
            view = view[take:]
            self._filled += take
            if self._filled == len(piece):
                self._index, self._filled = self._index + 1, 0
        self.position += len(data)
        return len(data)

    def writable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return False


class AzureBlobStore(ObjectStore):
    """Store over an ``adlfs.AzureBlobFileSystem``."""

    supports_conditional_put = True
    buffers_downloads = True
    reads_into_pieces = True
    sends_part_pieces = True

    def __init__(self, fs: Any, url: str, root: str, max_concurrency: int = 16, max_attempts: int = 10):
        super().__init__(url, root, max_concurrency)
        self.fs = fs
        #: the bucket and key prefix of the store root
        self.place = BucketPath.of(fs, url, self.root)
        self.max_attempts = max_attempts
        _switch_off_sdk_retries(fs.service_client)
        self._timeouts: dict[str, Any] = {"connection_timeout": CONNECT_TIMEOUT, "read_timeout": READ_TIMEOUT}
        self._timeouts.update(getattr(fs, "_timeout_kwargs", None) or {})

    @property
    def loop(self) -> Any:
        """The event loop of the filesystem's client (its sessions are bound to it)."""
        return self.fs.loop

    @property
    def endpoint(self) -> str:
        return redacted_endpoint(getattr(self.fs.service_client, "primary_endpoint", None))

    def _is_transient(self, exc: BaseException) -> bool:
        import aiohttp
        from azure.core.exceptions import (
            DecodeError,
            HttpResponseError,
            ServiceRequestError,
            ServiceResponseError,
        )

        # DecodeError: a body cut off midway (IncompleteReadError) or garbled in transit
        if isinstance(exc, (ServiceRequestError, ServiceResponseError, DecodeError)):
            return True
        if isinstance(exc, HttpResponseError):
            return exc.status_code in _TRANSIENT_STATUS
        return isinstance(
            exc, (aiohttp.ClientConnectionError, aiohttp.ClientPayloadError, TimeoutError, ConnectionError)
        )

    @property
    def _container_client(self) -> Any:
        return self.fs.service_client.get_container_client(self.place.bucket)

    def _blob(self, key: str) -> Any:
        return self.fs.service_client.get_blob_client(self.place.bucket, self.place.full_key(key))

    async def _azure(self, kind: str, key: str, call: Callable[[], Awaitable[Any]]) -> Any:
        """One SDK request (``call()`` starts a try), retried, errors translated."""
        from azure.core.exceptions import (
            ClientAuthenticationError,
            HttpResponseError,
            ResourceExistsError,
            ResourceNotFoundError,
        )

        where = f"{self.place.bucket}/{self.place.full_key(key)}"
        try:
            return await self._request(kind, call)
        except ResourceNotFoundError as exc:
            if getattr(exc, "error_code", None) == "ContainerNotFound":
                raise BucketNotFoundError(
                    f"{self.url}: container {self.place.bucket!r} does not exist. Create it (for "
                    f"example `az storage container create --name {self.place.bucket}`) or fix the URL."
                ) from exc
            raise FileNotFoundError(f"{self.url}: blob {where} not found") from exc
        except ResourceExistsError as exc:
            raise FileExistsError(f"{self.url}: blob {where} already exists") from exc
        except ClientAuthenticationError as exc:
            raise self._access_error(where, exc) from exc
        except HttpResponseError as exc:
            if exc.status_code == 416 and kind == "get_range":
                return 0  # the blob ends before the range starts
            if exc.status_code in (401, 403):
                raise self._access_error(where, exc) from exc
            raise

    def _access_error(self, where: str, exc: Any) -> StoreAccessError:
        code = getattr(exc, "error_code", None) or getattr(exc, "status_code", None)
        return StoreAccessError(
            f"{self.url}: Azure refused the request on {where} ({code}). Check the credentials "
            "(account_key, sas_token, connection_string or a credential in storage_options; "
            "AZURE_STORAGE_* variables) and the container's access policy."
        )

    # -- objects ------------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool = False) -> None:
        # the SDK's single-request upload takes bytes only
        body = data if isinstance(data, bytes) else bytes(data)
        await self._azure(
            "put", key, lambda: self._blob(key).upload_blob(body, overwrite=not if_absent, **self._timeouts)
        )

    async def get(self, key: str) -> bytes:
        async def read() -> bytes:
            downloader = await self._blob(key).download_blob(**self._timeouts)
            return bytes(await downloader.readall())

        return await self._azure("get", key, read)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        out = bytearray(end - start)
        got = await self.read_into(key, start, memoryview(out))
        return bytes(out[:got])

    async def read_into(self, key: str, start: int, out: memoryview) -> int:
        return await self._read_pieces(key, start, out)

    async def read_into_pieces(self, key: str, start: int, pieces: Sequence[memoryview]) -> int:
        return await self._read_pieces(key, start, pieces)

    async def _read_pieces(self, key: str, start: int, out: memoryview | Sequence[memoryview]) -> int:
        size = _MemoryviewSink(out).size
        if size == 0:  # an empty range has no x-ms-range form: the SDK would fail on it
            return 0

        async def read() -> int:
            downloader = await self._blob(key).download_blob(offset=start, length=size, **self._timeouts)
            sink = _MemoryviewSink(out)
            await downloader.readinto(sink)
            return sink.position

        return int(await self._azure("get_range", key, read))

    async def exists(self, key: str) -> bool:
        try:
            await self._azure("head", key, lambda: self._blob(key).get_blob_properties(**self._timeouts))
        except FileNotFoundError as exc:
            if isinstance(exc, BucketNotFoundError):
                raise
            return False
        return True

    async def _list(self, prefix: str, include: list[str] | None = None) -> list[Any]:
        name_prefix = self.place.listing_prefix(prefix)

        async def collect() -> list[Any]:
            pager = self._container_client.list_blobs(
                name_starts_with=name_prefix or None, include=include, **self._timeouts
            )
            return [blob async for blob in pager]

        return list(await self._azure("list", prefix, collect))

    async def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        infos = [
            ObjectInfo(
                self.place.relative_key(blob.name),
                int(blob.size or 0),
                blob.last_modified.timestamp() if blob.last_modified else None,
            )
            for blob in await self._list(prefix)
        ]
        return sorted(infos, key=lambda i: i.key)

    async def delete(self, keys: list[str]) -> None:
        await delete_each(keys, self._delete_one)

    async def _delete_one(self, key: str) -> None:
        await self._azure("delete", key, lambda: self._blob(key).delete_blob(**self._timeouts))

    # -- uploads: staged blocks, committed as one block list ----------------------------------

    async def start_upload(self, key: str) -> MultipartUpload:
        return MultipartUpload(key, secrets.token_hex(8))

    async def upload_part(
        self, upload: MultipartUpload, part_number: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        block = block_id(upload.state, part_number)
        # slices of our buffer: a memoryview body would be copied whole into aiohttp's write buffer
        body = PartBody(data)
        await self._azure(
            "upload_part",
            upload.key,
            lambda: self._blob(upload.key).stage_block(block, body, length=len(body), **self._timeouts),
        )
        upload.parts[part_number] = block

    async def complete_upload(self, upload: MultipartUpload) -> None:
        from azure.storage.blob import BlobBlock

        blocks = [BlobBlock(block_id=upload.parts[n]) for n in sorted(upload.parts)]
        await self._azure(
            "complete_upload",
            upload.key,
            lambda: self._blob(upload.key).commit_block_list(blocks, **self._timeouts),
        )

    async def abort_upload(self, upload: MultipartUpload) -> None:
        # Uncommitted blocks cannot be deleted one by one; deleting a blob that has only
        # uncommitted blocks drops them, and Azure drops the rest after 7 days anyway.
        try:
            await self._azure(
                "abort_upload", upload.key, lambda: self._blob(upload.key).delete_blob(**self._timeouts)
            )
        except Exception:  # nothing to delete, or the store is unreachable: gc cleans up later
            pass

    async def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        committed = {blob.name for blob in await self._list(prefix)}
        return [
            PendingUpload(
                self.place.relative_key(blob.name),
                (blob.last_modified or blob.creation_time).timestamp()
                if (blob.last_modified or blob.creation_time)
                else 0.0,
                MultipartUpload(self.place.relative_key(blob.name), None),
            )
            for blob in await self._list(prefix, include=["uncommittedblobs"])
            if blob.name not in committed
        ]


_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}


def _switch_off_sdk_retries(service_client: Any) -> None:
    """Set the SDK's retry policy to no retries: ours run instead.

    adlfs builds the client without a retry policy of ours; its policy object is shared by every
    client derived from it, so we adjust that one object in place.
    """
    policy = getattr(getattr(service_client, "_config", None), "retry_policy", None)
    if policy is None or not hasattr(policy, "total_retries"):
        return
    policy.total_retries = 0
