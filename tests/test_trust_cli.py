"""URLs, secrets, the CLI's errors and downloads that stay in their destination, against real
stores (moto's S3 server, local folders) and real processes."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner, Result
from torch.distributed.checkpoint.api import CheckpointException

from dcp_cloud import CloudStorageReader, CloudStorageWriter, copy_checkpoint
from dcp_cloud.cli import cli
from dcp_cloud.errors import (
    CheckpointNotFoundError,
    StoreConfigError,
    StoreUnavailableError,
    UnsafeCheckpointError,
)
from dcp_cloud.store import open_store
from dcp_cloud.testing import free_port
from dcp_cloud.urls import normalize_url, redact_url, scrub_text

from .conftest import BUCKET, Target

SECRET = "S3CR3T-do-not-print-9f2c"
SIG = "SIGNATURE-do-not-print-77ab"


def run(*args: str) -> Result:
    """Invoke the CLI in-process; stdout and stderr kept apart."""
    return CliRunner().invoke(cli, list(args), catch_exceptions=False)


def everything(result: Result) -> str:
    return result.stdout + result.stderr


def state() -> dict[str, Any]:
    return {"w": torch.arange(12, dtype=torch.float32).reshape(3, 4), "step": 3}


def save(url: str, storage_options: dict[str, Any] | None = None) -> None:
    dcp.save(state(), storage_writer=CloudStorageWriter(url, storage_options=storage_options))


def opts(target: Target) -> str:
    return json.dumps(target.storage_options)


# -- URL forms -------------------------------------------------------------------------------------

CREDENTIAL_URLS = [
    f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/run",
    f"S3://AKIAEXAMPLE:{SECRET}@{BUCKET}/run",  # scheme in upper case
    f"s3://AKIAEXAMPLE:pa@{SECRET}@{BUCKET}/run",  # '@' inside the password
    f"s3://AKIAEXAMPLE:pa/{SECRET}@{BUCKET}/run",  # '/' inside the password
    f"s3://AKIAEXAMPLE:pa%2F{SECRET}%40x@{BUCKET}/run",  # percent-encoded
    f"s3://AKIAEXAMPLE%3A{SECRET}%40{BUCKET}/run",  # encoded user-info, no literal '@'
    f"gs://user:{SECRET}@{BUCKET}/run",
    f"abfs://container:{SECRET}@account.dfs.core.windows.net/run",
    f"az://{SECRET}@account/run",  # not a container name: treated as a credential
    f"s3://{BUCKET}/run?X-Amz-Signature={SIG}&k={SECRET}",
    f"az://container/run?sv=2024&sig={SECRET}",
]


@pytest.mark.parametrize("url", CREDENTIAL_URLS)
def test_credentials_in_urls_are_refused_and_never_shown(url: str) -> None:
    shown = redact_url(url)
    assert SECRET not in shown and SIG not in shown
    with pytest.raises(StoreConfigError) as caught:
        open_store(url)
    assert SECRET not in str(caught.value) and SIG not in str(caught.value)
    assert caught.value.__cause__ is None and caught.value.__context__ is None
    for make in (CloudStorageWriter, CloudStorageReader):
        with pytest.raises(StoreConfigError) as built:
            make(url)
        assert SECRET not in str(built.value) and "storage_options" in str(built.value)
    assert not CloudStorageReader.validate_checkpoint_id(url)
    assert SECRET not in scrub_text(f"failed on {url} (see {url})")


def test_azure_authority_and_at_signs_in_paths_are_kept() -> None:
    azure = "abfs://container@account.dfs.core.windows.net/run/step-1"
    assert redact_url(azure) == azure and normalize_url(azure + "/") == azure
    assert normalize_url("s3://bucket/run@2/step-1") == "s3://bucket/run@2/step-1"
    assert redact_url("s3://bucket/run@2/step-1") == "s3://bucket/run@2/step-1"
    assert normalize_url("http://127.0.0.1:9000/bucket") == "http://127.0.0.1:9000/bucket"


@pytest.mark.parametrize(
    "url", ["s3://b/run/../other", "s3://b/run/./x", "s3://b/run//x", "s3://b/%2e%2e/x", "memory://../x"]
)
def test_dot_and_empty_segments_are_refused(url: str) -> None:
    with pytest.raises(StoreConfigError, match="segment"):
        open_store(url)
    with pytest.raises(StoreConfigError):
        CloudStorageWriter(url)


def test_local_paths_and_trailing_slashes_are_normalized(tmp_path: Path) -> None:
    (tmp_path / "a").mkdir()
    twisted = f"{tmp_path}/a/../ckpt/"
    assert normalize_url(twisted) == str(tmp_path / "ckpt")
    assert normalize_url(f"file://{twisted}") == f"file://{tmp_path / 'ckpt'}"
    assert normalize_url("s3://b/run/") == "s3://b/run"
    save(twisted)
    store = open_store(twisted)
    assert store.url == str(tmp_path / "ckpt")
    assert (tmp_path / "ckpt" / ".metadata").is_file() and not (tmp_path / "a" / "ckpt").exists()
    writer = CloudStorageWriter(str(tmp_path / "x"))
    writer.reset(f"{tmp_path}/a/../y/")
    assert writer.url == str(tmp_path / "y")


def test_a_query_in_a_reset_checkpoint_id_is_refused(s3_target: Target) -> None:
    writer = CloudStorageWriter(s3_target.url, storage_options=s3_target.storage_options)
    with pytest.raises(BaseException) as caught:
        dcp.save(state(), storage_writer=writer, checkpoint_id=f"{s3_target.url}?sig={SIG}")
    assert SIG not in str(caught.value) and "query string" in str(caught.value)
    assert not open_store(s3_target.url, s3_target.storage_options).run(
        open_store(s3_target.url, s3_target.storage_options).list_objects("")
    )


def test_reprs_hold_no_storage_option_secrets(s3_target: Target) -> None:
    options = {**s3_target.storage_options, "secret": SECRET}
    for made in (
        CloudStorageWriter(s3_target.url, storage_options=options),
        CloudStorageReader(s3_target.url, storage_options=options),
        open_store(s3_target.url, options),
    ):
        assert SECRET not in repr(made) and SECRET not in str(made)


# -- the CLI never prints credentials ---------------------------------------------------------------

COMMANDS = [
    ("ls", "{url}"),
    ("ls", "{url}", "--json"),
    ("info", "{url}"),
    ("verify", "{url}"),
    ("verify", "{url}", "--json"),
    ("gc", "{url}", "--dry-run"),
    ("prune", "{url}", "--keep", "1"),
    ("prune", "{url}", "--keep", "1", "--json"),
    ("cp", "{url}", "{out}/copy"),
    ("cp", "{good}", "{url}"),
    ("convert", "{url}", "{out}/model.pt"),
    ("convert", "{url}", "{out}/model.pt", "--json"),
]


@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: "-".join(a for a in c if "{" not in a))
@pytest.mark.parametrize(
    "secret_url",
    [f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/run", f"s3://{BUCKET}/run?sig={SECRET}"],
    ids=["userinfo", "query"],
)
def test_cli_refuses_secret_urls_without_echoing_them(
    command: tuple[str, ...], secret_url: str, s3_target: Target, tmp_path: Path
) -> None:
    argv = [a.format(url=secret_url, out=tmp_path, good=tmp_path) for a in command]
    result = run(*argv, "--storage-options", opts(s3_target))
    assert result.exit_code == 2, everything(result)
    assert SECRET not in everything(result)
    assert "Traceback" not in everything(result)
    if "--json" in argv:
        doc = json.loads(result.stdout)
        assert doc["ok"] is False and doc["error"] == "StoreConfigError" and doc["exit_code"] == 2
    else:
        lines = result.stderr.strip().splitlines()
        assert len(lines) == 1 and lines[0].startswith("dcp-cloud: error: "), result.stderr


def test_cli_output_holds_no_option_secrets(s3_target: Target, tmp_path: Path) -> None:
    """Every command, succeeding, with a distinctive secret in --storage-options and -v."""
    options = json.dumps({**s3_target.storage_options, "secret": SECRET})
    root = s3_target.url
    save(f"{root}/step-0000000001", s3_target.storage_options)
    save(f"{root}/step-0000000002", s3_target.storage_options)
    step = f"{root}/step-0000000002"
    runs = [
        ["ls", root],
        ["ls", root, "--json"],
        ["info", step],
        ["verify", step],
        ["gc", root, "--dry-run", "--json"],
        ["cp", step, str(tmp_path / "copy")],
        ["convert", step, str(tmp_path / "m.pt"), "--json"],
        ["prune", root, "--keep", "1", "--json"],
    ]
    for argv in runs:
        result = run("-v", *argv, "--storage-options", options)
        assert result.exit_code == 0, (argv, everything(result))
        assert SECRET not in everything(result), argv
    assert (tmp_path / "copy" / ".metadata").is_file() and (tmp_path / "m.pt").is_file()


def test_cli_refuses_credentials_in_the_endpoint_url(s3_target: Target) -> None:
    """An endpoint URL with user-info would reach botocore's messages: it is refused, unshown."""
    port = free_port()
    options = {
        **s3_target.storage_options,
        "endpoint_url": f"http://user:{SECRET}@127.0.0.1:{port}",
        "secret": SECRET,
    }
    result = run("-v", "info", f"s3://{BUCKET}/none", "--storage-options", json.dumps(options))
    assert result.exit_code == 2, everything(result)
    assert SECRET not in everything(result) and "Traceback (most recent call last)" in result.stderr
    assert f"http://127.0.0.1:{port}" in result.stderr and "endpoint_url" in result.stderr


