"""dcp_cloud: PyTorch Distributed Checkpoint (DCP) straight to object stores.

import torch.distributed.checkpoint as dcp
from dcp_cloud import CloudStorageWriter, CloudStorageReader

dcp.save(state_dict, storage_writer=CloudStorageWriter("s3://bucket/run1/step-1000"))
dcp.load(state_dict, storage_reader=CloudStorageReader("s3://bucket/run1/step-1000"))
"""

from ._version import __version__
from .errors import (
    BucketNotFoundError,
    CheckpointExistsError,
    CheckpointNotFoundError,
    CorruptCheckpointError,
    DcpCloudError,
    IncompleteCheckpointError,
    StoreAccessError,
    StoreConfigError,
    UnsafeCheckpointError,
    UploadError,
)
from .gc import GcReport, collect_garbage
from .layout import HashPrefix, ReversedRankPrefix
from .reader import CloudStorageReader
from .stats import TransferStats
from .writer import CloudStorageWriter

__all__ = [
    "BucketNotFoundError",
    "CheckpointExistsError",
    "CheckpointNotFoundError",
    "CloudStorageReader",
    "CloudStorageWriter",
    "CorruptCheckpointError",
    "DcpCloudError",
    "GcReport",
    "HashPrefix",
    "IncompleteCheckpointError",
    "ReversedRankPrefix",
    "StoreAccessError",
    "StoreConfigError",
    "TransferStats",
    "UnsafeCheckpointError",
    "UploadError",
    "__version__",
    "collect_garbage",
]
