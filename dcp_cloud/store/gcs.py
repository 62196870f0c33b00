"""Google Cloud Storage, through the JSON API session that gcsfs holds.

gcsfs's file API writes one object as one resumable stream, chunk after chunk. To send the parts
of an object concurrently we upload each part as an object of its own and join them with one
``compose`` request, then delete the parts. GCS's XML multipart API would do the same without
part objects, but it is a second protocol with its own auth and no emulator here speaks it; on
real GCS both run at the per-stream rate times the number of streams, and compose costs one extra
request per object plus free deletes (see docs/clouds.md, Google Cloud Storage).

Part objects live next to their object under ``<key>.dcp-upload-<id>/<n>``. Listings hide them
(as S3 hides multipart parts) and ``list_uploads`` reports them, so ``gc`` removes the parts of
an upload that a crash left behind.

No-overwrite commits use ``ifGenerationMatch=0`` on a single-request (multipart/related) upload:
GCS refuses it with 412 when the object exists.

Retries are ours (``ObjectStore._request``): 408, 429, 5xx, timeouts, refused connections and
bodies cut off midway, one layer per request. We send requests through gcsfs's request function
without its retry decorator; if a gcsfs release hides that function, its retries (6 tries) are
the one layer instead. Connections time out after ``CONNECT_TIMEOUT`` and each socket read after
``READ_TIMEOUT`` unless the filesystem has a ``requests_timeout`` of its own.
"""

from __future__ import annotations

import asyncio
import json
import re
import secrets
from collections.abc import Awaitable, Callable, Sequence
from typing import Any, TypeVar
from urllib.parse import quote

import aiohttp
from gcsfs.core import GCSFileSystem
from gcsfs.retry import HttpError, validate_response
from requests.exceptions import ProxyError

from ..errors import BucketNotFoundError, StoreAccessError
from ..options import CONNECT_TIMEOUT, READ_TIMEOUT
from .base import MultipartUpload, ObjectInfo, ObjectStore, PendingUpload, redacted_endpoint
from .body import PartBody
from .bucket import BucketPath, delete_each
from .fsspec_store import _modified

T = TypeVar("T")

#: Marks the part objects of an upload in progress: ``<key>.dcp-upload-<upload id>/<part>``.
PART_MARKER = ".dcp-upload-"
_PART_KEY = re.compile(r"^(?P<key>.+)" + re.escape(PART_MARKER) + r"(?P<upload>[0-9a-f]+)/(?P<part>\d+)$")

#: compose joins at most 32 source objects per request.
MAX_COMPOSE_SOURCES = 32

#: gcsfs's request function without its retry decorator (None where gcsfs does not expose it)
_PLAIN_REQUEST: Callable[..., Awaitable[Any]] | None = getattr(GCSFileSystem._request, "__wrapped__", None)

_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_CONNECTION_ERRORS = (
    aiohttp.ClientConnectionError,
    aiohttp.ClientPayloadError,
    asyncio.TimeoutError,
    ConnectionError,
    ProxyError,  # gcsfs's name for a 502 answer
)


def part_key(key: str, upload_id: str, part_number: int) -> str:
    """Key of one part object of an upload."""
    return f"{key}{PART_MARKER}{upload_id}/{part_number:05d}"


