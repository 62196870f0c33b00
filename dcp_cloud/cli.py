"""The ``dcp-cloud`` command line: list, inspect, verify, clean, prune, copy and convert checkpoints.

Credentials and endpoints come from each store's standard chain (for S3: ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ...), or from
``--storage-options JSON`` (also read from ``DCP_CLOUD_STORAGE_OPTIONS``).

Exit codes: 0 success, 1 a problem was found (a failed verify, a missing or damaged checkpoint,
a refused request), 2 a usage error (bad arguments, bad URL or options).
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from ._version import __version__
from .errors import DcpCloudError, StoreConfigError

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2


# -- output helpers ------------------------------------------------------------------------------


def human_size(n: int | float) -> str:
    """Bytes in binary units: ``512 B``, ``1.5 KiB``, ``250.1 MiB``."""
    value = float(n)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if value < 1024 or unit == "TiB":
            return f"{int(value)} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def plural(n: int, word: str) -> str:
    """``1 object``, ``2 objects``."""
    return f"{n} {word}" if n == 1 else f"{n} {word}s"


def _listed(names: list[str], limit: int = 8) -> str:
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _time(stamp: float | None) -> str:
    return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stamp)) if stamp else "-"


def _table(headers: list[str], rows: list[list[str]], right: frozenset[int] = frozenset()) -> None:
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    click.echo(line(headers))
    for row in rows:
        click.echo(line(row))


def _emit_json(doc: Any) -> None:
    click.echo(json.dumps(doc, indent=2, default=str))


def _use_progress(as_json: bool) -> bool:
    return not as_json and sys.stdout.isatty()


class _Progress:
    """Callbacks for the library's ``progress``/``on_total``: a tqdm byte bar on stderr when
    stdout is a terminal (and not --json), else nothing."""

    def __init__(self, bar: Any) -> None:
        self.bar = bar

    def update(self, n: int) -> None:
        self.bar.update(n)

    def total(self, n: int) -> None:
        self.bar.total = n
        self.bar.refresh()


@contextmanager
def _progress(enabled: bool, desc: str) -> Iterator[dict[str, Any]]:
    """Keyword arguments ``progress`` and ``on_total`` for a library call (empty when off)."""
    if not enabled:
        yield {}
        return
    from tqdm import tqdm

    with tqdm(desc=desc, unit="B", unit_scale=True, unit_divisor=1024, leave=False) as bar:
        callbacks = _Progress(bar)
        yield {"progress": callbacks.update, "on_total": callbacks.total}


# -- options and errors --------------------------------------------------------------------------


def _parse_options(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    if value is None or value == "":
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as exc:
        raise click.BadParameter(
            f'not valid JSON ({exc}); e.g. \'{{"endpoint_url": "http://..."}}\''
        ) from exc
    if not isinstance(parsed, dict):
        raise click.BadParameter("must be a JSON object, e.g. '{\"anon\": true}'")
    return parsed


def _common(func: F) -> F:
    """``--storage-options`` and ``--json`` on a subcommand, and our errors turned into exit codes."""

    @click.option(
        "--storage-options",
        "storage_options",
        envvar="DCP_CLOUD_STORAGE_OPTIONS",
        callback=_parse_options,
        metavar="JSON",
        help='fsspec options as JSON, e.g. \'{"endpoint_url": "http://127.0.0.1:9000"}\' '
        "[env DCP_CLOUD_STORAGE_OPTIONS]",
    )
    @click.option("--json", "as_json", is_flag=True, help="Machine-readable JSON on stdout.")
    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        as_json = kwargs.get("as_json", False)
        try:
            return func(*args, **kwargs)
        except BrokenPipeError:  # `dcp-cloud ... | head`: the reader left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_PROBLEM)
        except StoreConfigError as exc:
            _fail(exc, as_json, EXIT_USAGE)
        except (DcpCloudError, OSError, ValueError) as exc:
            _fail(exc, as_json, EXIT_PROBLEM)
        except BaseException as exc:
            if type(exc).__name__ == "CheckpointException":  # torch's wrapper of our errors
                _fail(exc, as_json, EXIT_PROBLEM)
            raise

    return wrapper  # type: ignore[return-value]


def _fail(exc: BaseException, as_json: bool, code: int) -> NoReturn:
    message = _message(exc)
    if as_json:
        _emit_json({"ok": False, "error": type(exc).__name__, "message": message})
    else:
        click.echo(f"error: {message}", err=True)
    sys.exit(code)


def _message(exc: BaseException) -> str:
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and failures:
        return "; ".join(f"{type(error).__name__}: {error}" for error, _trace in failures.values())
    return str(exc) or type(exc).__name__


# -- the commands --------------------------------------------------------------------------------


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dcp-cloud")
@click.option("-v", "--verbose", is_flag=True, help="Log transfer summaries (INFO) to stderr.")
def cli(verbose: bool) -> None:
    """Inspect and manage PyTorch Distributed Checkpoints on S3, GCS, Azure, local folders and
    any fsspec store.

    Exit codes: 0 ok, 1 a problem was found, 2 usage error.
    """
    if verbose:
        logging.basicConfig(level=logging.INFO, format="%(message)s")
        logging.getLogger("dcp_cloud").setLevel(logging.INFO)


@cli.command("ls", short_help="List checkpoints under a prefix: status, step, size, objects, time.")
@click.argument("url")
@_common
def ls_command(url: str, storage_options: dict[str, Any] | None, as_json: bool) -> None:
    """List the checkpoints under URL (a run folder or a bucket), committed or not."""
    from .catalog import list_checkpoints

    found = list_checkpoints(url, storage_options=storage_options)
    base = url.rstrip("/")
    if as_json:
        _emit_json([{**c.to_dict(), "url": f"{base}/{c.path}" if c.path else base} for c in found])
        return
    if not found:
        click.echo(f"no checkpoints under {url}")
        return
    rows = [
        [
            c.path or ".",
            c.status,
            "-" if c.step is None else str(c.step),
            human_size(c.size),
            str(c.objects),
            _time(c.modified),
        ]
        for c in found
    ]
    _table(["CHECKPOINT", "STATUS", "STEP", "SIZE", "OBJECTS", "MODIFIED"], rows, right=frozenset({2, 3, 4}))
    incomplete = sum(not c.committed for c in found)
    click.echo(
        f"{plural(len(found), 'checkpoint')}, {len(found) - incomplete} committed, {incomplete} incomplete, "
        f"{human_size(sum(c.size for c in found))}"
    )


@cli.command("info", short_help="Show a checkpoint's tensors (dtype, shape, size) and other values.")
@click.argument("url")
@_common
def info_command(url: str, storage_options: dict[str, Any] | None, as_json: bool) -> None:
    """Show the tensors (name, dtype, shape, size) and other values in the checkpoint at URL."""
    from .info import checkpoint_info

    info = checkpoint_info(url, storage_options=storage_options)
    if as_json:
        _emit_json(info.to_dict())
        return
    click.echo(f"{info.url}  save {info.save_id or '-'}")
    click.echo(
        f"{len(info.tensors)} tensors, {human_size(info.tensor_bytes)}; {len(info.objects)} other values"
    )
    if info.tensors:
        click.echo()
        rows = [
            [t.fqn, t.dtype, "(" + ", ".join(map(str, t.shape)) + ")", human_size(t.size), str(t.chunks)]
            for t in info.tensors
        ]
        _table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "SHARDS"], rows, right=frozenset({3, 4}))
    if info.objects:
        click.echo()
        click.echo("other values: " + ", ".join(info.objects))


@cli.command("verify", short_help="Check objects, sizes and CRC32Cs; exit 1 naming what is wrong.")
@click.argument("url")
@click.option(
    "--no-checksums", is_flag=True, help="Check existence and sizes only (one listing, no data read)."
)
@click.option(
    "--concurrency", default=16, show_default=True, type=click.IntRange(1, 256), help="Ranged GETs in flight."
)
@_common
def verify_command(
    url: str, no_checksums: bool, concurrency: int, storage_options: dict[str, Any] | None, as_json: bool
) -> None:
    """Check that every data object of the checkpoint at URL exists with the right size and that
    every item's CRC32C matches the manifest. Exits 1 naming what is wrong."""
    from .verify import verify_checkpoint

    with _progress(_use_progress(as_json), "verify") as progress:
        report = verify_checkpoint(
            url,
            storage_options=storage_options,
            checksums=not no_checksums,
            max_concurrency=concurrency,
            **progress,
        )
    if as_json:
        _emit_json(report.to_dict())
    else:
        for warning in report.warnings:
            click.echo(f"warning: {warning}", err=True)
        for problem in report.problems:
            click.echo(f"FAIL {problem.kind}: {problem.message}")
        summary = (
            f"{plural(report.objects, 'object')}, {plural(report.items, 'item')}, "
            f"{plural(report.items_checksummed, 'checksum')} "
            f"({human_size(report.bytes_read)} read)"
        )
        if report.ok:
            click.echo(f"OK {report.url}: {summary}")
        else:
            click.echo(
                f"FAILED {report.url}: {len(report.problems)} problem{'' if len(report.problems) == 1 else 's'}; {summary}"
            )
    sys.exit(EXIT_OK if report.ok else EXIT_PROBLEM)


