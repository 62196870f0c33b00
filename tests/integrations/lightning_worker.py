"""One rank of a PyTorch Lightning run for tests/integrations/test_lightning.py.

``python -m tests.integrations.lightning_worker CONFIG_JSON``, started once per rank by the test
with Lightning's environment variables (``LOCAL_RANK``, ``WORLD_SIZE``, ``MASTER_PORT``, ...), so
Lightning joins the ranks instead of launching its own. The S3 endpoint and credentials come from
the ``AWS_*`` variables (each cloud's standard chain; no storage_options anywhere). Each rank
writes what it saw to ``<out>/rank<R>.pt``: its local shards of the model and optimizer state,
the loss of the next training step, and what the load returned.

Modes: ``fabric`` (Fabric + dcp_cloud's FabricModelParallelStrategy), ``trainer`` (Trainer +
TrainerModelParallelStrategy + ModelCheckpoint on s3), ``plain`` (Fabric's own
ModelParallelStrategy with dcp_cloud.install(), one rank: shows where Lightning puts an s3 URL).
Phases: ``save`` trains and saves; ``resume`` starts from other weights and loads.
"""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Any

import torch
from torch import nn

FEATURES, HIDDEN, OUTPUTS, BATCH = 8, 16, 4, 8


def make_model() -> nn.Module:
    return nn.Sequential(nn.Linear(FEATURES, HIDDEN), nn.ReLU(), nn.Linear(HIDDEN, OUTPUTS))


def parallelize(model: nn.Module, device_mesh: Any) -> nn.Module:
    from torch.distributed.fsdp import fully_shard

    mesh = device_mesh["data_parallel"]
    for layer in model.modules():
        if isinstance(layer, nn.Linear):
            fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)
    return model


def batch(step: int, rank: int, world: int) -> tuple[torch.Tensor, torch.Tensor]:
    """This rank's slice of the global batch of ``step`` (the same in every run)."""
    g = torch.Generator().manual_seed(100 + step)
    x, y = torch.randn(BATCH, FEATURES, generator=g), torch.randn(BATCH, OUTPUTS, generator=g)
    per = BATCH // world
    return x[rank * per : (rank + 1) * per], y[rank * per : (rank + 1) * per]


