"""Faults survived: a server that fails requests (503 SlowDown, 500, cut connections)."""

from __future__ import annotations

import time
import uuid
from collections.abc import Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import BucketNotFoundError, CloudStorageReader, CloudStorageWriter
from dcp_cloud.testing import S3Server
from dcp_cloud.testing.fault_proxy import FaultProxy

from .conftest import BUCKET, SERVERS
from .helpers import assert_same, failure_text, failure_types

MiB = 1024 * 1024


# the module-scoped fixture is built once: all of the module on one pytest-xdist worker
pytestmark = pytest.mark.xdist_group(__name__)


@pytest.fixture(scope="module")
def faulty_server() -> Iterator[S3Server]:
    with S3Server() as server:
        server.create_bucket("faulty")
        yield server


def _state(seed: int) -> dict[str, Any]:
    g = torch.Generator().manual_seed(seed)
    return {
        "big": torch.randn(3 * MiB, generator=g),  # 12 MiB: three 5 MiB parts
        "layers": {f"l{i}": torch.randn(4096, generator=g) for i in range(40)},
        "step": seed,
    }


def _zeros(state: dict[str, Any]) -> dict[str, Any]:
    return {
        "big": torch.zeros_like(state["big"]),
        "layers": {k: torch.zeros_like(v) for k, v in state["layers"].items()},
        "step": -1,
    }


def test_ten_percent_faults_every_save_and_load_succeeds(faulty_server: S3Server) -> None:
    options = faulty_server.storage_options
    faulty_server.set_faults(0.10, kinds="503,500,reset", seed=11)
    retries = 0
    try:
        for attempt in range(6):
            url = f"s3://faulty/ten-percent/{attempt}"
            state = _state(attempt)
            writer = CloudStorageWriter(url, storage_options=options, part_size=5 * MiB)
            dcp.save(state, storage_writer=writer)
            reader = CloudStorageReader(url, storage_options=options, part_size=5 * MiB)
            out = _zeros(state)
            dcp.load(out, storage_reader=reader)
            assert_same(state, out)
            retries += writer.last_stats.retries + reader.last_stats.retries  # type: ignore[union-attr]
        counts = faulty_server.fault_counts()
    finally:
        faulty_server.set_faults(0.0)
    injected = sum(counts.get(k, 0) for k in ("503", "500", "reset"))
    print(f"\n10% faults: {counts['requests']} requests, injected {counts}, {retries} retries counted")
    assert injected >= 5, counts  # the faults really happened
    assert retries >= 1, "retries are not reported in the stats"


@pytest.fixture(params=["gcs", "azure"])
def proxied(request: pytest.FixtureRequest) -> Iterator[tuple[str, dict[str, Any], FaultProxy]]:
    """A GCS or Azure emulator behind a fault proxy: (URL, storage options, proxy)."""
    server = request.getfixturevalue(SERVERS[request.param][1])
    with FaultProxy(server.endpoint_url) as proxy:
        if request.param == "gcs":
            options = {**server.storage_options, "endpoint_url": proxy.endpoint_url}
        else:
            options = {
                "connection_string": server.connection_string.replace(server.endpoint_url, proxy.endpoint_url)
            }
        yield f"{SERVERS[request.param][0]}://{BUCKET}/faults-{uuid.uuid4().hex[:8]}", options, proxy


def test_faults_on_gcs_and_azure_are_survived(proxied: tuple[str, dict[str, Any], FaultProxy]) -> None:
    """The store's one retry layer covers GCS and Azure too: only the injected faults and the
    bitwise round trips are checked here."""
    base, options, proxy = proxied
    proxy.set_faults(0.10, kinds="503,500,reset", seed=7)
    try:
        for attempt in range(2):
            url = f"{base}/{attempt}"
            state = _state(attempt)
            dcp.save(
                state, storage_writer=CloudStorageWriter(url, storage_options=options, part_size=5 * MiB)
            )
            out = _zeros(state)
            dcp.load(out, storage_reader=CloudStorageReader(url, storage_options=options, part_size=5 * MiB))
            assert_same(state, out)
        counts = proxy.fault_counts()
    finally:
        proxy.set_faults(0.0)
    print(f"\n10% faults via the proxy: {counts}")
    assert sum(counts.get(k, 0) for k in ("503", "500", "reset")) >= 3, counts


def test_cut_connections_on_downloads_are_retried(faulty_server: S3Server) -> None:
    options = faulty_server.storage_options
    state = _state(100)
    dcp.save(
        state,
        storage_writer=CloudStorageWriter("s3://faulty/cut", storage_options=options, part_size=5 * MiB),
    )
    faulty_server.set_faults(0.3, kinds="reset", seed=5)
    try:
        reader = CloudStorageReader("s3://faulty/cut", storage_options=options, part_size=5 * MiB)
        out = _zeros(state)
        dcp.load(out, storage_reader=reader)
        counts = faulty_server.fault_counts()
    finally:
        faulty_server.set_faults(0.0)
    assert_same(state, out)
    assert counts.get("reset", 0) >= 1 and reader.last_stats.retries >= 1  # type: ignore[union-attr]


def test_non_retryable_errors_fail_fast(faulty_server: S3Server) -> None:
    faulty_server.clear_requests()
    start = time.monotonic()
    with pytest.raises(CheckpointException) as info:
        dcp.save(
            {"x": torch.ones(4)},
            storage_writer=CloudStorageWriter(
                "s3://no-such-bucket-x/c", storage_options=faulty_server.storage_options
            ),
        )
    elapsed = time.monotonic() - start
    assert BucketNotFoundError in failure_types(info.value)
    to_missing = [r for r in faulty_server.requests() if r.path.startswith("/no-such-bucket-x")]
    assert len(to_missing) <= 2, [(r.method, r.path) for r in to_missing]  # no retries of a 404
    assert elapsed < 10


def test_attempts_are_configurable(faulty_server: S3Server) -> None:
    faulty_server.set_faults(1.0, kinds="503", seed=1)
    try:
        start = time.monotonic()
        with pytest.raises(CheckpointException):
            dcp.save(
                {"x": torch.ones(4)},
                storage_writer=CloudStorageWriter(
                    "s3://faulty/never", storage_options=faulty_server.storage_options, max_attempts=2
                ),
            )
        counts = faulty_server.fault_counts()
    finally:
        faulty_server.set_faults(0.0)
    assert counts["503"] == 2, counts  # exactly max_attempts tries of the first request
    assert time.monotonic() - start < 10


def test_deadline_bounds_a_request_and_its_retries(faulty_server: S3Server) -> None:
    faulty_server.set_faults(1.0, kinds="503", seed=2)
    try:
        start = time.monotonic()
        with pytest.raises(CheckpointException) as info:
            dcp.save(
                {"x": torch.ones(4)},
                storage_writer=CloudStorageWriter(
                    "s3://faulty/deadline",
                    storage_options=faulty_server.storage_options,
                    max_attempts=100,
                    deadline=2.0,
                ),
            )
        elapsed = time.monotonic() - start
    finally:
        faulty_server.set_faults(0.0)
    assert "deadline" in failure_text(info.value)
    assert 1.5 < elapsed < 15
