"""The dcp-cloud command line, against real stores (moto's S3 server, local folders, memory)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed.checkpoint as dcp
from click.testing import CliRunner, Result

from dcp_cloud.checkpoint import layout
from dcp_cloud.checkpoint.ownership import Intent
from dcp_cloud.cli import cli
from dcp_cloud.store import open_store
from dcp_cloud.tools.info import read_metadata
from dcp_cloud.tools.manager import CheckpointManager

from .conftest import BUCKET, Target, make_target
from .helpers import assert_same, zeros_like_state

MiB = 1024 * 1024


def run(target: Target | None, *args: str) -> Result:
    """Invoke the CLI in-process, with the target's storage options."""
    argv = list(args)
    if target is not None and target.storage_options:
        argv += ["--storage-options", json.dumps(target.storage_options)]
    return CliRunner().invoke(cli, argv, catch_exceptions=False)


def state(value: float = 1.0) -> dict[str, Any]:
    return {
        "model": {"weight": torch.full((16, 8), value), "bias": torch.arange(8, dtype=torch.float64)},
        "emb": torch.ones(4, 4, dtype=torch.bfloat16) * value,
        "step": int(value),
        "tag": "run",
    }


def store_of(target: Target) -> Any:
    return open_store(target.url, target.storage_options)


def data_key(target: Target) -> str:
    return next(
        o.key for o in store_of(target).run(store_of(target).list_objects("")) if o.key.endswith(".distcp")
    )


# -- ls / info ------------------------------------------------------------------------------------


def test_ls_shows_committed_and_incomplete(target: Target) -> None:
    manager = CheckpointManager(target.url, storage_options=target.storage_options)
    for step in (1, 2, 3):
        manager.save(step, state(step))
    store = store_of(target)
    store.run(store.delete(["step-0000000003/.metadata"]))

    result = run(target, "ls", target.url, "--json")
    assert result.exit_code == 0, result.output
    rows = json.loads(result.stdout)
    assert [(r["path"], r["status"], r["step"]) for r in rows] == [
        ("step-0000000001", "committed", 1),
        ("step-0000000002", "committed", 2),
        ("step-0000000003", "incomplete", 3),
    ]
    assert all(r["objects"] >= 2 and r["size"] > 0 and r["modified"] for r in rows)

    text = run(target, "ls", target.url)
    assert text.exit_code == 0
    assert (
        "step-0000000003  incomplete" in text.stdout
        and "3 checkpoints, 2 committed, 1 incomplete" in text.stdout
    )


def test_info_lists_tensors_and_other_values(target: Target) -> None:
    dcp.save(state(), storage_writer=target.writer())
    result = run(target, "info", target.url, "--json")
    assert result.exit_code == 0, result.output
    doc = json.loads(result.stdout)
    tensors = {t["fqn"]: t for t in doc["tensors"]}
    assert tensors["model.weight"] == {
        "fqn": "model.weight",
        "dtype": "float32",
        "shape": [16, 8],
        "size": 512,
        "chunks": 1,
    }
    assert tensors["emb"]["dtype"] == "bfloat16" and tensors["emb"]["size"] == 32
    assert doc["objects"] == ["step", "tag"]

    text = run(target, "info", target.url)
    assert (
        "model.bias" in text.stdout and "float64" in text.stdout and "other values: step, tag" in text.stdout
    )


def test_missing_checkpoint_exits_1_and_names_the_url(target: Target) -> None:
    result = run(target, "info", target.url)
    assert result.exit_code == 1
    assert "no checkpoint here" in result.stderr and target.url.split("://")[-1] in result.stderr
    as_json = run(target, "verify", target.url, "--json")
    assert as_json.exit_code == 1 and json.loads(as_json.stdout)["error"] == "CheckpointNotFoundError"


def test_usage_errors_exit_2(tmp_path: Path) -> None:
    assert run(None, "ls", str(tmp_path), "--storage-options", "{not json").exit_code == 2
    assert run(None, "ls", str(tmp_path), "--storage-options", "[1]").exit_code == 2
    assert run(None, "nope").exit_code == 2
    assert run(None, "prune", str(tmp_path)).exit_code == 2  # --keep is required
    bad = run(None, "info", "nosuchscheme://x/y")
    assert bad.exit_code == 2 and "unknown URL scheme" in bad.stderr


