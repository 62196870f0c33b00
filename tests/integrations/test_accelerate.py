"""HF accelerate 1.15: FSDP ``SHARDED_STATE_DICT`` ``save_state``/``load_state`` on the S3 server.

accelerate passes ``dist_cp.FileSystemWriter(ckpt_dir)`` to DCP itself
(``accelerate/utils/fsdp_utils.py``, ``save_fsdp_model`` / ``save_fsdp_optimizer``), so
``dcp_cloud.install()`` cannot reach it; :mod:`dcp_cloud.integrations.accelerate` redirects it.

Two real ranks on gloo (CPU) train a small model sharded by accelerate's own FSDP2 preparation
(``fully_shard``), save with ``dcp_accelerate.save_state(accelerator, "s3://...")`` and record the
loss and parameters of the next step; two fresh processes start from another seed, call
``dcp_accelerate.load_state`` and must reproduce both bit for bit.

On CPU, accelerate never picks FSDP: ``AcceleratorState`` sets ``DistributedType.FSDP`` only when
the distributed type is one of the accelerator types (MULTI_GPU, MULTI_XPU, ...), not MULTI_CPU
(``accelerate/state.py``, the ``elif self.distributed_type in [DistributedType.MULTI_GPU, ...]``
branch), and silently wraps the model in DDP. The ranks here set ``distributed_type = FSDP`` on the
shared state after building the Accelerator; from there on it is accelerate's own code:
``prepare`` shards with ``fully_shard``, and ``save_state``/``load_state`` call
``save_fsdp_model``/``save_fsdp_optimizer``/``load_fsdp_model``/``load_fsdp_optimizer``. FSDP1
(``fsdp_version=1``) does not run on CPU: accelerate passes ``device_id=cpu:0`` and torch's FSDP
refuses it ("Inconsistent compute device and `device_id` on rank 0: cpu vs cpu:0",
``torch/distributed/fsdp/_init_utils.py``, ``_get_compute_device``).

Run as ``python -m tests.integrations.test_accelerate CONFIG RANK`` it is one rank of a job.
"""

from __future__ import annotations

import json
import os
import socket
import sys
import traceback
import uuid
from pathlib import Path
from typing import Any

import pytest
import torch

from .conftest import assert_same_tensors, launch_ranks, require_framework

ROOT = Path(__file__).resolve().parents[2]
WORLD = 2
STEPS = 3


# -- one rank ------------------------------------------------------------------------------------


def _batch(step: int, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1000 * rank + step)
    x = torch.randn(8, 16, generator=g)
    return x, torch.cos(x[:, :4] * 2.0)


def _run_rank(cfg: dict[str, Any], rank: int) -> dict[str, Any]:
    import torch.distributed as dist
    from accelerate import Accelerator
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType, FullyShardedDataParallelPlugin, set_seed

    from dcp_cloud.integrations import accelerate as dcp_accelerate

    os.environ.update(
        RANK=str(rank),
        LOCAL_RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_WORLD_SIZE=str(WORLD),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(cfg["port"]),
    )
    plugin = FullyShardedDataParallelPlugin(
        fsdp_version=2, state_dict_type="SHARDED_STATE_DICT", cpu_ram_efficient_loading=False
    )
    accelerator = Accelerator(cpu=True, fsdp_plugin=plugin)
    # see the module doc: accelerate keeps MULTI_CPU (and DDP) on CPU even with an FSDP plugin
    for shared in (PartialState._shared_state, AcceleratorState._shared_state):
        shared["distributed_type"] = DistributedType.FSDP
    AcceleratorState._shared_state["fsdp_plugin"] = plugin
    assert accelerator.distributed_type == DistributedType.FSDP and accelerator.is_fsdp2

    set_seed(cfg["seed"])
    model = torch.nn.Sequential(torch.nn.Linear(16, 32), torch.nn.GELU(), torch.nn.Linear(32, 4))
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.05)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=2, gamma=0.5)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    out: dict[str, Any] = {"sharded": type(next(model.parameters())).__name__}

    def full_params() -> dict[str, torch.Tensor]:
        return {name: p.full_tensor().detach().clone() for name, p in model.named_parameters()}

    def train_step(step: int) -> float:
        x, y = _batch(step, rank)
        optimizer.zero_grad()
        loss = torch.nn.functional.mse_loss(model(x), y)
        accelerator.backward(loss)
        optimizer.step()
        scheduler.step()
        losses = [torch.zeros(()) for _ in range(WORLD)]
        dist.all_gather(losses, loss.detach())
        return float(sum(losses))

    options = {"storage_options": cfg["storage_options"]}
    if cfg["phase"] == "train":
        for step in range(STEPS):
            train_step(step)
        dcp_accelerate.save_state(accelerator, cfg["url"], **options)
        out["local_dirs_left"] = sorted(p.name for p in Path(cfg["out"]).iterdir() if p.name.startswith("s3"))
    else:
        out["params_before"] = full_params()
        dcp_accelerate.load_state(accelerator, cfg["url"], **options)
    out["params_saved"] = full_params()
    out["lr"] = scheduler.get_last_lr()
    out["next_loss"] = train_step(STEPS)
    out["params_next"] = full_params()
    # torch's classes are back once the redirect is over
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint import filesystem

    out["restored"] = dist_cp.FileSystemWriter is filesystem.FileSystemWriter
    accelerator.wait_for_everyone()
    accelerator.end_training()
    return out


