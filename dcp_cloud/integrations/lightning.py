"""PyTorch Lightning strategies that save and load distributed checkpoints at cloud URLs.

Lightning's ``ModelParallelStrategy`` (Fabric and Trainer) turns the checkpoint path into a
``pathlib.Path`` before anything else, so ``"s3://bucket/ckpt"`` becomes the local folder
``s3:/bucket/ckpt``; :func:`dcp_cloud.install` cannot help there. These subclasses take over
``save_checkpoint``/``load_checkpoint`` when the path is a cloud URL and keep Lightning's layout at
that URL: the model and optimizer shards as a DCP checkpoint (written by
:class:`~dcp_cloud.CloudStorageWriter`, committed by ``.metadata``), and the rest of the state in
``meta.pt``, written by rank 0 after the commit. Local paths go to Lightning unchanged.

A checkpoint counts as present when both ``.metadata`` and ``meta.pt`` exist, Lightning's own
test (``_is_sharded_checkpoint``). A save interrupted between the DCP commit and ``meta.pt`` is
therefore not found, as with Lightning on a local disk; where it overwrote an earlier checkpoint,
that one's ``meta.pt`` stays beside the new shards, so give each save its own URL (Lightning's
``ModelCheckpoint`` does).

Requires ``lightning`` (``pip install "dcp-cloud[lightning]"``).
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping
from typing import Any

import torch
import torch.distributed.checkpoint as dcp
from lightning.fabric.strategies import ModelParallelStrategy as _FabricModelParallel
from lightning.pytorch.strategies import ModelParallelStrategy as _TrainerModelParallel
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_optimizer_state_dict,
)
from torch.distributed.tensor import DTensor
from torch.nn import Module
from torch.optim import Optimizer

from ..load.reader import CloudStorageReader
from ..save.writer import CloudStorageWriter
from .install import _split_defaults, cloud_url

#: the object beside the DCP files that holds the rest of the state (Lightning's name)
META_NAME = "meta.pt"

__all__ = ["FabricModelParallelStrategy", "LightningCheckpoints", "TrainerModelParallelStrategy"]


class LightningCheckpoints:
    """Lightning's sharded checkpoint layout (DCP files plus ``meta.pt``) at a cloud URL.

    Args:
        options: keyword arguments for the :class:`~dcp_cloud.CloudStorageWriter` and
            :class:`~dcp_cloud.CloudStorageReader` it builds (``storage_options``, ``part_size``,
            ``overwrite``, ``verify_checksums``, ...), each class taking the ones it accepts.
    """

    def __init__(self, options: Mapping[str, Any] | None = None) -> None:
        self.writer_options, self.reader_options = _split_defaults(dict(options or {}))

    def writer(self, url: str) -> CloudStorageWriter:
        return CloudStorageWriter(url, **self.writer_options)

    def reader(self, url: str) -> CloudStorageReader:
        return CloudStorageReader(url, **self.reader_options)

    def save(self, url: str, tensors: dict[str, Any], meta: dict[str, Any], rank: int) -> None:
        """Every rank: ``tensors`` as a DCP checkpoint at ``url``; then rank 0: ``meta`` as
        ``meta.pt`` beside it."""
        dcp.save(tensors, storage_writer=self.writer(url))
        if rank == 0:
            buffer = io.BytesIO()
            torch.save(meta, buffer)
            store = self.writer(url).store
            store.run(store.put(META_NAME, buffer.getvalue()))

    def exists(self, url: str) -> bool:
        """Whether a complete Lightning sharded checkpoint is at ``url``."""
        store = self.reader(url).store
        return bool(store.run(store.exists(".metadata")) and store.run(store.exists(META_NAME)))

    def load_meta(self, url: str, weights_only: bool | None) -> dict[str, Any]:
        """``meta.pt`` at ``url``, read with ``torch.load(weights_only=...)`` as Lightning does."""
        store = self.reader(url).store
        data = store.run(store.get(META_NAME))
        loaded = torch.load(io.BytesIO(data), map_location="cpu", weights_only=weights_only)
        if not isinstance(loaded, dict):
            raise TypeError(f"{url}/{META_NAME} holds a {type(loaded).__name__}, not a dict")
        return loaded

    def uncommit(self, url: str) -> None:
        """Delete the checkpoint's ``.metadata``: afterwards no reader takes it as committed."""
        store = self.writer(url).store
        store.run(store.delete([".metadata"]))

    def require(self, url: str) -> None:
        if not self.exists(url):
            raise FileNotFoundError(
                f"{url}: no Lightning distributed checkpoint there (it needs both .metadata and "
                f"{META_NAME}); check the URL, or whether the save that wrote it finished"
            )


