"""S3 and S3-compatible stores, talking to the aiobotocore client that s3fs holds.

We use the client directly for what s3fs's file API hides: multipart uploads whose parts we send
concurrently from our own buffers, conditional PUT (``If-None-Match: *``) for a no-overwrite
commit, batched deletes, and the retry counts in each response's metadata.

Retries are ours (``ObjectStore._request``): throttling, 5xx, timeouts, refused connections and
bodies cut off midway, one layer for a request and its body together. botocore's own retries are
off for a client this store configures (one not made yet, with ``open_store``'s retry settings
or none); a client whose botocore retries the caller chose keeps them for requests, and our layer
then retries only cut-off bodies, so no request is retried by two layers. Connections time out
after ``CONNECT_TIMEOUT`` and each socket read after ``READ_TIMEOUT`` unless ``config_kwargs``
says otherwise.
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Iterator, Sequence
from typing import Any

import aiohttp
import fsspec.asyn
from botocore.exceptions import ClientError, HTTPClientError, ResponseStreamingError
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3fs.errors import translate_boto_error

from ..errors import BucketNotFoundError, StoreAccessError
from ..options import CONNECT_TIMEOUT, READ_TIMEOUT
from .base import MultipartUpload, ObjectInfo, ObjectStore, PendingUpload, redacted_endpoint
from .body import PartBody
from .bucket import BucketPath


class IncompleteBody(ConnectionError):
    """The server sent fewer body bytes than it announced."""


class _BodyError(ConnectionError):
    """A GET's body broke off after its headers arrived."""


# Failures of the connection: refused, timed out, reset, cut off midway.
_CONNECTION_ERRORS = (
    BotoConnectionError,
    HTTPClientError,  # botocore's read timeouts and closed connections
    ResponseStreamingError,
    ConnectionError,
    asyncio.TimeoutError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
)

# Answers worth another try: throttling, timeouts, server errors.
_TRANSIENT_STATUS = {408, 429, 500, 502, 503, 504}
_TRANSIENT_CODES = {
    "SlowDown",
    "Throttling",
    "ThrottlingException",
    "RequestTimeout",
    "RequestTimeoutException",
    "InternalError",
    "ServiceUnavailable",
}

_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}


def _error_responses(exc: BaseException | None) -> Iterator[dict[str, Any]]:
    """The botocore error responses behind an exception that s3fs translated, outermost first."""
    seen = 0
    while exc is not None and seen < 8:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            yield response
        exc = exc.__cause__ or exc.__context__
        seen += 1


def client_error_code(exc: BaseException | None) -> str | None:
    """The S3 error code behind an exception that s3fs translated, if any."""
    for response in _error_responses(exc):
        code = response.get("Error", {}).get("Code")
        if code:
            return str(code)
    return None


def http_status(exc: BaseException | None) -> int | None:
    """The HTTP status of the S3 answer behind an exception that s3fs translated, if any."""
    for response in _error_responses(exc):
        status = response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        if status is not None:
            return int(status)
    return None


