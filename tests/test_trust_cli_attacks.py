"""Attacks on URLs, secrets, the CLI and cp, each against a real store (moto's S3 server, local
folders) or a real process: what an attacker who controls a bucket's names and files, or a hurried
user, could try."""

from __future__ import annotations

import json
import logging
import os
import pickle
import shutil
import subprocess
import sys
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner, Result

from dcp_cloud import CloudStorageReader, CloudStorageWriter, copy_checkpoint
from dcp_cloud.cli import cli
from dcp_cloud.errors import CheckpointExistsError, StoreConfigError, UnsafeCheckpointError
from dcp_cloud.store import open_store
from dcp_cloud.urls import normalize_url, printable, scrub_text, secret_values

from .conftest import BUCKET, Target

SECRET = "S3CR3T-attack-9b1e"


def run(*args: str, env: dict[str, str] | None = None) -> Result:
    return CliRunner().invoke(cli, list(args), catch_exceptions=False, env=env)


def everything(result: Result) -> str:
    return result.stdout + result.stderr


def state(value: float = 1.0) -> dict[str, Any]:
    return {"w": torch.full((2, 3), value), "step": int(value)}


def save(url: str | Path, storage_options: dict[str, Any] | None = None, **kwargs: Any) -> None:
    dcp.save(state(), storage_writer=CloudStorageWriter(url, storage_options=storage_options, **kwargs))


def load(url: str | Path, storage_options: dict[str, Any] | None = None) -> dict[str, Any]:
    loaded = {"w": torch.zeros(2, 3), "step": 0}
    dcp.load(loaded, storage_reader=CloudStorageReader(url, storage_options=storage_options))
    return loaded


def one_error_line(result: Result) -> str:
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dcp-cloud: error: "), result.stderr
    assert "Traceback" not in everything(result)
    return lines[0]


# -- secrets: click's own usage errors, logs, warnings, JSON -----------------------------------------

MISPLACED = [
    ("prune", "--keep", "{u}", "/tmp"),
    ("gc", "--grace", "{u}", "/tmp"),
    ("cp", "--concurrency", "{u}", "a", "b"),
    ("cp", "--part-size", "{u}", "a", "b"),
    ("convert", "--format", "{u}", "a", "b"),
    ("verify", "--concurrency={u}", "/tmp"),
]


@pytest.mark.parametrize("argv", MISPLACED, ids=lambda a: "-".join(a[:2]))
def test_usage_errors_never_quote_a_misplaced_secret_url(argv: tuple[str, ...]) -> None:
    """A URL with credentials typed where a number or a choice belongs: click's error quotes
    the rejected value, which must come out redacted."""
    url = f"s3://AKIAEXAMPLE:{SECRET}@{BUCKET}/run?sig={SECRET}x"
    result = run(*(a.format(u=url) for a in argv))
    assert result.exit_code == 2, everything(result)
    assert SECRET not in everything(result) and "Invalid value" in result.stderr


@pytest.mark.parametrize("command", [("ls",), ("info",), ("convert", "/tmp/unused.pt")])
def test_a_password_holding_at_and_slash_is_never_shown(command: tuple[str, ...]) -> None:
    url = f"s3://AKIAEXAMPLE:p@ss/w0rd-{SECRET}@{BUCKET}/run"
    result = run(command[0], url, *command[1:])
    assert result.exit_code == 2 and "credentials" in one_error_line(result)
    assert "w0rd" not in everything(result) and SECRET not in everything(result)


def test_usage_errors_never_quote_a_secret_from_the_options() -> None:
    options = json.dumps({"key": "AKIAEXAMPLE", "secret": SECRET})
    result = run("prune", "--keep", SECRET, "/tmp", "--storage-options", options)
    assert result.exit_code == 2 and SECRET not in everything(result), everything(result)
    from_env = run("prune", "--keep", SECRET, "/tmp", env={"DCP_CLOUD_STORAGE_OPTIONS": options})
    assert from_env.exit_code == 2 and SECRET not in everything(from_env), everything(from_env)


