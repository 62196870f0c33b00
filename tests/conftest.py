"""Fixtures: real stores over HTTP on 127.0.0.1 (moto's S3 server, fake-gcs-server, Azurite),
local folders, memory. Each server starts when the first test that needs it runs."""

from __future__ import annotations

import atexit
import os
import shutil
import tempfile
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pytest

from dcp_cloud import CloudStorageReader, CloudStorageWriter
from dcp_cloud.testing import AzuriteServer, GCSServer, S3Server
from dcp_cloud.testing.azurite import azurite_binary

warnings.filterwarnings("ignore", message="torch.distributed is disabled")

# gcsfs reads this when imported: on, each request to fake-gcs-server first waits ~60 s on a
# gRPC probe. Set for the whole session (and so for every child process) before any test can
# patch the environment: a test that restores os.environ afterwards must not drop it.
os.environ["GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT"] = "false"

# Shared reads make their blocks in a directory of this test process's own (under /dev/shm, a
# tmpfs), so that the tests that look for leftover blocks see only their own loads', not those of
# tests running in another xdist worker (each worker imports this file and makes its own; the
# ranks it starts inherit it).
if os.path.isdir("/dev/shm"):
    _SHM_DIR = tempfile.mkdtemp(prefix="dcp-cloud-tests-", dir="/dev/shm")
    os.environ["DCP_CLOUD_SHM_DIR"] = _SHM_DIR
    atexit.register(shutil.rmtree, _SHM_DIR, ignore_errors=True)

BUCKET = "dcp-cloud-tests"
STORES = ["s3", "gcs", "azure", "file", "memory"]


@pytest.fixture(scope="session")
def s3_server() -> Iterator[S3Server]:
    """moto's S3 server in a child process on a free port, with one bucket."""
    with S3Server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def gcs_server() -> Iterator[GCSServer]:
    """fake-gcs-server in a child process on a free port, with one bucket."""
    with GCSServer() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def azure_server() -> Iterator[AzuriteServer]:
    """Azurite's blob service in a child process on a free port, with one container.

    Skipped where Azurite is not installed (it needs Node.js), but never in CI."""
    try:
        azurite_binary()
    except RuntimeError as exc:
        if os.environ.get("CI"):
            raise
        pytest.skip(str(exc))
    with AzuriteServer() as server:
        server.create_bucket(BUCKET)
        yield server


Server = S3Server | GCSServer | AzuriteServer

# URL scheme and server fixture of each store that runs as a server
SERVERS = {"s3": ("s3", "s3_server"), "gcs": ("gs", "gcs_server"), "azure": ("az", "azure_server")}


@dataclass
class Target:
    """A fresh checkpoint location on one store."""

    store: str
    url: str
    storage_options: dict[str, Any] = field(default_factory=dict)
    server: Server | None = None

    def writer(self, url: str | None = None, **kwargs: Any) -> CloudStorageWriter:
        return CloudStorageWriter(url or self.url, storage_options=self.storage_options, **kwargs)

    def reader(self, url: str | None = None, **kwargs: Any) -> CloudStorageReader:
        return CloudStorageReader(url or self.url, storage_options=self.storage_options, **kwargs)

    def child(self, name: str) -> Target:
        return Target(self.store, f"{self.url}/{name}", self.storage_options, self.server)


def make_target(store: str, request: pytest.FixtureRequest, tmp_path: Any) -> Target:
    name = f"t-{uuid.uuid4().hex[:12]}"
    if store in SERVERS:
        scheme, fixture = SERVERS[store]
        server = request.getfixturevalue(fixture)
        return Target(store, f"{scheme}://{BUCKET}/{name}/ckpt", server.storage_options, server)
    if store == "file":
        return Target("file", str(tmp_path / name / "ckpt"))
    return Target("memory", f"memory://{BUCKET}/{name}/ckpt")


@pytest.fixture(params=STORES)
def target(request: pytest.FixtureRequest, tmp_path: Any) -> Target:
    """A fresh checkpoint URL on each store in turn."""
    return make_target(request.param, request, tmp_path)


@pytest.fixture
def s3_target(request: pytest.FixtureRequest, tmp_path: Any) -> Target:
    """A fresh checkpoint URL on the S3 server."""
    return make_target("s3", request, tmp_path)
