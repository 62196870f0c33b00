"""Stores that cannot be steered outside their root, and that fail within a bound.

- Every store operation that takes a key refuses one that leaves the store's root (``..``,
  ``.``, absolute, empty segments, backslashes, schemes, percent-encoded dots) with
  ``UnsafeCheckpointError`` before the client library sees it: on S3, GCS, Azure with a shared
  key and with a container SAS, local folders and memory. Objects elsewhere survive.
- A dead endpoint (nothing listening, or a server that accepts and never answers) fails with
  ``StoreUnavailableError`` within a bound; a server that is back within the retry window is
  used again and the save completes.
"""

from __future__ import annotations

import concurrent.futures
import time
import uuid
from collections.abc import Callable, Iterator
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import CloudStorageReader, CloudStorageWriter
from dcp_cloud.errors import DcpCloudError, StoreConfigError, StoreUnavailableError, UnsafeCheckpointError
from dcp_cloud.store import ObjectStore, open_store
from dcp_cloud.store.base import MultipartUpload
from dcp_cloud.testing import AzuriteServer, free_port
from dcp_cloud.testing.azurite import ACCOUNT_KEY, ACCOUNT_NAME
from dcp_cloud.testing.fault_proxy import Blackhole, FaultProxy

from .conftest import BUCKET, SERVERS
from .helpers import assert_same, failure_text, failure_types

VICTIM_CONTAINER = "victim-container"

# Keys that name something outside the store's root, or not in a form we send as it is.
ESCAPING_KEYS = [
    "../victim/x",
    "../../victim/x",
    "a/../../victim/x",
    "%2e%2e/victim/x",
    "a/./b",
    "/etc/passwd",
    "a//b",
    "a\\b",
    "s3://other-bucket/x",
    "",
]


# -- the store key guard ------------------------------------------------------------------------


def _options(store: str, request: pytest.FixtureRequest) -> tuple[str, dict[str, Any]]:
    """(URL prefix of the bucket, storage options) of one store kind."""
    if store.startswith("azure-"):
        server: AzuriteServer = request.getfixturevalue("azure_server")
        scope = BUCKET if store == "azure-container-sas" else None
        return f"az://{BUCKET}", server.sas_storage_options(scope)
    if store in SERVERS:
        scheme, fixture = SERVERS[store]
        return f"{scheme}://{BUCKET}", request.getfixturevalue(fixture).storage_options
    if store == "file":
        return str(request.getfixturevalue("tmp_path")), {}
    return f"memory://{BUCKET}", {}


@pytest.fixture(params=["s3", "gcs", "azure", "azure-container-sas", "azure-account-sas", "file", "memory"])
def rooted(request: pytest.FixtureRequest) -> tuple[ObjectStore, ObjectStore]:
    """(a store rooted at ``<run>/ckpt``, a store at ``<run>`` holding ``victim/x``)."""
    base, options = _options(request.param, request)
    run = f"{base}/guard-{uuid.uuid4().hex[:8]}"
    outer = open_store(run, options)
    outer.run(outer.put("victim/x", b"keep me"))
    return open_store(f"{run}/ckpt", options), outer


def _operations(store: ObjectStore, key: str) -> dict[str, Callable[[], Any]]:
    upload = MultipartUpload(key, None)
    return {
        "get": lambda: store.get(key),
        "get_range": lambda: store.get_range(key, 0, 4),
        "read_into": lambda: store.read_into(key, 0, memoryview(bytearray(4))),
        "exists": lambda: store.exists(key),
        "put": lambda: store.put(key, b"evil"),
        "put_if_absent": lambda: store.put(key, b"evil", if_absent=True),
        "delete": lambda: store.delete(["fine", key]),
        "start_upload": lambda: store.start_upload(key),
        "upload_part": lambda: store.upload_part(upload, 1, 0, b"evil"),
        "complete_upload": lambda: store.complete_upload(upload),
        "abort_upload": lambda: store.abort_upload(upload),
        "list_objects": lambda: store.list_objects(key),
        "list_uploads": lambda: store.list_uploads(key),
    }


