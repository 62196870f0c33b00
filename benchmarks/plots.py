"""PNG plots of benchmark results (matplotlib, Agg backend; optional: skipped when missing)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

OP_COLORS = {"save": "#1f77b4", "load": "#ff7f0e", "async_save": "#2ca02c"}


def _pyplot() -> Any:
    try:
        import matplotlib
    except ImportError:
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def throughput_plot(rows: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    """Grouped bars: GB/s per contender for each op (median over rounds; failed rows left out)."""
    plt = _pyplot()
    if plt is None:
        return None
    contenders: list[str] = []
    for row in rows:
        if row["contender"] not in contenders:
            contenders.append(row["contender"])
    ops = [op for op in OP_COLORS if any(r["op"] == op for r in rows)]
    width = 0.8 / max(1, len(ops))
    fig, ax = plt.subplots(figsize=(max(6.0, 1.6 * len(contenders)), 4.2))
    for i, op in enumerate(ops):
        xs, ys = [], []
        for j, contender in enumerate(contenders):
            found: dict[str, Any] | None = next(
                (r for r in rows if r["contender"] == contender and r["op"] == op), None
            )
            if found is None or not found.get("gb_per_s"):
                continue
            xs.append(j + (i - (len(ops) - 1) / 2) * width)
            ys.append(found["gb_per_s"])
        bars = ax.bar(
            xs,
            ys,
            width,
            label=op if op != "async_save" else "async_save (to completion)",
            color=OP_COLORS[op],
        )
        for bar, y in zip(bars, ys):
            ax.annotate(
                f"{y:.3g}",
                (bar.get_x() + bar.get_width() / 2, y),
                ha="center",
                va="bottom",
                fontsize=7,
                xytext=(0, 1),
                textcoords="offset points",
            )
    ax.set_xticks(range(len(contenders)))
    ax.set_xticklabels(contenders, rotation=15)
    ax.set_ylabel("GB/s (tensor bytes / wall s, median)")
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=8)
    ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def scaling_plot(rows: list[dict[str, Any]], title: str, path: Path) -> Path | None:
    """Peak extra RSS and GB/s of saves against checkpoint size, one line per contender."""
    plt = _pyplot()
    if plt is None:
        return None
    fig, (mem_ax, speed_ax) = plt.subplots(1, 2, figsize=(10, 4.2))
    contenders: list[str] = []
    for row in rows:
        if row["contender"] not in contenders:
            contenders.append(row["contender"])
    sizes = sorted({r["size_mib"] for r in rows})
    for contender in contenders:
        mine = sorted(
            (r for r in rows if r["contender"] == contender and r.get("gb_per_s")),
            key=lambda r: r["size_mib"],
        )
        if not mine:
            continue
        xs = [r["size_mib"] for r in mine]
        mem_ax.plot(xs, [r["peak_extra_rss_mib"] for r in mine], marker="o", label=contender)
        speed_ax.plot(xs, [r["gb_per_s"] for r in mine], marker="o", label=contender)
    mem_ax.plot(sizes, sizes, linestyle=":", color="grey", label="= checkpoint size")
    mem_ax.axhline(256, linestyle="--", color="red", linewidth=0.8, label="target: 256 MiB")
    for ax in (mem_ax, speed_ax):
        ax.set_xscale("log", base=2)
        ax.set_xticks(sizes)
        ax.set_xticklabels([f"{s} MiB" for s in sizes])
        ax.set_xlabel("checkpoint size")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    mem_ax.set_yscale("log", base=2)
    mem_ax.set_ylabel("save: peak RSS above the state dict (MiB)")
    speed_ax.set_ylabel("save GB/s")
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
