"""torch_checkpointing 0.1 (Meta's successor to DCP for torchtitan): what its storage API asks of
a backend, checked against the installed package.

dcp_cloud ships no torch_checkpointing backend. These tests pin down the reasons in the library's
own behaviour, so that a change in it shows up here:

* its ``Storage`` receives ``pathlib.Path`` objects, so ``"s3://bucket/x"`` arrives as
  ``s3:/bucket/x``: a backend maps paths to URLs itself (``Storage.remap_path``);
* its default commit is a directory rename: every rank writes under ``tmp_<name>`` and rank 0
  calls ``Storage.rename(tmp_<name>, <name>, is_directory=True)`` after the barrier
  (``checkpoint_writer.py``, ``CheckpointWriter.write``). On an object store that is a copy of
  every object and a delete (``Storage.rename``'s docstring says so for prefix-emulated
  directories), the O(checkpoint size) commit dcp_cloud exists to avoid;
* it loads torch-serialized files with the full ``pickle`` module (``storage/torch_serialization.py``
  ``load_torch_serialized_from_storage``; ``checkpoint_reader.py`` ``torch.load(..., weights_only=False)``):
  a checkpoint file runs any function it names, so a dcp_cloud backend would need an explicit trust
  switch, as ``CloudStorageReader(trust_pickles=True)`` has;
* ``write_to_temp_dir=False`` writes in place with no rename and leaves completion to a
  ``finalize_callback`` that runs after the barrier with the writer's own ``Storage``: the seam a
  rename-free backend would use (hold rank 0's metadata, publish a commit record in the callback,
  and make ``exists(<dir>)`` true only once that record exists, since the loader's only
  completeness check is ``exists(checkpoint_dir)`` in ``checkpoint_reader.py``).

torchtitan 0.3's ``TorchCheckpointingManager`` does not save or load yet (its ``_save``/``_load``
raise ``NotImplementedError``), so there is no torchtitan path to test either; with
torch-checkpointing 0.1.1 it does not even import (it needs ``torch_checkpointing.dtensor_resharder``,
which 0.1.0 had). The API moves between patch releases (0.1.0 has no ``write_to_temp_dir``): these
tests are written against 0.1.1.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import require_framework

require_framework("torch_checkpointing")

from torch_checkpointing import CheckpointManager, CheckpointWriterConfig  # noqa: E402
from torch_checkpointing.config import SyncCheckpointSaverConfig  # noqa: E402
from torch_checkpointing.storage.filesystem import (  # noqa: E402
    LocalFileSystemStorage,
    LocalFileSystemStorageConfig,
)


class RecordingStorage(LocalFileSystemStorage):
    """torch_checkpointing's local storage, recording the calls that write or commit."""

    calls: list[tuple[Any, ...]] = []

    def get_write_stream(self, path: Path, data: object) -> Any:
        self.calls.append(("stream", path))
        return super().get_write_stream(path, data)

    def write(self, path: Path, data: Any) -> None:
        self.calls.append(("write", path))
        super().write(path, data)

    def rename(
        self, src_path: Path, dst_path: Path, is_directory: bool = False, background_cleanup: bool = False
    ) -> None:
        self.calls.append(("rename", src_path, dst_path, is_directory))
        super().rename(src_path, dst_path, is_directory, background_cleanup)


class RecordingConfig(LocalFileSystemStorageConfig):
    def create_storage(self) -> RecordingStorage:
        return RecordingStorage(self)


W = torch.arange(6.0)
STATE: dict[str, Any] = {"w": W, "meta": {"step": 3}}


def _manager(write_to_temp_dir: bool = True, **kwargs: Any) -> Any:
    RecordingStorage.calls = []
    save = SyncCheckpointSaverConfig(
        writer_config=CheckpointWriterConfig(write_to_temp_dir=write_to_temp_dir)
    )
    return CheckpointManager.Config(
        save=save, storage_config=RecordingConfig(use_direct_io=False), **kwargs
    ).build()


