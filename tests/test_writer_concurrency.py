"""The writer's default concurrency: 64 requests in flight on a remote store, 8 where the
store's server runs on this machine (a loopback endpoint shares the CPU)."""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed.checkpoint as dcp

from dcp_cloud import CloudStorageWriter

from .conftest import Target

MiB = 1024 * 1024


def test_a_server_on_this_machine_gets_fewer_uploads_at_once(s3_target: Target) -> None:
    writer = s3_target.writer()
    assert writer.store.on_this_machine  # moto on 127.0.0.1
    assert writer.max_concurrency == writer.store.max_concurrency == 8
    assert writer.sizes_for(256 * MiB).part_size == 16 * MiB  # 16 parts keep 8 connections busy
    assert writer.sizes_for(48 * MiB).part_size == 6 * MiB  # a part for each connection
    given = s3_target.writer(max_concurrency=64)
    assert given.max_concurrency == 64 and given.sizes_for(256 * MiB).part_size == 5 * MiB
    state = {f"w{i}": torch.randn(MiB) for i in range(3)}
    dcp.save(state, storage_writer=writer)
    out = {k: torch.zeros_like(v) for k, v in state.items()}
    dcp.load(out, storage_reader=s3_target.reader())
    assert all(torch.equal(out[k], v) for k, v in state.items())


def test_a_remote_endpoint_keeps_the_cloud_default() -> None:
    options: dict[str, Any] = {"endpoint_url": "https://s3.example.com", "key": "k", "secret": "s"}
    writer = CloudStorageWriter("s3://bucket/ckpt", storage_options=options)
    assert not writer.store.on_this_machine
    assert writer.max_concurrency == 64
    assert writer.sizes_for(256 * MiB).part_size == 5 * MiB  # a part for each of 52 connections
