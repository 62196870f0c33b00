"""From measurements to rows: medians over rounds and ratios to dcp_cloud's in the same run."""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field

from benchmarks.catalog import ALL_OPS, BASELINE
from benchmarks.measurement import Measurement


@dataclass
class Row:
    """Medians over rounds of one contender's save or load (at one size)."""

    contender: str
    op: str
    rounds: int
    size_mib: int = 0
    seconds: float | None = None
    gb_per_s: float | None = None
    blocked_s: float | None = None
    cpu_s: float | None = None  # the client's CPU seconds, all threads
    streams: int | None = None  # requests in flight at most (see benchmarks.runner.contender_streams)
    vs_baseline: float | None = None  # this contender's GB/s / dcp_cloud's
    baseline_vs: float | None = None  # dcp_cloud's GB/s / this contender's
    peak_extra_rss_mib: float | None = None
    requests: dict[str, int] = field(default_factory=dict)
    connections: dict[str, int] = field(default_factory=dict)
    errors: list[str] = field(default_factory=list)
    skipped: str | None = None


def _median_counts(dicts: list[dict[str, int] | None]) -> dict[str, int]:
    kinds = sorted({k for d in dicts for k in (d or {})})
    return {k: round(statistics.median((d or {}).get(k, 0) for d in dicts)) for k in kinds}


def summarize(
    measurements: list[Measurement], contenders: list[str], ops: tuple[str, ...] = ALL_OPS
) -> list[Row]:
    """Median seconds, GB/s, peak RSS and requests per (size, contender, op), with ratios to
    dcp_cloud's at the same size and op."""
    rows = []
    for size in sorted({m.size_mib for m in measurements}):
        for op in ops:
            for contender in contenders:
                mine = [
                    m for m in measurements if m.contender == contender and m.op == op and m.size_mib == size
                ]
                if mine:
                    rows.append(_row(contender, op, size, mine))
    _add_ratios(rows)
    return rows


def _row(contender: str, op: str, size: int, mine: list[Measurement]) -> Row:
    """The medians of one contender's rounds of ``op`` at ``size``; none when a round failed."""
    skipped = [m for m in mine if m.error and m.error.startswith("skipped")]
    row = Row(
        contender,
        op,
        len(mine),
        size,
        errors=[f"round {m.round}: {m.error}" for m in mine if m.error and m not in skipped],
        skipped=skipped[0].error if skipped and len(skipped) == len(mine) else None,
    )
    ok = [m for m in mine if m.error is None and m.seconds]
    if ok and not row.errors:
        row.seconds = statistics.median(m.seconds for m in ok if m.seconds)
        row.gb_per_s = ok[0].payload_bytes / row.seconds / 1e9
        blocked = [m.blocked_s for m in ok if m.blocked_s is not None]
        row.blocked_s = statistics.median(blocked) if blocked else None
        cpu = [m.cpu_s for m in ok if m.cpu_s is not None]
        row.cpu_s = statistics.median(cpu) if cpu else None
        row.peak_extra_rss_mib = statistics.median(m.peak_extra_rss_mib or 0.0 for m in ok)
        row.requests = _median_counts([m.requests for m in ok])
        row.connections = _median_counts([m.connections for m in ok])
    return row


def _add_ratios(rows: list[Row]) -> None:
    """Set each row's GB/s ratios to dcp_cloud's row of the same size and op."""
    for row in rows:
        base = next(
            (r for r in rows if r.contender == BASELINE and r.op == row.op and r.size_mib == row.size_mib),
            None,
        )
        if base and base.gb_per_s and row.gb_per_s:
            row.vs_baseline = row.gb_per_s / base.gb_per_s
            row.baseline_vs = base.gb_per_s / row.gb_per_s