def test_default_commit_is_a_directory_rename(tmp_path: Path) -> None:
    manager = _manager()
    final = tmp_path / "step-3"
    manager.save(str(final), STATE)
    streams = [c[1] for c in RecordingStorage.calls if c[0] == "stream"]
    renames = [c for c in RecordingStorage.calls if c[0] == "rename"]
    # every byte went under tmp_step-3, then one directory rename published it
    assert streams and all(p.parent == tmp_path / "tmp_step-3" for p in streams), streams
    assert renames == [("rename", tmp_path / "tmp_step-3", final, True)]
    assert RecordingStorage.calls[-1][0] == "rename"
    loaded = manager.load(str(final), into={"w": torch.zeros(6), "meta": {"step": 0}})
    assert torch.equal(loaded["w"], W) and loaded["meta"] == {"step": 3}
    manager.close()


def test_storage_gets_paths_not_urls(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)  # the local storage writes the "URL" as a relative folder here
    manager = _manager()
    manager.save("s3://bucket/run1/step-3", STATE)
    paths = [c[1] for c in RecordingStorage.calls if c[0] == "stream"]
    assert paths and all(isinstance(p, Path) for p in paths)
    # the scheme's "//" is gone: a backend cannot tell s3://bucket from a local folder "s3:"
    assert all(str(p).startswith("s3:/bucket/run1/tmp_step-3/") for p in paths), paths
    assert (tmp_path / "s3:" / "bucket" / "run1" / "step-3").is_dir()
    manager.close()


def test_in_place_writes_leave_the_commit_to_a_finalize_callback(tmp_path: Path) -> None:
    seen: list[tuple[str, Any]] = []
    manager = _manager(
        write_to_temp_dir=False, finalize_callback=lambda args: seen.append((args.path, args.storage))
    )
    final = tmp_path / "step-3"
    manager.save(str(final), STATE)
    assert not [c for c in RecordingStorage.calls if c[0] == "rename"]
    streams = [c[1] for c in RecordingStorage.calls if c[0] == "stream"]
    assert streams and all(p.parent == final for p in streams), streams
    # the callback runs once, after the writes, with the final path and the storage that wrote
    assert len(seen) == 1 and seen[0][0] == str(final)
    assert isinstance(seen[0][1], RecordingStorage)
    manager.close()


LOAD_SIDE_EFFECTS: list[str] = []


def _run_on_load(tag: str) -> str:
    LOAD_SIDE_EFFECTS.append(tag)
    return tag


class RunsCodeOnLoad:
    """Unpickling this calls ``_run_on_load``: any function a checkpoint file names would run."""

    def __reduce__(self) -> tuple[Any, tuple[str]]:
        return (_run_on_load, ("ran at load",))


def test_loading_unpickles_arbitrary_globals(tmp_path: Path) -> None:
    """torch_checkpointing loads torch files with the full pickle module (no weights_only), so a
    backend that feeds it bytes from a bucket would run whatever the checkpoint names: dcp_cloud
    would have to put that behind an explicit trust flag."""
    manager = _manager()
    manager.save(str(tmp_path / "step-1"), {"obj": RunsCodeOnLoad()})
    LOAD_SIDE_EFFECTS.clear()
    loaded = manager.load(str(tmp_path / "step-1"), into={"obj": None})
    assert LOAD_SIDE_EFFECTS == ["ran at load"] and loaded["obj"] == "ran at load"
    manager.close()


def test_torchtitan_torch_checkpointing_manager_does_not_import_with_this_release() -> None:
    """torchtitan 0.3.0's TorchCheckpointingManager imports torch_checkpointing.dtensor_resharder,
    which torch_checkpointing 0.1.1 no longer has: torchtitan's own torch_checkpointing path
    cannot be used with the release that has a pluggable storage."""
    import importlib

    require_framework("torchtitan")
    with pytest.raises(ImportError, match="dtensor_resharder"):
        importlib.import_module("torchtitan.components.checkpointer.torch_checkpointing")