@cli.command("gc", short_help="Remove uncommitted saves and stale multipart uploads.")
@click.argument("url")
@click.option("--dry-run", is_flag=True, help="Only report what would be removed.")
@click.option(
    "--grace",
    "grace",
    type=click.FloatRange(min=0),
    default=None,
    metavar="SECONDS",
    help="Leave saves and uploads younger than this alone (default 21600 = 6 h: saves in progress).",
)
@_common
def gc_command(
    url: str, dry_run: bool, grace: float | None, storage_options: dict[str, Any] | None, as_json: bool
) -> None:
    """Remove debris under URL: uncommitted saves and stale multipart uploads."""
    from .gc import DEFAULT_GRACE_SECONDS, collect_garbage

    report = collect_garbage(
        url,
        storage_options=storage_options,
        grace_seconds=DEFAULT_GRACE_SECONDS if grace is None else grace,
        dry_run=dry_run,
    )
    if as_json:
        _emit_json(
            {
                "url": report.url,
                "dry_run": report.dry_run,
                "deleted": report.deleted,
                "bytes_freed": report.bytes_freed,
                "aborted_uploads": report.aborted_uploads,
                "kept_recent": report.kept_recent,
                "unreadable_metadata": report.unreadable_metadata,
            }
        )
        return
    verb = "would delete" if dry_run else "deleted"
    for key in report.deleted:
        click.echo(f"{verb} {key}")
    for key in report.aborted_uploads:
        click.echo(f"{'would abort' if dry_run else 'aborted'} upload {key}")
    for name in report.kept_recent:
        click.echo(f"kept {name} (younger than the grace period: maybe still saving)")
    for key in report.unreadable_metadata:
        click.echo(f"warning: {key} is unreadable; everything beside it was kept", err=True)
    click.echo(
        f"{verb} {plural(len(report.deleted), 'object')} ({human_size(report.bytes_freed)}), "
        f"{'would abort' if dry_run else 'aborted'} {plural(len(report.aborted_uploads), 'upload')}"
    )