def _worker_main(config_path: str, rank: int) -> None:
    cfg = json.loads(Path(config_path).read_text())
    out = Path(cfg["out"])
    try:
        os.chdir(out)  # anything accelerate would create relative to the working folder lands here
        torch.save(_run_rank(cfg, rank), out / f"rank{rank}.pt")
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        sys.exit(1)


# -- the parent ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _launch(cfg: dict[str, Any], env: dict[str, str]) -> list[dict[str, Any]]:
    Path(cfg["out"]).mkdir(parents=True)
    return launch_ranks("tests.integrations.test_accelerate", WORLD, {**cfg, "port": _free_port()}, env)


@pytest.mark.slow
@pytest.mark.timeout(400)
def test_accelerate_fsdp_sharded_save_state_and_load_state_on_s3(s3_server: Any, tmp_path: Path) -> None:
    require_framework("accelerate")
    from dcp_cloud import verify_checkpoint
    from dcp_cloud.store import open_store

    from ..conftest import BUCKET

    url = f"s3://{BUCKET}/accelerate-{uuid.uuid4().hex[:10]}/step-3"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    env.pop("ACCELERATE_USE_FSDP", None)
    common = {"url": url, "storage_options": s3_server.storage_options}

    trained = _launch({**common, "phase": "train", "seed": 0, "out": str(tmp_path / "train")}, env)
    assert trained[0]["sharded"] == "DTensor"  # FSDP2 shards, not DDP replicas
    assert trained[0]["local_dirs_left"] == [], "accelerate created s3:/... folders locally"

    # the DCP folders are dcp_cloud checkpoints; accelerate's other files sit next to them
    for name in ("pytorch_model_fsdp_0", "optimizer_0"):
        report = verify_checkpoint(f"{url}/{name}", storage_options=s3_server.storage_options)
        assert report.has_manifest and report.items_checksummed > 0 and not report.problems, report
    store = open_store(url, s3_server.storage_options)
    top = {info.key for info in store.run(store.list_objects("")) if "/" not in info.key}
    assert {"random_states_0.pkl", "random_states_1.pkl", "scheduler.bin"} <= top, top

    resumed = _launch({**common, "phase": "resume", "seed": 99, "out": str(tmp_path / "resume")}, env)
    for rank in range(WORLD):
        res, ref, what = resumed[rank], trained[rank], f"rank {rank}"
        assert not torch.equal(res["params_before"]["0.weight"], ref["params_saved"]["0.weight"])
        assert_same_tensors(ref["params_saved"], res["params_saved"], f"{what}: loaded params")
        assert res["lr"] == ref["lr"], what
        assert res["next_loss"] == ref["next_loss"], (what, res["next_loss"], ref["next_loss"])
        # one more step moves the parameters exactly as before: the Adam moments came back too
        assert_same_tensors(ref["params_next"], res["params_next"], f"{what}: params one step later")
        assert res["restored"] and ref["restored"], what


