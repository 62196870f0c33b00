"""dcp_cloud.install(): plain ``dcp.save/async_save/load`` with a cloud ``checkpoint_id``.

The first test pins the torch internals the hook relies on: if torch moves or renames DCP's
storage auto-detection, it fails here with the name that changed.
"""

from __future__ import annotations

import inspect
import json
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import fsspec
import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import (
    FileSystemReader,
    FileSystemWriter,
    _storage_utils,
    state_dict_loader,
    state_dict_saver,
)
from torch.distributed.checkpoint._fsspec_filesystem import FsspecReader, FsspecWriter

import dcp_cloud
from dcp_cloud import CloudStorageReader, CloudStorageWriter, StoreConfigError
from dcp_cloud.checkpoint.layout import MANIFEST_NAME
from dcp_cloud.integrations import CLOUD_SCHEMES, autoinstall, cloud_url, is_installed
from dcp_cloud.store.registry import _backend_for_scheme

from .conftest import Target, make_target
from .helpers import assert_same

ORIGINAL_SETUP = _storage_utils._storage_setup
ORIGINAL_ASYNC_SAVE = dcp.async_save


@pytest.fixture(autouse=True)
def _clean() -> Iterator[None]:
    dcp_cloud.uninstall()
    yield
    dcp_cloud.uninstall()


def _state() -> dict[str, object]:
    torch.manual_seed(0)
    return {"w": torch.randn(64, 32), "b": torch.arange(100, dtype=torch.int64), "step": 7}


def _empty_like(state: dict[str, object]) -> dict[str, object]:
    return {k: torch.zeros_like(v) if isinstance(v, torch.Tensor) else 0 for k, v in state.items()}


def _manifests(target: Target) -> list[str]:
    fs, root = fsspec.url_to_fs(target.url, **target.storage_options)
    return [p for p in fs.find(root) if p.endswith("/" + MANIFEST_NAME)]


def test_torch_internals_the_hook_relies_on() -> None:
    """Fails loudly when torch changes what install() wraps."""
    assert callable(_storage_utils._storage_setup)
    assert state_dict_saver._storage_setup is _storage_utils._storage_setup
    assert state_dict_loader._storage_setup is _storage_utils._storage_setup
    assert list(inspect.signature(_storage_utils._storage_setup).parameters) == [
        "storage",
        "checkpoint_id",
        "reader",
    ]
    assert dcp.async_save is state_dict_saver.async_save
    assert {"checkpoint_id", "storage_writer"} <= set(inspect.signature(dcp.async_save).parameters)
    # without install() a cloud URL falls through to torch's fsspec writer and reader
    assert type(ORIGINAL_SETUP(None, "s3://bucket/ckpt")) is FsspecWriter
    assert type(ORIGINAL_SETUP(None, "s3://bucket/ckpt", reader=True)) is FsspecReader


def test_save_and_load_go_through_dcp_cloud(s3_target: Target) -> None:
    dcp_cloud.install(storage_options=s3_target.storage_options)
    state = _state()
    dcp.save(state, checkpoint_id=s3_target.url, no_dist=True)
    assert len(_manifests(s3_target)) == 1, "the save did not write a dcp_cloud manifest"
    loaded = _empty_like(state)
    dcp.load(loaded, checkpoint_id=s3_target.url, no_dist=True)
    assert_same(state, loaded)
    # the checkpoint is an ordinary dcp_cloud checkpoint: the explicit reader loads it too
    again = _empty_like(state)
    dcp.load(again, storage_reader=s3_target.reader(), no_dist=True)
    assert_same(state, again)