def test_store_refuses_keys_outside_its_root(rooted: tuple[ObjectStore, ObjectStore]) -> None:
    store, outer = rooted
    store.run(store.put("fine", b"mine"))
    for key in ESCAPING_KEYS:
        for name, operation in _operations(store, key).items():
            if name.startswith("list") and key == "":
                continue  # the empty prefix lists the whole root
            with pytest.raises(UnsafeCheckpointError) as info:
                store.run(operation())
            assert repr(key) in str(info.value), (name, key, str(info.value))
    assert outer.run(outer.get("victim/x")) == b"keep me"
    assert store.run(store.get("fine")) == b"mine"  # the batch with a bad key deleted nothing
    assert [o.key for o in outer.run(outer.list_objects(""))] == ["ckpt/fine", "victim/x"]


def test_listing_prefixes_inside_the_root_still_work(rooted: tuple[ObjectStore, ObjectStore]) -> None:
    store, _ = rooted
    store.run(store.put("save-1/a.distcp", b"a"))
    assert [o.key for o in store.run(store.list_objects("save-1/"))] == ["save-1/a.distcp"]
    assert [o.key for o in store.run(store.list_objects("save-1"))] == ["save-1/a.distcp"]
    assert store.run(store.list_objects("")) != []


def _azure_victim(server: AzuriteServer) -> Any:
    from azure.storage.blob import BlobServiceClient

    client = BlobServiceClient.from_connection_string(server.connection_string)
    container = client.get_container_client(VICTIM_CONTAINER)
    if not container.exists():
        container.create_container()
    container.upload_blob("x", b"other container", overwrite=True)
    return client


@pytest.mark.parametrize("auth", ["shared-key", "container-sas", "account-sas"])
def test_azure_keys_cannot_reach_another_container(azure_server: AzuriteServer, auth: str) -> None:
    client = _azure_victim(azure_server)
    run = f"guard-{uuid.uuid4().hex[:8]}"
    options = {
        "shared-key": azure_server.storage_options,
        "container-sas": azure_server.sas_storage_options(BUCKET),
        "account-sas": azure_server.sas_storage_options(),
    }[auth]
    store = open_store(f"az://{BUCKET}/{run}/ckpt", options)
    key = f"../../../{VICTIM_CONTAINER}/x"
    for operation in (
        lambda: store.delete([key]),
        lambda: store.put(key, b"evil"),
        lambda: store.get(key),
        lambda: store.exists(key),
        lambda: store.delete([f"%2e%2e/%2e%2e/%2e%2e/{VICTIM_CONTAINER}/x"]),
    ):
        with pytest.raises(UnsafeCheckpointError):
            store.run(operation())
    victim = client.get_blob_client(VICTIM_CONTAINER, "x")
    assert victim.download_blob().readall() == b"other container"


def test_control_an_account_sas_client_resolves_dot_segments_into_another_container(
    azure_server: AzuriteServer,
) -> None:
    """Why the guard matters: the SDK sends a blob name's '..' as it is, the HTTP client
    resolves it, and with an account SAS (no signature over the path) the delete lands in
    another container."""
    import asyncio

    from azure.storage.blob.aio import BlobServiceClient

    client = _azure_victim(azure_server)

    async def delete_sneakily() -> None:
        options = azure_server.sas_storage_options()
        async with BlobServiceClient.from_connection_string(options["connection_string"]) as sdk:
            await sdk.get_blob_client(BUCKET, f"run/ckpt/../../../{VICTIM_CONTAINER}/x").delete_blob()

    asyncio.run(delete_sneakily())
    assert not client.get_blob_client(VICTIM_CONTAINER, "x").exists()


def test_azure_sas_is_scoped_to_its_container(azure_server: AzuriteServer) -> None:
    """The testing kit's SAS options reach their container and nothing else."""
    _azure_victim(azure_server)
    options = azure_server.sas_storage_options(BUCKET)
    mine = open_store(f"az://{BUCKET}/sas-{uuid.uuid4().hex[:8]}", options)
    mine.run(mine.put("a", b"1"))
    assert mine.run(mine.get("a")) == b"1"
    assert "AccountKey" not in options["connection_string"]
    other = open_store(f"az://{VICTIM_CONTAINER}", options)
    with pytest.raises(DcpCloudError):
        other.run(other.delete(["x"]))


