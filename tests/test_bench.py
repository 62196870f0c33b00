"""The benchmark harness end to end: a small run against the moto server it starts itself."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_bench_compares_dcp_cloud_raw_and_transport_on_moto(tmp_path: Path) -> None:
    # 24 MiB of tensors: two raw parts (16 + 8 MiB); --raw-streams 1 puts both in one object,
    # so the raw ceiling and the transport both go through a real multipart upload
    command = [
        sys.executable, "-m", "benchmarks.bench",
        "--size-mib", "24", "--rounds", "1", "--raw-streams", "1", "--raw-part-mib", "16",
        "--contenders", "dcp_cloud,raw,transport", "--ops", "save,load",
        "--no-plot", "--results-dir", str(tmp_path), "--name", "smoke",
    ]  # fmt: skip
    done = subprocess.run(command, cwd=REPO, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]

    report = json.loads((tmp_path / "smoke.json").read_text())
    rows = {(r["contender"], r["op"]): r for r in report["summary"]}
    assert set(rows) == {(c, op) for c in ("dcp_cloud", "raw", "transport") for op in ("save", "load")}
    for row in rows.values():
        assert not row["errors"], row
        assert row["gb_per_s"] > 0
        assert row["peak_extra_rss_mib"] is not None
        assert 0 < row["cpu_s"] < 60  # the client process's CPU time while it ran
    # requests as moto's log counted them: one multipart upload of two parts, two ranged GETs
    multipart = {"create_multipart_upload": 1, "upload_part": 2, "complete_multipart_upload": 1}
    assert rows["raw", "save"]["requests"] == multipart
    assert rows["transport", "save"]["requests"] == multipart
    assert rows["raw", "load"]["requests"] == {"get_object": 2}
    assert rows["transport", "load"]["requests"] == {"get_object": 2}
    # dcp_cloud's load: .metadata, the manifest and its ranges; no LIST, no HEAD
    assert set(rows["dcp_cloud", "load"]["requests"]) == {"get_object"}
    # ratios are against dcp_cloud, in the same run
    assert rows["transport", "load"]["vs_baseline"] == pytest.approx(
        rows["transport", "load"]["gb_per_s"] / rows["dcp_cloud", "load"]["gb_per_s"], rel=1e-3
    )

    markdown = (tmp_path / "smoke.md").read_text()
    assert "| transport | load |" in markdown
    assert "client CPU s" in markdown
    assert "load: dcp_cloud >= 0.8x raw GET ceiling" in markdown
    assert not (tmp_path / "smoke.png").exists()  # --no-plot


def test_bench_takes_transport_only_where_dcp_cloud_has_a_store_layer() -> None:
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.bench import CONTENDERS, parse_args
    finally:
        sys.path.remove(str(REPO))
    for store in ("s3", "gcs", "azure"):
        args = parse_args(["--store", store, "--contenders", "dcp_cloud,transport"])
        assert args.contenders == ["dcp_cloud", "transport"]
        assert "transport" not in CONTENDERS[store]  # opt-in: a default run keeps its contenders
    with pytest.raises(SystemExit):
        parse_args(["--store", "file", "--contenders", "transport"])


def test_bench_help_is_the_same_under_each_entry_point() -> None:
    # python -m benchmarks and python -m benchmarks.bench are one command line
    helps = [
        subprocess.run(
            [sys.executable, "-m", module, "--help"], cwd=REPO, capture_output=True, text=True, timeout=120
        )
        for module in ("benchmarks", "benchmarks.bench")
    ]
    assert [h.returncode for h in helps] == [0, 0], helps[0].stderr + helps[1].stderr
    assert helps[0].stdout == helps[1].stdout
    assert helps[0].stdout.startswith("usage: python -m benchmarks.bench ")
    for option in ("--size-mib", "--contenders", "--store", "--latency-ms", "--raw-streams", "--results-dir"):
        assert option in helps[0].stdout


def test_bench_summary_takes_medians_and_ratios_to_dcp_cloud() -> None:
    sys.path.insert(0, str(REPO))
    try:
        from benchmarks.measurement import Measurement
        from benchmarks.summary import summarize
        from benchmarks.tables import TABLE_HEADER, markdown_table, table_cells
    finally:
        sys.path.remove(str(REPO))

    def m(contender: str, round_index: int, seconds: float, error: str | None = None) -> Measurement:
        return Measurement(
            contender, "load", round_index, "s3://b/p", 1, seconds=seconds, payload_bytes=10**9,
            peak_extra_rss_mib=10.0 * round_index, requests={"get_object": 2 + round_index}, error=error,
        )  # fmt: skip

    measurements = [m("dcp_cloud", r, s) for r, s in enumerate((1.0, 4.0, 2.0))]
    measurements += [m("raw", r, s) for r, s in enumerate((0.5, 0.5, 1.0))]
    measurements += [m("fsspec_t8", 0, 1.0), m("fsspec_t8", 1, 0.0, error="boom")]
    rows = {r.contender: r for r in summarize(measurements, ["dcp_cloud", "raw", "fsspec_t8"], ("load",))}
    assert rows["dcp_cloud"].seconds == 2.0 and rows["dcp_cloud"].gb_per_s == pytest.approx(0.5)
    assert rows["dcp_cloud"].requests == {"get_object": 3}
    assert rows["raw"].vs_baseline == pytest.approx(4.0) and rows["raw"].baseline_vs == pytest.approx(0.25)
    assert rows["fsspec_t8"].errors == ["round 1: boom"] and rows["fsspec_t8"].gb_per_s is None
    table = markdown_table(TABLE_HEADER, table_cells(list(rows.values()), "moto server log"))
    assert "| raw | load | 2.000 | 4.00x | 0.25x | 0.50 |" in table
    assert "| fsspec_t8 | load | FAILED |" in table
