"""The pytest plugin users get: fixtures for a local S3 server, loaded by entry point."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from dcp_cloud import CloudStorageReader, CloudStorageWriter
from dcp_cloud.testing import S3Server


def test_fixture_gives_a_fresh_prefix_on_a_live_server(
    dcp_cloud_s3: S3Server, dcp_cloud_s3_url: tuple[str, dict[str, Any]]
) -> None:
    url, options = dcp_cloud_s3_url
    assert url.startswith("s3://dcp-cloud-test/") and options["endpoint_url"] == dcp_cloud_s3.endpoint_url
    dcp.save({"w": torch.arange(5.0)}, storage_writer=CloudStorageWriter(url, storage_options=options))
    out = {"w": torch.zeros(5)}
    dcp.load(out, storage_reader=CloudStorageReader(url, storage_options=options))
    assert torch.equal(out["w"], torch.arange(5.0))
    assert any(r.path.startswith("/" + url.removeprefix("s3://")) for r in dcp_cloud_s3.requests())