@pytest.mark.parametrize("root", ["b/a/../other", "b/..", "b/./x", "b/a/%2e%2e/x"])
def test_bucket_roots_with_dot_segments_are_refused(root: str) -> None:
    import s3fs

    from dcp_cloud.store.s3 import S3Store

    fs = s3fs.S3FileSystem(anon=True, endpoint_url=f"http://127.0.0.1:{free_port()}")
    with pytest.raises(StoreConfigError):
        S3Store(fs, f"s3://{root}", root)


# -- bounded failure ----------------------------------------------------------------------------


def _dead_options(store: str, endpoint: str, tight: bool) -> tuple[str, dict[str, Any]]:
    """URL and options that point ``store`` at ``endpoint``; ``tight``: 0.5 s timeouts."""
    if store == "s3":
        options: dict[str, Any] = {"endpoint_url": endpoint, "key": "id", "secret": "top-secret-value"}
        if tight:
            options["config_kwargs"] = {"connect_timeout": 0.5, "read_timeout": 0.5}
        return f"s3://{BUCKET}/dead", options
    if store == "gcs":
        options = {"endpoint_url": endpoint, "token": "anon"}
        if tight:
            import aiohttp

            options["requests_timeout"] = aiohttp.ClientTimeout(total=None, sock_connect=0.5, sock_read=0.5)
        return f"gs://{BUCKET}/dead", options
    options = {
        "connection_string": (
            f"DefaultEndpointsProtocol=http;AccountName={ACCOUNT_NAME};AccountKey={ACCOUNT_KEY};"
            f"BlobEndpoint={endpoint}/{ACCOUNT_NAME};"
        )
    }
    if tight:
        options.update(connection_timeout=0.5, read_timeout=0.5)
    return f"az://{BUCKET}/dead", options


@pytest.fixture(params=["refused", "blackhole"])
def dead_endpoint(request: pytest.FixtureRequest) -> Iterator[str]:
    if request.param == "refused":
        yield f"http://127.0.0.1:{free_port()}"
        return
    with Blackhole() as hole:
        yield hole.endpoint_url


def _assert_unavailable(exc: BaseException, endpoint: str) -> None:
    text = failure_text(exc)
    assert StoreUnavailableError in failure_types(exc) or isinstance(exc, StoreUnavailableError), text
    assert endpoint.split("//")[1] in text, text  # names the endpoint
    assert "retry_window" in text, text  # says which option waits longer
    assert "top-secret-value" not in text and ACCOUNT_KEY not in text


@pytest.mark.parametrize("store", ["s3", "gcs", "azure"])
def test_dead_endpoint_fails_each_operation_quickly(store: str, dead_endpoint: str) -> None:
    url, options = _dead_options(store, dead_endpoint, tight=True)
    target = open_store(url, options)
    target.retry_window = 0.5
    operations = {
        "list": lambda: target.list_objects(""),
        "get": lambda: target.get(".metadata"),
        "put": lambda: target.put("x", b"x"),
    }
    for name, operation in operations.items():
        start = time.monotonic()
        with pytest.raises(StoreUnavailableError) as info:
            target.run(operation())
        elapsed = time.monotonic() - start
        _assert_unavailable(info.value, dead_endpoint)
        assert elapsed < 10, (name, elapsed)
        requests, retries = target.counter.snapshot()
        assert retries >= 1 and requests[name if name != "list" else "list"] >= 2, (name, requests)


@pytest.mark.parametrize("store", ["s3", "azure"])
def test_dead_endpoint_fails_save_and_load_with_few_attempts(store: str) -> None:
    url, options = _dead_options(store, f"http://127.0.0.1:{free_port()}", tight=True)
    start = time.monotonic()
    with pytest.raises(CheckpointException) as saved:
        dcp.save(
            {"x": torch.ones(4)},
            storage_writer=CloudStorageWriter(url, storage_options=options, max_attempts=2),
        )
    with pytest.raises(BaseException) as loaded:
        dcp.load(
            {"x": torch.zeros(4)},
            storage_reader=CloudStorageReader(url, storage_options=options, max_attempts=2),
        )
    assert time.monotonic() - start < 30
    assert StoreUnavailableError in failure_types(saved.value), failure_text(saved.value)
    # torch's rank-local metadata fallback may wrap the load's error; its text is ours
    assert "did not complete a get request" in failure_text(loaded.value), failure_text(loaded.value)


