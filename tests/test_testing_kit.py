"""The pytest plugin users get: fixtures for local S3, GCS and Azure servers, loaded by entry point."""

from __future__ import annotations

from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp

from dcp_cloud import CloudStorageReader, CloudStorageWriter
from dcp_cloud.testing import S3Server


def _round_trip(url: str, options: dict[str, Any]) -> None:
    dcp.save({"w": torch.arange(5.0)}, storage_writer=CloudStorageWriter(url, storage_options=options))
    out = {"w": torch.zeros(5)}
    dcp.load(out, storage_reader=CloudStorageReader(url, storage_options=options))
    assert torch.equal(out["w"], torch.arange(5.0))


def test_fixture_gives_a_fresh_prefix_on_a_live_server(
    dcp_cloud_s3: S3Server, dcp_cloud_s3_url: tuple[str, dict[str, Any]]
) -> None:
    url, options = dcp_cloud_s3_url
    assert url.startswith("s3://dcp-cloud-test/") and options["endpoint_url"] == dcp_cloud_s3.endpoint_url
    _round_trip(url, options)
    assert any(r.path.startswith("/" + url.removeprefix("s3://")) for r in dcp_cloud_s3.requests())


@pytest.mark.parametrize("store,scheme", [("gcs", "gs"), ("azure", "az")])
def test_gcs_and_azure_fixtures_give_fresh_prefixes_on_live_servers(
    store: str, scheme: str, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue(f"dcp_cloud_{store}")
    url, options = request.getfixturevalue(f"dcp_cloud_{store}_url")
    assert url.startswith(f"{scheme}://dcp-cloud-test/")
    assert server.endpoint_url in str(options)
    _round_trip(url, options)
    # the checkpoint is really on that server, seen by a plain fsspec client
    fs, root = fsspec.core.url_to_fs(url, skip_instance_cache=True, **options)
    assert fs.exists(f"{root}/.metadata")