def _url_of(path: Any) -> str | None:
    """The cloud URL ``path`` names, or None for anything Lightning handles itself."""
    return cloud_url(os.fspath(path)) if isinstance(path, (str, os.PathLike)) else None


def _sharded_module(state: Mapping[str, Any]) -> tuple[str, Module]:
    modules = [
        (key, obj)
        for key, obj in state.items()
        if isinstance(obj, Module) and any(isinstance(p, DTensor) for p in obj.parameters())
    ]
    if len(modules) != 1:
        raise ValueError(
            f"a distributed checkpoint needs exactly one model set up by the strategy in the state, "
            f"found {len(modules)}; pass it as state={{'model': model, ...}}"
        )
    return modules[0]


class FabricModelParallelStrategy(_FabricModelParallel):
    """Fabric's ``ModelParallelStrategy`` with ``fabric.save``/``fabric.load`` at cloud URLs.

    Takes the arguments of ``lightning.fabric.strategies.ModelParallelStrategy`` plus
    ``checkpoint_options`` (see :class:`LightningCheckpoints`). Only distributed checkpoints
    (``save_distributed_checkpoint=True``, the default) go to a cloud URL.
    """

    def __init__(
        self, *args: Any, checkpoint_options: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoints = LightningCheckpoints(checkpoint_options)

    def save_checkpoint(  # type: ignore[override]
        self,
        path: Any,
        state: dict[str, Any],
        storage_options: Any | None = None,
        filter: dict[str, Any] | None = None,
    ) -> None:
        url = _url_of(path)
        if url is None:
            return super().save_checkpoint(path, state, storage_options=storage_options, filter=filter)
        if storage_options is not None or filter is not None or not self._save_distributed_checkpoint:
            raise NotImplementedError(
                f"{type(self).__name__} saves to a cloud URL only distributed checkpoints, without "
                "storage_options or filter; set them in checkpoint_options instead"
            )
        url = self.broadcast(url)
        _, module = _sharded_module(state)
        options = StateDictOptions(cpu_offload=True)
        tensors: dict[str, Any] = {}
        meta: dict[str, Any] = {}
        for key, obj in state.items():
            if isinstance(obj, Module):
                tensors[key] = get_model_state_dict(obj, options=options)
            elif isinstance(obj, Optimizer):
                tensors[key] = get_optimizer_state_dict(module, obj, options=options)
            else:
                meta[key] = (
                    obj.state_dict()
                    if hasattr(obj, "state_dict") and hasattr(obj, "load_state_dict")
                    else obj
                )
        self.checkpoints.save(url, tensors, meta, self.global_rank)

    def load_checkpoint(  # type: ignore[override]
        self,
        path: Any,
        state: Any = None,
        strict: bool = True,
        weights_only: bool | None = None,
    ) -> dict[str, Any]:
        url = _url_of(path)
        if url is None:
            return super().load_checkpoint(path, state, strict=strict, weights_only=weights_only)
        if not isinstance(state, dict) or not state:
            raise NotImplementedError(
                f"{type(self).__name__} loads from a cloud URL into a state dict holding the model, "
                "e.g. fabric.load(url, {'model': model, 'optimizer': optimizer})"
            )
        url = self.broadcast(url)
        self.checkpoints.require(url)
        module_key, module = _sharded_module(state)
        module_state = {module_key: get_model_state_dict(module)}
        dcp.load(module_state, storage_reader=self.checkpoints.reader(url))
        module.load_state_dict(module_state[module_key], strict=strict)
        optimizers = {key: obj for key, obj in state.items() if isinstance(obj, Optimizer)}
        for key, optimizer in optimizers.items():
            optim_state = {key: get_optimizer_state_dict(module, optimizer)}
            dcp.load(optim_state, storage_reader=self.checkpoints.reader(url))
            set_optimizer_state_dict(
                module,
                optimizer,
                optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        meta = self.checkpoints.load_meta(url, weights_only)
        requested = [key for key in state if key != module_key and key not in optimizers]
        missing = [key for key in requested if key not in meta]
        if strict and missing:
            raise KeyError(
                f"the requested state has a key {missing[0]!r} that {url}/{META_NAME} does not hold; "
                "load with strict=False to skip it"
            )
        for key in requested:
            if key in meta:
                state[key] = meta.pop(key)
        return meta


class TrainerModelParallelStrategy(_TrainerModelParallel):
    """The Trainer's ``ModelParallelStrategy`` with checkpoints at cloud URLs
    (``ModelCheckpoint(dirpath="s3://...")``, ``trainer.fit(ckpt_path="s3://...")``).

    Takes the arguments of ``lightning.pytorch.strategies.ModelParallelStrategy`` plus
    ``checkpoint_options`` (see :class:`LightningCheckpoints`).
    """

    def __init__(
        self, *args: Any, checkpoint_options: Mapping[str, Any] | None = None, **kwargs: Any
    ) -> None:
        super().__init__(*args, **kwargs)
        self.checkpoints = LightningCheckpoints(checkpoint_options)

    def save_checkpoint(
        self, checkpoint: dict[str, Any], filepath: Any, storage_options: Any | None = None
    ) -> None:
        url = _url_of(filepath)
        if url is None:
            return super().save_checkpoint(checkpoint, filepath, storage_options=storage_options)
        if storage_options is not None or not self._save_distributed_checkpoint:
            raise NotImplementedError(
                f"{type(self).__name__} saves to a cloud URL only distributed checkpoints, without "
                "storage_options; set them in checkpoint_options instead"
            )
        url = self.broadcast(url)
        meta = dict(checkpoint)
        # the model and optimizer states are already sharded (lightning_module_state_dict and
        # optimizer_state of this strategy); Lightning's own key names
        tensors: dict[str, Any] = {"state_dict": meta.pop("state_dict")}
        for index, optim_state in enumerate(meta.pop("optimizer_states", [])):
            tensors[f"optimizer_{index}"] = optim_state
        self.checkpoints.save(url, tensors, meta, self.global_rank)

    def remove_checkpoint(self, filepath: Any) -> None:
        """Lightning's removal (``ModelCheckpoint``'s ``save_top_k``: its fsspec filesystem's
        recursive ``rm``), after deleting ``.metadata`` first for a cloud URL, so that a removal
        cut short never leaves something that still looks committed."""
        url = _url_of(filepath)
        if url is not None and self.is_global_zero:
            self.checkpoints.uncommit(url)
        super().remove_checkpoint(filepath)

    def load_checkpoint(self, checkpoint_path: Any, weights_only: bool | None = None) -> dict[str, Any]:
        url = _url_of(checkpoint_path)
        if url is None:
            return super().load_checkpoint(checkpoint_path, weights_only=weights_only)
        url = self.broadcast(url)
        self.checkpoints.require(url)
        model = self.model
        assert model is not None and self.lightning_module is not None
        strict = self.lightning_module.strict_loading
        module_state = {"state_dict": get_model_state_dict(model)}
        dcp.load(module_state, storage_reader=self.checkpoints.reader(url))
        model.load_state_dict(module_state["state_dict"], strict=strict)
        for index, optimizer in enumerate(self.optimizers):
            key = f"optimizer_{index}"
            optim_state = {key: get_optimizer_state_dict(model, optimizer)}
            dcp.load(optim_state, storage_reader=self.checkpoints.reader(url))
            set_optimizer_state_dict(
                model,
                optimizer,
                optim_state_dict=optim_state[key],
                options=StateDictOptions(cpu_offload=True),
            )
        return self.checkpoints.load_meta(url, weights_only)