# -- one error line and documented exit codes -------------------------------------------------------


def test_help_documents_exit_codes_and_trust_pickles() -> None:
    top = run("--help")
    assert all(f"{code}  " in top.stdout for code in (0, 1, 2, 3)), top.stdout
    text = run("convert", "--help").stdout
    assert "--trust-pickles" in text and "trust" in text.split("--trust-pickles", 1)[1]


@pytest.mark.parametrize(
    "error, code",
    [
        (CheckpointNotFoundError("s3://b/x: no checkpoint here"), 1),
        (UnsafeCheckpointError("s3://b/x: key '../y' leaves the checkpoint"), 1),
        (StoreUnavailableError("s3://b/x: the store did not answer"), 3),
        (ConnectionRefusedError(111, "Connection refused"), 3),
        (StoreConfigError("s3://b/x: bad"), 2),
        (RuntimeError(f"unexpected, see http://u:{SECRET}@h/x?sig={SIG}"), 1),
    ],
)
@pytest.mark.parametrize("wrapped", [False, True], ids=["bare", "in-CheckpointException"])
def test_errors_become_one_line_and_an_exit_code(
    error: BaseException, code: int, wrapped: bool, monkeypatch: pytest.MonkeyPatch
) -> None:
    raised: BaseException = CheckpointException("failed", {0: (error, None)}) if wrapped else error

    def boom(*args: Any, **kwargs: Any) -> None:
        raise raised

    monkeypatch.setattr("dcp_cloud.tools.info.checkpoint_info", boom)
    result = run("info", "s3://b/x")
    assert result.exit_code == code, everything(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcp-cloud: error: ")
    assert "Traceback" not in everything(result) and SECRET not in everything(result)
    assert SIG not in everything(result)
    as_json = run("info", "s3://b/x", "--json")
    doc = json.loads(as_json.stdout)
    assert as_json.exit_code == code and doc["exit_code"] == code and doc["error"] == type(error).__name__


def test_trust_pickles_is_passed_only_when_asked(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    calls: list[dict[str, Any]] = []

    def fake(url: str, out: str, **kwargs: Any) -> dict[str, Any]:
        calls.append(kwargs)
        Path(out).write_bytes(b"x")
        return {}

    monkeypatch.setattr("dcp_cloud.tools.convert.to_torch_save", fake)
    assert run("convert", str(tmp_path), str(tmp_path / "a.pt")).exit_code == 0
    assert run("convert", str(tmp_path), str(tmp_path / "b.pt"), "--trust-pickles").exit_code == 0
    assert "trust_pickles" not in calls[0] and calls[1]["trust_pickles"] is True


def test_dead_endpoint_fails_fast_with_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr("dcp_cloud.store.base.RETRY_WINDOW", 1.0)
    options = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": SECRET}
    started = time.monotonic()
    result = run("info", f"s3://{BUCKET}/run", "--storage-options", json.dumps(options))
    assert time.monotonic() - started < 30
    assert result.exit_code == 3, everything(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcp-cloud: error: ") and SECRET not in result.stderr


@pytest.mark.slow
def test_dead_endpoint_with_defaults_in_a_real_process() -> None:
    options = {"endpoint_url": f"http://127.0.0.1:{free_port()}", "key": "k", "secret": SECRET}
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    started = time.monotonic()
    done = subprocess.run(
        [
            sys.executable,
            "-m",
            "dcp_cloud.cli",
            "ls",
            f"s3://{BUCKET}/run",
            "--storage-options",
            json.dumps(options),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert time.monotonic() - started < 90
    assert done.returncode == 3, done.stderr
    assert "Traceback" not in done.stderr and SECRET not in done.stdout + done.stderr
    assert done.stderr.strip().count("\n") == 0 and done.stderr.startswith("dcp-cloud: error: ")


# -- cp writes only inside its destination ---------------------------------------------------------


def _redirect_locator(store: Any, new_key: str) -> None:
    """Rewrite the committed .metadata so that one locator names ``new_key``."""
    metadata = pickle.loads(store.run(store.get(".metadata")))  # the test's own checkpoint
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = type(info)(new_key, info.offset, info.length)
    store.run(store.put(".metadata", pickle.dumps(metadata)))


def _files_under(path: Path) -> set[str]:
    return {str(p.relative_to(path)) for p in path.rglob("*")}


@pytest.mark.parametrize("evil", ["../../outside/x.distcp", "../x.distcp", "/tmp/abs.distcp", "a//b"])
def test_cp_from_s3_refuses_locators_that_leave_the_checkpoint(
    evil: str, s3_target: Target, tmp_path: Path
) -> None:
    save(s3_target.url, s3_target.storage_options)
    store = open_store(s3_target.url, s3_target.storage_options)
    data = store.run(
        store.get(next(o.key for o in store.run(store.list_objects("")) if o.key.endswith(".distcp")))
    )
    s3 = s3_target.server.client()  # type: ignore[union-attr]
    prefix = s3_target.url.split(f"{BUCKET}/", 1)[1]
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/{evil}", Body=data)  # S3 keeps '..' literally
    _redirect_locator(store, evil)
    dst = tmp_path / "deep" / "down" / "dst"
    dst.mkdir(parents=True)
    before = _files_under(tmp_path)
    with pytest.raises(UnsafeCheckpointError) as caught:
        copy_checkpoint(s3_target.url, dst, storage_options=s3_target.storage_options)
    assert repr(evil) in str(caught.value)
    assert _files_under(tmp_path) == before
    result = run("cp", s3_target.url, str(dst), "--storage-options", opts(s3_target))
    assert result.exit_code == 1 and repr(evil) in result.stderr and "Traceback" not in result.stderr
    assert _files_under(tmp_path) == before


def test_cp_ignores_dot_dot_keys_in_the_source_listing(s3_target: Target, tmp_path: Path) -> None:
    save(s3_target.url, s3_target.storage_options)
    s3 = s3_target.server.client()  # type: ignore[union-attr]
    prefix = s3_target.url.split(f"{BUCKET}/", 1)[1]
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/../../escaped.distcp", Body=b"x")
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}/a/../../../escaped2.distcp", Body=b"x")
    dst = tmp_path / "one" / "two" / "dst"
    report = copy_checkpoint(s3_target.url, dst, storage_options=s3_target.storage_options)
    assert report.objects >= 2
    assert {p.name for p in tmp_path.rglob("escaped*")} == set()
    assert all(str(p.resolve()).startswith(str(dst.resolve())) for p in dst.rglob("*"))
    dcp.load(loaded := {"w": torch.zeros(3, 4), "step": 0}, storage_reader=CloudStorageReader(str(dst)))
    assert torch.equal(loaded["w"], state()["w"])


def test_cp_refuses_a_symlink_in_the_destination(s3_target: Target, tmp_path: Path) -> None:
    save(s3_target.url, s3_target.storage_options)
    store = open_store(s3_target.url, s3_target.storage_options)
    key = next(o.key for o in store.run(store.list_objects("")) if o.key.endswith(".distcp"))
    outside = tmp_path / "outside"
    outside.mkdir()
    dst = tmp_path / "dst"
    dst.mkdir()
    (dst / key.split("/")[0]).symlink_to(outside, target_is_directory=True)
    with pytest.raises(UnsafeCheckpointError, match="outside that folder"):
        copy_checkpoint(s3_target.url, dst, storage_options=s3_target.storage_options)
    assert list(outside.iterdir()) == [] and not (dst / ".metadata").exists()


def test_cp_from_a_local_folder_refuses_traversal_and_links(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save(str(src))
    victim = tmp_path / "victim.distcp"
    victim.write_bytes(b"private bytes")
    store = open_store(str(src))
    key = next(o.key for o in store.run(store.list_objects("")) if o.key.endswith(".distcp"))
    _redirect_locator(store, "../victim.distcp")
    with pytest.raises(UnsafeCheckpointError):
        copy_checkpoint(src, "memory://trust-cli/traversal")
    _redirect_locator(store, key)
    (src / key).unlink()
    (src / key).symlink_to(victim)  # a planted link inside the source folder
    with pytest.raises(UnsafeCheckpointError, match="outside that folder"):
        copy_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / ".metadata").exists()


def test_convert_refuses_unlisted_globals_unless_trusted(tmp_path: Path) -> None:
    import fractions

    src = str(tmp_path / "ckpt")
    dcp.save({"w": torch.ones(2), "f": fractions.Fraction(1, 3)}, storage_writer=CloudStorageWriter(src))
    refused = run("convert", src, str(tmp_path / "a.pt"))
    assert refused.exit_code == 1 and "fractions.Fraction" in refused.stderr
    assert refused.stderr.startswith("dcp-cloud: error: ") and "Traceback" not in refused.stderr
    assert not (tmp_path / "a.pt").exists()
    trusted = run("convert", src, str(tmp_path / "b.pt"), "--trust-pickles")
    assert trusted.exit_code == 0, everything(trusted)
    assert torch.load(tmp_path / "b.pt", weights_only=False)["f"] == fractions.Fraction(1, 3)