# -- verify ---------------------------------------------------------------------------------------


def test_verify_passes_on_a_good_checkpoint(target: Target) -> None:
    dcp.save(state(), storage_writer=target.writer())
    result = run(target, "verify", target.url)
    assert result.exit_code == 0, result.output
    assert result.stdout.startswith("OK ")
    doc = json.loads(run(target, "verify", target.url, "--json").stdout)
    assert doc["ok"] and doc["items_checksummed"] == doc["items"] == 5 and doc["has_manifest"]


def test_verify_finds_a_flipped_byte(target: Target) -> None:
    dcp.save(state(), storage_writer=target.writer())
    store = store_of(target)
    key = data_key(target)
    data = bytearray(store.run(store.get(key)))
    # flip a byte inside the bytes of model.weight
    metadata = read_metadata(store)
    located = next(v for k, v in metadata.storage_data.items() if k.fqn == "model.weight")
    data[located.offset + located.length - 8] ^= 0x01
    store.run(store.put(key, bytes(data)))

    result = run(target, "verify", target.url)
    assert result.exit_code == 1
    assert f"FAIL checksum: {store.url}/{key}: checksum mismatch" in result.stdout
    assert "model.weight" in result.stdout and "FAILED" in result.stdout
    doc = json.loads(run(target, "verify", target.url, "--json").stdout)
    assert not doc["ok"] and [(p["object"], p["kind"], p["tensors"]) for p in doc["problems"]] == [
        (key, "checksum", ["model.weight"])
    ]


def test_verify_carries_checksums_across_ranged_reads(target: Target) -> None:
    from dcp_cloud.tools.verify import verify_checkpoint

    dcp.save({"x": torch.randn(4096), "y": torch.randn(10)}, storage_writer=target.writer())
    good = verify_checkpoint(target.url, storage_options=target.storage_options, part_size=1000)
    assert good.ok and good.items_checksummed == 2 and good.bytes_read > 16384
    store = store_of(target)
    key = data_key(target)
    located = next(v for k, v in read_metadata(store).storage_data.items() if k.fqn == "x")
    data = bytearray(store.run(store.get(key)))
    data[located.offset + located.length - 100] ^= 0x80  # in the last of x's 17 windows
    store.run(store.put(key, bytes(data)))
    bad = verify_checkpoint(target.url, storage_options=target.storage_options, part_size=1000)
    assert [(p.kind, p.tensors) for p in bad.problems] == [("checksum", ["x"])]


def test_verify_finds_missing_and_truncated_objects(target: Target) -> None:
    dcp.save(state(), storage_writer=target.child("a").writer())
    dcp.save(state(), storage_writer=target.child("b").writer())
    a, b = target.child("a"), target.child("b")
    store_a, store_b = store_of(a), store_of(b)
    store_a.run(store_a.delete([data_key(a)]))
    key_b = data_key(b)
    store_b.run(store_b.put(key_b, store_b.run(store_b.get(key_b))[:100]))

    missing = run(a, "verify", a.url)
    assert missing.exit_code == 1 and "FAIL missing" in missing.stdout and "model.weight" in missing.stdout
    truncated = run(b, "verify", b.url, "--json")
    problems = json.loads(truncated.stdout)["problems"]
    assert (
        truncated.exit_code == 1
        and problems[0]["kind"] == "size"
        and "model.weight" in problems[0]["tensors"]
    )


def test_verify_without_manifest_checks_sizes(tmp_path: Path) -> None:
    folder = tmp_path / "torch-ckpt"
    dcp.save(state(), storage_writer=dcp.FileSystemWriter(str(folder)))
    ok = run(None, "verify", str(folder))
    assert ok.exit_code == 0 and "no checksums" in ok.stderr
    data = next(folder.glob("*.distcp"))
    data.write_bytes(data.read_bytes()[:-10])
    bad = run(None, "verify", str(folder))
    assert bad.exit_code == 1 and "truncated" in bad.stdout


# -- gc / prune -----------------------------------------------------------------------------------