@pytest.mark.parametrize("store", ["gcs", "azure"])
def test_gcs_and_azure_urls_go_through_dcp_cloud(
    store: str, request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    target = make_target(store, request, tmp_path)
    dcp_cloud.install(storage_options=target.storage_options)
    state = _state()
    dcp.save(state, checkpoint_id=target.url, no_dist=True)
    assert len(_manifests(target)) == 1
    loaded = _empty_like(state)
    dcp.load(loaded, checkpoint_id=target.url, no_dist=True)
    assert_same(state, loaded)


def test_async_save_builds_the_writer_in_the_caller(s3_target: Target) -> None:
    dcp_cloud.install(storage_options=s3_target.storage_options)
    state = _state()
    future = dcp.async_save(state, checkpoint_id=s3_target.url, no_dist=True)
    future.result(timeout=120)
    assert len(_manifests(s3_target)) == 1
    loaded = _empty_like(state)
    dcp.load(loaded, checkpoint_id=s3_target.url, no_dist=True)
    assert_same(state, loaded)


def test_state_dict_saver_module_functions_are_hooked(s3_target: Target) -> None:
    dcp_cloud.install(storage_options=s3_target.storage_options)
    state = _state()
    state_dict_saver.save(state, checkpoint_id=s3_target.url, no_dist=True)
    assert len(_manifests(s3_target)) == 1
    loaded = _empty_like(state)
    state_dict_loader.load(loaded, checkpoint_id=s3_target.url, no_dist=True)
    assert_same(state, loaded)


def test_without_install_nothing_changes(s3_target: Target) -> None:
    assert not is_installed()
    assert _storage_utils._storage_setup is ORIGINAL_SETUP
    assert dcp.async_save is ORIGINAL_ASYNC_SAVE
    fs, root = fsspec.url_to_fs(s3_target.url, **s3_target.storage_options)
    # torch's FsspecWriter with the same options: a torch checkpoint, no manifest
    state = _state()
    dcp.save(state, storage_writer=FsspecWriter(s3_target.url, **s3_target.storage_options), no_dist=True)
    assert fs.exists(f"{root}/.metadata")
    assert _manifests(s3_target) == []


def test_local_paths_and_other_schemes_keep_torchs_storage(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dcp_cloud.install()
    assert type(_storage_utils._storage_setup(None, str(tmp_path))) is FileSystemWriter
    assert type(_storage_utils._storage_setup(None, tmp_path, reader=True)) is FileSystemReader
    assert type(_storage_utils._storage_setup(None, "memory://b/ckpt")) is FsspecWriter
    # a pathlib.Path of "s3://x" is the local path "s3:/x", and stays local
    assert cloud_url(tmp_path / "s3:" / "bucket") is None
    state = _state()
    dcp.save(state, checkpoint_id=tmp_path / "local", no_dist=True)
    assert (tmp_path / "local" / ".metadata").is_file()
    assert not list((tmp_path / "local").rglob(MANIFEST_NAME))


@pytest.mark.parametrize("scheme", sorted(CLOUD_SCHEMES))
def test_every_cloud_scheme_gets_dcp_cloud(scheme: str) -> None:
    dcp_cloud.install(storage_options={"anon": True})
    url = f"{scheme}://bucket/run/step-1"
    writer = state_dict_saver._storage_setup(None, url)
    reader = state_dict_loader._storage_setup(None, url, reader=True)
    assert isinstance(writer, CloudStorageWriter) and writer.url == url
    assert isinstance(reader, CloudStorageReader) and reader.url == url
    assert writer.storage_options == {"anon": True} == reader.storage_options
    assert _backend_for_scheme(scheme) is not None, f"{scheme} has no dcp_cloud store backend"
    upper = state_dict_saver._storage_setup(None, f"{scheme.upper()}://bucket/x")
    assert isinstance(upper, CloudStorageWriter)


def test_explicit_storage_is_left_alone(tmp_path) -> None:  # type: ignore[no-untyped-def]
    dcp_cloud.install()
    mine = FileSystemWriter(str(tmp_path / "a"))
    assert _storage_utils._storage_setup(mine, "s3://bucket/x") is mine


def test_defaults_are_split_between_writer_and_reader() -> None:
    dcp_cloud.install(part_size=8 * 2**20, overwrite=False, verify_checksums=False, max_concurrency=3)
    writer = state_dict_saver._storage_setup(None, "s3://b/x")
    reader = state_dict_loader._storage_setup(None, "s3://b/x", reader=True)
    assert writer.overwrite is False and writer.options.part_size == 8 * 2**20
    assert reader.verify_checksums is False and reader.options.part_size == 8 * 2**20
    assert writer.options.max_concurrency == 3 == reader.options.max_concurrency


def test_install_is_idempotent_and_uninstall_restores_torch() -> None:
    dcp_cloud.install()
    hooked = _storage_utils._storage_setup
    dcp_cloud.install(overwrite=False)  # new defaults, same hook
    assert _storage_utils._storage_setup is hooked
    assert hooked.__wrapped__ is ORIGINAL_SETUP  # type: ignore[attr-defined]
    assert state_dict_saver._storage_setup(None, "s3://b/x").overwrite is False
    dcp_cloud.uninstall()
    assert _storage_utils._storage_setup is ORIGINAL_SETUP
    assert state_dict_saver._storage_setup is ORIGINAL_SETUP
    assert state_dict_loader._storage_setup is ORIGINAL_SETUP
    assert dcp.async_save is ORIGINAL_ASYNC_SAVE is state_dict_saver.async_save
    dcp_cloud.uninstall()  # twice is harmless
    assert not is_installed()


def test_frameworks_own_filesystems_see_checkpoints_dcp_cloud_writes(
    s3_target: Target, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A framework lists its checkpoint folder through its own s3fs; after install() that listing
    is not served from a cache made before dcp_cloud committed a new checkpoint."""
    import fsspec.config

    monkeypatch.setattr(fsspec.config, "conf", {"gs": {"use_listings_cache": True}})
    dcp_cloud.install(storage_options=s3_target.storage_options)
    assert fsspec.config.conf["gs"] == {"use_listings_cache": True}  # the user's choice stands
    fs, root = fsspec.url_to_fs(s3_target.url, skip_instance_cache=True, **s3_target.storage_options)
    fs.mkdir(root)
    fs.pipe(f"{root}/README", b"x")
    before = fs.ls(root, detail=False)
    dcp.save(_state(), checkpoint_id=f"{s3_target.url}/step-1")
    assert f"{root}/step-1" in fs.ls(root, detail=False), before
    dcp_cloud.uninstall()
    assert fsspec.config.conf == {"gs": {"use_listings_cache": True}}


def test_uninstall_leaves_a_later_patch_in_place() -> None:
    dcp_cloud.install()

    def someone_elses(*args, **kwargs):  # type: ignore[no-untyped-def]
        return None

    state_dict_loader._storage_setup = someone_elses
    try:
        dcp_cloud.uninstall()
        assert state_dict_loader._storage_setup is someone_elses
        assert state_dict_saver._storage_setup is ORIGINAL_SETUP
    finally:
        state_dict_loader._storage_setup = ORIGINAL_SETUP


def test_unknown_or_bad_options_fail_at_install_time() -> None:
    with pytest.raises(TypeError, match="unknown option.*part_sise"):
        dcp_cloud.install(part_sise=2**20)
    with pytest.raises(ValueError, match="part"):
        dcp_cloud.install(part_size=1)
    with pytest.raises(ValueError, match="lease_seconds"):
        dcp_cloud.install(lease_seconds=-1)
    assert not is_installed()
    assert _storage_utils._storage_setup is ORIGINAL_SETUP


def test_a_bad_url_fails_with_dcp_clouds_message() -> None:
    dcp_cloud.install()
    with pytest.raises(StoreConfigError, match="credentials"):
        state_dict_saver._storage_setup(None, "s3://key:secret@bucket/x")


# -- the environment-variable opt-in (dcp_cloud.integrations.autoinstall) ----------------------

_PROBE = """
import site, sys
site.addsitedir(sys.argv[1])  # processes the .pth files there, as at interpreter start
print("before:", sorted(m for m in ("torch", "dcp_cloud", "_dcp_cloud_autoinstall") if m in sys.modules))
if sys.argv[2:] == ["--start-only"]:
    raise SystemExit(0)
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import _storage_utils
print("writer:", type(_storage_utils._storage_setup(None, "s3://b/x")).__name__)
print("loader:", type(dcp.__loader__).__name__)
if len(sys.argv) > 2:
    import torch
    dcp.save({"w": torch.ones(3)}, checkpoint_id=sys.argv[2], no_dist=True)
    print("saved")
"""


def _probe(site_dir: Path, env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    clean = {k: v for k, v in os.environ.items() if not k.startswith("DCP_CLOUD_")}
    return subprocess.run(
        [sys.executable, "-c", _PROBE, str(site_dir), *args],
        env={**clean, **env},
        capture_output=True,
        text=True,
        timeout=180,
    )


@pytest.fixture
def hook_dir(tmp_path: Path) -> Path:
    site_dir = tmp_path / "site"
    site_dir.mkdir()
    assert autoinstall.main(["enable", "--dir", str(site_dir)]) == 0
    assert (site_dir / autoinstall.PTH_NAME).is_file()
    return site_dir


def test_env_hook_does_nothing_without_the_variable(hook_dir: Path) -> None:
    for env in ({}, {autoinstall.ENV_VAR: "false"}):
        started = _probe(hook_dir, env, "--start-only")
        assert started.returncode == 0 and started.stderr == "", started.stderr
        assert "before: []" in started.stdout  # nothing imported at start
    done = _probe(hook_dir, {autoinstall.ENV_VAR: "0"})
    assert done.returncode == 0, done.stderr
    assert "before: []" in done.stdout
    assert "writer: FsspecWriter" in done.stdout


def test_env_variable_values() -> None:
    on = ["1", "true", "TRUE", " yes ", "on"]
    off = ["", "0", "false", "no", "off", "2", "maybe"]
    assert all(autoinstall.requested({autoinstall.ENV_VAR: v}) for v in on)
    assert not any(autoinstall.requested({autoinstall.ENV_VAR: v}) for v in off)
    assert not autoinstall.requested({})
    assert autoinstall.options({autoinstall.OPTIONS_VAR: '{"part_size": 8388608}'}) == {"part_size": 8388608}
    with pytest.raises(ValueError, match="JSON object"):
        autoinstall.options({autoinstall.OPTIONS_VAR: "[1, 2]"})


def test_env_install_warns_instead_of_raising(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv(autoinstall.OPTIONS_VAR, '{"part_sise": 1}')
    with pytest.warns(RuntimeWarning, match="part_sise"):
        assert autoinstall.install_from_env() is False
    assert not is_installed()


def test_env_hook_installs_when_dcp_is_imported(hook_dir: Path, s3_target: Target) -> None:
    options = json.dumps({"storage_options": s3_target.storage_options})
    done = _probe(hook_dir, {autoinstall.ENV_VAR: "1", autoinstall.OPTIONS_VAR: options}, s3_target.url)
    assert done.returncode == 0, done.stderr
    # at start only the stdlib hook is loaded: neither torch nor dcp_cloud
    assert "before: ['_dcp_cloud_autoinstall']" in done.stdout
    assert "writer: CloudStorageWriter" in done.stdout
    assert "loader: SourceFileLoader" in done.stdout  # the module keeps its own loader
    assert "saved" in done.stdout
    assert len(_manifests(s3_target)) == 1


def test_env_hook_never_stops_the_interpreter(hook_dir: Path, tmp_path: Path) -> None:
    bad = _probe(hook_dir, {autoinstall.ENV_VAR: "1", autoinstall.OPTIONS_VAR: "{not json"})
    assert bad.returncode == 0, bad.stderr
    assert "writer: FsspecWriter" in bad.stdout
    assert "DCP_CLOUD_INSTALL_OPTIONS is not valid JSON" in bad.stderr
    # a hook file left behind by an uninstalled dcp_cloud: one line on stderr, nothing else
    stale = tmp_path / "stale"
    stale.mkdir()
    (stale / autoinstall.PTH_NAME).write_text(autoinstall.pth_text(str(tmp_path / "gone.py")))
    done = _probe(stale, {autoinstall.ENV_VAR: "1"}, "--start-only")
    assert done.returncode == 0, done.stderr
    assert "before: []" in done.stdout
    assert "auto-install hook could not load" in done.stderr


def test_env_hook_disable_removes_only_its_own_file(hook_dir: Path) -> None:
    assert autoinstall.disable(hook_dir) == hook_dir / autoinstall.PTH_NAME
    assert not (hook_dir / autoinstall.PTH_NAME).exists()
    assert autoinstall.disable(hook_dir) is None
    (hook_dir / autoinstall.PTH_NAME).write_text("import something_else\n")
    with pytest.raises(RuntimeError, match="not written by dcp_cloud"):
        autoinstall.disable(hook_dir)
    assert (hook_dir / autoinstall.PTH_NAME).exists()


def test_env_hook_installs_at_once_when_dcp_is_already_imported() -> None:
    autoinstall.activate({autoinstall.ENV_VAR: "yes"})
    assert is_installed()
    assert not any(type(f).__name__ == "_ImportHook" for f in sys.meta_path)


_PROCESS_SAVE = """
import json, sys, tempfile
import torch, torch.distributed as dist, torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict_saver import AsyncCheckpointerType
import dcp_cloud

url, options = sys.argv[1], json.loads(sys.argv[2])
dist.init_process_group("gloo", init_method="file://" + tempfile.mktemp(), rank=0, world_size=1)
dcp_cloud.install(storage_options=options)
future = dcp.async_save({"w": torch.arange(10.0)}, checkpoint_id=url,
                        async_checkpointer_type=AsyncCheckpointerType.PROCESS)
future.result(timeout=240)
loaded = {"w": torch.zeros(10)}
dcp.load(loaded, checkpoint_id=url)
assert torch.equal(loaded["w"], torch.arange(10.0))
print("process save done")
dist.destroy_process_group()
"""


@pytest.mark.slow
def test_async_save_in_a_separate_process_uses_dcp_cloud(s3_target: Target) -> None:
    """PROCESS mode saves in a process where install() never ran: the writer built in the
    caller travels there."""
    done = subprocess.run(
        [sys.executable, "-c", _PROCESS_SAVE, s3_target.url, json.dumps(s3_target.storage_options)],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "process save done" in done.stdout
    assert len(_manifests(s3_target)) == 1
