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
        "--size-mib", "24", "--rounds", "1", "--raw-streams", "1",
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
