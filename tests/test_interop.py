"""No lock-in: our checkpoints load with torch's own reader, and we load theirs."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemWriter
from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

from .conftest import BUCKET, Target
from .helpers import assert_same


def _state() -> dict:
    return {
        "w": torch.randn(300, 200),
        "b": torch.randn(200).to(torch.bfloat16),
        "nested": {"step": 17, "ids": torch.arange(12).reshape(3, 4)[:, 1:]},
        "big": torch.randn(2 * 1024 * 1024),
    }


def _download(s3_target: Target, dest: Path) -> None:
    client = s3_target.server.client()
    prefix = s3_target.url.removeprefix(f"s3://{BUCKET}/") + "/"
    keys = [o["Key"] for o in client.list_objects_v2(Bucket=BUCKET, Prefix=prefix)["Contents"]]
    for key in keys:
        path = dest / key[len(prefix) :]
        path.parent.mkdir(parents=True, exist_ok=True)
        client.download_file(BUCKET, key, str(path))


def _upload(s3_target: Target, src: Path) -> None:
    client = s3_target.server.client()
    prefix = s3_target.url.removeprefix(f"s3://{BUCKET}/")
    for path in src.rglob("*"):
        if path.is_file():
            client.upload_file(str(path), BUCKET, f"{prefix}/{path.relative_to(src).as_posix()}")


def test_downloaded_checkpoint_loads_with_stock_filesystem_reader(s3_target: Target, tmp_path: Path) -> None:
    state = _state()
    torch.save(state, tmp_path / "expected.pt")
    dcp.save(state, storage_writer=s3_target.writer(part_size=5 * 1024 * 1024))
    folder = tmp_path / "downloaded"
    _download(s3_target, folder)
    assert (folder / ".metadata").is_file()

    # A fresh interpreter in which importing dcp_cloud fails: torch alone must load it.
    script = textwrap.dedent(
        f"""
        import sys, warnings
        sys.modules["dcp_cloud"] = None
        warnings.simplefilter("ignore")
        import torch, torch.distributed.checkpoint as dcp
        expected = torch.load({str(tmp_path / "expected.pt")!r}, weights_only=False)
        out = {{"w": torch.zeros(300, 200), "b": torch.zeros(200, dtype=torch.bfloat16),
               "nested": {{"step": 0, "ids": torch.zeros(3, 3, dtype=torch.int64)}},
               "big": torch.zeros(2 * 1024 * 1024)}}
        dcp.load(out, storage_reader=dcp.FileSystemReader({str(folder)!r}))
        for k in ("w", "b", "big"):
            assert torch.equal(out[k], expected[k]), k
        assert torch.equal(out["nested"]["ids"], expected["nested"]["ids"])
        assert out["nested"]["step"] == 17
        print("LOADED-BY-TORCH")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "LOADED-BY-TORCH" in result.stdout


def test_filesystem_writer_checkpoint_uploaded_loads_with_our_reader(
    s3_target: Target, tmp_path: Path
) -> None:
    state = _state()
    dcp.save(state, storage_writer=FileSystemWriter(str(tmp_path / "fs"), thread_count=2))
    _upload(s3_target, tmp_path / "fs")
    out = {
        "w": torch.zeros(300, 200),
        "b": torch.zeros(200, dtype=torch.bfloat16),
        "nested": {"step": 0, "ids": torch.zeros(3, 3, dtype=torch.int64)},
        "big": torch.zeros(2 * 1024 * 1024),
    }
    reader = s3_target.reader()
    dcp.load(out, storage_reader=reader)
    assert_same(state, out)
    assert reader.last_stats is not None and reader.last_stats.objects == 2


def test_fsspec_writer_checkpoint_loads_with_our_reader(s3_target: Target) -> None:
    state = _state()
    writer = FsspecWriter(s3_target.url, sync_files=False, **s3_target.storage_options)
    dcp.save(state, storage_writer=writer)
    out = {
        "w": torch.zeros(300, 200),
        "b": torch.zeros(200, dtype=torch.bfloat16),
        "nested": {"step": 0, "ids": torch.zeros(3, 3, dtype=torch.int64)},
        "big": torch.zeros(2 * 1024 * 1024),
    }
    dcp.load(out, storage_reader=s3_target.reader())
    assert_same(state, out)


def test_local_checkpoint_is_a_plain_dcp_folder(tmp_path: Path) -> None:
    from dcp_cloud import CloudStorageWriter

    state = _state()
    dcp.save(state, storage_writer=CloudStorageWriter(str(tmp_path / "ck")))
    names = sorted(
        p.relative_to(tmp_path / "ck").as_posix() for p in (tmp_path / "ck").rglob("*") if p.is_file()
    )
    assert names[0] == ".metadata" and any(n.endswith("/__0_0.distcp") for n in names)
    assert not any(".tmp" in n for n in names), names
    out = {
        "w": torch.zeros(300, 200),
        "b": torch.zeros(200, dtype=torch.bfloat16),
        "nested": {"step": 0, "ids": torch.zeros(3, 3, dtype=torch.int64)},
        "big": torch.zeros(2 * 1024 * 1024),
    }
    dcp.load(out, storage_reader=dcp.FileSystemReader(str(tmp_path / "ck")))
    assert_same(state, out)
    assert os.path.getsize(tmp_path / "ck" / ".metadata") > 0
