"""Red-team tests of the integrations: ``dcp_cloud.install()``, the ``DCP_CLOUD_INSTALL`` hook,
the Lightning checkpoint layout and the accelerate shim, fed what a hurried user or a hostile
checkpoint would give them. Each checks one promise of the trust model: nothing outside the
checkpoint is read, written or deleted, no code from a checkpoint runs unless trusted, secrets
are never shown, and a failure is an actionable error in bounded time."""

from __future__ import annotations

import io
import logging
import os
import pickle
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Iterator
from pathlib import Path, PurePosixPath
from typing import Any

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter, state_dict_loader, state_dict_saver
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

import dcp_cloud
from dcp_cloud import CloudStorageReader, CloudStorageWriter, StoreConfigError, UnsafeCheckpointError
from dcp_cloud.integrations import autoinstall, cloud_url, is_installed
from dcp_cloud.testing import S3Server

from .conftest import BUCKET, Target

ORIGINAL_SETUP = state_dict_saver._storage_setup
ORIGINAL_ASYNC_SAVE = state_dict_saver.async_save
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    dcp_cloud.uninstall()
    yield
    dcp_cloud.uninstall()


def _state() -> dict[str, Any]:
    return {"w": torch.arange(24.0).reshape(4, 6), "step": 3}


def _keys(target: Target) -> list[str]:
    fs, root = fsspec.url_to_fs(target.url, **target.storage_options)
    fs.invalidate_cache()
    return sorted(fs.find(root)) if fs.exists(root) else []


# -- install(): what a checkpoint_id can be ------------------------------------------------------


def test_uppercase_scheme_round_trips_through_dcp_cloud(s3_target: Target) -> None:
    dcp_cloud.install(storage_options=s3_target.storage_options)
    upper = "S3://" + s3_target.url.split("://", 1)[1]
    assert isinstance(state_dict_saver._storage_setup(None, upper), CloudStorageWriter)
    dcp.save(_state(), checkpoint_id=upper)
    assert any(k.endswith("/.metadata") for k in _keys(s3_target))
    loaded: dict[str, Any] = {"w": torch.zeros(4, 6), "step": 0}
    dcp.load(loaded, checkpoint_id=upper)
    assert torch.equal(loaded["w"], _state()["w"]) and loaded["step"] == 3


def test_non_url_checkpoint_ids_keep_torchs_behaviour(tmp_path: Path) -> None:
    """pathlib collapses ``s3://`` to ``s3:/`` (a local folder), bytes are torch's business, a
    local path holding ``://`` and Windows-like paths are not URLs: all go to torch unchanged."""
    dcp_cloud.install()
    local_with_sep = tmp_path / "run" / "x://y"
    for checkpoint_id in (
        PurePosixPath("s3://bucket/ckpt"),
        Path("s3://bucket/ckpt"),
        str(local_with_sep),
        "C:\\ckpt\\step-1",
        "C://ckpt/step-1",
        "s3:/bucket/ckpt",
    ):
        assert cloud_url(checkpoint_id) is None, checkpoint_id
        ours = state_dict_saver._storage_setup(None, checkpoint_id)
        assert not isinstance(ours, CloudStorageWriter), checkpoint_id
        assert type(ours) is type(ORIGINAL_SETUP(None, checkpoint_id)), checkpoint_id
    assert type(state_dict_saver._storage_setup(None, str(local_with_sep))) is FileSystemWriter
    assert cloud_url(b"s3://bucket/ckpt") is None
    # bytes: the hook raises exactly what torch raises
    raw: Any = b"s3://bucket/ckpt"
    with pytest.raises(Exception) as hooked_error:
        state_dict_saver._storage_setup(None, raw)
    with pytest.raises(Exception) as torch_error:
        ORIGINAL_SETUP(None, raw)
    assert type(hooked_error.value) is type(torch_error.value)


