"""dcp_cloud.urls: normal form of checkpoint URLs, and keeping credentials out of messages."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from dcp_cloud.errors import StoreConfigError
from dcp_cloud.urls import (
    MASK,
    has_credentials,
    is_supported_url,
    is_usable_url,
    normalize_url,
    redact_url,
    scrub_text,
    secret_values,
    url_scheme,
)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        ("s3://bucket/run", "s3://bucket/run"),
        ("s3://AKIAXX:s3cr3t@bucket/run", "s3://bucket/run"),
        ("s3://user@bucket/run", "s3://bucket/run"),
        ("s3://AKIA:p@ssw0rd@bucket/run", "s3://bucket/run"),  # '@' in the password
        ("s3://AKIA:s3cr3t/bucket/run", f"s3://{MASK}/bucket/run"),  # credentials, no '@'
        ("s3://AKIA%3As3cr3t/bucket", f"s3://{MASK}/bucket"),  # percent-encoded credentials
        ("az://c/blob?sv=2020&sig=abc", "az://c/blob"),
        ("abfs://container@acct.dfs.core.windows.net/run", "abfs://container@acct.dfs.core.windows.net/run"),
        ("http://127.0.0.1:9000/bucket", "http://127.0.0.1:9000/bucket"),
        ("/tmp/what?.txt", "/tmp/what?.txt"),  # a local path keeps its '?'
    ],
)
def test_redact_url(url: str, shown: str) -> None:
    assert redact_url(url) == shown


def test_a_password_with_at_and_slash_is_never_shown() -> None:
    url = "s3://AKIA:p@ss/w0rd@bucket/run"
    assert "w0rd" not in redact_url(url)
    with pytest.raises(StoreConfigError) as caught:
        normalize_url(url)
    assert "w0rd" not in str(caught.value)


def test_redact_url_takes_path_likes() -> None:
    assert redact_url(Path("/tmp/x")) == "/tmp/x"


@given(
    user=st.text(alphabet="ABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789", min_size=4, max_size=12),
    secret=st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789+=@:!", min_size=6, max_size=20),
    scheme=st.sampled_from(["s3", "gs", "az", "abfs", "http"]),
)
def test_redacted_urls_never_show_the_password(user: str, secret: str, scheme: str) -> None:
    # a marker no message text holds, so a hit is the secret and not an English word
    secret = f"zq{secret}"
    url = f"{scheme}://{user}:{secret}@bucket/run/step-1"
    assert has_credentials(url)
    assert secret not in redact_url(url)
    assert user not in redact_url(url)
    with pytest.raises(StoreConfigError) as caught:
        normalize_url(url)
    assert secret not in str(caught.value)


def test_url_scheme() -> None:
    assert url_scheme("S3://b/k") == "s3"
    assert url_scheme("/local/path") == "file"
    assert url_scheme("gs://b") == "gs"


@pytest.mark.parametrize(
    ("url", "normal"),
    [
        ("s3://bucket/run/", "s3://bucket/run"),
        ("s3://bucket/run///", "s3://bucket/run"),
        ("gs://bucket", "gs://bucket"),
        ("memory://b/x/", "memory://b/x"),
        ("s3://bucket/run@2/step-1", "s3://bucket/run@2/step-1"),
    ],
)
def test_normalize_object_store_urls(url: str, normal: str) -> None:
    assert normalize_url(url) == normal
    assert normalize_url(normal) == normal  # idempotent


def test_normalize_local_paths(tmp_path: Path) -> None:
    assert normalize_url(str(tmp_path / "a" / ".." / "ckpt" / "")) == str(tmp_path / "ckpt")
    assert normalize_url(f"file://{tmp_path}/./ckpt/") == f"file://{tmp_path}/ckpt"
    assert normalize_url("relative/ckpt") == os.path.abspath("relative/ckpt")
    assert normalize_url(tmp_path / "ckpt") == str(tmp_path / "ckpt")


@pytest.mark.parametrize(
    ("url", "says"),
    [
        ("", "empty"),
        ("s3://b/a/../c", "'..' path segment"),
        ("s3://b/a/%2e%2e/c", "path segment"),
        ("s3://b/./c", "'.' path segment"),
        ("s3://b/a//c", "empty path segment"),
        ("s3://b/run?versionId=3", "query string"),
        ("s3://k:s@b/run", "credentials"),
        ("s3://b/run\n", "control character"),
    ],
)
def test_urls_that_cannot_be_normalized_safely_are_refused(url: str, says: str) -> None:
    with pytest.raises(StoreConfigError, match=says):
        normalize_url(url)
    assert not is_usable_url(url)


def test_plain_paths_for_remote_filesystems_are_checked_as_url_paths() -> None:
    assert normalize_url("bucket/run/", local_paths=False) == "bucket/run"
    with pytest.raises(StoreConfigError):
        normalize_url("bucket/../run", local_paths=False)


def test_supported_and_usable_urls() -> None:
    assert is_supported_url("s3://b/x") and is_supported_url("memory://b/x") and is_supported_url("/x")
    assert not is_supported_url("nosuchscheme://b/x") and not is_supported_url("")
    assert is_usable_url("s3://b/x") and not is_usable_url("nosuchscheme://b/x")


def test_scrub_text_masks_urls_fields_and_given_secrets() -> None:
    text = (
        "failed GET https://acct.blob.core.windows.net/c/b?sv=1&sig=SIGVALUE "
        "with AccountKey=KEYVALUE; and s3://AK:SECRETVALUE@bucket/x, token=TOKVALUE, opt hunter22"
    )
    scrubbed = scrub_text(text, ["hunter22", "abc"])
    for secret in ("SIGVALUE", "KEYVALUE", "SECRETVALUE", "TOKVALUE", "hunter22"):
        assert secret not in scrubbed
    assert "https://acct.blob.core.windows.net/c/b" in scrubbed and "s3://bucket/x" in scrubbed
    assert scrub_text("abc is short", ["abc"]) == "abc is short"  # under 4 characters: kept


def test_secret_values_of_storage_options() -> None:
    options = {
        "key": "AKIAKEY",
        "secret": "SECRET",
        "endpoint_url": "http://u:pw@127.0.0.1:9000",
        "region_name": "us-east-1",
        "client_kwargs": {"aws_session_token": "TOKEN", "endpoint_url": "http://host"},
        "list": ["ITEM"],
        "retries": 3,
    }
    found = set(secret_values(options))
    assert {"AKIAKEY", "SECRET", "TOKEN", "ITEM", "u:pw", "pw"} <= found
    assert "us-east-1" not in found and "http://host" not in found
    assert "http://u:pw@127.0.0.1:9000" not in found
