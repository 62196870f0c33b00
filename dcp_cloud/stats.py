"""Figures of one save or load: bytes, objects, requests, retries, time."""

from __future__ import annotations

import threading
import time
from collections import Counter
from dataclasses import dataclass, field


class RequestCounter:
    """Thread-safe counts of store requests by kind, and of retries."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._requests: Counter[str] = Counter()
        self._retries = 0

    def request(self, kind: str, n: int = 1) -> None:
        with self._lock:
            self._requests[kind] += n

    def retry(self, n: int = 1) -> None:
        with self._lock:
            self._retries += n

    def snapshot(self) -> tuple[dict[str, int], int]:
        with self._lock:
            return dict(self._requests), self._retries


@dataclass
class TransferStats:
    """What one save or load did in this process.

    Attributes:
        operation: "save" or "load".
        url: the checkpoint URL (never credentials).
        bytes: payload bytes written or read (data objects, not metadata).
        objects: data objects written, or distinct data objects read.
        items: DCP items written or read.
        direct_items: items of a load read straight into their destination tensors (no
            fetch buffer, no copy).
        requests: store requests by kind, e.g. {"put": 1, "upload_part": 64}.
        retries: requests retried by the transport.
        seconds: wall time from the first to the last request of the operation.
    """

    operation: str
    url: str
    bytes: int = 0
    objects: int = 0
    items: int = 0
    direct_items: int = 0
    requests: dict[str, int] = field(default_factory=dict)
    retries: int = 0
    seconds: float = 0.0

    @property
    def total_requests(self) -> int:
        return sum(self.requests.values())

    @property
    def gb_per_s(self) -> float:
        return self.bytes / self.seconds / 1e9 if self.seconds > 0 else 0.0

    def summary(self) -> str:
        """One log line."""
        kinds = ", ".join(f"{k}={v}" for k, v in sorted(self.requests.items()))
        return (
            f"dcp_cloud {self.operation} {self.url}: {self.bytes / 1e6:.1f} MB, "
            f"{self.objects} objects, {self.items} items"
            + (f" ({self.direct_items} direct)" if self.direct_items else "")
            + f", {self.total_requests} requests "
            f"({kinds}), {self.retries} retries, {self.seconds:.2f} s, {self.gb_per_s:.3f} GB/s"
        )


class StatsRecorder:
    """Collects figures for one operation; ``finish()`` freezes them into TransferStats."""

    def __init__(self, operation: str, url: str, counter: RequestCounter) -> None:
        self.stats = TransferStats(operation=operation, url=url)
        self._counter = counter
        self._base_requests, self._base_retries = counter.snapshot()
        self._started = time.perf_counter()

    def finish(self) -> TransferStats:
        requests, retries = self._counter.snapshot()
        self.stats.requests = {
            k: v - self._base_requests.get(k, 0)
            for k, v in requests.items()
            if v - self._base_requests.get(k, 0)
        }
        self.stats.retries = retries - self._base_retries
        self.stats.seconds = time.perf_counter() - self._started
        return self.stats