@pytest.mark.parametrize(
    ("url", "secret"),
    [
        ("s3://AKIAEXAMPLEKEY:Sup3rSecretValue@bucket/ckpt", "Sup3rSecretValue"),
        ("s3://bucket/ckpt?X-Amz-Security-Token=T0kenSecretValue", "T0kenSecretValue"),
        ("gs://bucket/ckpt?access_token=T0kenSecretValue", "T0kenSecretValue"),
        ("az://user:Pa55wordSecret@container/ckpt", "Pa55wordSecret"),
    ],
)
def test_credentials_in_a_url_are_refused_and_never_shown(
    url: str, secret: str, caplog: pytest.LogCaptureFixture
) -> None:
    dcp_cloud.install(storage_options={"endpoint_url": "http://127.0.0.1:9"})
    caplog.set_level(logging.DEBUG)
    started = time.monotonic()
    with pytest.raises(BaseException) as excinfo:
        dcp.save(_state(), checkpoint_id=url)
    assert time.monotonic() - started < 10
    shown = f"{excinfo.value}\n{excinfo.value!r}"
    assert "StoreConfigError" in shown or isinstance(excinfo.value, StoreConfigError)
    assert secret not in shown
    # dcp_cloud's own log records never hold it (torch's DCP logger records the raw
    # checkpoint_id it was given, before dcp_cloud sees it: not checked here)
    ours = [r.getMessage() for r in caplog.records if r.name.startswith("dcp_cloud")]
    assert not any(secret in m for m in ours)
    with pytest.raises(StoreConfigError) as load_error:
        dcp.load({"w": torch.zeros(1)}, checkpoint_id=url)
    assert secret not in f"{load_error.value}{load_error.value!r}"


@pytest.mark.parametrize("url", ["s3://", "gs://"])
def test_a_url_without_bucket_fails_fast_and_says_so(url: str) -> None:
    dcp_cloud.install(storage_options={"endpoint_url": "http://127.0.0.1:9"}, max_attempts=1)
    started = time.monotonic()
    with pytest.raises(BaseException) as excinfo:
        dcp.save(_state(), checkpoint_id=url)
    assert time.monotonic() - started < 10
    assert "names no" in str(excinfo.value), excinfo.value


def test_a_filesystem_default_is_not_used_for_another_cloud(s3_target: Target) -> None:
    """install(filesystem=<s3fs>) then a gs:// or az:// URL: the S3 filesystem must not serve it;
    the error says the filesystem and the URL do not match (today: botocore's 'Invalid bucket
    name "gs:"' from deep inside the save)."""
    import s3fs

    fs = s3fs.S3FileSystem(**s3_target.storage_options)
    dcp_cloud.install(filesystem=fs, max_attempts=1)
    # the same filesystem serves another S3 prefix
    dcp.save(_state(), checkpoint_id=s3_target.url)
    assert any(k.endswith("/.metadata") for k in _keys(s3_target))
    before = sorted(fs.find(BUCKET))
    for url in (f"gs://{BUCKET}/other-cloud", f"az://{BUCKET}/other-cloud"):
        writer: Any = state_dict_saver._storage_setup(None, url)
        assert isinstance(writer, CloudStorageWriter)
        with pytest.raises(StoreConfigError, match="filesystem"):
            writer.store  # noqa: B018
    fs.invalidate_cache()
    assert sorted(fs.find(BUCKET)) == before


