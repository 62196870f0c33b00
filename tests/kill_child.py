"""A process that saves one version of a checkpoint, to be SIGKILLed by test_kill_safety.

Usage: python tests/kill_child.py {ours|fsspec} URL STORAGE_OPTIONS_JSON VALUE
Prints READY when about to save and DONE when the save returned.
"""

from __future__ import annotations

import json
import sys
import warnings

import torch
import torch.distributed.checkpoint as dcp

warnings.simplefilter("ignore")

# One large item and many small ones: with several files per save (FsspecWriter thread_count=4)
# the small files finish long before the large one, which leaves a wide window to kill in.
SHAPES = {"large": (12 * 1024 * 1024,), **{f"small.{i}": (16 * 1024,) for i in range(12)}}


def state(value: float) -> dict[str, torch.Tensor]:
    return {name: torch.full(shape, value) for name, shape in SHAPES.items()}


def main() -> None:
    kind, url, options_json, value = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
    options = json.loads(options_json)
    if kind == "ours":
        from dcp_cloud import CloudStorageWriter

        writer = CloudStorageWriter(url, storage_options=options, part_size=5 * 1024 * 1024)
    else:
        from torch.distributed.checkpoint._fsspec_filesystem import FsspecWriter

        writer = FsspecWriter(url, thread_count=4, sync_files=False, **options)
    sd = state(value)
    print("READY", flush=True)
    dcp.save(sd, storage_writer=writer)
    print("DONE", flush=True)


if __name__ == "__main__":
    main()
