"""pytest fixtures for testing your own checkpointing code against a local S3 server.

Installed with dcp-cloud (``pip install "dcp-cloud[s3,local]"``) and loaded by pytest through
its ``pytest11`` entry point, so in your tests::

    def test_my_trainer_resumes(dcp_cloud_s3_url):
        url, storage_options = dcp_cloud_s3_url
        trainer = MyTrainer(checkpoint_url=url, storage_options=storage_options)
        ...

``dcp_cloud_s3`` is the session's :class:`~dcp_cloud.testing.S3Server` (moto, in a child
process on 127.0.0.1, started on first use and stopped at the end of the session);
``dcp_cloud_s3_url`` gives each test a fresh ``s3://`` prefix on it and the matching
``storage_options``. Clients configured by environment can use ``dcp_cloud_s3.env``.
"""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from typing import Any

import pytest

from . import S3Server

BUCKET = "dcp-cloud-test"


@pytest.fixture(scope="session")
def dcp_cloud_s3() -> Iterator[S3Server]:
    """A local S3 server (moto) with a bucket named ``dcp-cloud-test``."""
    with S3Server() as server:
        server.create_bucket(BUCKET)
        yield server


@pytest.fixture
def dcp_cloud_s3_url(dcp_cloud_s3: S3Server) -> tuple[str, dict[str, Any]]:
    """A fresh checkpoint prefix on the local S3 server, and its storage_options."""
    return f"s3://{BUCKET}/{uuid.uuid4().hex[:12]}", dcp_cloud_s3.storage_options