def test_a_local_filesystem_default_never_turns_a_cloud_url_into_a_local_folder(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """install(filesystem=LocalFileSystem()) then ``dcp.save(checkpoint_id="s3://...")``: today
    the checkpoint silently lands in ``./s3:/bucket/ckpt`` while the user believes it is on S3."""
    from fsspec.implementations.local import LocalFileSystem

    monkeypatch.chdir(tmp_path)
    dcp_cloud.install(filesystem=LocalFileSystem())
    with pytest.raises(BaseException) as excinfo:
        dcp.save(_state(), checkpoint_id="s3://bucket/ckpt")
    assert "filesystem" in str(excinfo.value)
    assert list(tmp_path.iterdir()) == [], "a cloud URL was saved to a local folder"


def test_a_hook_held_across_uninstall_keeps_the_installed_options_or_defers_to_torch() -> None:
    """A framework that did ``from torch.distributed.checkpoint import async_save`` while
    installed, or a thread already inside the hook when ``uninstall()`` runs, still calls the
    hook afterwards. It must not build a dcp_cloud writer with the options dropped (which sends
    the checkpoint to the cloud's default endpoint and credentials instead of the configured
    ones): either torch's own storage, or dcp_cloud with the options it was installed with."""
    options = {"endpoint_url": "http://127.0.0.1:9", "key": "k", "secret": "s"}
    dcp_cloud.install(storage_options=options)
    held = [state_dict_saver._storage_setup, state_dict_loader._storage_setup]
    dcp_cloud.uninstall()
    assert not is_installed()
    for hook in held:
        for reader in (False, True):
            storage = hook(None, "s3://bucket/ckpt", reader=reader)
            if isinstance(storage, (CloudStorageWriter, CloudStorageReader)):
                assert storage.storage_options == options, "dcp_cloud storage without install()'s options"
            else:
                assert type(storage).__module__.startswith("torch.distributed.checkpoint")


def test_async_save_after_uninstall_is_torchs_again(s3_target: Target) -> None:
    dcp_cloud.install(storage_options=s3_target.storage_options)
    assert dcp.async_save is not ORIGINAL_ASYNC_SAVE
    dcp_cloud.uninstall()
    assert type(state_dict_saver._storage_setup(None, s3_target.url)) is FsspecWriter
    assert dcp.async_save is ORIGINAL_ASYNC_SAVE and state_dict_saver.async_save is ORIGINAL_ASYNC_SAVE


# -- the DCP_CLOUD_INSTALL hook -----------------------------------------------------------------


def test_enable_never_writes_through_a_symlink(tmp_path: Path) -> None:
    site_dir, outside = tmp_path / "site", tmp_path / "outside.txt"
    site_dir.mkdir()
    outside.write_text("precious\n")
    (site_dir / autoinstall.PTH_NAME).symlink_to(outside)
    try:
        autoinstall.enable(site_dir)
    except (RuntimeError, OSError):
        pass
    assert outside.read_text() == "precious\n", "enable() wrote outside the site-packages folder"


def test_enable_never_overwrites_a_file_it_did_not_write(tmp_path: Path) -> None:
    foreign = tmp_path / autoinstall.PTH_NAME
    foreign.write_text("import someone_elses_hook\n")
    with pytest.raises(RuntimeError, match="not written by dcp_cloud"):
        autoinstall.enable(tmp_path)
    assert foreign.read_text() == "import someone_elses_hook\n"


def test_disable_deletes_neither_a_foreign_file_nor_a_symlink_target(tmp_path: Path) -> None:
    site_dir, foreign = tmp_path / "site", tmp_path / "foreign.pth"
    site_dir.mkdir()
    foreign.write_text("import someone_elses_hook\n")
    link = site_dir / autoinstall.PTH_NAME
    link.symlink_to(foreign)
    with pytest.raises(RuntimeError, match="not written by dcp_cloud"):
        autoinstall.disable(site_dir)
    assert foreign.read_text() == "import someone_elses_hook\n" and link.is_symlink()
    # a link to a hook file of ours elsewhere: only the link goes, the file it points to stays
    ours = tmp_path / "ours.pth"
    ours.write_text(autoinstall.pth_text())
    link.unlink()
    link.symlink_to(ours)
    assert autoinstall.disable(site_dir) == link
    assert not link.is_symlink() and ours.read_text().startswith("# dcp_cloud")


@pytest.mark.parametrize(
    "value",
    ["{not json", "[1, 2]", '"text"', "null", '{"part_sise": 1}', '{"part_size": -5}', "[" * 100_000],
)
def test_garbled_options_only_warn(value: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(autoinstall.OPTIONS_VAR, value)
    with pytest.warns(RuntimeWarning, match="install\\(\\) failed"):
        assert autoinstall.install_from_env() is False
    assert not is_installed()


def test_garbled_options_never_break_importing_dcp_when_warnings_are_errors(tmp_path: Path) -> None:
    """With warnings as errors (``-W error``, pytest's ``filterwarnings = error``) the hook's
    warning must not turn into an exception that makes ``import torch.distributed.checkpoint``
    fail."""
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    autoinstall.enable(site_dir)
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DCP_CLOUD_")}
    env = {**clean, autoinstall.ENV_VAR: "1", autoinstall.OPTIONS_VAR: "{not json"}
    code = (
        "import site, sys; site.addsitedir(sys.argv[1]);"
        "import torch.distributed.checkpoint as d; print('imported', d.save.__name__)"
    )
    done = subprocess.run(
        [sys.executable, "-W", "error::RuntimeWarning", "-c", code, str(site_dir)],
        env=env,
        capture_output=True,
        text=True,
        timeout=180,
        cwd=ROOT,
    )
    assert done.returncode == 0 and "imported save" in done.stdout, done.stderr[-2000:]
    assert "DCP_CLOUD_INSTALL_OPTIONS is not valid JSON" in done.stderr


def test_status_never_prints_secrets_from_the_options(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    secret = "Sup3rSecretValue"
    monkeypatch.setenv(autoinstall.ENV_VAR, "1")
    monkeypatch.setenv(
        autoinstall.OPTIONS_VAR,
        f'{{"storage_options": {{"key": "AKIAEXAMPLEKEY", "secret": "{secret}", '
        f'"endpoint_url": "http://u:{secret}@127.0.0.1:9"}}}}',
    )
    assert autoinstall.main(["status", "--dir", str(tmp_path)]) == 0
    out = capsys.readouterr()
    assert "storage_options" in out.out
    assert secret not in out.out + out.err
    assert "AKIAEXAMPLEKEY" not in out.out + out.err


# -- Lightning: meta.pt --------------------------------------------------------------------------


class _RunsCode:
    """Unpickling it creates a folder: proof that code from the file ran."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, ...]:
        return (os.mkdir, (str(self.marker),))


def test_lightning_meta_pt_runs_no_code_unless_weights_only_false(tmp_path: Path) -> None:
    from .integrations.conftest import require_framework

    require_framework("lightning")
    from dcp_cloud.integrations.lightning import META_NAME, LightningCheckpoints

    url = f"memory://{BUCKET}/{uuid.uuid4().hex[:8]}/epoch=0"
    marker = tmp_path / "pwned"
    buffer = io.BytesIO()
    torch.save({"epoch": 1, "payload": _RunsCode(marker)}, buffer)
    fsspec.filesystem("memory").pipe(f"{url}/{META_NAME}", buffer.getvalue())
    checkpoints = LightningCheckpoints()
    for weights_only in (None, True):
        with pytest.raises(pickle.UnpicklingError):
            checkpoints.load_meta(url, weights_only)
        assert not marker.exists(), f"meta.pt ran code with weights_only={weights_only}"
    # the file is a real exploit: with the user's explicit weights_only=False it runs
    checkpoints.load_meta(url, False)
    assert marker.is_dir()


# -- accelerate: load_state and redirect ---------------------------------------------------------


class _LoadRecorder:
    """In place of an Accelerator: records the folder ``load_state`` hands to accelerate."""

    project_configuration = None

    def __init__(self) -> None:
        self.files: list[str] | None = None
        self.folder: Path | None = None

    def load_state(self, input_dir: str) -> None:
        self.folder = Path(input_dir)
        self.files = sorted(os.listdir(input_dir))


@pytest.mark.parametrize(
    "name", ["CUSTOM_CHECKPOINT_0.pkl", "Custom_Checkpoint_0.pkl", "custom_checkpoint_0.PKL"]
)
def test_accelerate_refuses_custom_pickles_in_any_letter_case(name: str) -> None:
    """On a case-insensitive disk (macOS, Windows) accelerate's ``custom_checkpoint_0.pkl`` opens
    ``CUSTOM_CHECKPOINT_0.pkl`` and unpickles it with weights_only=False."""
    from dcp_cloud.integrations import accelerate as dcp_accelerate

    url = f"memory://{BUCKET}/{uuid.uuid4().hex[:8]}/step-1"
    fsspec.filesystem("memory").pipe(f"{url}/{name}", b"pickle")
    recorder = _LoadRecorder()
    with pytest.raises(UnsafeCheckpointError):
        dcp_accelerate.load_state(recorder, url)
    assert recorder.files is None


@pytest.mark.parametrize(
    "hostile",
    [["..", ".", "../escape1.txt", "a/../../escape2.txt"], ["..\\..\\escape3.txt"], ["/escape4.txt"]],
)
def test_accelerate_load_state_writes_only_inside_its_folder(s3_target: Target, hostile: list[str]) -> None:
    """Keys a hostile writer can put at the top level of a checkpoint (``..``, ``.``, names with
    backslashes or ``../``) never land outside the private download folder: they are skipped or
    the checkpoint is refused."""
    from dcp_cloud.integrations import accelerate as dcp_accelerate

    assert isinstance(s3_target.server, S3Server)
    client = s3_target.server.client()
    prefix = s3_target.url.split(f"{BUCKET}/", 1)[1]
    for name in ["random_states_0.pkl", *hostile]:
        client.put_object(Bucket=BUCKET, Key=f"{prefix}/{name}", Body=b"data")
    temp = Path(tempfile.gettempdir())
    before = set(os.listdir(temp)) | set(os.listdir(temp.parent))
    recorder = _LoadRecorder()
    try:
        dcp_accelerate.load_state(recorder, s3_target.url, storage_options=s3_target.storage_options)
    except (StoreConfigError, UnsafeCheckpointError) as exc:
        assert recorder.files is None, "refused only after accelerate had the folder"
        assert "crafted" in str(exc) or "refused" in str(exc)
    else:
        assert recorder.files == ["random_states_0.pkl"], recorder.files
    after = set(os.listdir(temp)) | set(os.listdir(temp.parent))
    assert not {n for n in after - before if "escape" in n}
    assert not {n for n in after - before if n.startswith("dcp-cloud-accelerate-")}, "folder left behind"


def test_redirect_restores_torchs_classes_after_an_exception(tmp_path: Path) -> None:
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint import filesystem

    from dcp_cloud.integrations import accelerate as dcp_accelerate

    with pytest.raises(ZeroDivisionError):
        with dcp_accelerate.redirect(tmp_path / "a", "memory://bucket/a"):
            with dcp_accelerate.redirect(tmp_path / "b", "memory://bucket/b"):
                assert isinstance(dist_cp.FileSystemWriter(str(tmp_path / "b" / "x")), CloudStorageWriter)
                1 / 0  # noqa: B018
    assert dist_cp.FileSystemWriter is filesystem.FileSystemWriter
    assert dist_cp.FileSystemReader is filesystem.FileSystemReader
    # a bad URL fails before anything is patched
    with pytest.raises(StoreConfigError):
        with dcp_accelerate.redirect(tmp_path, "s3://k:Secr3tValue@bucket/x"):
            pass
    assert dist_cp.FileSystemWriter is filesystem.FileSystemWriter
    assert type(dist_cp.FileSystemWriter(str(tmp_path / "x"))) is filesystem.FileSystemWriter