class S3Store(ObjectStore):
    """Store over an ``s3fs.S3FileSystem``."""

    supports_conditional_put = True
    reads_into_pieces = True
    sends_part_pieces = True

    def __init__(self, fs: Any, url: str, root: str, max_concurrency: int = 16, max_attempts: int = 10):
        super().__init__(url, root, max_concurrency)
        self.fs = fs
        #: the bucket and key prefix of the store root
        self.place = BucketPath.of(fs, url, self.root)
        self.max_attempts = max_attempts
        #: whether botocore retries requests itself (then ours retry only cut-off bodies)
        self._client_retries = not _take_over_retries(fs, max_attempts)
        _make_client_now(fs)
        #: whether a request proved the bucket exists (``exists`` then needs no bucket check)
        self._bucket_seen = False

    @property
    def loop(self) -> Any:
        """The event loop of the filesystem's client (its sessions are bound to it)."""
        return self.fs.loop

    @property
    def endpoint(self) -> str:
        client = getattr(self.fs, "_s3", None)
        url = getattr(getattr(client, "meta", None), "endpoint_url", None)
        url = url or getattr(self.fs, "endpoint_url", None)
        url = url or (getattr(self.fs, "client_kwargs", None) or {}).get("endpoint_url")
        # before the client exists, botocore's own environment variables
        url = url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
        return redacted_endpoint(url or "https://s3.amazonaws.com")

    def _is_transient(self, exc: BaseException) -> bool:
        if isinstance(exc, _BodyError):
            return True
        if self._client_retries:
            return False
        if isinstance(exc, ClientError):
            status = exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
            code = exc.response.get("Error", {}).get("Code")
            return status in _TRANSIENT_STATUS or code in _TRANSIENT_CODES
        return isinstance(exc, _CONNECTION_ERRORS)

    def _bucket_not_found(self) -> BucketNotFoundError:
        return BucketNotFoundError(
            f"{self.url}: bucket {self.place.bucket!r} does not exist. Create it (for example "
            f"`aws s3 mb s3://{self.place.bucket}`) or fix the URL."
        )

    def _translate(self, exc: BaseException, key: str) -> BaseException:
        code = client_error_code(exc)
        if code == "NoSuchBucket":
            return self._bucket_not_found()
        if code in _ACCESS_CODES or isinstance(exc, PermissionError):
            return StoreAccessError(
                f"{self.url}: the store refused the request on {self.place.full_key(key)!r} ({code or exc}). "
                "Check the credentials (key/secret, AWS_PROFILE, AWS_* variables) and the "
                "bucket policy."
            )
        if code == "PreconditionFailed":
            return FileExistsError(f"{self.url}: {self.place.full_key(key)} already exists")
        return exc

    async def _client_call(self, method: str, **kwargs: Any) -> Any:
        client = await self.fs.set_session()
        _send_bodies_at_once(client)
        return await getattr(client, method)(**kwargs)

    async def _s3(self, kind: str, key: str, method: str, read: Any = None, **kwargs: Any) -> Any:
        """One request, retried (see the module docstring); with ``read``, the response's body
        is read by ``await read(response)`` within the same try."""

        async def attempt() -> Any:
            response = await self._client_call(method, **kwargs)
            retries = response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
            if retries:
                self.counter.retry(retries)
            if read is None:
                return response
            try:
                return await read(response)
            except (IncompleteBody, *_CONNECTION_ERRORS) as exc:
                raise _BodyError(f"{key}: {exc}") from exc

        try:
            return await self._request(kind, attempt)
        except ClientError as exc:
            raise self._translate(translate_boto_error(exc), key) from exc
        except Exception as exc:
            translated = self._translate(exc, key)
            if translated is exc:
                raise
            raise translated from exc

    async def put(self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool = False) -> None:
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        await self._put_object(key, data if isinstance(data, bytes) else PartBody(data), **condition)

    async def put_pieces(self, key: str, pieces: Sequence[bytes | bytearray | memoryview]) -> None:
        await self._put_object(key, PartBody(pieces))

    async def _put_object(self, key: str, body: bytes | PartBody, **condition: str) -> None:
        await self._s3(
            "put",
            key,
            "put_object",
            Bucket=self.place.bucket,
            Key=self.place.full_key(key),
            Body=body,
            **condition,
        )

    async def _get_into(
        self, kind: str, key: str, out: memoryview | Sequence[memoryview] | None, **range_kw: Any
    ) -> Any:
        """One GET and its body, retried together; the body goes into ``out`` (or the pieces it
        lists, one after another; returns the byte count) or is returned whole. A range that starts at or past the object's end (416)
        reads nothing."""

        async def read(response: Any) -> Any:
            return await _read_body(response, key, out)

        try:
            return await self._s3(
                kind,
                key,
                "get_object",
                read,
                Bucket=self.place.bucket,
                Key=self.place.full_key(key),
                **range_kw,
            )
        except OSError as exc:
            if range_kw and http_status(exc) == 416:
                return b"" if out is None else 0
            raise

    async def get(self, key: str) -> bytes:
        data: bytes = await self._get_into("get", key, None)
        return data

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        # an inverted Range header (bytes=a-(a-1)) is ignored by S3, which sends the whole object
        if end <= start:
            return b""
        data: bytes = await self._get_into("get_range", key, None, Range=f"bytes={start}-{end - 1}")
        return data

    async def read_into(self, key: str, start: int, out: memoryview) -> int:
        if len(out) == 0:
            return 0
        span = f"bytes={start}-{start + len(out) - 1}"
        return int(await self._get_into("get_range", key, out, Range=span))

    async def read_into_pieces(self, key: str, start: int, pieces: Sequence[memoryview]) -> int:
        total = sum(len(p) for p in pieces)
        if total == 0:
            return 0
        span = f"bytes={start}-{start + total - 1}"
        return int(await self._get_into("get_range", key, list(pieces), Range=span))

    async def exists(self, key: str) -> bool:
        """Whether the object exists; ``BucketNotFoundError`` when its bucket does not.

        An answer to HEAD has no body, so a missing object and a missing bucket both come back
        as a bare 404: only then is the bucket checked, once per store while it exists.
        """
        try:
            await self._s3("head", key, "head_object", Bucket=self.place.bucket, Key=self.place.full_key(key))
        except FileNotFoundError as exc:
            if isinstance(exc, BucketNotFoundError):
                raise
            if not self._bucket_seen and not await self._bucket_exists(key):
                raise self._bucket_not_found() from exc
            return False
        self._bucket_seen = True
        return True

    async def _bucket_exists(self, key: str) -> bool:
        """Whether the bucket exists (True when the store will not say, e.g. no permission)."""
        try:
            await self._s3("head", key, "head_bucket", Bucket=self.place.bucket)
        except FileNotFoundError:
            return False
        except Exception:  # cannot tell: answer for the object alone
            return True
        self._bucket_seen = True
        return True

    async def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = self.place.full_key(prefix)
        infos: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.place.bucket, "Prefix": full_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._s3("list", prefix, "list_objects_v2", **kwargs)
            for obj in page.get("Contents", []):
                modified = obj.get("LastModified")
                infos.append(
                    ObjectInfo(
                        self.place.relative_key(obj["Key"]),
                        int(obj.get("Size", 0)),
                        modified.timestamp() if modified is not None else None,
                    )
                )
            if not page.get("IsTruncated"):
                break
            token = page.get("NextContinuationToken")
        return infos

    async def delete(self, keys: list[str]) -> None:
        for start in range(0, len(keys), 1000):
            batch = keys[start : start + 1000]
            await self._s3(
                "delete",
                batch[0],
                "delete_objects",
                Bucket=self.place.bucket,
                Delete={"Objects": [{"Key": self.place.full_key(k)} for k in batch], "Quiet": True},
            )

    async def start_upload(self, key: str) -> MultipartUpload:
        response = await self._s3(
            "start_upload",
            key,
            "create_multipart_upload",
            Bucket=self.place.bucket,
            Key=self.place.full_key(key),
        )
        return MultipartUpload(key, response["UploadId"])

    def _upload_args(self, upload: MultipartUpload) -> dict[str, Any]:
        """The arguments that name a multipart upload in S3's API."""
        return {"Bucket": self.place.bucket, "Key": self.place.full_key(upload.key), "UploadId": upload.state}

    async def upload_part(
        self, upload: MultipartUpload, part_number: int, offset: int, data: bytes | bytearray | memoryview
    ) -> None:
        response = await self._s3(
            "upload_part",
            upload.key,
            "upload_part",
            **self._upload_args(upload),
            PartNumber=part_number,
            Body=PartBody(data),
        )
        upload.parts[part_number] = response["ETag"]

    async def complete_upload(self, upload: MultipartUpload) -> None:
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in sorted(upload.parts.items())]
        await self._s3(
            "complete_upload",
            upload.key,
            "complete_multipart_upload",
            **self._upload_args(upload),
            MultipartUpload={"Parts": parts},
        )

    async def list_uploads(self, prefix: str = "") -> list[PendingUpload]:
        found: list[PendingUpload] = []
        markers: dict[str, str] = {}
        while True:
            page = await self._s3(
                "list",
                prefix,
                "list_multipart_uploads",
                Bucket=self.place.bucket,
                Prefix=self.place.full_key(prefix),
                **markers,
            )
            for item in page.get("Uploads", []):
                key = self.place.relative_key(item["Key"])
                upload = MultipartUpload(key, item["UploadId"])
                activity = max(item["Initiated"].timestamp(), await self._newest_part(upload))
                found.append(PendingUpload(key, activity, upload))
            if not page.get("IsTruncated"):
                return found
            markers = {"KeyMarker": page["NextKeyMarker"], "UploadIdMarker": page["NextUploadIdMarker"]}

    async def _newest_part(self, upload: MultipartUpload) -> float:
        """When the newest part of an upload arrived (0 without parts): an upload still being
        written has recent parts even if it was started long ago."""
        page = await self._s3(
            "list",
            upload.key,
            "list_parts",
            **self._upload_args(upload),
        )
        return max((part["LastModified"].timestamp() for part in page.get("Parts", [])), default=0.0)

    async def abort_upload(self, upload: MultipartUpload) -> None:
        try:
            await self._s3(
                "abort_upload",
                upload.key,
                "abort_multipart_upload",
                **self._upload_args(upload),
            )
        except Exception:  # already gone, or the store is unreachable: gc cleans up later
            pass


