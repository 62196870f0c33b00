"""Property tests: random state dicts round-trip bitwise; random corruption is always caught."""

from __future__ import annotations

import logging
import uuid
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import CloudStorageReader, CloudStorageWriter
from dcp_cloud.store import open_store

from .conftest import STORES, make_target
from .helpers import assert_same, failure_text, zeros_like_state

DTYPES = [
    torch.float32,
    torch.float16,
    torch.bfloat16,
    torch.float64,
    torch.int8,
    torch.int32,
    torch.int64,
    torch.uint8,
    torch.bool,
    torch.complex64,
]


@st.composite
def tensors(draw: st.DrawFn) -> torch.Tensor:
    dtype = draw(st.sampled_from(DTYPES))
    shape = draw(st.lists(st.integers(0, 6), min_size=0, max_size=3))
    seed = draw(st.integers(0, 2**16))
    g = torch.Generator().manual_seed(seed)
    numel = 1
    for n in shape:
        numel *= n
    base = (
        torch.randint(0, 2, (numel,), generator=g)
        if dtype == torch.bool
        else torch.randn(numel, generator=g) * 50
    )
    tensor = base.to(dtype).reshape(shape)
    view = draw(st.sampled_from(["plain", "transpose", "slice"]))
    if view == "transpose" and tensor.dim() >= 2:
        tensor = tensor.transpose(0, 1)
    elif view == "slice" and tensor.dim() >= 1 and tensor.shape[0] > 1:
        tensor = tensor[1:]
    return tensor


keys = st.text(alphabet="abcdefghij_", min_size=1, max_size=6)
leaves = st.one_of(tensors(), st.integers(), st.text(max_size=8))
state_dicts = st.dictionaries(
    keys,
    st.recursive(
        leaves, lambda children: st.dictionaries(keys, children, min_size=1, max_size=3), max_leaves=6
    ),
    min_size=1,
    max_size=5,
)

SETTINGS = settings(
    max_examples=12,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)


@pytest.mark.parametrize("store", STORES)
@SETTINGS
@given(state=state_dicts)
def test_random_state_dicts_round_trip_bitwise(
    store: str, state: dict[str, Any], request: pytest.FixtureRequest, tmp_path_factory: Any
) -> None:
    target = make_target(store, request, tmp_path_factory.mktemp("prop"))
    dcp.save(state, storage_writer=target.writer())
    out = zeros_like_state(state)
    dcp.load(out, storage_reader=target.reader())
    assert_same(state, out)


@pytest.mark.parametrize("store", ["s3", "file"])
@SETTINGS
@given(position=st.floats(0.0, 1.0, exclude_max=True), flip=st.integers(1, 255))
def test_random_corruption_is_always_detected(
    store: str, position: float, flip: int, request: pytest.FixtureRequest, tmp_path_factory: Any
) -> None:
    target = make_target(store, request, tmp_path_factory.mktemp("corrupt"))
    state = {"w": torch.randn(64, 64), "b": torch.arange(100), "meta": {"step": 7}}
    dcp.save(state, storage_writer=target.writer())
    store_ = open_store(target.url, target.storage_options)
    key = next(o.key for o in store_.run(store_.list_objects("")) if o.key.endswith(".distcp"))
    data = bytearray(store_.run(store_.get(key)))
    index = int(position * len(data))
    data[index] ^= flip
    store_.run(store_.put(key, bytes(data)))
    out = {"w": torch.zeros(64, 64), "b": torch.zeros(100, dtype=torch.int64), "meta": {"step": 0}}
    try:
        dcp.load(out, storage_reader=target.reader())
    except CheckpointException as exc:
        assert key in failure_text(exc)
        return
    # Loaded without an error: only possible if the flipped byte lies in padding between items,
    # which no item covers. Then the data must be exactly right.
    assert_same(state, out)


def test_secrets_never_reach_logs(s3_server: Any, caplog: pytest.LogCaptureFixture) -> None:
    options = s3_server.storage_options
    url = f"s3://dcp-cloud-tests/secret-{uuid.uuid4().hex[:8]}/ckpt"
    with caplog.at_level(logging.DEBUG):
        writer = CloudStorageWriter(url, storage_options=options, part_size=5 * 1024 * 1024)
        dcp.save({"w": torch.randn(2 * 1024 * 1024)}, storage_writer=writer)
        reader = CloudStorageReader(url, storage_options=options)
        dcp.load({"w": torch.zeros(2 * 1024 * 1024)}, storage_reader=reader)
        try:
            dcp.load(
                {"w": torch.zeros(2)},
                storage_reader=CloudStorageReader(url + "-missing", storage_options=options),
            )
        except CheckpointException as exc:
            logging.getLogger("test").error("load failed: %s", exc)
    logged = "\n".join(r.getMessage() for r in caplog.records)
    assert "dcp_cloud save" in logged  # the capture really saw our log lines
    assert options["secret"] not in logged
    for shown in (repr(writer), repr(reader), writer.last_stats.summary(), str(writer.last_stats)):  # type: ignore[union-attr]
        assert options["secret"] not in shown
