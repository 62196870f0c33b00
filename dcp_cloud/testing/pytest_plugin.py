"""pytest fixtures for testing your own checkpointing code against local object-store servers.

Installed with dcp-cloud (``pip install "dcp-cloud[s3,local]"``; add ``gcs`` and ``azure`` for
those stores) and loaded by pytest through its ``pytest11`` entry point, so in your tests::

    def test_my_trainer_resumes(dcp_cloud_s3_url):
        url, storage_options = dcp_cloud_s3_url
        trainer = MyTrainer(checkpoint_url=url, storage_options=storage_options)
        ...

Each store has a session-wide server, started on first use and stopped at the end of the
session, and a per-test fixture giving a fresh prefix on it with the matching
``storage_options``:

- ``dcp_cloud_s3`` / ``dcp_cloud_s3_url``: moto's S3 server (:class:`~dcp_cloud.testing.S3Server`);
- ``dcp_cloud_gcs`` / ``dcp_cloud_gcs_url``: fake-gcs-server (:class:`~dcp_cloud.testing.GCSServer`);
- ``dcp_cloud_azure`` / ``dcp_cloud_azure_url``: Azurite (:class:`~dcp_cloud.testing.AzuriteServer`,
  needs ``npm install -g azurite``).

Every server has a bucket (container) named ``dcp-cloud-test``. Clients configured by environment
can use the server's ``env``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest

from . import AzuriteServer, GCSServer, S3Server

BUCKET = "dcp-cloud-test"
Server = TypeVar("Server", S3Server, GCSServer, AzuriteServer)


def _fresh_prefix() -> str:
    return uuid.uuid4().hex[:12]


def _serve(server: Server) -> Iterator[Server]:
    """Start ``server``, create the bucket, yield it, always stop it."""
    with server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture(scope="session")
def dcp_cloud_s3() -> Iterator[S3Server]:
    """A local S3 server (moto) with a bucket named ``dcp-cloud-test``."""
    yield from _serve(S3Server())


@pytest.fixture
def dcp_cloud_s3_url(dcp_cloud_s3: S3Server) -> tuple[str, dict[str, Any]]:
    """A fresh checkpoint prefix on the local S3 server, and its storage_options."""
    return f"s3://{BUCKET}/{_fresh_prefix()}", dcp_cloud_s3.storage_options


@pytest.fixture(scope="session")
def dcp_cloud_gcs() -> Iterator[GCSServer]:
    """A local GCS server (fake-gcs-server) with a bucket named ``dcp-cloud-test``."""
    yield from _serve(GCSServer())


@pytest.fixture
def dcp_cloud_gcs_url(dcp_cloud_gcs: GCSServer) -> tuple[str, dict[str, Any]]:
    """A fresh checkpoint prefix on the local GCS server, and its storage_options."""
    return f"gs://{BUCKET}/{_fresh_prefix()}", dcp_cloud_gcs.storage_options


@pytest.fixture(scope="session")
def dcp_cloud_azure() -> Iterator[AzuriteServer]:
    """A local Azure Blob server (Azurite) with a container named ``dcp-cloud-test``."""
    yield from _serve(AzuriteServer())


@pytest.fixture
def dcp_cloud_azure_url(dcp_cloud_azure: AzuriteServer) -> tuple[str, dict[str, Any]]:
    """A fresh checkpoint prefix on the local Azure Blob server, and its storage_options."""
    return f"az://{BUCKET}/{_fresh_prefix()}", dcp_cloud_azure.storage_options