@cli.command("prune", short_help="Keep only the newest N committed step-* checkpoints.")
@click.argument("url")
@click.option(
    "--keep", "keep", required=True, type=click.IntRange(min=1), help="Committed steps to keep (newest)."
)
@click.option("--dry-run", is_flag=True, help="Only report which steps would be deleted.")
@_common
def prune_command(
    url: str, keep: int, dry_run: bool, storage_options: dict[str, Any] | None, as_json: bool
) -> None:
    """Delete all but the newest KEEP committed step-* checkpoints under URL (a
    CheckpointManager root). The newest committed step is never deleted."""
    from .manager import CheckpointManager

    manager = CheckpointManager(url, storage_options=storage_options)
    doomed = manager.prune(keep_last=keep, dry_run=dry_run)
    left = [s for s in manager.steps() if s not in doomed] if dry_run else manager.steps()
    if as_json:
        _emit_json({"url": url, "dry_run": dry_run, "deleted": doomed, "kept": left})
        return
    verb = "would delete" if dry_run else "deleted"
    for step in doomed:
        click.echo(f"{verb} {manager.step_url(step)}")
    click.echo(
        f"{verb} {plural(len(doomed), 'step')}; kept {len(left)}: {', '.join(map(str, left)) or 'none'}"
    )


@cli.command("cp", short_help="Copy a checkpoint between stores, committing .metadata last.")
@click.argument("src")
@click.argument("dst")
@click.option(
    "--dst-storage-options",
    callback=_parse_options,
    metavar="JSON",
    help="Options for DST (default: --storage-options).",
)
@click.option("--overwrite", is_flag=True, help="Replace a checkpoint committed at DST.")
@click.option(
    "--part-size",
    default=16,
    show_default=True,
    type=click.IntRange(5, 5120),
    metavar="MiB",
    help="Multipart part size.",
)
@click.option(
    "--concurrency", default=16, show_default=True, type=click.IntRange(1, 256), help="Transfers in flight."
)
@_common
def cp_command(
    src: str,
    dst: str,
    dst_storage_options: dict[str, Any] | None,
    overwrite: bool,
    part_size: int,
    concurrency: int,
    storage_options: dict[str, Any] | None,
    as_json: bool,
) -> None:
    """Copy the committed checkpoint at SRC to DST (any two URLs or local folders), in
    parallel; DST's .metadata is written last, so DST is never seen half-copied."""
    from .copier import copy_checkpoint

    with _progress(_use_progress(as_json), "copy") as progress:
        report = copy_checkpoint(
            src,
            dst,
            storage_options=storage_options,
            dst_storage_options=dst_storage_options,
            overwrite=overwrite,
            part_size=part_size * 1024 * 1024,
            max_concurrency=concurrency,
            **progress,
        )
    if as_json:
        _emit_json(report.to_dict())
        return
    rate = report.bytes / report.seconds / 1e6 if report.seconds else 0.0
    click.echo(
        f"copied {report.src} -> {report.dst}: {plural(report.objects, 'object')}, {human_size(report.bytes)} "
        f"in {report.seconds:.1f} s ({rate:.1f} MB/s){' (replaced the old checkpoint)' if report.replaced else ''}"
    )


