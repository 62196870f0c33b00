"""Attacks on the per-process filesystem cache (dcp_cloud.store.filesystems): a client built for
one identity, endpoint or configuration must never serve another; the cache must not change
fsspec's own instance cache, must keep evicted clients usable by the stores that hold them,
must not deadlock or share clients across a fork, and must not log or key by secrets in clear.

Real requests go to moto's S3 server, which refuses any request not signed with its access key,
so "which identity signs" is observed by the server, not assumed.
"""

from __future__ import annotations

import copy
import gc
import logging
import multiprocessing
import threading
import uuid
import weakref
from pathlib import Path
from typing import Any

import fsspec
import fsspec.asyn
import fsspec.config
import pytest

from dcp_cloud.store.filesystems import CAPACITY, FILESYSTEMS
from dcp_cloud.store.registry import open_store as _open_store
from dcp_cloud.testing import AzuriteServer, S3Server
from tests.conftest import BUCKET, Target

INTRUDER = "intruder-key"


def open_store(url: str, options: dict[str, Any]) -> Any:
    """The store for ``url`` (typed loosely: the tests reach into its ``fs``)."""
    return _open_store(url, options)


def _url(target: Target, name: str = "") -> str:
    return f"{target.url}/{name or uuid.uuid4().hex[:8]}"


def _signing_key(fs: Any) -> str:
    """The access key the filesystem's client signs requests with (connecting it if needed)."""
    client = fs.connect()
    credentials = client._request_signer._credentials
    frozen = fsspec.asyn.sync(fs.loop, credentials.get_frozen_credentials)
    return str(frozen.access_key)


def _server_accepts(fs: Any) -> bool:
    """Whether the S3 server answers a listing made with this filesystem's client."""
    try:
        fs.ls(BUCKET, refresh=True)
    except PermissionError:
        return False
    return True


@pytest.fixture
def clean_aws_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """No AWS variable from the outer environment, and credential files of this test only."""
    import os

    for name in list(os.environ):
        if name.startswith(("AWS_", "BOTO_")):
            monkeypatch.delenv(name)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "aws-credentials"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    (tmp_path / "aws-config").write_text("")
    (tmp_path / "aws-credentials").write_text("")
    return tmp_path


def _without_credentials(server: S3Server) -> dict[str, Any]:
    options = dict(server.storage_options)
    options.pop("key")
    options.pop("secret")
    return options


# -- different identity, endpoint or configuration: never the same client ----------------------


def test_options_that_differ_in_any_identity_setting_get_distinct_filesystems(s3_target: Target) -> None:
    base = s3_target.storage_options
    variants: list[dict[str, Any]] = [
        dict(base),
        {**base, "token": "session-token-a"},
        {**base, "token": "session-token-b"},
        {**base, "anon": True},
        {**base, "profile": "other"},
        {**base, "client_kwargs": {"region_name": "eu-west-1"}},
        {**base, "client_kwargs": {**base["client_kwargs"], "endpoint_url": "http://127.0.0.1:9"}},
        {**base, "endpoint_url": base["endpoint_url"] + "/"},
        {**base, "config_kwargs": {"signature_version": "s3"}},
        {**base, "key": base["key"] + " "},
        {**base, "secret": 1},  # typed: 1 and "1" and True are different settings
        {**base, "secret": "1"},
        {**base, "secret": True},
        {**base, "client_kwargs": ({"region_name": "us-east-1"},)},  # a tuple is not its content
    ]
    filesystems = [open_store(_url(s3_target), options).fs for options in variants]
    assert len({id(fs) for fs in filesystems}) == len(variants)
    # and each one carries its own settings, not another's
    for options, fs in zip(variants, filesystems):
        assert fs.storage_options.get("token") == options.get("token")
        assert fs.storage_options.get("secret") == options.get("secret")


def test_the_same_settings_in_another_order_or_copy_share_one_filesystem(s3_target: Target) -> None:
    options = s3_target.storage_options
    reordered = dict(reversed(list(copy.deepcopy(options).items())))
    first = open_store(_url(s3_target), options).fs
    assert open_store(_url(s3_target), reordered).fs is first


