"""The report's tables: display cells of rows and targets, as aligned text or Markdown."""

from __future__ import annotations

from benchmarks.summary import Row
from benchmarks.targets import Target

TABLE_HEADER = (
    "contender",
    "op",
    "GB/s",
    "vs dcp_cloud",
    "dcp_cloud vs it",
    "s (median)",
    "blocked s",
    "client CPU s",
    "peak extra RSS MiB",
    "streams",
    "requests by kind",
)
SCALING_HEADER = ("contender", "size MiB", "GB/s", "s (median)", "peak extra RSS MiB", "extra RSS / size")


def _fmt(value: float | None, spec: str, suffix: str = "") -> str:
    return "-" if value is None else f"{value:{spec}}{suffix}"


def _requests_cell(r: Row, source: str) -> str:
    if not r.requests:
        return "n/a" if source == "n/a" else "-"
    text = " ".join(f"{k}={v}" for k, v in r.requests.items())
    total = sum(r.requests.values())
    text = f"{total}: {text}"
    if r.connections:
        text += (
            f" (conns {r.connections.get('connections', 0)}, max {r.connections.get('max_active', 0)} open)"
        )
    return text


def table_cells(rows: list[Row], source: str) -> list[tuple[str, ...]]:
    """One tuple of display strings per row, in TABLE_HEADER order."""
    cells: list[tuple[str, ...]] = []
    for r in rows:
        if r.errors or r.skipped:
            why = r.skipped or "; ".join(r.errors)
            status = "FAILED" if r.errors else "skipped"
            cells.append((r.contender, r.op, status, *("-",) * (len(TABLE_HEADER) - 4), why))
            continue
        cells.append(
            (
                r.contender,
                r.op,
                _fmt(r.gb_per_s, ".3f"),
                _fmt(r.vs_baseline, ".2f", "x"),
                _fmt(r.baseline_vs, ".2f", "x"),
                _fmt(r.seconds, ".2f"),
                _fmt(r.blocked_s, ".2f"),
                _fmt(r.cpu_s, ".2f"),
                _fmt(r.peak_extra_rss_mib, ".0f"),
                "-" if r.streams is None else str(r.streams),
                _requests_cell(r, source),
            )
        )
    return cells


def scaling_cells(rows: list[Row]) -> list[tuple[str, ...]]:
    """One tuple of display strings per row of a scaling run, in SCALING_HEADER order."""
    cells: list[tuple[str, ...]] = []
    for r in sorted(rows, key=lambda r: (r.contender, r.size_mib)):
        if r.errors or r.skipped:
            why = r.skipped or "; ".join(r.errors)
            cells.append((r.contender, str(r.size_mib), "FAILED" if r.errors else "skipped", "-", "-", why))
            continue
        ratio = (r.peak_extra_rss_mib or 0) / r.size_mib if r.size_mib else None
        cells.append(
            (
                r.contender,
                str(r.size_mib),
                _fmt(r.gb_per_s, ".3f"),
                _fmt(r.seconds, ".2f"),
                _fmt(r.peak_extra_rss_mib, ".0f"),
                _fmt(ratio, ".2f"),
            )
        )
    return cells


def text_table(header: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    """An aligned plain-text table (the last column is not padded)."""
    lines = [header, *cells]
    widths = [max(len(line[i]) for line in lines) for i in range(len(header) - 1)]
    return "\n".join(
        "  ".join(cell.ljust(w) for cell, w in zip(line, widths)) + "  " + line[-1] for line in lines
    )


def markdown_table(header: tuple[str, ...], cells: list[tuple[str, ...]]) -> str:
    """A Markdown table (a "|" inside a cell becomes "/")."""
    lines = [header, tuple("---" for _ in header), *cells]
    return "\n".join("| " + " | ".join(c.replace("|", "/") for c in line) + " |" for line in lines)


TARGETS_HEADER = ("target", "measured", "verdict")


def targets_cells(targets: list[Target]) -> list[tuple[str, ...]]:
    """One tuple of display strings per target, in TARGETS_HEADER order."""
    verdict = {True: "holds", False: "MISSED", None: "n/a"}
    return [(t.goal, t.measured, verdict[t.holds]) for t in targets]
