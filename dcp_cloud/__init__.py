"""dcp_cloud: PyTorch Distributed Checkpoint (DCP) straight to object stores.

import torch.distributed.checkpoint as dcp
from dcp_cloud import CloudStorageWriter, CloudStorageReader

dcp.save(state_dict, storage_writer=CloudStorageWriter("s3://bucket/run1/step-1000"))
dcp.load(state_dict, storage_reader=CloudStorageReader("s3://bucket/run1/step-1000"))

Or, for code that only passes ``checkpoint_id`` (training frameworks), once per process:

dcp_cloud.install()
dcp.save(state_dict, checkpoint_id="s3://bucket/run1/step-1000")
"""

from ._version import __version__
from .checkpoint.layout import HashPrefix, ReversedRankPrefix
from .errors import (
    BucketNotFoundError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DcpCloudError,
    IncompleteCheckpointError,
    PeerReadError,
    StoreAccessError,
    StoreConfigError,
    StoreUnavailableError,
    UnsafeCheckpointError,
    UploadError,
)
from .integrations.install import install, uninstall  # imports nothing heavy until called
from .load.reader import CloudStorageReader
from .save.writer import CloudStorageWriter
from .stats import TransferStats
from .tools.catalog import CheckpointSummary, list_checkpoints
from .tools.convert import load_full_state_dict, to_safetensors, to_torch_save
from .tools.copy import CopyReport, copy_checkpoint
from .tools.gc import GcReport, collect_garbage
from .tools.info import CheckpointInfo, TensorInfo, checkpoint_info
from .tools.manager import CheckpointManager
from .tools.verify import Problem, VerifyReport, verify_checkpoint

__all__ = [
    "BucketNotFoundError",
    "CheckpointExistsError",
    "CheckpointInfo",
    "CheckpointManager",
    "CheckpointNotFoundError",
    "CheckpointSummary",
    "CloudStorageReader",
    "CloudStorageWriter",
    "CopyReport",
    "CorruptCheckpointError",
    "DcpCloudError",
    "GcReport",
    "HashPrefix",
    "IncompleteCheckpointError",
    "PeerReadError",
    "Problem",
    "ReversedRankPrefix",
    "StoreAccessError",
    "StoreConfigError",
    "StoreUnavailableError",
    "TensorInfo",
    "TransferStats",
    "UnsafeCheckpointError",
    "UploadError",
    "VerifyReport",
    "__version__",
    "checkpoint_info",
    "collect_garbage",
    "copy_checkpoint",
    "install",
    "list_checkpoints",
    "load_full_state_dict",
    "to_safetensors",
    "to_torch_save",
    "uninstall",
    "verify_checkpoint",
]
