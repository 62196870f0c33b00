"""Measuring one operation: wall and CPU seconds, peak RSS, an optional py-spy recording.

``measured`` runs in the worker process around the timed save or load; ``Measurement`` is what
the parent keeps of it, together with the server's request counts.
"""

from __future__ import annotations

import gc
import os
import resource
import shutil
import signal
import subprocess
import sysconfig
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil

from benchmarks.catalog import MiB

RSS_SAMPLE_INTERVAL_S = 0.01


class PeakRss:
    """Samples this process's RSS in a background thread while active; keeps the peak."""

    def __init__(self, interval_s: float = RSS_SAMPLE_INTERVAL_S) -> None:
        self.interval_s = interval_s
        self.peak = 0
        self._process = psutil.Process()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, self._process.memory_info().rss)
            self._stop.wait(self.interval_s)

    def __enter__(self) -> PeakRss:
        self.peak = self._process.memory_info().rss
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, self._process.memory_info().rss)


def _max_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def py_spy_binary() -> str:
    """The py-spy executable: on PATH, else beside this Python."""
    return shutil.which("py-spy") or str(Path(sysconfig.get_path("scripts")) / "py-spy")


@contextmanager
def _py_spy(output: str | None, fmt: str) -> Iterator[None]:
    """Record this process with py-spy for the duration of the block (wall time: idle
    included, per thread; --nonblocking so the sampled process is never paused)."""
    if output is None:
        yield
        return
    command = [py_spy_binary(), "record", "--pid", str(os.getpid()), "-o", output, "--format", fmt]
    command += ["--idle", "--threads", "--nonblocking", "--rate", "100"]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    time.sleep(1.0)  # attached and sampling before the timed block starts
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        try:
            spy.wait(timeout=60)
        except subprocess.TimeoutExpired:
            spy.kill()
            spy.wait()


@contextmanager
def measured(
    result: dict[str, Any], profile: str | None = None, profile_format: str = "raw"
) -> Iterator[None]:
    """Time the block and record its peak RSS above the RSS on entry into ``result``; with
    ``profile``, record the block with py-spy into that file."""
    gc.collect()
    baseline = psutil.Process().memory_info().rss
    with _py_spy(profile, profile_format), PeakRss() as rss:
        start = time.perf_counter()
        cpu_start = time.process_time()
        yield
        result["seconds"] = time.perf_counter() - start
        result["cpu_s"] = time.process_time() - cpu_start
    result["baseline_rss_mib"] = baseline / MiB
    result["peak_extra_rss_mib"] = max(0, rss.peak - baseline) / MiB
    result["maxrss_extra_mib"] = max(0, _max_rss_bytes() - baseline) / MiB


@dataclass
class Measurement:
    """One save or load of one contender in one round, as the parent saw it."""

    contender: str
    op: str
    round: int
    url: str
    size_mib: int = 0
    seconds: float | None = None
    blocked_s: float | None = None  # async_save: how long the call blocked the caller
    cpu_s: float | None = None  # CPU seconds of the client process (all its threads) in the timed block
    payload_bytes: int = 0
    peak_extra_rss_mib: float | None = None
    maxrss_extra_mib: float | None = None
    requests: dict[str, int] | None = None
    connections: dict[str, int] | None = None
    client_stats: dict[str, Any] | None = None
    profile: str | None = None
    loadavg: float | None = None  # the machine's 1-minute load average as the measurement started
    error: str | None = None

    @property
    def gb_per_s(self) -> float | None:
        """Tensor bytes per wall second, in GB/s (None: no time measured)."""
        return self.payload_bytes / self.seconds / 1e9 if self.seconds else None


def show_measurement(m: Measurement) -> str:
    """One measurement in a few words, for the progress lines and the profiles list."""
    if m.error:
        return m.error
    text = f"{m.gb_per_s:.3f} GB/s, {m.seconds:.2f} s, +{m.peak_extra_rss_mib:.0f} MiB"
    if m.blocked_s is not None:
        text += f", blocked {m.blocked_s:.2f} s"
    if m.requests:
        text += f", {sum(m.requests.values())} requests"
    return text
