"""Summarize py-spy's raw (collapsed-stack) output: where each thread spends its wall time.

    .venv/bin/python -m benchmarks.profile_summary results/profiles/NAME-dcp_cloud-save.txt

The profiles come from ``bench --profile`` (``py-spy record --format raw --idle --threads``
attached to the worker for exactly the timed save or load), so
waiting counts as well as running: a main thread that spends 70% of its samples in
``BufferPool.get`` is waiting for uploads to drain, not computing. For each thread with a
meaningful share of samples this prints the top frames by self samples (the leaf: what it was
doing, with the nearest dcp_cloud or torch checkpoint frame above it when the leaf is a lock,
a socket or a library call) and by inclusive samples (a frame anywhere on the stack: which call it was under).
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import Counter, defaultdict
from pathlib import Path

_LINE = re.compile(r"^(?P<stack>.*) (?P<count>\d+)$")
_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>.*?)(?::\d+)?\)$")


# Frames of the code under test: a leaf elsewhere (a lock, a socket) is shown with its nearest one.
_OWN = ("dcp_cloud/", "torch/distributed/checkpoint", "torch/serialization", "s3torchconnector")


def _frame_name(frame: str) -> str:
    """``func (path/to/file.py:123)`` -> ``func (file.py)``: lines merged, paths shortened."""
    match = _FRAME.match(frame)
    if not match:
        return frame
    path = match["file"]
    for marker in ("site-packages/", "/work/main/", "lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
    return f"{match['func']} ({path})"


def _thread_name(frame: str) -> str:
    # "thread (12345): MainThread" or "thread (12345)"
    name = frame.partition(": ")[2]
    return name or frame


def summarize(path: str | Path, top: int = 12, min_share: float = 0.02) -> str:
    """A text summary of one raw py-spy profile."""
    self_counts: dict[str, Counter[str]] = defaultdict(Counter)
    incl_counts: dict[str, Counter[str]] = defaultdict(Counter)
    totals: Counter[str] = Counter()
    for line in Path(path).read_text().splitlines():
        match = _LINE.match(line.strip())
        if not match:
            continue
        frames = match["stack"].split(";")
        count = int(match["count"])
        thread = "?"
        if frames and frames[0].startswith("thread ("):
            thread = _thread_name(frames[0])
            frames = frames[1:]
        if frames and frames[0].startswith("process "):
            frames = frames[1:]
        names = [_frame_name(f) for f in frames]
        if names and names[-1].startswith("_py_spy ("):
            continue  # the harness attaching and detaching py-spy, outside the timed block
        totals[thread] += count
        leaf = names[-1] if names else "(no python frame)"
        caller = next((n for n in reversed(names[:-1]) if any(k in n for k in _OWN)), None)
        if caller and not any(k in leaf for k in _OWN):
            leaf = f"{leaf} <- {caller}"
        self_counts[thread][leaf] += count
        for name in set(names):
            incl_counts[thread][name] += count
    grand = sum(totals.values()) or 1
    out = [f"{path}: {grand} samples (about {grand / 100:.1f} s of thread time at 100 Hz)"]
    # Worker threads of one pool look alike: report the busiest few by name.
    for thread, total in totals.most_common():
        if total / grand < min_share:
            continue
        out.append(f"\n== thread {thread}: {total} samples ({100 * total / grand:.0f}% of all)")
        out.append("  self (leaf) frames:")
        for name, n in self_counts[thread].most_common(top):
            out.append(f"    {100 * n / total:5.1f}%  {name}")
        out.append("  inclusive frames (dcp_cloud, torch, s3fs, aiobotocore, benchmarks):")
        shown = 0
        for name, n in incl_counts[thread].most_common():
            if not any(
                k in name for k in ("dcp_cloud", "torch/", "s3fs", "aiobotocore", "benchmarks/", "fsspec")
            ):
                continue
            out.append(f"    {100 * n / total:5.1f}%  {name}")
            shown += 1
            if shown >= top:
                break
    return "\n".join(out)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.profile_summary", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("profiles", nargs="+", help="py-spy raw outputs")
    parser.add_argument("--top", type=int, default=12)
    args = parser.parse_args(argv)
    for path in args.profiles:
        print(summarize(path, args.top))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