def test_redirect_routes_only_paths_inside_the_folder(tmp_path: Path) -> None:
    """Inside ``redirect``, DCP's FileSystemWriter/Reader under the folder are dcp_cloud's (for
    the relative path under the URL); elsewhere, and after the block, they are torch's."""
    import torch.distributed.checkpoint as dist_cp
    from torch.distributed.checkpoint import filesystem

    from dcp_cloud import CloudStorageReader, CloudStorageWriter
    from dcp_cloud.integrations import accelerate as dcp_accelerate

    inside, outside = tmp_path / "ckpt", tmp_path / "ckpt-other"
    with dcp_accelerate.redirect(inside, "memory://bucket/run/step-1/"):
        writer = dist_cp.FileSystemWriter(str(inside / "optimizer_0"))
        reader = dist_cp.FileSystemReader(inside / "pytorch_model_fsdp_0")
        assert isinstance(writer, CloudStorageWriter) and isinstance(reader, CloudStorageReader)
        assert writer.url == "memory://bucket/run/step-1/optimizer_0"
        assert reader.url == "memory://bucket/run/step-1/pytorch_model_fsdp_0"
        plain = dist_cp.FileSystemWriter(str(outside / "optimizer_0"), single_file_per_rank=False)
        assert type(plain) is filesystem.FileSystemWriter and not plain.single_file_per_rank
        assert type(dist_cp.FileSystemReader(tmp_path)) is filesystem.FileSystemReader
    assert dist_cp.FileSystemWriter is filesystem.FileSystemWriter
    assert dist_cp.FileSystemReader is filesystem.FileSystemReader


def test_redirect_round_trip_through_accelerate_fsdp_functions_layout(tmp_path: Path) -> None:
    """A DCP save/load of a plain state dict with the very calls accelerate makes
    (``dist_cp.save(storage_writer=dist_cp.FileSystemWriter(ckpt_dir))``) lands in memory://."""
    import torch.distributed.checkpoint as dist_cp

    from dcp_cloud import list_checkpoints
    from dcp_cloud.integrations import accelerate as dcp_accelerate

    url = f"memory://bucket/{uuid.uuid4().hex[:8]}/step-1"
    state = {"model": {"w": torch.arange(12.0).reshape(3, 4), "b": torch.ones(4)}}
    with dcp_accelerate.redirect(tmp_path, url):
        dist_cp.save(state, storage_writer=dist_cp.FileSystemWriter(str(tmp_path / "pytorch_model_fsdp_0")))
        target = {"model": {"w": torch.zeros(3, 4), "b": torch.zeros(4)}}
        dist_cp.load(target, storage_reader=dist_cp.FileSystemReader(tmp_path / "pytorch_model_fsdp_0"))
    assert torch.equal(target["model"]["w"], state["model"]["w"]) and torch.equal(
        target["model"]["b"], state["model"]["b"]
    )
    assert [c.path for c in list_checkpoints(url) if c.committed] == ["pytorch_model_fsdp_0"]
    assert not any(tmp_path.iterdir()), "nothing is written to the local folder"


def test_redirect_refuses_unknown_options(tmp_path: Path) -> None:
    from dcp_cloud.integrations import accelerate as dcp_accelerate

    with pytest.raises(TypeError, match="sync_files"):
        with dcp_accelerate.redirect(tmp_path, "memory://bucket/x", sync_files=False):
            pass


class _LoadRecorder:
    """Stands in for an Accelerator in ``load_state``: records what accelerate would be given."""

    project_configuration = None

    def __init__(self) -> None:
        self.seen: dict[str, Any] = {}

    def load_state(self, input_dir: str) -> None:
        import torch.distributed.checkpoint as dist_cp

        self.seen["files"] = sorted(os.listdir(input_dir))
        self.seen["reader_url"] = getattr(
            dist_cp.FileSystemReader(Path(input_dir) / "optimizer_0"), "url", None
        )


def test_load_state_refuses_custom_pickles_unless_trusted() -> None:
    """accelerate unpickles ``custom_checkpoint_*.pkl`` with weights_only=False: such a file in
    the checkpoint is refused before anything is downloaded, unless trust_pickles=True."""
    import fsspec

    from dcp_cloud import UnsafeCheckpointError
    from dcp_cloud.integrations import accelerate as dcp_accelerate

    url = f"memory://bucket/{uuid.uuid4().hex[:8]}/step-1"
    fs = fsspec.filesystem("memory")
    fs.pipe(f"{url}/random_states_0.pkl", b"rng")
    fs.pipe(f"{url}/custom_checkpoint_0.pkl", b"pickle")
    fs.pipe(f"{url}/optimizer_0/.metadata", b"dcp")

    recorder = _LoadRecorder()
    with pytest.raises(UnsafeCheckpointError, match="custom_checkpoint_0.pkl"):
        dcp_accelerate.load_state(recorder, url)
    assert recorder.seen == {}

    dcp_accelerate.load_state(recorder, url, trust_pickles=True)
    # the top-level files were downloaded, the DCP folder stays remote and is read from the URL
    assert recorder.seen["files"] == ["custom_checkpoint_0.pkl", "random_states_0.pkl"]
    assert recorder.seen["reader_url"] == f"{url}/optimizer_0"


if __name__ == "__main__":
    _worker_main(sys.argv[1], int(sys.argv[2]))