def test_gc_prints_what_it_removes_and_passes_its_flags(
    request: pytest.FixtureRequest, tmp_path: Path
) -> None:
    """What ``gc`` adds to ``collect_garbage`` (tested in test_gc.py): its flags, its JSON and
    text output, its exit code."""
    root = make_target("file", request, tmp_path)
    manager = CheckpointManager(root.url, storage_options=root.storage_options)
    manager.save(1, state(1))
    manager.save(2, state(2))
    store = store_of(root)
    store.run(store.delete(["step-0000000002/.metadata"]))  # save 2 died before its commit
    dead = "save-20260101T000000Z-0000dead"  # save 3 was killed mid-upload, its lease long expired
    intent = Intent(dead, ("__0_",), created=time.time(), heartbeat=time.time(), lease_seconds=0.1)
    store.run(store.put(f"step-0000000003/{layout.intent_key(dead)}", intent.to_json()))
    upload = store.run(store.start_upload(f"step-0000000003/{dead}/__0_0.distcp"))
    store.run(store.upload_part(upload, 1, 0, b"x" * 65536))
    time.sleep(0.2)  # past the lease
    debris = {
        k
        for k in (o.key for o in store.run(store.list_objects("")))
        if k.startswith(("step-0000000002/", "step-0000000003/"))
    }

    young = run(root, "gc", root.url, "--json")  # the default grace keeps young debris
    doc = json.loads(young.stdout)
    assert young.exit_code == 0 and doc["deleted"] == [] and doc["kept_recent"] and not doc["dry_run"]

    preview = run(root, "gc", root.url, "--grace", "0", "--dry-run", "--json")
    doc = json.loads(preview.stdout)
    assert preview.exit_code == 0 and doc["dry_run"] and doc["url"] == root.url
    assert set(doc["deleted"]) == debris and len(doc["aborted_uploads"]) == 1 and doc["bytes_freed"] > 0
    assert len(store.run(store.list_uploads(""))) == 1  # --dry-run reached the library

    shown = run(root, "gc", root.url, "--grace", "0", "--dry-run")
    assert shown.exit_code == 0 and f"would delete {len(debris)} objects" in shown.stdout
    assert all(f"would delete {k}" in shown.stdout for k in debris)

    done = run(root, "gc", root.url, "--grace", "0")
    assert done.exit_code == 0, done.output
    assert f"deleted {len(debris)} objects" in done.stdout and "aborted 1 upload" in done.stdout
    assert all(f"deleted {k}" in done.stdout for k in debris)
    assert store.run(store.list_uploads("")) == []
    assert run(root, "verify", f"{root.url}/step-0000000001").exit_code == 0


def test_prune_keeps_the_newest(target: Target) -> None:
    manager = CheckpointManager(target.url, storage_options=target.storage_options)
    for step in (10, 20, 30, 40):
        manager.save(step, state(step))
    preview = run(target, "prune", target.url, "--keep", "2", "--dry-run", "--json")
    assert json.loads(preview.stdout) == {
        "url": target.url,
        "dry_run": True,
        "deleted": [10, 20],
        "kept": [30, 40],
    }
    assert manager.steps() == [10, 20, 30, 40]
    result = run(target, "prune", target.url, "--keep", "1")
    assert result.exit_code == 0 and "deleted 3 steps; kept 1: 40" in result.stdout
    assert manager.steps() == [40]
    assert {o.key.split("/")[0] for o in store_of(target).run(store_of(target).list_objects(""))} == {
        "step-0000000040"
    }


# -- cp / convert ---------------------------------------------------------------------------------


