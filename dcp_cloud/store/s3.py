"""S3 and S3-compatible stores, talking to the aiobotocore client that s3fs holds.

We use the client directly for what s3fs's file API hides: multipart uploads whose parts we send
concurrently from our own buffers, conditional PUT (``If-None-Match: *``) for a no-overwrite
commit, batched deletes, and the retry counts in each response's metadata.

Retries are botocore's own ("standard" mode: jittered exponential backoff on throttling, 5xx,
timeouts and connection errors, for every request kind), configured by ``open_store``; we do not
stack s3fs's retry loop on top. A response body cut off mid-stream is past botocore's reach, so
ranged reads retry that case themselves with tenacity.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

import aiohttp
from botocore.exceptions import ClientError, ResponseStreamingError
from botocore.exceptions import ConnectionError as BotoConnectionError
from s3fs.errors import translate_boto_error
from tenacity import AsyncRetrying, retry_if_exception_type, stop_after_attempt, wait_random_exponential

from ..errors import BucketNotFoundError, StoreAccessError
from .base import MultipartUpload, ObjectInfo, PendingUpload
from .body import PartBody
from .bucket import BucketStore

T = TypeVar("T")


class IncompleteBody(ConnectionError):
    """The server sent fewer body bytes than it announced."""


# A ranged GET whose body stops early: the connection broke after the headers.
_BODY_ERRORS = (
    ResponseStreamingError,
    BotoConnectionError,
    ConnectionError,
    asyncio.TimeoutError,
    aiohttp.ClientPayloadError,
    aiohttp.ClientConnectionError,
    IncompleteBody,
)

_ACCESS_CODES = {
    "AccessDenied",
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "InvalidToken",
    "ExpiredToken",
    "AllAccessDisabled",
}


def client_error_code(exc: BaseException | None) -> str | None:
    """The S3 error code behind an exception that s3fs translated, if any."""
    seen = 0
    while exc is not None and seen < 8:
        response = getattr(exc, "response", None)
        if isinstance(response, dict):
            code = response.get("Error", {}).get("Code")
            if code:
                return str(code)
        exc = exc.__cause__ or exc.__context__
        seen += 1
    return None


class S3Store(BucketStore):
    """Store over an ``s3fs.S3FileSystem``."""

    supports_conditional_put = True

    def __init__(self, fs: Any, url: str, root: str, max_concurrency: int = 16, max_attempts: int = 10):
        super().__init__(fs, url, root, max_concurrency)
        self.max_attempts = max_attempts

    def _translate(self, exc: BaseException, key: str) -> BaseException:
        code = client_error_code(exc)
        if code == "NoSuchBucket":
            return BucketNotFoundError(
                f"{self.url}: bucket {self.bucket!r} does not exist. Create it (for example "
                f"`aws s3 mb s3://{self.bucket}`) or fix the URL."
            )
        if code in _ACCESS_CODES or isinstance(exc, PermissionError):
            return StoreAccessError(
                f"{self.url}: the store refused the request on {self.full_key(key)!r} ({code or exc}). "
                "Check the credentials (key/secret, AWS_PROFILE, AWS_* variables) and the "
                "bucket policy."
            )
        if code == "PreconditionFailed":
            return FileExistsError(f"{self.url}: {self.full_key(key)} already exists")
        return exc

    async def _client_call(self, method: str, **kwargs: Any) -> Any:
        client = await self.fs.set_session()
        try:
            return await getattr(client, method)(**kwargs)
        except ClientError as exc:
            raise translate_boto_error(exc) from exc

    async def _s3(self, kind: str, key: str, method: str, **kwargs: Any) -> Any:
        try:
            response = await self._request(kind, self._client_call(method, **kwargs))
        except Exception as exc:
            translated = self._translate(exc, key)
            if translated is exc:
                raise
            raise translated from exc
        retries = response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        if retries:
            self.counter.retry(retries)
        return response

    async def put(self, key: str, data: bytes | bytearray | memoryview, *, if_absent: bool = False) -> None:
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        body = data if isinstance(data, bytes) else PartBody(data)
        await self._s3(
            "put", key, "put_object", Bucket=self.bucket, Key=self.full_key(key), Body=body, **condition
        )

    async def _with_body_retries(self, read: Callable[[], Awaitable[T]]) -> T:
        """Run ``read`` (a GET and its body), again if the body is cut off midway."""
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.max_attempts),
            wait=wait_random_exponential(multiplier=0.05, max=5),
            retry=retry_if_exception_type(_BODY_ERRORS),
            reraise=True,
        )
        async for attempt in retrying:
            with attempt:
                if attempt.retry_state.attempt_number > 1:
                    self.counter.retry()
                return await read()
        raise AssertionError("unreachable: tenacity reraises the last error")

    async def _get_into(self, kind: str, key: str, out: memoryview | None, **range_kw: Any) -> Any:
        """One GET; the body goes into ``out`` (returns the byte count) or is returned whole."""
        response = await self._s3(
            kind, key, "get_object", Bucket=self.bucket, Key=self.full_key(key), **range_kw
        )
        body = response["Body"]
        expected = int(response.get("ContentLength", -1))
        try:
            if out is None:
                data = await body.read()
                got = len(data)
            else:
                got = 0
                while got < len(out):
                    n = await body.readinto(out[got:])
                    if n == 0:
                        break
                    got += n
        finally:
            body.close()
        if 0 <= got < expected:
            raise IncompleteBody(f"{key}: the body ended after {got} of {expected} bytes")
        return data if out is None else got

    async def get(self, key: str) -> bytes:
        return await self._with_body_retries(lambda: self._get_into("get", key, None))

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self._with_body_retries(
            lambda: self._get_into("get_range", key, None, Range=f"bytes={start}-{end - 1}")
        )

    async def read_into(self, key: str, start: int, out: memoryview) -> int:
        return await self._with_body_retries(
            lambda: self._get_into("get_range", key, out, Range=f"bytes={start}-{start + len(out) - 1}")
        )

    async def exists(self, key: str) -> bool:
        try:
            await self._s3("head", key, "head_object", Bucket=self.bucket, Key=self.full_key(key))
        except FileNotFoundError:
            return False
        return True

    async def list_objects(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = self.full_key(prefix)
        infos: list[ObjectInfo] = []
        token: str | None = None
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._s3("list", prefix, "list_objects_v2", **kwargs)
            for obj in page.get("Contents", []):
                modified = obj.get("LastModified")
                infos.append(
                    ObjectInfo(
                        self.relative_key(obj["Key"]),
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
                Bucket=self.bucket,
                Delete={"Objects": [{"Key": self.full_key(k)} for k in batch], "Quiet": True},
            )

    async def start_upload(self, key: str) -> MultipartUpload:
        response = await self._s3(
            "start_upload", key, "create_multipart_upload", Bucket=self.bucket, Key=self.full_key(key)
        )
        return MultipartUpload(key, response["UploadId"])

    def _upload_args(self, upload: MultipartUpload) -> dict[str, Any]:
        """The arguments that name a multipart upload in S3's API."""
        return {"Bucket": self.bucket, "Key": self.full_key(upload.key), "UploadId": upload.state}

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
                Bucket=self.bucket,
                Prefix=self.full_key(prefix),
                **markers,
            )
            for item in page.get("Uploads", []):
                key = self.relative_key(item["Key"])
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