async def _read_body(response: Any, key: str, out: memoryview | Sequence[memoryview] | None) -> Any:
    """A GET response's body: into ``out`` or the pieces it lists, one after another (the byte
    count), or whole (bytes)."""
    body = response["Body"]
    expected = int(response.get("ContentLength", -1))
    try:
        if out is None:
            data = await body.read()
            got = len(data)
        else:
            got = 0
            for piece in [out] if isinstance(out, memoryview) else out:
                filled = 0
                while filled < len(piece):
                    n = await body.readinto(piece[filled:])
                    if n == 0:
                        break
                    filled += n
                got += filled
                if filled < len(piece):
                    break
    finally:
        body.close()
    if 0 <= got < expected:
        raise IncompleteBody(f"{key}: the body ended after {got} of {expected} bytes")
    return data if out is None else got


def _drop_expect_continue(params: dict[str, Any], **_: Any) -> None:
    params.get("headers", {}).pop("Expect", None)


def _send_bodies_at_once(client: Any) -> None:
    """Send request bodies without ``Expect: 100-continue`` first: aiohttp waits for the
    ``100 Continue`` with no timeout, so a server that accepts the connection and never answers
    would hang an upload for ever. (S3 takes bodies without it; it only saves sending a body
    that is refused.)"""
    if getattr(client, "_dcp_cloud_no_expect", False):
        return
    client.meta.events.register_last("before-call.s3", _drop_expect_continue)
    client._dcp_cloud_no_expect = True


