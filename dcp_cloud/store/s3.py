"""S3 and S3-compatible stores, talking to the aiobotocore client that s3fs holds.

We use the client directly for what s3fs's file API hides: multipart uploads whose parts we send
concurrently from our own buffers, conditional PUT (``If-None-Match: *``) for a no-overwrite
commit, batched deletes, and the retry counts in each response's metadata.
"""

from __future__ import annotations

from typing import Any

from s3fs.core import _error_wrapper

from ..errors import BucketNotFoundError, StoreAccessError
from .base import MultipartUpload, ObjectInfo
from .fsspec_store import FsspecStore

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


class S3Store(FsspecStore):
    """Store over an ``s3fs.S3FileSystem``."""

    supports_conditional_put = True

    def __init__(self, fs: Any, url: str, root: str, max_concurrency: int = 16):
        super().__init__(fs, url, root, max_concurrency)
        bucket, prefix, _ = fs.split_path(root)
        self.bucket = bucket
        self.prefix = prefix.strip("/")

    @property
    def loop(self) -> Any:
        return self.fs.loop

    def s3_key(self, key: str) -> str:
        return f"{self.prefix}/{key}" if self.prefix else key

    def _translate(self, exc: BaseException, key: str) -> BaseException:
        code = client_error_code(exc)
        if code == "NoSuchBucket":
            return BucketNotFoundError(
                f"{self.url}: bucket {self.bucket!r} does not exist. Create it (for example "
                f"`aws s3 mb s3://{self.bucket}`) or fix the URL."
            )
        if code in _ACCESS_CODES or isinstance(exc, PermissionError):
            return StoreAccessError(
                f"{self.url}: the store refused the request on {self.s3_key(key)!r} ({code or exc}). "
                "Check the credentials (key/secret, AWS_PROFILE, AWS_* variables) and the "
                "bucket policy."
            )
        if code == "PreconditionFailed":
            return FileExistsError(f"{self.url}: {self.s3_key(key)} already exists")
        return exc

    async def _s3(self, kind: str, key: str, method: str, **kwargs: Any) -> Any:
        try:
            response = await self._request(kind, self.fs._call_s3(method, **kwargs))
        except Exception as exc:
            translated = self._translate(exc, key)
            if translated is exc:
                raise
            raise translated from exc
        retries = response.get("ResponseMetadata", {}).get("RetryAttempts", 0)
        if retries:
            self.counter.retry(retries)
        return response

    async def put(self, key: str, data: bytes, *, if_absent: bool = False) -> None:
        condition = {"IfNoneMatch": "*"} if if_absent else {}
        await self._s3(
            "put", key, "put_object", Bucket=self.bucket, Key=self.s3_key(key), Body=data, **condition
        )

    async def _read(self, kind: str, key: str, **range_kw: Any) -> bytes:
        response = await self._s3(
            kind, key, "get_object", Bucket=self.bucket, Key=self.s3_key(key), **range_kw
        )
        body = response["Body"]
        try:
            return await body.read()
        finally:
            body.close()

    async def get(self, key: str) -> bytes:
        return await self._read("get", key)

    async def get_range(self, key: str, start: int, end: int) -> bytes:
        return await self._read("get_range", key, Range=f"bytes={start}-{end - 1}")

    async def read_into(self, key: str, start: int, out: memoryview) -> int:
        async def attempt() -> int:
            response = await self._s3(
                "get_range",
                key,
                "get_object",
                Bucket=self.bucket,
                Key=self.s3_key(key),
                Range=f"bytes={start}-{start + len(out) - 1}",
            )
            body = response["Body"]
            total = 0
            try:
                while total < len(out):
                    n = await body.readinto(out[total:])
                    if n == 0:
                        break
                    total += n
            finally:
                body.close()
            return total

        # s3fs's wrapper retries a body cut off mid-stream (IncompleteRead, payload errors).
        return await _error_wrapper(attempt, retries=self.fs.retries)

    async def exists(self, key: str) -> bool:
        try:
            await self._s3("head", key, "head_object", Bucket=self.bucket, Key=self.s3_key(key))
        except FileNotFoundError:
            return False
        return True

    async def list(self, prefix: str = "") -> list[ObjectInfo]:
        full_prefix = self.s3_key(prefix)
        infos: list[ObjectInfo] = []
        token: str | None = None
        strip = len(self.prefix) + 1 if self.prefix else 0
        while True:
            kwargs: dict[str, Any] = {"Bucket": self.bucket, "Prefix": full_prefix}
            if token:
                kwargs["ContinuationToken"] = token
            page = await self._s3("list", prefix, "list_objects_v2", **kwargs)
            for obj in page.get("Contents", []):
                modified = obj.get("LastModified")
                infos.append(
                    ObjectInfo(
                        obj["Key"][strip:],
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
                Delete={"Objects": [{"Key": self.s3_key(k)} for k in batch], "Quiet": True},
            )

    async def start_upload(self, key: str) -> MultipartUpload:
        response = await self._s3(
            "start_upload", key, "create_multipart_upload", Bucket=self.bucket, Key=self.s3_key(key)
        )
        return MultipartUpload(key, response["UploadId"])

    async def upload_part(
        self, upload: MultipartUpload, part_number: int, offset: int, data: bytes | bytearray
    ) -> None:
        response = await self._s3(
            "upload_part",
            upload.key,
            "upload_part",
            Bucket=self.bucket,
            Key=self.s3_key(upload.key),
            UploadId=upload.state,
            PartNumber=part_number,
            Body=data,
        )
        upload.parts[part_number] = response["ETag"]

    async def complete_upload(self, upload: MultipartUpload) -> None:
        parts = [{"PartNumber": n, "ETag": etag} for n, etag in sorted(upload.parts.items())]
        await self._s3(
            "complete_upload",
            upload.key,
            "complete_multipart_upload",
            Bucket=self.bucket,
            Key=self.s3_key(upload.key),
            UploadId=upload.state,
            MultipartUpload={"Parts": parts},
        )

    async def abort_upload(self, upload: MultipartUpload) -> None:
        try:
            await self._s3(
                "abort_upload",
                upload.key,
                "abort_multipart_upload",
                Bucket=self.bucket,
                Key=self.s3_key(upload.key),
                UploadId=upload.state,
            )
        except Exception:  # already gone, or the store is unreachable: gc cleans up later
            pass
