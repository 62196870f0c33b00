"""Shared reads: bytes served, GETs and seconds of distributed loads, by world size.

``python -m benchmarks.shared_reads --size-mib 96`` starts a local moto S3 server, saves a
replicated state (as data parallelism keeps it: every rank holds all of it) and a sharded one
(DTensors, Shard(0)) of about ``--size-mib`` each on 4 gloo ranks, then loads each on 1, 2 and 4
ranks with dcp_cloud sharing reads (``share_reads="job"``), without (``"off"``), and with torch's
FsspecReader. Every load reaches the server through a counting proxy of its own
(benchmarks/proxy.py), so bytes served and GETs are counted on the server's side; seconds are
the slowest rank's ``dcp.load``, the fastest of ``--rounds`` rounds. Prints a Markdown table (and writes it, with the raw numbers as
JSON, with ``--out PREFIX``). Ranks run as processes on this machine (tests/share_worker.py).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import uuid
from pathlib import Path
from typing import Any

from benchmarks.proxy import ProxyProcess
from dcp_cloud.testing import S3Server

MiB = 1024 * 1024
BUCKET = "bench-shared"
READERS = {"share": ("load", "job"), "off": ("load", "off"), "fsspec": ("fsspec_load", None)}


def _sizes(size_mib: int) -> dict[str, int]:
    """State sizes for ``share_worker.full_state``: 8 replicated and 4 sharded fp32 matrices of
    1024 columns (plus a few small tensors and values), about ``size_mib`` MiB of each kind."""
    return {
        "rep_tensors": 8,
        "rep_rows": max(1, size_mib * MiB // (8 * 1024 * 4)),
        "dt_rows": max(4, size_mib * MiB // (4 * 1024 * 4)),
    }


def run(size_mib: int, worlds: list[int], workdir: Path, rounds: int = 2) -> list[dict[str, Any]]:
    from tests import share_worker as sw
    from tests.dist_worker import list_objects

    sizes = _sizes(size_mib)
    rows: list[dict[str, Any]] = []
    with S3Server() as server:
        server.create_bucket(BUCKET)
        base = f"s3://{BUCKET}/{uuid.uuid4().hex[:8]}"
        urls = {"rep": f"{base}/rep", "dt": f"{base}/dt"}
        saves = [
            {"op": "save", "name": f"save_{k}", "url": u, "kind": k, "sizes": sizes} for k, u in urls.items()
        ]
        sw.launch(4, workdir, timeout=900, storage_options=server.storage_options, steps=saves).check()
        ckpt_bytes = {k: sum(list_objects(u, server.storage_options).values()) for k, u in urls.items()}
        for world in worlds:
            steps: list[dict[str, Any]] = []
            for round_no in range(rounds):
                # the readers' order rotates each round (a machine's state drifts)
                readers = list(READERS.items())
                readers = readers[round_no % len(readers) :] + readers[: round_no % len(readers)]
                for kind, url in urls.items():
                    for reader, (op, scope) in readers:
                        step: dict[str, Any] = {
                            "op": op,
                            "name": f"{kind}_{reader}_{round_no}",
                            "url": url,
                            "kind": kind,
                            "sizes": sizes,
                            "report": False,
                        }
                        if scope:
                            step["share_reads"] = scope
                        steps.append(step)
            proxies = {s["name"]: ProxyProcess(server.endpoint_url, 0, 0).start() for s in steps}
            try:
                for step in steps:
                    step["endpoint"] = proxies[step["name"]].url
                job = sw.launch(
                    world, workdir, timeout=900, storage_options=server.storage_options, steps=steps
                )
                job.check()
                counts = {name: p.counts() for name, p in proxies.items()}
            finally:
                for proxy in proxies.values():
                    proxy.stop()
            results = job.results()
            for step in steps:
                name = step["name"]
                errors = [r[name].get("error") for r in results]
                assert not any(errors), errors
                kind, reader, round_no = name.split("_")
                row = {
                    "world": world,
                    "state": "replicated" if kind == "rep" else "sharded",
                    "reader": reader,
                    "checkpoint_bytes": ckpt_bytes[kind],
                    "bytes_served": counts[name]["bytes_down"],
                    "gets": counts[name]["kinds"].get("get_object", 0),
                    "seconds": max(r[name]["seconds"] for r in results),
                }
                same = [r for r in rows if all(r[k] == row[k] for k in ("world", "state", "reader"))]
                if same:  # the fastest round's seconds; bytes and GETs are the same every round
                    same[0]["seconds"] = min(same[0]["seconds"], row["seconds"])
                else:
                    rows.append(row)
            print(f"world {world} done", file=sys.stderr, flush=True)
    return rows


def table(rows: list[dict[str, Any]]) -> str:
    labels = {
        "share": "dcp_cloud, share_reads=job",
        "off": "dcp_cloud, share_reads=off",
        "fsspec": "FsspecReader",
    }
    lines = [
        "| state | ranks | reader | served / checkpoint | GETs | seconds |",
        "|---|---:|---|---:|---:|---:|",
    ]
    for row in sorted(rows, key=lambda r: (r["state"], r["world"], list(labels).index(r["reader"]))):
        ratio = row["bytes_served"] / row["checkpoint_bytes"]
        lines.append(
            f"| {row['state']} | {row['world']} | {labels[row['reader']]} | {ratio:.2f}x | {row['gets']} "
            f"| {row['seconds']:.2f} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.shared_reads", description=__doc__.split("\n\n")[0]
    )
    parser.add_argument("--size-mib", type=int, default=96, help="MiB of each state (default 96)")
    parser.add_argument("--ranks", type=int, nargs="+", default=[1, 2, 4], help="world sizes (default 1 2 4)")
    parser.add_argument("--rounds", type=int, default=2, help="loads of each kind (fastest shown)")
    parser.add_argument("--out", help="write PREFIX.md and PREFIX.json")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory(prefix="shared-reads-") as workdir:
        rows = run(args.size_mib, args.ranks, Path(workdir), args.rounds)
    text = table(rows)
    print(text)
    if args.out:
        Path(f"{args.out}.md").write_text(text + "\n")
        Path(f"{args.out}.json").write_text(json.dumps(rows, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
