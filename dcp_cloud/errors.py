"""Exceptions raised by dcp_cloud.

Every error names the URL or object it is about and says what to do. They all derive from
:class:`DcpCloudError`, so callers can catch one type. Note that when DCP runs the storage code
inside ``dcp.save``/``dcp.load`` it wraps errors in ``CheckpointException``; the original error is
kept in its per-rank failure map and in its message.
"""

from __future__ import annotations

from typing import Any


class DcpCloudError(Exception):
    """Base class of every dcp_cloud error."""


class StoreConfigError(DcpCloudError, ValueError):
    """The URL, its scheme or the storage options cannot be used (bad URL, missing backend)."""


class BucketNotFoundError(DcpCloudError, FileNotFoundError):
    """The bucket or container named in the URL does not exist."""


class StoreUnavailableError(DcpCloudError, ConnectionError):
    """The store did not answer (refused or timed-out connections, or 5xx/throttling answers)
    within the request's tries and retry window."""


class StoreAccessError(DcpCloudError, PermissionError):
    """The store refused the credentials or the operation."""


class CheckpointNotFoundError(DcpCloudError, FileNotFoundError):
    """There is no checkpoint at the URL."""


class IncompleteCheckpointError(CheckpointNotFoundError):
    """Data objects exist at the URL but no ``.metadata``: a save that never committed."""


class CorruptCheckpointError(DcpCloudError):
    """An object of a checkpoint is unreadable, truncated or fails its checksum."""


class UnsafeCheckpointError(CorruptCheckpointError):
    """A checkpoint's files ask for something outside the checkpoint or unsafe to run: a key
    that leaves its prefix, or a pickle global that is not allowed."""


class CheckpointExistsError(DcpCloudError, FileExistsError):
    """A save with ``overwrite=False`` found a committed checkpoint at the URL."""


class UploadError(DcpCloudError):
    """An upload failed after the transport's retries; the save did not commit."""


class PeerReadError(DcpCloudError):
    """Another rank failed while reading bytes this rank shares with it.

    Attributes:
        rank: the global rank that failed.
        cause: what it raised (the exception, or its text when it could not travel).
    """

    def __init__(self, message: str, rank: int = -1, cause: Any = None) -> None:
        super().__init__(message)
        self.rank = rank
        self.cause = cause

    def __reduce__(self) -> tuple[Any, ...]:
        return (PeerReadError, (str(self), self.rank, None))