class GCSStore(ObjectStore):
    """Store over a ``gcsfs.GCSFileSystem``."""

    supports_conditional_put = True
    prefers_one_part_objects = True
    reads_into_pieces = True
    sends_part_pieces = True

    def __init__(self, fs: Any, url: str, root: str, max_concurrency: int = 16, max_attempts: int = 10):
        super().__init__(url, root, max_concurrency)
        self.fs = fs
        #: the bucket and key prefix of the store root
        self.place = BucketPath.of(fs, url, self.root)
        self.max_attempts = max_attempts if _PLAIN_REQUEST is not None else 1
        if getattr(fs, "requests_timeout", None) is None:
            fs.requests_timeout = aiohttp.ClientTimeout(
                total=None, sock_connect=CONNECT_TIMEOUT, sock_read=READ_TIMEOUT
            )

    @property
    def loop(self) -> Any:
        """The event loop of the filesystem's client (its sessions are bound to it)."""
        return self.fs.loop

    @property
    def endpoint(self) -> str:
        return redacted_endpoint(getattr(self.fs, "_location", None) or "https://storage.googleapis.com")

    def _is_transient(self, exc: BaseException) -> bool:
        if _PLAIN_REQUEST is None:
            return False
        status = getattr(exc, "code", None) if isinstance(exc, HttpError) else None
        if isinstance(exc, aiohttp.ClientResponseError):
            status = exc.status
        return status in _TRANSIENT_STATUS or isinstance(exc, _CONNECTION_ERRORS)

    async def _json_call(
        self, method: str, path: str, *args: Any, json_out: bool = False, **kwargs: Any
    ) -> Any:
        """``fs._call`` through gcsfs's request function without its retries."""
        if _PLAIN_REQUEST is None:
            return await self.fs._call(method, path, *args, json_out=json_out, **kwargs)
        _, headers, _, contents = await _PLAIN_REQUEST(self.fs, method, path, *args, **kwargs)
        return json.loads(contents) if json_out else (headers, contents)

    def _object_path(self, key: str) -> str:
        return f"b/{quote(self.place.bucket, safe='')}/o/{quote(self.place.full_key(key), safe='')}"

    @property
    def _upload_url(self) -> str:
        return f"{self.fs._location}/upload/storage/v1/b/{quote(self.place.bucket, safe='')}/o"

    def _media_url(self, key: str) -> str:
        return f"{self.fs._location}/download/storage/v1/{self._object_path(key)}?alt=media"

    async def _bucket_exists(self) -> bool:
        try:
            await self._json_call("GET", f"b/{quote(self.place.bucket, safe='')}", json_out=True)
        except FileNotFoundError:
            return False
        except Exception:  # cannot tell; report the original error
            return True
        return True

    async def _gcs(self, kind: str, key: str, method: str, path: str, **kwargs: Any) -> Any:
        """One JSON-API request, retried, errors translated."""
        return await self._translated(kind, key, lambda: self._json_call(method, path, **kwargs))

    async def _translated(self, kind: str, key: str, call: Callable[[], Awaitable[T]]) -> T:
        """One request (``call()`` starts a try) under the concurrency bound, retried, with
        gcsfs's errors made ours."""
        try:
            return await self._request(kind, call)
        except FileNotFoundError as exc:
            if not await self._bucket_exists():
                raise BucketNotFoundError(
                    f"{self.url}: bucket {self.place.bucket!r} does not exist. Create it (for example "
                    f"`gcloud storage buckets create gs://{self.place.bucket}`) or fix the URL."
                ) from exc
            raise FileNotFoundError(
                f"{self.url}: gs://{self.place.bucket}/{self.place.full_key(key)} not found"
            ) from exc
        except PermissionError as exc:
            raise self._access_error(key, exc) from exc
        except Exception as exc:
            refused = str(exc).startswith(("Forbidden", "Unauthorized"))
            if refused or getattr(exc, "code", None) in (401, 403):
                raise self._access_error(key, exc) from exc
            raise

    def _access_error(self, key: str, exc: BaseException) -> StoreAccessError:
        first_line = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        return StoreAccessError(
            f"{self.url}: GCS refused the request on gs://{self.place.bucket}/{self.place.full_key(key)} "
            f"({first_line}). Check the credentials (`token=` in storage_options, "
            "GOOGLE_APPLICATION_CREDENTIALS, `gcloud auth application-default login`) and the "
            "bucket's IAM permissions."
        )

    # -- objects ------------------------------------------------------------------------------

    async def put(self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool = False) -> None:
        if if_absent:
            # A multipart/related upload carries ifGenerationMatch=0 on every GCS server; some
            # emulators ignore it on media and resumable uploads.
            await self._put_related(key, bytes(data))
        else:
            await self._put_media("put", key, data)

    async def put_pieces(self, key: str, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        await self._put_media("put", key, PartBody(pieces))

    async def _put_media(self, kind: str, key: str, data: bytes | bytearray | memoryview | PartBody) -> None:
        body = data if isinstance(data, PartBody) else PartBody(data)
        await self._gcs(
            kind,
            key,
            "POST",
            self._upload_url,
            uploadType="media",
            name=self.place.full_key(key),
            headers={"Content-Type": "application/octet-stream", "Content-Length": str(len(body))},
            data=body,  # sent in slices: no copy of the part in aiohttp's write buffer
            json_out=True,
        )

    async def _put_related(self, key: str, data: bytes) -> None:
        boundary = f"dcp-cloud-{secrets.token_hex(8)}"
        head = (
            f"--{boundary}\r\nContent-Type: application/json; charset=UTF-8\r\n\r\n"
            + json.dumps({"name": self.place.full_key(key)})
            + f"\r\n--{boundary}\r\nContent-Type: application/octet-stream\r\n\r\n"
        ).encode()
        body = head + bytes(data) + f"\r\n--{boundary}--\r\n".encode()
        try:
            await self._gcs(
                "put",
                key,
                "POST",
                self._upload_url,
                uploadType="multipart",
                ifGenerationMatch="0",
                headers={"Content-Type": f'multipart/related; boundary="{boundary}"'},
                data=body,
                json_out=True,
            )
        except FileExistsError:
            raise FileExistsError(
                f"{self.url}: gs://{self.place.bucket}/{self.place.full_key(key)} already exists"
            ) from None

    async def get(self, key: str) -> bytes:
        _, contents = await self._gcs("get", key, "GET", self._media_url(key))
        return bytes(contents)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        if end <= start:
            return b""
        try:
            _, contents = await self._gcs(
                "get_range", key, "GET", self._media_url(key), headers={"Range": f"bytes={start}-{end - 1}"}
            )
        except Exception as exc:
            if getattr(exc, "code", None) == 416:  # the object ends before ``start``
                return b""
            raise
        return bytes(contents)

    async def read_into(self, key: str, start: int, out: memoryview) -> int:
        if len(out) == 0:  # an inverted Range header would be ignored: the whole object
            return 0
        # Streamed into ``out`` chunk by chunk: gcsfs's own calls read whole bodies into memory.
        url = self._media_url(key)
        return await self._translated("get_range", key, lambda: _read_range_into(self.fs, url, start, out))

    async def read_into_pieces(self, key: str, start: int, pieces: Sequence[memoryview]) -> int:
        if sum(len(p) for p in pieces) == 0:
            return 0
        url = self._media_url(key)
        return await self._translated("get_range", key, lambda: _read_range_into(self.fs, url, start, pieces))

    async def exists(self, key: str) -> bool:
        try:
            await self._gcs("head", key, "GET", self._object_path(key), json_out=True)
        except FileNotFoundError as exc:
            if isinstance(exc, BucketNotFoundError):
                raise
            return False
        return True

    async def _list_raw(self, prefix: str) -> list[dict[str, Any]]:
        items: list[dict[str, Any]] = []
        token: str | None = None
        while True:
            params: dict[str, Any] = {"prefix": self.place.listing_prefix(prefix)}
            if token:
                params["pageToken"] = token
            page = await self._gcs(
                "list", prefix, "GET", f"b/{quote(self.place.bucket, safe='')}/o", json_out=True, **params
            )
            items.extend(page.get("items", []))
            token = page.get("nextPageToken")
            if not token:
                return items

    async def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        infos = []
        for item in await self._list_raw(prefix):
            key = self.place.relative_key(item["name"])
            if PART_MARKER in key and _PART_KEY.match(key):
                continue
            infos.append(ObjectInfo(key, int(item.get("size", 0)), _modified(_times(item))))
        return sorted(infos, key=lambda i: i.key)

    async def delete(self, keys: list[str]) -> None:
        await delete_each(keys, self._delete_one)

    async def _delete_one(self, key: str) -> None:
        await self._gcs("delete", key, "DELETE", self._object_path(key))

    # -- uploads: parts as objects, joined by compose -----------------------------------------

    async def start_upload(self, key: str) -> MultipartUpload:
        return MultipartUpload(key, secrets.token_hex(8))

    async def upload_part(
        self, upload: MultipartUpload, part_number: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        await self._put_media("upload_part", part_key(upload.key, upload.state, part_number), data)
        upload.parts[part_number] = len(data)

    async def complete_upload(self, upload: MultipartUpload) -> None:
        sources = [part_key(upload.key, upload.state, n) for n in sorted(upload.parts)]
        if not sources:  # an empty object
            await self._put_media("complete_upload", upload.key, b"")
            return
        staged = 0
        # compose takes 32 sources: fold longer lists into the destination 31 at a time
        while sources:
            batch = sources[: MAX_COMPOSE_SOURCES - (1 if staged else 0)]
            sources = sources[len(batch) :]
            names = ([upload.key] if staged else []) + batch
            await self._compose(upload.key, names)
            staged += 1
        await self.delete([part_key(upload.key, upload.state, n) for n in sorted(upload.parts)])

    async def _compose(self, key: str, sources: list[str]) -> None:
        await self._gcs(
            "complete_upload",
            key,
            "POST",
            f"{self._object_path(key)}/compose",
            headers={"Content-Type": "application/json"},
            json={
                "kind": "storage#composeRequest",
                "sourceObjects": [{"name": self.place.full_key(s)} for s in sources],
                "destination": {"name": self.place.full_key(key), "bucket": self.place.bucket},
            },
            json_out=True,
        )

    async def abort_upload(self, upload: MultipartUpload) -> None:
        try:
            # listed, not only the parts recorded: a part cancelled in flight may have landed
            listed = await self._list_raw(f"{upload.key}{PART_MARKER}{upload.state}/")
            parts = set(upload.parts) | {
                int(m.group("part"))
                for o in listed
                if (m := _PART_KEY.match(self.place.relative_key(o["name"])))
            }
            await self.delete([part_key(upload.key, upload.state, n) for n in sorted(parts)])
        except Exception:  # the upload is abandoned either way; gc removes leftovers
            pass

    async def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        uploads: dict[tuple[str, str], PendingUpload] = {}
        for item in await self._list_raw(prefix):
            match = _PART_KEY.match(self.place.relative_key(item["name"]))
            if match is None:
                continue
            key, upload_id = match.group("key"), match.group("upload")
            modified = _modified(_times(item)) or 0.0
            found = uploads.get((key, upload_id))
            if found is None:
                found = uploads[(key, upload_id)] = PendingUpload(
                    key, modified, MultipartUpload(key, upload_id)
                )
            found.last_activity = max(found.last_activity, modified)
            found.upload.parts[int(match.group("part"))] = int(item.get("size", 0))
        return list(uploads.values())


def _times(item: dict[str, Any]) -> dict[str, Any]:
    """A JSON-API object resource's times as the fsspec info keys ``_modified`` reads."""
    from datetime import datetime

    stamp = item.get("updated") or item.get("timeCreated")
    if not stamp:
        return {}
    return {"mtime": datetime.fromisoformat(stamp.replace("Z", "+00:00"))}


async def _read_range_into(fs: Any, url: str, start: int, out: memoryview | Sequence[memoryview]) -> int:
    """GET bytes ``[start, start + total)`` of ``url`` into ``out`` (or the pieces it lists, one
    after another); the count read."""
    pieces = [out] if isinstance(out, memoryview) else [p for p in out if len(p)]
    total = sum(len(p) for p in pieces)
    await fs._set_session()
    headers = fs._get_headers({"Range": f"bytes={start}-{start + total - 1}"})
    async with fs.session.get(url, headers=headers, timeout=fs.requests_timeout) as response:
        if response.status == 416:  # the object ends before ``start``
            return 0
        if response.status >= 400:
            validate_response(response.status, await response.read(), url)
        if response.status != 206 and start > 0:
            raise ValueError(f"{url}: the server ignored the Range header (status {response.status})")
        got = 0
        index, filled = 0, 0  # the piece being filled, and how far
        async for chunk in response.content.iter_any():
            view = memoryview(chunk)
            while len(view) and index < len(pieces):
                piece = pieces[index]
                take = min(len(view), len(piece) - filled)
                piece[filled : filled + take] = view[:take]
                view = view[take:]
                filled += take
                got += take
                if filled == len(piece):
                    index, filled = index + 1, 0
            if got == total:
                break
        expected = response.content_length
        if expected is not None and got < min(expected, total):
            raise aiohttp.ClientPayloadError(f"{url}: the body ended after {got} of {expected} bytes")
        return got