@cli.command("convert", short_help="Convert a checkpoint to one torch.save or safetensors file.")
@click.argument("url")
@click.argument("out", type=click.Path(dir_okay=False, writable=True))
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["torch", "safetensors"]),
    default="torch",
    show_default=True,
    help="torch: one torch.save file of the whole state dict; safetensors: its tensors only.",
)
@_common
def convert_command(
    url: str, out: str, fmt: str, storage_options: dict[str, Any] | None, as_json: bool
) -> None:
    """Convert the checkpoint at URL into the local file OUT (loads it whole into memory)."""
    from .convert import flatten_tensors, to_safetensors, to_torch_save

    skipped: list[str] = []
    if fmt == "safetensors":
        skipped = to_safetensors(url, out, storage_options=storage_options)
        tensors = -1
    else:
        state = to_torch_save(url, out, storage_options=storage_options)
        tensors = len(flatten_tensors(state)[0])
    size = os.path.getsize(out)
    if as_json:
        _emit_json({"url": url, "out": out, "format": fmt, "bytes": size, "skipped": skipped})
        return
    what = f"{tensors} tensors, " if tensors >= 0 else ""
    click.echo(f"wrote {out} ({fmt}, {what}{human_size(size)})")
    if skipped:
        click.echo(
            f"left out {plural(len(skipped), 'non-tensor value')} (kept in the file's metadata): "
            f"{_listed(skipped)}"
        )


@cli.command(
    "bench",
    short_help="Run python -m benchmarks.bench ARGS in a source checkout.",
    context_settings={"ignore_unknown_options": True, "allow_extra_args": True, "help_option_names": []},
)
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def bench_command(args: tuple[str, ...]) -> None:
    """Run the benchmarks (python -m benchmarks.bench ARGS) from a dcp-cloud source checkout."""
    cwd = Path.cwd()
    package = cwd / "benchmarks"
    found = (package / "__init__.py").is_file() and (
        (package / "bench.py").is_file() or (package / "bench" / "__init__.py").is_file()
    )
    if not found:
        click.echo(
            "error: the benchmarks are not importable from here: run `dcp-cloud bench` in a "
            "dcp-cloud source checkout (the folder holding benchmarks/), after "
            "pip install 'dcp-cloud[bench]'.",
            err=True,
        )
        sys.exit(EXIT_USAGE)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(cwd), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep),
    }
    sys.exit(subprocess.call([sys.executable, "-m", "benchmarks.bench", *args], cwd=cwd, env=env))


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``dcp-cloud`` console script."""
    cli.main(args=argv, prog_name="dcp-cloud")


if __name__ == "__main__":
    main()