def test_credential_objects_are_told_apart_by_identity_even_after_one_is_dropped(s3_target: Target) -> None:
    class Provider:
        """Stands for a credential provider: two equal-looking ones may be different identities."""

    first_provider = Provider()
    options = {
        **s3_target.storage_options,
        "client_kwargs": {"region_name": "us-east-1", "p": first_provider},
    }
    first = open_store(_url(s3_target), options).fs
    again = open_store(_url(s3_target), {**options, "client_kwargs": dict(options["client_kwargs"])}).fs
    assert again is first
    first_id = id(first_provider)
    del first_provider, options, again
    gc.collect()
    # the cache keeps the object alive, so a new object can never take its id and its key
    seen = set()
    for _ in range(CAPACITY // 2):  # fewer new entries than would evict the first one
        provider = Provider()
        seen.add(id(provider))
        other = {**s3_target.storage_options, "client_kwargs": {"region_name": "us-east-1", "p": provider}}
        assert open_store(_url(s3_target), other).fs is not first
    assert first_id not in seen


def test_a_changed_credential_environment_variable_is_a_new_identity(
    s3_target: Target, monkeypatch: pytest.MonkeyPatch, clean_aws_env: Path
) -> None:
    server = s3_target.server
    assert isinstance(server, S3Server)
    options = _without_credentials(server)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    good = open_store(_url(s3_target), options).fs
    assert _server_accepts(good)

    for name, value in [
        ("AWS_ACCESS_KEY_ID", INTRUDER),
        ("AWS_PROFILE", "other"),
        ("AWS_ROLE_ARN", "arn:aws:iam::1:role/x"),
        ("AWS_WEB_IDENTITY_TOKEN_FILE", "/tmp/token"),
        ("AWS_CONTAINER_CREDENTIALS_FULL_URI", "http://127.0.0.1:9/creds"),
        ("aws_access_key_id", "lower-case-is-another-variable"),
        ("https_proxy", "http://127.0.0.1:9"),
    ]:
        with monkeypatch.context() as patch:
            patch.setenv(name, value)
            assert open_store(_url(s3_target), options).fs is not good, name

    monkeypatch.setenv("AWS_ACCESS_KEY_ID", INTRUDER)
    intruder = open_store(_url(s3_target), options).fs
    assert _signing_key(intruder) == INTRUDER
    assert not _server_accepts(intruder)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    assert open_store(_url(s3_target), options).fs is good
    assert _server_accepts(good)


def test_rewritten_shared_credentials_file_is_a_new_identity(
    s3_target: Target, monkeypatch: pytest.MonkeyPatch, clean_aws_env: Path
) -> None:
    """A credentials file rewritten in place (a sidecar rotating keys, another profile's keys)
    must not keep serving the identity it held when the first client was built."""
    server = s3_target.server
    assert isinstance(server, S3Server)
    options = _without_credentials(server)
    credentials = clean_aws_env / "aws-credentials"
    credentials.write_text(
        f"[default]\naws_access_key_id = {server.access_key}\naws_secret_access_key = {server.secret_key}\n"
    )
    first = open_store(_url(s3_target), options).fs
    assert _signing_key(first) == server.access_key

    credentials.write_text(f"[default]\naws_access_key_id = {INTRUDER}\naws_secret_access_key = x\n")
    second = open_store(_url(s3_target), options).fs
    assert _signing_key(second) == INTRUDER, "a client of the file's previous identity was reused"


def test_fsspec_config_defaults_are_part_of_the_configuration(
    s3_target: Target, monkeypatch: pytest.MonkeyPatch, clean_aws_env: Path
) -> None:
    """fsspec applies ``fsspec.config.conf[protocol]`` as default options to every filesystem it
    builds (and its own instance cache keys by them): a changed default is another client."""
    server = s3_target.server
    assert isinstance(server, S3Server)
    options = _without_credentials(server)
    monkeypatch.setitem(fsspec.config.conf, "s3", {"key": server.access_key, "secret": server.secret_key})
    first = open_store(_url(s3_target), options).fs
    assert _server_accepts(first)

    monkeypatch.setitem(fsspec.config.conf, "s3", {"key": INTRUDER, "secret": "x"})
    second = open_store(_url(s3_target), options).fs
    assert second is not first, "a client built with fsspec's previous default credentials was reused"
    assert _signing_key(second) == INTRUDER


def test_a_nested_option_mutated_after_opening_does_not_reach_another_store(s3_target: Target) -> None:
    """The cache keys by the options' content when opened; the filesystem must hold that
    content too, not the caller's dicts, or a later mutation rewires a cached, not yet connected
    client under a key that still says the old settings."""
    server = s3_target.server
    assert isinstance(server, S3Server)
    base = _without_credentials(server)

    def options() -> dict[str, Any]:
        return {
            **base,
            "client_kwargs": {
                "region_name": "us-east-1",
                "aws_access_key_id": server.access_key,
                "aws_secret_access_key": server.secret_key,
            },
            "config_kwargs": {"user_agent_extra": uuid.uuid4().hex},  # a configuration of this test only
        }

    mine = options()
    open_store(_url(s3_target), mine)  # opened, not yet used
    mine["client_kwargs"]["aws_access_key_id"] = INTRUDER  # the caller reuses its dict for another identity

    theirs = {**mine, "client_kwargs": {**mine["client_kwargs"], "aws_access_key_id": server.access_key}}
    fs = open_store(_url(s3_target), theirs).fs
    assert _signing_key(fs) == server.access_key, "another store's mutated options rewired this client"
    assert _server_accepts(fs)


def test_the_environment_at_first_use_does_not_rewire_a_client_keyed_by_another(
    s3_target: Target, monkeypatch: pytest.MonkeyPatch, clean_aws_env: Path
) -> None:
    """botocore reads credentials from the environment when a client is made; the cache keys a
    filesystem by the environment when the store is opened, so the client is made then too."""
    server = s3_target.server
    assert isinstance(server, S3Server)
    options = {**_without_credentials(server), "config_kwargs": {"user_agent_extra": uuid.uuid4().hex}}
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", server.secret_key)
    opened = open_store(_url(s3_target), options)  # keyed by the environment now
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", INTRUDER)  # e.g. another thread switching identity
    _signing_key(opened.fs)  # first use: the client was made when the store was opened
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", server.access_key)
    later = open_store(_url(s3_target), options).fs
    assert _signing_key(later) == server.access_key


# -- skip_instance_cache and fsspec's own instance cache ----------------------------------------


def test_skip_instance_cache_true_is_never_shared(s3_target: Target) -> None:
    options = {**s3_target.storage_options, "skip_instance_cache": True}
    built = FILESYSTEMS.built
    first = open_store(_url(s3_target), options).fs
    second = open_store(_url(s3_target), options).fs
    assert first is not second
    assert first is not open_store(_url(s3_target), s3_target.storage_options).fs
    assert FILESYSTEMS.built - built <= 1  # only the plain open may have built a shared one
    assert _server_accepts(first)


def test_skip_instance_cache_false_is_accepted(s3_target: Target) -> None:
    """``skip_instance_cache=False`` is fsspec's default said out loud: it must open the store
    (not fail with 'multiple values for keyword argument')."""
    options = {**s3_target.storage_options, "skip_instance_cache": False}
    store = open_store(_url(s3_target), options)
    assert _server_accepts(store.fs)


def test_the_cache_leaves_fsspecs_instance_cache_alone(s3_target: Target) -> None:
    s3fs = pytest.importorskip("s3fs")
    options = {**s3_target.storage_options, "config_kwargs": {"user_agent_extra": uuid.uuid4().hex}}
    before = dict(s3fs.S3FileSystem._cache)
    latest = s3fs.S3FileSystem._latest
    ours = open_store(_url(s3_target), options).fs
    assert dict(s3fs.S3FileSystem._cache) == before
    assert s3fs.S3FileSystem._latest == latest
    # the user's own filesystem of the same options is fsspec's, not the cache's
    users = s3fs.S3FileSystem(**options)
    try:
        assert users is not ours
        assert s3fs.S3FileSystem(**options) is users
    finally:
        s3fs.S3FileSystem._cache.pop(users._fs_token, None)
        s3fs.S3FileSystem._latest = latest


# -- eviction, threads, fork --------------------------------------------------------------------


def test_an_evicted_filesystem_keeps_serving_its_store_and_is_freed_when_dropped(s3_target: Target) -> None:
    tag = uuid.uuid4().hex
    options = {**s3_target.storage_options, "config_kwargs": {"user_agent_extra": tag}}
    held = open_store(_url(s3_target), options)
    assert _server_accepts(held.fs)
    dropped = weakref.ref(
        open_store(_url(s3_target), {**options, "config_kwargs": {"user_agent_extra": tag + "x"}}).fs
    )

    for i in range(CAPACITY + 2):
        open_store(_url(s3_target), {**options, "config_kwargs": {"user_agent_extra": f"{tag}-{i}"}})
    assert len(FILESYSTEMS) <= CAPACITY

    assert _server_accepts(held.fs)  # evicted, still in use, still working
    built = FILESYSTEMS.built
    reopened = open_store(_url(s3_target), options).fs
    assert reopened is not held.fs and FILESYSTEMS.built == built + 1
    gc.collect()
    assert dropped() is None, "an evicted filesystem nobody holds is still referenced"


def test_threads_opening_one_configuration_get_one_filesystem(s3_target: Target) -> None:
    options = {**s3_target.storage_options, "config_kwargs": {"user_agent_extra": uuid.uuid4().hex}}
    others = [{**s3_target.storage_options, "token": f"t{i}"} for i in range(4)]
    barrier = threading.Barrier(12)
    same: list[Any] = []
    different: dict[int, Any] = {}
    errors: list[BaseException] = []

    def open_one(i: int) -> None:
        try:
            barrier.wait(10)
            if i < 8:
                same.append(open_store(_url(s3_target), options).fs)
            else:
                different[i] = open_store(_url(s3_target), others[i - 8]).fs
        except BaseException as exc:  # reported below
            errors.append(exc)

    built = FILESYSTEMS.built
    threads = [threading.Thread(target=open_one, args=(i,)) for i in range(12)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(30)
    assert not errors, errors
    assert len({id(fs) for fs in same}) == 1 and len(same) == 8
    assert len({id(fs) for fs in different.values()}) == 4
    assert same[0] not in different.values()
    for i, fs in different.items():
        assert fs.storage_options["token"] == f"t{i - 8}"
    assert FILESYSTEMS.built - built == 5


def _open_in_child(url: str, options: dict[str, Any], parent_fs_id: int, results: Any) -> None:
    try:
        store = open_store(url, options)
        results.put(("ok", id(store.fs) != parent_fs_id, _server_accepts(store.fs)))
    except BaseException as exc:
        results.put(("error", repr(exc), False))


def test_a_fork_while_the_cache_lock_is_held_does_not_deadlock_the_child(s3_target: Target) -> None:
    options = dict(s3_target.storage_options)
    parent = open_store(_url(s3_target), options).fs
    assert _server_accepts(parent)
    context = multiprocessing.get_context("fork")
    results = context.Queue()
    FILESYSTEMS._lock.acquire()  # as if another thread were building a client at the fork
    try:
        child = context.Process(target=_open_in_child, args=(_url(s3_target), options, id(parent), results))
        child.start()
    finally:
        FILESYSTEMS._lock.release()
    outcome = results.get(timeout=60)
    child.join(30)
    assert outcome == ("ok", True, True), outcome
    assert child.exitcode == 0
    assert open_store(_url(s3_target), options).fs is parent  # the parent's cache is untouched


# -- secrets ------------------------------------------------------------------------------------


def test_keys_and_logs_hold_no_secret(s3_target: Target, caplog: pytest.LogCaptureFixture) -> None:
    secret = f"s3cr3t-{uuid.uuid4().hex}"
    options = {**s3_target.storage_options, "secret": secret, "token": secret + "-token"}
    with caplog.at_level(logging.DEBUG):
        open_store(_url(s3_target), options)
    assert secret not in caplog.text
    keys = list(FILESYSTEMS._entries)
    assert keys and all(len(k) == 64 and secret not in k for k in keys)


# -- Azure: keys, SAS tokens and credential objects --------------------------------------------


@pytest.fixture
def azure_target(request: pytest.FixtureRequest, tmp_path: Path) -> Target:
    from tests.conftest import make_target

    return make_target("azure", request, tmp_path)


def test_azure_connection_strings_of_other_keys_or_sas_never_share_a_client(azure_target: Target) -> None:
    server = azure_target.server
    assert isinstance(server, AzuriteServer)
    connection = azure_target.storage_options["connection_string"]
    parts = dict(p.split("=", 1) for p in connection.split(";") if p)
    wrong_key = connection.replace(parts["AccountKey"], "AAAA" + parts["AccountKey"][4:])
    endpoint = parts["BlobEndpoint"]
    with_sas = {
        "connection_string": f"BlobEndpoint={endpoint};SharedAccessSignature={server.sas_token(BUCKET)}"
    }
    other_sas = {
        "connection_string": f"BlobEndpoint={endpoint};SharedAccessSignature={server.sas_token(BUCKET, hours=1)}"
    }

    good = open_store(_url(azure_target), {"connection_string": connection}).fs
    wrong = open_store(_url(azure_target), {"connection_string": wrong_key}).fs
    sas = open_store(_url(azure_target), with_sas).fs
    sas2 = open_store(_url(azure_target), other_sas).fs
    assert len({id(good), id(wrong), id(sas), id(sas2)}) == 4
    assert open_store(_url(azure_target), {"connection_string": connection}).fs is good
    assert good.ls(BUCKET, refresh=True) is not None
    with pytest.raises(Exception):  # noqa: B017 (adlfs raises the SDK's error as it is)
        wrong.ls(BUCKET, refresh=True)
    assert good.ls(BUCKET, refresh=True) is not None  # the wrong key's client is not the good one's