def local(value: Any) -> Any:
    """``value`` with every DTensor replaced by a copy of this rank's shard."""
    from torch.distributed.tensor import DTensor

    if isinstance(value, DTensor):
        return value.to_local().detach().clone()
    if isinstance(value, torch.Tensor):
        return value.detach().clone()
    if isinstance(value, dict):
        return {k: local(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return type(value)(local(v) for v in value)
    return value


def run_fabric(cfg: dict[str, Any], out: Path) -> None:
    import lightning as L

    from dcp_cloud.integrations.lightning import FabricModelParallelStrategy

    strategy = FabricModelParallelStrategy(
        parallelize_fn=parallelize, data_parallel_size=2, tensor_parallel_size=1
    )
    fabric = L.Fabric(accelerator="cpu", devices=2, strategy=strategy)
    fabric.launch()
    rank, world = fabric.global_rank, fabric.world_size
    torch.manual_seed(0 if cfg["phase"] == "save" else 1)  # a resume starts from other weights
    with fabric.init_module(empty_init=False):
        model = make_model()
    model = fabric.setup(model)
    optimizer = fabric.setup_optimizers(torch.optim.Adam(model.parameters(), lr=1e-2))

    def train_step(step: int) -> float:
        x, y = batch(step, rank, world)
        loss = nn.functional.mse_loss(model(x), y)
        fabric.backward(loss)
        optimizer.step()
        optimizer.zero_grad()
        return float(loss.item())

    steps = cfg["steps"]
    result: dict[str, Any] = {}
    if cfg["phase"] == "save":
        for step in range(steps):
            train_step(step)
        fabric.save(cfg["url"], {"model": model, "optimizer": optimizer, "step": steps, "note": "dcp_cloud"})
    else:
        state: dict[str, Any] = {"model": model, "optimizer": optimizer, "step": -1}
        result["remainder"] = fabric.load(cfg["url"], state)
        result["step"] = state["step"]
    result["model"] = local(model.state_dict())
    result["optimizer"] = local(optimizer.state_dict()["state"])
    result["next_loss"] = train_step(steps)
    torch.save(result, out / f"rank{rank}.pt")


def run_trainer(cfg: dict[str, Any], out: Path) -> None:
    """Two epochs of ``steps`` batches with a checkpoint after each (ModelCheckpoint on s3).
    ``save`` records the state and loss at the first batch of epoch 1; ``resume`` restarts
    from the epoch-0 checkpoint and records the same."""
    import lightning.pytorch as pl
    from lightning.pytorch.callbacks import ModelCheckpoint
    from torch.utils.data import DataLoader, Dataset

    from dcp_cloud.integrations.lightning import TrainerModelParallelStrategy

    world = int(os.environ["WORLD_SIZE"])
    rank = int(os.environ["LOCAL_RANK"])
    steps = cfg["steps"]

    class Steps(Dataset):  # type: ignore[type-arg]
        """Item i is this rank's slice of batch i (no sampler: each rank reads its own slice)."""

        def __len__(self) -> int:
            return steps

        def __getitem__(self, step: int) -> tuple[torch.Tensor, torch.Tensor]:
            return batch(step, rank, world)

    class Module(pl.LightningModule):
        def __init__(self) -> None:
            super().__init__()
            self.net = make_model()
            self.losses: list[float] = []

        def configure_model(self) -> None:
            parallelize(self.net, self.device_mesh)

        def training_step(self, item: Any, index: int) -> torch.Tensor:
            x, y = item[0][0], item[1][0]
            loss = nn.functional.mse_loss(self.net(x), y)
            self.losses.append(float(loss.item()))
            return loss

        def configure_optimizers(self) -> torch.optim.Optimizer:
            return torch.optim.Adam(self.net.parameters(), lr=1e-2)

    captured: dict[str, Any] = {}

    class Capture(pl.Callback):
        """The state at the first batch of epoch 1, before it trains."""

        def on_train_batch_start(self, trainer: Any, pl_module: Any, item: Any, index: int) -> None:
            if trainer.current_epoch == 1 and not captured:
                captured["model"] = local(pl_module.net.state_dict())
                captured["optimizer"] = local(trainer.optimizers[0].state_dict()["state"])
                captured["global_step"] = trainer.global_step
                captured["losses_before"] = len(pl_module.losses)

    torch.manual_seed(0 if cfg["phase"] == "save" else 1)  # a resume starts from other weights
    module = Module()
    checkpoints = ModelCheckpoint(dirpath=cfg["dir"], save_top_k=-1)
    trainer = pl.Trainer(
        accelerator="cpu",
        devices=2,
        strategy=TrainerModelParallelStrategy(data_parallel_size=2, tensor_parallel_size=1),
        max_epochs=2,
        callbacks=[checkpoints, Capture()],
        logger=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        use_distributed_sampler=False,
        num_sanity_val_steps=0,
    )
    loader = DataLoader(Steps(), batch_size=1, shuffle=False)
    trainer.fit(module, loader, ckpt_path=cfg.get("ckpt"))
    result = dict(captured)
    result["next_loss"] = module.losses[captured["losses_before"]]
    result["last_saved"] = checkpoints.last_model_path or checkpoints.best_model_path
    torch.save(result, out / f"rank{rank}.pt")


def run_plain(cfg: dict[str, Any], out: Path) -> None:
    """Lightning's own strategy after dcp_cloud.install(): where does an s3 URL end up?"""
    import lightning as L
    from lightning.fabric.strategies import ModelParallelStrategy

    import dcp_cloud

    dcp_cloud.install()
    strategy = ModelParallelStrategy(parallelize_fn=parallelize, data_parallel_size=1, tensor_parallel_size=1)
    fabric = L.Fabric(accelerator="cpu", devices=1, strategy=strategy)
    fabric.launch()
    with fabric.init_module(empty_init=False):
        model = make_model()
    model = fabric.setup(model)
    fabric.save(cfg["url"], {"model": model, "step": 1})
    torch.save({"cwd_entries": sorted(os.listdir("."))}, out / "rank0.pt")


def main() -> None:
    cfg = json.loads(sys.argv[1])
    out = Path(cfg["out"])
    rank = os.environ.get("LOCAL_RANK", "0")
    try:
        {"fabric": run_fabric, "trainer": run_trainer, "plain": run_plain}[cfg["mode"]](cfg, out)
    except BaseException:
        (out / f"rank{rank}.err").write_text(traceback.format_exc())
        raise


if __name__ == "__main__":
    main()