def test_cp_between_stores_commits_metadata_last(s3_target: Target, tmp_path: Path) -> None:
    server = s3_target.server
    assert server is not None
    big = {"big": torch.randn(3 * MiB), **state()}  # 12 MiB: a multipart copy with 5 MiB parts
    local = str(tmp_path / "local-ckpt")
    dcp.save(big, storage_writer=Target("file", local).writer())

    server.clear_requests()
    up = run(
        s3_target,
        "cp",
        local,
        s3_target.url,
        "--part-size",
        "5",
        "--dst-storage-options",
        json.dumps(server.storage_options),
    )
    assert up.exit_code == 0, up.output
    writes = [
        r for r in server.requests() if r.kind in {"put_object", "complete_multipart_upload", "upload_part"}
    ]
    assert writes[-1].kind == "put_object" and writes[-1].path.endswith("/.metadata")
    assert sum(r.kind == "upload_part" for r in writes) == 3

    memory = f"memory://{BUCKET}/cp-{tmp_path.name}/ckpt"
    down = run(s3_target, "cp", s3_target.url, memory)
    assert down.exit_code == 0, down.output
    for url, options in ((s3_target.url, s3_target.storage_options), (memory, {})):
        out = zeros_like_state(big)
        out["step"], out["tag"] = 0, ""
        dcp.load(out, storage_reader=Target("x", url, options).reader())
        assert_same(big, out)
    assert run(None, "verify", memory).exit_code == 0

    again = run(
        s3_target, "cp", local, s3_target.url, "--dst-storage-options", json.dumps(server.storage_options)
    )
    assert again.exit_code == 1 and "already committed" in again.stderr
    forced = run(
        s3_target,
        "cp",
        local,
        s3_target.url,
        "--overwrite",
        "--json",
        "--dst-storage-options",
        json.dumps(server.storage_options),
    )
    assert forced.exit_code == 0 and json.loads(forced.stdout)["replaced"] is True


def test_cp_refuses_an_incomplete_source(target: Target, tmp_path: Path) -> None:
    dcp.save(state(), storage_writer=target.writer())
    store = store_of(target)
    store.run(store.delete([".metadata"]))
    result = run(target, "cp", target.url, str(tmp_path / "dst"))
    assert result.exit_code == 1 and "no .metadata" in result.stderr
    assert not (tmp_path / "dst").exists()


def test_convert_to_torch_save_and_safetensors(target: Target, tmp_path: Path) -> None:
    from safetensors.torch import load_file

    original = state(3.0)
    dcp.save(original, storage_writer=target.writer())
    out = tmp_path / "model.pt"
    result = run(target, "convert", target.url, str(out))
    assert result.exit_code == 0, result.output
    assert_same(original, torch.load(out, weights_only=False))

    st = tmp_path / "model.safetensors"
    result = run(target, "convert", target.url, str(st), "--format", "safetensors")
    assert result.exit_code == 0, result.output
    assert "left out 2 non-tensor values" in result.stdout
    tensors = load_file(str(st))
    assert set(tensors) == {"model.weight", "model.bias", "emb"}
    assert_same(original["model"]["weight"], tensors["model.weight"])
    assert_same(original["emb"], tensors["emb"])


# -- bench, environment ---------------------------------------------------------------------------


def test_bench_passes_arguments_through(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)
    missing = run(None, "bench")
    assert missing.exit_code == 2 and "not importable from here" in missing.stderr

    (tmp_path / "benchmarks").mkdir()
    (tmp_path / "benchmarks" / "__init__.py").write_text("")
    (tmp_path / "benchmarks" / "bench.py").write_text(
        "import sys\nopen('args.json', 'w').write(__import__('json').dumps(sys.argv[1:]))\nsys.exit(3)\n"
    )
    result = run(None, "bench", "--store", "moto", "--help")
    assert result.exit_code == 3
    assert json.loads((tmp_path / "args.json").read_text()) == ["--store", "moto", "--help"]


def test_standard_aws_environment_is_enough(s3_target: Target) -> None:
    server = s3_target.server
    assert server is not None
    CheckpointManager(s3_target.url, storage_options=s3_target.storage_options).save(5, state(5))
    env = {k: v for k, v in os.environ.items() if not k.startswith("AWS_")}
    env.update(server.env)
    env["PYTHONPATH"] = os.pathsep.join(sys.path)
    done = subprocess.run(
        [sys.executable, "-m", "dcp_cloud.cli", "ls", s3_target.url, "--json"],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    assert [(r["step"], r["status"]) for r in json.loads(done.stdout)] == [(5, "committed")]


@pytest.mark.slow
@pytest.mark.timeout(300)
def test_export_safetensors_example() -> None:
    script = Path(__file__).resolve().parent.parent / "examples" / "export_safetensors.py"
    done = subprocess.run([sys.executable, str(script)], capture_output=True, text=True, timeout=280)
    assert done.returncode == 0, (done.stdout + done.stderr)[-3000:]
    assert "all equal; same outputs: True" in done.stdout
