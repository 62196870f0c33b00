"""A process that saves one version of a checkpoint, to be SIGKILLed by test_kill_safety.

Usage: python tests/kill_child.py {ours|fsspec} URL STORAGE_OPTIONS_JSON VALUE [GO_FILE [no-overwrite]]
Prints READY when about to save and DONE when the save returned. With GO_FILE, waits for that
file to exist before saving (to start several savers at once). The environment variable
KILL_CHILD_LEASE_SECONDS sets the writer's lease (default: the writer's). With
KILL_CHILD_HOLD_FILE (ours only), each stored part waits for that file to exist (at most
HOLD_SECONDS, then the child exits with status 3), and the first one prints PART: the parent
then knows an upload is open with data in it, for as long as it needs.
"""

from __future__ import annotations

import asyncio
import json
import os
import sys
import threading
import time
import warnings
from typing import Any

import torch
import torch.distributed.checkpoint as dcp

warnings.simplefilter("ignore")

HOLD_SECONDS = 120.0
# One large item and many small ones: with several files per save (FsspecWriter thread_count=4)
# the small files finish long before the large one, which leaves a wide window to kill in.
SHAPES = {"large": (12 * 1024 * 1024,), **{f"small.{i}": (16 * 1024,) for i in range(12)}}


def state(value: float) -> dict[str, torch.Tensor]:
    return {name: torch.full(shape, value) for name, shape in SHAPES.items()}


def _give_up_after(started: float) -> None:
    """End a held child that nobody released or killed, so it cannot outlive its test."""
    if time.monotonic() - started > HOLD_SECONDS:
        print("nobody released the held upload", file=sys.stderr, flush=True)
        os._exit(3)


def main() -> None:
    kind, url, options_json, value = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    go_file = sys.argv[5] if len(sys.argv) > 5 else None
    overwrite = not (len(sys.argv) > 6 and sys.argv[6] == "no-overwrite")
    options = json.loads(options_json)
    if kind == "ours":
        from dcp_cloud import CloudStorageWriter

        lease = os.environ.get("KILL_CHILD_LEASE_SECONDS")
        extra = {"lease_seconds": float(lease)} if lease else {}
        # two parts at a time, each held after it is stored: the upload stays open, with parts
        # in it, long enough for the parent to see it and kill this process
        writer = CloudStorageWriter(
            url,
            storage_options=options,
            part_size=5 * 1024 * 1024,
            max_concurrency=2,
            overwrite=overwrite,
            **extra,
        )
        hold_file = os.environ.get("KILL_CHILD_HOLD_FILE")
        started = time.monotonic()
        announced = threading.Lock()

        def stored() -> bool:
            """After a part is stored: whether it is the first (which then says PART)."""
            if announced.acquire(blocking=False):
                print("PART", flush=True)
                return True
            return False

        upload_part = writer.store.upload_part

        async def held_upload_part(*args: Any, **kwargs: Any) -> None:
            await upload_part(*args, **kwargs)
            if not hold_file:
                await asyncio.sleep(0.2)
                return
            stored()
            while not os.path.exists(hold_file):
                _give_up_after(started)
                await asyncio.sleep(0.01)

        writer.store.upload_part = held_upload_part  # type: ignore[method-assign]
        write_in_place = getattr(writer.store, "write_in_place", None)
        if write_in_place is not None and hold_file:  # local files are written in place

            def held_write_in_place(upload: Any, offset: int, data: Any) -> None:
                write_in_place(upload, offset, data)
                if not memoryview(data).nbytes:
                    return
                stored()
                while not os.path.exists(hold_file):
                    _give_up_after(started)
                    time.sleep(0.01)

            writer.store.write_in_place = held_write_in_place  # type: ignore[attr-defined]
    else:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(url, thread_count=4, sync_files=False, **options)
    sd = state(value)
    print("READY", flush=True)
    while go_file and not os.path.exists(go_file):
        time.sleep(0.005)
    dcp.save(sd, storage_writer=writer)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