def test_log_records_and_warnings_are_scrubbed_and_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """What the library (or a backend) logs or warns while a command runs goes through the same
    scrubbing as errors, and a name holding a newline cannot forge a second line."""

    def noisy(url: str, **kwargs: Any) -> None:
        logging.getLogger("dcp_cloud").warning(
            "retrying http://u:%s@127.0.0.1:9/x?sig=%s for key %r", SECRET, SECRET, "a\nFORGED"
        )
        warnings.warn(f"endpoint https://h/x?X-Amz-Signature={SECRET}", UserWarning, stacklevel=1)
        logging.getLogger("botocore.retryhandler").warning("Falling back to a third-party note.")
        raise RuntimeError("stop")

    monkeypatch.setattr("dcp_cloud.tools.info.checkpoint_info", noisy)
    result = run("info", "s3://b/x", "--storage-options", json.dumps({"secret": SECRET}))
    assert result.exit_code == 1
    assert SECRET not in everything(result)
    lines = result.stderr.strip().splitlines()
    assert lines[0].startswith("retrying http://127.0.0.1:9/x") and "FORGED" in lines[0]
    assert any(line.endswith("UserWarning: endpoint https://h/x") for line in lines), lines
    assert not any(line.startswith("FORGED") for line in lines)
    assert "Falling back" not in result.stderr  # other libraries' notes only with -v
    verbose = run("-v", "info", "s3://b/x", "--storage-options", json.dumps({"secret": SECRET}))
    assert "Falling back" in verbose.stderr and SECRET not in everything(verbose)
    assert lines[-1].startswith("dcp-cloud: error: ")


def test_json_is_scrubbed_before_it_is_encoded(monkeypatch: pytest.MonkeyPatch) -> None:
    """A secret with quotes, backslashes or non-ASCII characters is escaped by JSON; it must
    be removed before that, not searched for afterwards."""
    secret = 'p\u00e4ss"w\\rd-JSON-ONLY-77c1'

    class Found:
        path = "run"
        committed = True

        def to_dict(self) -> dict[str, Any]:
            return {"path": "run", "note": f"listed with {secret}", "extra": Path(f"/x/{secret}")}

    monkeypatch.setattr("dcp_cloud.tools.catalog.list_checkpoints", lambda url, **kw: [Found()])
    result = run("ls", "s3://b/x", "--json", "--storage-options", json.dumps({"secret": secret}))
    assert result.exit_code == 0, everything(result)
    doc = json.loads(result.stdout)
    assert "JSON-ONLY" not in json.dumps(doc, ensure_ascii=False) and "***" in doc[0]["note"]


def test_connection_string_fields_count_as_secrets() -> None:
    conn = f"DefaultEndpointsProtocol=http;AccountName=acct;AccountKey={SECRET};BlobEndpoint=http://h"
    found = secret_values({"connection_string": conn})
    assert SECRET in found
    assert SECRET not in scrub_text(f"auth failed for key {SECRET}", found)


def test_storage_option_endpoint_must_be_a_plain_string(s3_target: Target) -> None:
    result = run("ls", s3_target.url, "--storage-options", json.dumps({"endpoint_url": 5}))
    assert result.exit_code == 2 and "endpoint_url" in one_error_line(result)
    with pytest.raises(StoreConfigError, match="endpoint_url"):
        open_store(s3_target.url, {"endpoint_url": f"http://127.0.0.1:9/?sig={SECRET}"})