def _make_client_now(fs: Any) -> None:
    """Make the filesystem's client now, while the store is opened, rather than at its first
    request: botocore reads credentials from the environment when the client is made, and the
    client cache keyed this filesystem by the environment of this moment, so a later change of
    the environment (another thread switching identity) must not decide whose credentials the
    shared client signs with. Where the client cannot be made here (no credentials or a bad
    setting, or a call from the client's own event loop), it is made at the first request, as
    before, which reports the failure as usual."""
    if getattr(fs, "_s3", None) is not None:
        return
    try:
        fsspec.asyn.sync(fs.loop, fs.set_session)
    except Exception:  # noqa: BLE001 - the first request makes the client and reports the error
        return


def _take_over_retries(fs: Any, max_attempts: int) -> bool:
    """Whether our retry layer retries this filesystem's requests: it does where botocore's
    retries are off, which this switches them to (and sets connect and read timeouts) on a
    filesystem whose client is not made yet and whose retry settings are ``open_store``'s or
    none. Retries the caller chose otherwise stay botocore's."""
    client = getattr(fs, "_s3", None)
    if client is not None:
        retries = getattr(getattr(getattr(client, "meta", None), "config", None), "retries", None) or {}
        return retries.get("total_max_attempts", retries.get("max_attempts")) == 1
    config = getattr(fs, "config_kwargs", None)
    if not isinstance(config, dict):
        return False
    defaults = [{"mode": "standard", "total_max_attempts": n} for n in (max_attempts, 1)]
    if config.get("retries") is not None and config.get("retries") not in defaults:
        return False
    config["retries"] = {"mode": "standard", "total_max_attempts": 1}
    config.setdefault("connect_timeout", CONNECT_TIMEOUT)
    config.setdefault("read_timeout", READ_TIMEOUT)
    return True
