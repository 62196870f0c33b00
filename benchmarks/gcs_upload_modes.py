"""GCS: one 128 MiB object as 8 parallel part uploads joined by ``compose`` (what dcp_cloud does)
against one resumable upload stream of the same 8 chunks (what gcsfs's file API does).

Run: ``.venv/bin/python -m benchmarks.gcs_upload_modes`` (starts fake-gcs-server itself).
"""

from __future__ import annotations

import asyncio
import os
import statistics
import time

MiB = 1 << 20
PARTS = 8
ROUNDS = 3


def main() -> None:
    from dcp_cloud.store import open_store
    from dcp_cloud.testing import GCSServer

    with GCSServer() as server:
        server.create_bucket("bench")
        import gcsfs

        data = memoryview(os.urandom(16 * MiB) * PARTS)
        store = open_store("gs://bench/modes", server.storage_options)
        fs = gcsfs.GCSFileSystem(**server.storage_options)
        times: dict[str, list[float]] = {"parallel parts + compose": [], "one resumable stream": []}

        async def compose(key: str) -> None:
            upload = await store.start_upload(key)
            await asyncio.gather(
                *(
                    store.upload_part(upload, n + 1, n * 16 * MiB, data[n * 16 * MiB : (n + 1) * 16 * MiB])
                    for n in range(PARTS)
                )
            )
            await store.complete_upload(upload)

        for round_ in range(ROUNDS):
            start = time.perf_counter()
            store.run(compose(f"compose-{round_}"))
            times["parallel parts + compose"].append(time.perf_counter() - start)
            start = time.perf_counter()
            with fs.open(f"bench/modes/resumable-{round_}", "wb", block_size=16 * MiB) as out:
                for n in range(PARTS):
                    out.write(data[n * 16 * MiB : (n + 1) * 16 * MiB])
            times["one resumable stream"].append(time.perf_counter() - start)
        assert fs.cat_file("bench/modes/compose-0") == data and fs.cat_file("bench/modes/resumable-0") == data
        for mode, seconds in times.items():
            median = statistics.median(seconds)
            rounds = ", ".join(f"{s:.2f}" for s in seconds)
            print(f"{mode}: median {median:.2f} s = {len(data) / median / 1e9:.3f} GB/s ({rounds})")


if __name__ == "__main__":
    main()