@pytest.mark.slow
def test_a_real_process_never_shows_secrets_or_torch_noise(tmp_path: Path) -> None:
    """The console entry point, not the test runner: a misplaced secret, and a clean run whose
    stderr stays empty (torch's single-process warning is not the user's problem)."""
    save(tmp_path / "ckpt")
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(sys.path)}
    misplaced = subprocess.run(
        [sys.executable, "-m", "dcp_cloud.cli", "prune", "--keep", f"s3://k:{SECRET}@b/x", "/tmp"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert misplaced.returncode == 2 and SECRET not in misplaced.stdout + misplaced.stderr
    clean = subprocess.run(
        [sys.executable, "-m", "dcp_cloud.cli", "convert", str(tmp_path / "ckpt"), str(tmp_path / "m.pt")],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert clean.returncode == 0 and clean.stderr == "", clean.stderr


# -- names from the store cannot drive the terminal --------------------------------------------------


def test_listed_names_cannot_forge_lines_or_escape_sequences(tmp_path: Path) -> None:
    root = tmp_path / "root"
    save(root / "step-0000000001")
    evil = "x\x1b]0;owned\x07\x1b[31m\nstep-0000000009  committed\u202e"
    save(tmp_path / "plain")
    shutil.copytree(tmp_path / "plain", root / evil / "inner")  # a name no dcp_cloud URL may hold
    result = run("ls", str(root))
    assert result.exit_code == 0, everything(result)
    out = result.stdout
    assert "\x1b" not in out and "\u202e" not in out and "\x07" not in out
    assert not any(line.startswith("step-0000000009") for line in out.splitlines())
    assert "\\x1b" in out and len(out.strip().splitlines()) == 4  # header, 2 rows, summary
    as_json = json.loads(run("ls", str(root), "--json").stdout)
    assert any(evil in row["path"] for row in as_json)  # JSON keeps the exact name, escaped


def test_tensor_names_from_metadata_are_shown_escaped(tmp_path: Path) -> None:
    url = str(tmp_path / "ckpt")
    dcp.save({"w\x1b[2J\nFAKE ROW": torch.ones(2), "n\u2028x": 3}, storage_writer=CloudStorageWriter(url))
    result = run("info", url)
    assert result.exit_code == 0, everything(result)
    assert "\x1b" not in result.stdout and "\u2028" not in result.stdout
    assert not any(line.startswith("FAKE ROW") for line in result.stdout.splitlines())


def test_printable_escapes_every_kind_of_line_break_and_override() -> None:
    for char in ["\n", "\r", "\x1b", "\x85", "\u2028", "\u2029", "\u202e", "\u2066", "\x7f", "\x9b"]:
        shown = printable(f"a{char}b")
        assert char not in shown and shown.startswith("a\\") and len(shown.splitlines()) == 1


# -- URL forms: one rule, writer and reader agree ---------------------------------------------------

REFUSED = [
    "s3:/bucket/run",  # a missing '/': would be a local folder called 's3:'
    "file:/tmp/run",
    "gs:bucket/run",
    " s3://bucket/run",  # leading space: would be a local folder
    "s3://bucket/run ",
    "s3://bucket/run\n",
    "s3://bucket/run\rINFO forged",
    "s3://bucket/ru\u2028n",
    "s3://bucket/ru\x85n",
    "s3://bucket/\u202erun",
    "s3://bucket/a%2F..%2Fb",  # encoded traversal inside one segment
    "s3://bucket/a%2f.%2fb",
    "s3://bucket/a\\..\\b",
    "az://container/a\\b",
    "az://container@account/run",  # the account would be silently ignored
    "abfs://container@account/run",
    "az://container/run./step-1",  # Azure may drop a trailing dot from a name
    "gs://bucket/..",
    "memory://a/../b",
]


@pytest.mark.parametrize("url", REFUSED, ids=repr)
def test_mistyped_and_hostile_urls_are_refused(url: str) -> None:
    with pytest.raises(StoreConfigError) as caught:
        normalize_url(url)
    assert "\n" not in str(caught.value) and "\u2028" not in str(caught.value)
    with pytest.raises(StoreConfigError):
        CloudStorageWriter(url)
    assert not CloudStorageReader.validate_checkpoint_id(url)


@pytest.mark.parametrize(
    "given, stored",
    [
        ("S3://bucket/run/", "s3://bucket/run"),
        ("s3:///bucket/run", "s3://bucket/run"),
        ("Memory://bucket/run", "memory://bucket/run"),
        ("memory:///bucket/run", "memory://bucket/run"),
        (
            "abfs://container@account.dfs.core.windows.net/run",
            "abfs://container@account.dfs.core.windows.net/run",
        ),
        ("s3://bucket/run%2Fx", "s3://bucket/run%2Fx"),
    ],
)
def test_urls_are_stored_in_one_form(given: str, stored: str) -> None:
    assert normalize_url(given) == stored
    assert normalize_url(stored) == stored


def test_home_paths_expand_like_fsspec(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """``~/ckpt`` names the home folder (as fsspec's local filesystem does), never ./~/ckpt."""
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.chdir(tmp_path)
    assert normalize_url("~/ckpt") == str(tmp_path / "ckpt")
    assert normalize_url("file://~/ckpt") == f"file://{tmp_path / 'ckpt'}"
    save("~/ckpt")
    assert (tmp_path / "ckpt" / ".metadata").is_file() and not (tmp_path / "~").exists()
    assert torch.equal(load(tmp_path / "ckpt")["w"], state()["w"])


@pytest.mark.parametrize(
    "written, read", [("S3://{b}/{p}", "s3://{b}/{p}"), ("s3:///{b}/{p}", "S3://{b}/{p}/")]
)
def test_writer_and_reader_agree_on_every_spelling(written: str, read: str, s3_target: Target) -> None:
    prefix = s3_target.url.split(f"{BUCKET}/", 1)[1]
    save(written.format(b=BUCKET, p=prefix), s3_target.storage_options)
    client = s3_target.server.client()  # type: ignore[union-attr]
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    assert f"{prefix}/.metadata" in keys and all(k.startswith(f"{prefix}/") for k in keys)
    assert torch.equal(load(read.format(b=BUCKET, p=prefix), s3_target.storage_options)["w"], state()["w"])
    options = json.dumps(s3_target.storage_options)
    listed = run("ls", read.format(b=BUCKET, p=prefix), "--json", "--storage-options", options)
    assert listed.exit_code == 0, everything(listed)
    assert [row["url"] for row in json.loads(listed.stdout)] == [f"s3://{BUCKET}/{prefix}"]


def test_a_very_long_url_fails_in_one_bounded_line() -> None:
    url = f"s3://{'b' * 5000}/{'k' * 100_000}?sig={SECRET}"
    result = run("ls", url)
    assert result.exit_code == 2 and SECRET not in everything(result)
    assert len(one_error_line(result)) <= 2100


# -- cp stays inside its source and destination ------------------------------------------------------


def test_cp_refuses_a_metadata_link_that_leaves_the_source(tmp_path: Path) -> None:
    src, other = tmp_path / "src", tmp_path / "other"
    save(src)
    save(other)
    (src / ".metadata").unlink()
    (src / ".metadata").symlink_to(other / ".metadata")
    with pytest.raises(UnsafeCheckpointError, match="outside that folder"):
        copy_checkpoint(src, tmp_path / "dst")
    assert not (tmp_path / "dst" / ".metadata").exists()
    result = run("cp", str(src), str(tmp_path / "dst2"))
    assert result.exit_code == 1 and ".metadata" in one_error_line(result)


def test_cp_refuses_a_manifest_link_that_leaves_the_source(tmp_path: Path) -> None:
    src = tmp_path / "src"
    save(src)
    secret_file = tmp_path / "private.json"
    secret_file.write_text('{"private": true}')
    manifest = next(src.glob("save-*/manifest.json"))
    manifest.unlink()
    manifest.symlink_to(secret_file)
    with pytest.raises(UnsafeCheckpointError):
        copy_checkpoint(src, tmp_path / "dst")
    assert not any("private" in p.read_text() for p in (tmp_path / "dst").rglob("*.json") if p.is_file())


def test_cp_refuses_a_destination_metadata_link(tmp_path: Path) -> None:
    src, dst = tmp_path / "src", tmp_path / "dst"
    save(src)
    save(dst)
    victim = tmp_path / "victim.txt"
    victim.write_text("keep me")
    (dst / ".metadata").unlink()
    (dst / ".metadata").symlink_to(victim)
    with pytest.raises(UnsafeCheckpointError):
        copy_checkpoint(src, dst, overwrite=True)
    assert victim.read_text() == "keep me"


def test_cp_onto_its_own_source_is_refused(tmp_path: Path, s3_target: Target) -> None:
    src = tmp_path / "src"
    save(src)
    (tmp_path / "alias").symlink_to(src, target_is_directory=True)
    for dst in (src, tmp_path / "alias", f"file://{src}/"):
        with pytest.raises(CheckpointExistsError, match="source checkpoint itself"):
            copy_checkpoint(src, dst, overwrite=True)
    assert torch.equal(load(src)["w"], state()["w"])
    save(s3_target.url, s3_target.storage_options)
    options = json.dumps(s3_target.storage_options)
    result = run("cp", s3_target.url, s3_target.url + "/", "--overwrite", "--storage-options", options)
    assert result.exit_code == 1 and "source checkpoint itself" in one_error_line(result)


def test_cp_over_a_crafted_destination_records_no_foreign_keys(tmp_path: Path) -> None:
    """The destination's old .metadata is untrusted too: its locators may name files outside
    it; cp --overwrite must not record them for deletion, and the next save deletes nothing
    outside."""
    src, dst = tmp_path / "src", tmp_path / "run" / "dst"
    save(src)
    save(dst)
    victim = tmp_path / "run" / "victim.distcp"
    victim.write_bytes(b"user data")
    store = open_store(dst)
    metadata = pickle.loads(store.run(store.get(".metadata")))  # the test's own checkpoint
    index, info = next(iter(metadata.storage_data.items()))
    metadata.storage_data[index] = type(info)("../victim.distcp", info.offset, info.length)
    store.run(store.put(".metadata", pickle.dumps(metadata)))
    copy_checkpoint(src, dst, overwrite=True)
    manifests = [json.loads(p.read_bytes()) for p in dst.glob("save-*/manifest.json")]
    assert manifests and all(".." not in key for m in manifests for key in m.get("replaced", []))
    for _ in range(2):
        save(dst, overwrite=True)
    assert victim.read_bytes() == b"user data"
    assert torch.equal(load(dst)["w"], state()["w"])


# -- realistic failures: one line, documented exit code ---------------------------------------------


@pytest.mark.parametrize("command", ["ls", "info", "verify", "gc", "prune", "cp", "convert"])
def test_a_missing_bucket_is_one_line_and_exit_1(command: str, s3_target: Target, tmp_path: Path) -> None:
    url = "s3://no-such-bucket-dcp-attacks/run"
    extra = {"prune": ["--keep", "1"], "cp": [str(tmp_path / "c")], "convert": [str(tmp_path / "m.pt")]}
    argv = [command, url, *extra.get(command, []), "--storage-options", json.dumps(s3_target.storage_options)]
    result = run(*argv)
    assert result.exit_code == 1, everything(result)
    assert "no-such-bucket-dcp-attacks" in one_error_line(result)


@pytest.mark.parametrize("command", ["info", "verify", "cp", "convert"])
def test_a_corrupt_metadata_is_one_line_and_exit_1(command: str, tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save(ckpt)
    (ckpt / ".metadata").write_bytes(b"\x80\x04garbage")
    extra = {"cp": [str(tmp_path / "c")], "convert": [str(tmp_path / "m.pt")]}
    result = run(command, str(ckpt), *extra.get(command, []))
    assert result.exit_code == 1, everything(result)
    assert ".metadata" in one_error_line(result)


def test_an_interrupt_exits_130(monkeypatch: pytest.MonkeyPatch) -> None:
    def interrupted(*args: Any, **kwargs: Any) -> None:
        raise KeyboardInterrupt

    monkeypatch.setattr("dcp_cloud.tools.verify.verify_checkpoint", interrupted)
    result = run("verify", "s3://b/x")
    assert result.exit_code == 130 and result.stderr.strip() == "dcp-cloud: interrupted"


def test_convert_into_a_missing_folder_is_one_line(tmp_path: Path) -> None:
    save(tmp_path / "ckpt")
    result = run("convert", str(tmp_path / "ckpt"), str(tmp_path / "no" / "such" / "m.pt"))
    assert result.exit_code == 1 and "no/such" in one_error_line(result)


@pytest.mark.skipif(os.geteuid() == 0, reason="root reads any folder")
def test_a_folder_without_permission_is_one_line(tmp_path: Path) -> None:
    ckpt = tmp_path / "ckpt"
    save(ckpt)
    ckpt.chmod(0)
    try:
        result = run("info", str(ckpt))
    finally:
        ckpt.chmod(0o755)
    assert result.exit_code == 1 and str(ckpt) in one_error_line(result)
