"""Tuning knobs shared by the writer and the reader."""

from __future__ import annotations

from dataclasses import dataclass

MiB = 1024 * 1024

# S3 refuses parts under 5 MiB (except the last) and more than 10,000 parts per upload.
MIN_PART_SIZE = 5 * MiB
MAX_PARTS = 10_000

# The writer's default buffers for copied bytes: where every part is copied (stores that do not
# send parts in pieces), ten 16 MiB parts, so that a save's peak memory above the state dict, the
# HTTP client's included, stays under 256 MiB (measured: ~62 MiB on top of the budget).
WRITER_MEMORY_BUDGET = 160 * MiB
#: a writer's requests in flight by default: large tensors are sent from their own memory, so
#: more connections cost no buffers, and on a cloud store each one carries only tens of MB/s
WRITER_MAX_CONCURRENCY = 64
#: ... and where the store's server runs on this machine (a loopback endpoint), which shares the
#: CPU: there more uploads at once only contend (measured on SeaweedFS, 2 cores, 1 GiB saves:
#: 0.106-0.116 GB/s with 8 in flight, 0.10 with 12, 0.085 with 16, 0.070 with 64)
WRITER_LOCAL_MAX_CONCURRENCY = 8

# Bounds on a store that does not answer. Every request is tried up to ``max_attempts`` times,
# and a failed request is tried again only while less than RETRY_WINDOW seconds have passed
# since its first failure, so a dead endpoint fails in about RETRY_WINDOW plus two tries
# (under a minute with these defaults) while one that is back within the window is used again.
#: seconds a store may take to accept a connection
CONNECT_TIMEOUT = 10.0
#: seconds a store may stay silent on one socket read (per read, not per request: a slow but
#: moving transfer of a large part never hits it)
READ_TIMEOUT = 20.0
#: seconds after a request's first failure within which it is tried again
RETRY_WINDOW = 20.0


@dataclass(frozen=True)
class TransferOptions:
    """How data moves between this process and the store.

    Attributes:
        part_size: bytes per multipart part on upload and per ranged GET on download.
        max_concurrency: requests in flight at once per process.
        memory_budget: bytes of part and range buffers held at once per process; the
            whole checkpoint is never buffered. At least ``2 * part_size``.
        object_size: a rank starts a new data object once the current one would grow past
            this (an item larger than it gets an object of its own). Bounded objects keep
            ranged reads cheap on stores that pay per object byte, and let objects complete
            while the next one is written.
        coalesce_gap: on load, byte ranges of one object closer than this are fetched
            with one request (the gap is read and discarded).
        max_attempts: tries per request, retries included, for throttling (503 SlowDown),
            5xx answers, timeouts and broken connections, with jittered exponential backoff.
        deadline: seconds one request may take, its retries included; None for no limit.
            Without one, a store that does not answer still fails each request within
            about ``retry_window`` seconds plus two tries of ``CONNECT_TIMEOUT`` or
            ``READ_TIMEOUT`` (under a minute by default) with ``StoreUnavailableError``.
        retry_window: seconds after a request's first failure within which it is tried
            again (``max_attempts`` bounds the tries too): a store that is back within it is
            used again, one that is not fails the request with ``StoreUnavailableError``.
    """

    part_size: int = 16 * MiB
    max_concurrency: int = 16
    memory_budget: int = 256 * MiB
    object_size: int = 128 * MiB
    coalesce_gap: int = 1 * MiB
    max_attempts: int = 10
    deadline: float | None = None
    retry_window: float = RETRY_WINDOW

    def __post_init__(self) -> None:
        if self.part_size < MIN_PART_SIZE:
            raise ValueError(
                f"part_size={self.part_size} is below the 5 MiB minimum that S3 accepts for a "
                f"multipart part; pass part_size >= {MIN_PART_SIZE}"
            )
        if self.max_concurrency < 1:
            raise ValueError(f"max_concurrency must be >= 1, got {self.max_concurrency}")
        if self.memory_budget < 2 * self.part_size:
            raise ValueError(
                f"memory_budget={self.memory_budget} must hold at least two parts "
                f"(2 * part_size = {2 * self.part_size}); raise it or lower part_size"
            )
        if not self.part_size <= self.object_size <= self.max_object_size:
            raise ValueError(
                f"object_size={self.object_size} must lie between part_size ({self.part_size}) "
                f"and part_size * 10,000 ({self.max_object_size})"
            )
        if self.deadline is not None and self.deadline <= 0:
            raise ValueError(f"deadline must be a positive number of seconds, got {self.deadline}")
        if self.retry_window < 0:
            raise ValueError(f"retry_window must be >= 0 seconds, got {self.retry_window}")
        if self.max_attempts < 1:
            raise ValueError(f"max_attempts must be >= 1, got {self.max_attempts}")
        if self.coalesce_gap < 0:
            raise ValueError(f"coalesce_gap must be >= 0, got {self.coalesce_gap}")

    @property
    def max_object_size(self) -> int:
        """Largest data object a writer packs before starting the next one."""
        return self.part_size * MAX_PARTS