@pytest.mark.slow
def test_dead_endpoints_with_default_options_fail_within_a_minute() -> None:
    """Default options, every store, both kinds of dead endpoint, save and load: each fails with
    StoreUnavailableError in under 75 s (run side by side to keep the suite short)."""
    with Blackhole() as hole:
        refused = f"http://127.0.0.1:{free_port()}"

        def timed(store: str, endpoint: str, call: Any) -> tuple[float, BaseException | None]:
            url, options = _dead_options(store, endpoint, tight=False)
            start = time.monotonic()
            try:
                call(url, options)
            except BaseException as exc:
                return time.monotonic() - start, exc
            return time.monotonic() - start, None

        def save(store: str, endpoint: str) -> tuple[float, BaseException | None]:
            return timed(
                store,
                endpoint,
                lambda url, options: dcp.save(
                    {"x": torch.ones(4)}, storage_writer=CloudStorageWriter(url, storage_options=options)
                ),
            )

        def load(store: str, endpoint: str) -> tuple[float, BaseException | None]:
            return timed(
                store,
                endpoint,
                lambda url, options: dcp.load(
                    {"x": torch.zeros(4)}, storage_reader=CloudStorageReader(url, storage_options=options)
                ),
            )

        cases = [(save, s, hole.endpoint_url) for s in ("s3", "gcs", "azure")]
        cases += [(load, s, refused) for s in ("s3", "gcs", "azure")]
        with concurrent.futures.ThreadPoolExecutor(len(cases)) as pool:
            futures = {
                pool.submit(run, store, endpoint): (run.__name__, store) for run, store, endpoint in cases
            }
            results = {futures[f]: f.result() for f in futures}
    for case, (elapsed, exc) in results.items():
        assert exc is not None, case
        text = failure_text(exc)
        assert StoreUnavailableError in failure_types(exc) or "did not complete a get" in text, (case, text)
        assert elapsed < 75, (case, elapsed)


# -- a server that goes away and comes back -----------------------------------------------------


@pytest.mark.parametrize("store", ["s3", "gcs", "azure"])
def test_a_store_back_within_the_retry_window_completes_the_save(
    store: str, request: pytest.FixtureRequest
) -> None:
    server = request.getfixturevalue(SERVERS[store][1])
    proxy = FaultProxy(server.endpoint_url).start()
    try:
        if store == "azure":
            options = {
                "connection_string": server.connection_string.replace(server.endpoint_url, proxy.endpoint_url)
            }
        else:
            options = {**server.storage_options, "endpoint_url": proxy.endpoint_url}
        url = f"{SERVERS[store][0]}://{BUCKET}/back-{uuid.uuid4().hex[:8]}"
        state = {"a": torch.randn(1000), "b": {"c": torch.arange(10)}, "step": 3}
        proxy.stop()  # the store goes away ...
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            saving = pool.submit(
                dcp.save, state, storage_writer=CloudStorageWriter(url, storage_options=options)
            )
            time.sleep(2)
            assert not saving.done()  # still trying
            proxy.start()  # ... and is back within the retry window
            saving.result(timeout=120)
        out = {"a": torch.zeros(1000), "b": {"c": torch.zeros(10, dtype=torch.long)}, "step": 0}
        dcp.load(out, storage_reader=CloudStorageReader(url, storage_options=options))
        assert_same(state, out)
    finally:
        proxy.stop()


# -- one retry layer ----------------------------------------------------------------------------


@pytest.mark.parametrize("kind", ["503", "reset"])
def test_a_failing_read_is_tried_max_attempts_times_in_all(kind: str, request: pytest.FixtureRequest) -> None:
    """A GET that keeps failing (an error answer, or a body cut off midway) reaches the server
    exactly ``max_attempts`` times: one retry layer, not the client's tries times ours."""
    server = request.getfixturevalue("s3_server")
    url = f"s3://{BUCKET}/one-layer-{uuid.uuid4().hex[:8]}"
    store = open_store(url, server.storage_options, max_attempts=3)
    store.run(store.put("obj", b"x" * 4096))
    server.set_faults(1.0, kinds=kind, seed=5, methods="GET")
    try:
        with pytest.raises(StoreUnavailableError) as info:
            store.run(store.get("obj"))
        counts = server.fault_counts()
    finally:
        server.set_faults(0.0)
    assert counts.get(kind) == 3, counts
    assert "3 tries" in str(info.value)
