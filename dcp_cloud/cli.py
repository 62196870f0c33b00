"""The ``dcp-cloud`` command line: list, inspect, verify, clean, prune, copy and convert checkpoints.

Credentials and endpoints come from each store's standard chain (for S3: ``AWS_ENDPOINT_URL``,
``AWS_PROFILE``, ``AWS_ACCESS_KEY_ID``/``AWS_SECRET_ACCESS_KEY``, ...), or from
``--storage-options JSON`` (also read from ``DCP_CLOUD_STORAGE_OPTIONS``); never from the URL.

Exit codes: 0 success, 1 a problem was found (a failed verify, a missing, damaged or unsafe
checkpoint, a refused request), 2 a usage error (bad arguments, bad URL or options), 3 the store
could not be reached (connection refused, unknown host, no answer within the retry window).
Every error is one line on stderr, ``dcp-cloud: error: ...``, with URLs redacted and no
credentials; ``-v`` adds the (equally redacted) traceback.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import subprocess
import sys
import time
import traceback
import warnings
from collections.abc import Callable, Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NoReturn, TypeVar

import click

from ._version import __version__
from .errors import DcpCloudError, StoreConfigError
from .urls import normalize_url, printable, redact_url, scrub_text, secret_values, url_secrets

F = TypeVar("F", bound=Callable[..., Any])

EXIT_OK = 0
EXIT_PROBLEM = 1
EXIT_USAGE = 2
EXIT_UNREACHABLE = 3

#: what this invocation must never print: credentials from the options and URLs it was given
_SECRETS: list[str] = []
#: option values of gcsfs and others that name a mode, not a credential
_NOT_SECRET = frozenset({"anon", "google_default", "cache", "browser", "cloud", "true", "false", "none"})


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
    rows = [[printable(cell) for cell in row] for row in rows]
    widths = [max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.rjust(w) if i in right else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths))
        ).rstrip()

    _echo(line(headers))
    for row in rows:
        _echo(line(row))


def _echo(text: str = "", err: bool = False) -> None:
    """``click.echo`` of one line ``text`` with credentials scrubbed (see :func:`_scrub`) and
    control characters escaped: names listed from a store cannot forge lines or drive the
    terminal."""
    click.echo(printable(_scrub(text)), err=err)


def _scrub(text: str) -> str:
    """``text`` with URLs redacted and this invocation's credentials masked."""
    return scrub_text(text, _SECRETS)


def _shown(url: str) -> str:
    """A URL argument as output shows it: in the normal form the stores use (scheme in lower
    case, local paths absolute), redacted."""
    try:
        return redact_url(normalize_url(url))
    except StoreConfigError:
        return redact_url(url).rstrip("/") or url


def _emit_json(doc: Any) -> None:
    """``doc`` as JSON on stdout, every string in it scrubbed before encoding (JSON escapes
    would hide a credential holding quotes or non-ASCII characters from a later scrub)."""
    click.echo(json.dumps(_scrub_doc(doc), indent=2))


def _scrub_doc(doc: Any) -> Any:
    """``doc`` (JSON-like) with every string scrubbed; other objects become scrubbed strings."""
    if isinstance(doc, str):
        return _scrub(doc)
    if isinstance(doc, dict):
        return {_scrub(str(k)): _scrub_doc(v) for k, v in doc.items()}
    if isinstance(doc, (list, tuple)):
        return [_scrub_doc(v) for v in doc]
    if doc is None or isinstance(doc, (bool, int, float)):
        return doc
    return _scrub(str(doc))


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


def _trust_pickles(func: F) -> F:
    """``--trust-pickles`` on a subcommand that reads a checkpoint's non-tensor values."""
    return click.option(
        "--trust-pickles",
        is_flag=True,
        help="Unpickle non-tensor values with torch's full pickle rules, which can run code "
        "stored in the checkpoint. Only for checkpoints you trust; by default only plain values, "
        "containers, tensors and torch.serialization.add_safe_globals types load.",
    )(func)


def _trust(trust_pickles: bool) -> dict[str, bool]:
    """Keyword arguments for the library's readers: empty unless the user trusts the pickles."""
    return {"trust_pickles": True} if trust_pickles else {}


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
        _SECRETS[:] = sorted({*_SECRETS, *_secrets_of(kwargs.values())}, key=len, reverse=True)
        try:
            return func(*args, **kwargs)
        except BrokenPipeError:  # `dcp-cloud ... | head`: the reader left
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            sys.exit(EXIT_PROBLEM)
        except (SystemExit, click.exceptions.Exit, click.ClickException, click.Abort):
            raise
        except KeyboardInterrupt:
            click.echo("dcp-cloud: interrupted", err=True)
            sys.exit(130)
        except BaseException as exc:  # torch's CheckpointException is a BaseException
            _fail(exc, as_json)

    return wrapper  # type: ignore[return-value]


def _secrets_of(values: Iterable[Any]) -> list[str]:
    """The credentials among a command's arguments: storage option values and the user-info
    and query of URL arguments."""
    found: list[str] = []
    for value in values:
        if isinstance(value, str):
            found.extend(url_secrets(value))
        elif isinstance(value, dict):
            found.extend(secret_values(value))
    # shorter values are not credentials but would mask ordinary words and numbers in the output
    return sorted({s for s in found if len(s) >= 6 and s.lower() not in _NOT_SECRET}, key=len, reverse=True)


def _secrets_of_argv(argv: Iterable[str]) -> list[str]:
    """The credentials in a raw command line and in ``DCP_CLOUD_STORAGE_OPTIONS``, before click
    parses them (its usage errors quote the values they reject)."""
    values: list[Any] = []
    for text in [*argv, os.environ.get("DCP_CLOUD_STORAGE_OPTIONS", "")]:
        if not isinstance(text, str):
            continue
        for candidate in (text, text.partition("=")[2] if text.startswith("--") else ""):
            values.append(candidate)
            if candidate.lstrip().startswith("{"):
                try:
                    values.append(json.loads(candidate))
                except ValueError:
                    pass
    return _secrets_of(values)


def _causes(exc: BaseException) -> list[BaseException]:
    """``exc``, the per-rank errors inside a torch ``CheckpointException``, and their causes,
    outermost first, each once."""
    seen: list[BaseException] = []
    pending = [exc]
    while pending:
        current = pending.pop(0)
        if any(current is s for s in seen) or len(seen) > 50:
            continue
        seen.append(current)
        failures = getattr(current, "failures", None)
        if isinstance(failures, dict):
            pending.extend(f[0] if isinstance(f, tuple) else f for f in failures.values())
        pending.extend(c for c in (current.__cause__, current.__context__) if c is not None)
    return [e for e in seen if isinstance(e, BaseException)]


#: names of transport errors (botocore, aiohttp, azure-core, google-auth, urllib3) that mean
#: the store did not answer, for libraries that do not derive them from ConnectionError
_UNREACHABLE_NAMES = frozenset(
    {
        "EndpointConnectionError",
        "ConnectTimeoutError",
        "ReadTimeoutError",
        "ConnectionClosedError",
        "ClientConnectorError",
        "ClientConnectionError",
        "ServerDisconnectedError",
        "ServerTimeoutError",
        "ServiceRequestError",
        "ServiceResponseError",
        "TransportError",
        "NewConnectionError",
        "MaxRetryError",
    }
)


def _unreachable(exc: BaseException) -> bool:
    if isinstance(exc, (ConnectionError, TimeoutError)):
        return True
    return any(cls.__name__ in _UNREACHABLE_NAMES for cls in type(exc).__mro__)


def _exit_code(exc: BaseException) -> int:
    """The documented exit code for a failed command (see the module docstring)."""
    chain = _causes(exc)
    if any(isinstance(e, StoreConfigError) for e in chain):
        return EXIT_USAGE
    if any(_unreachable(e) for e in chain):
        return EXIT_UNREACHABLE
    return EXIT_PROBLEM


def _reported(exc: BaseException) -> BaseException:
    """The error to name: the first of ours in the chain, else the first per-rank error, else
    ``exc``."""
    chain = _causes(exc)
    ours = [e for e in chain if isinstance(e, DcpCloudError)]
    if ours:
        return ours[0]
    failures = getattr(exc, "failures", None)
    if isinstance(failures, dict) and len(chain) > 1:
        return chain[1]
    return exc


def _fail(exc: BaseException, as_json: bool) -> NoReturn:
    code = _exit_code(exc)
    reported = _reported(exc)
    message = _message(exc, reported, code)
    if _verbose():
        trace = "".join(traceback.format_exception(type(exc), exc, exc.__traceback__))
        click.echo("\n".join(printable(line) for line in _scrub(trace).rstrip("\n").split("\n")), err=True)
    if as_json:
        _emit_json({"ok": False, "error": type(reported).__name__, "message": message, "exit_code": code})
    else:
        _echo(f"dcp-cloud: error: {message}", err=True)
    sys.exit(code)


def _message(exc: BaseException, reported: BaseException, code: int) -> str:
    """One line saying what failed, redacted."""
    failures = getattr(exc, "failures", None)
    if isinstance(reported, DcpCloudError):
        text = str(reported) or type(reported).__name__
    elif isinstance(failures, dict) and failures:
        text = "; ".join(
            f"{type(f[0]).__name__}: {f[0]}" for f in failures.values() if isinstance(f, tuple) and f
        )
    else:
        text = f"{type(exc).__name__}: {exc}" if str(exc) else type(exc).__name__
    if code == EXIT_UNREACHABLE and not isinstance(reported, DcpCloudError):
        text += (
            " (the store did not answer: check the endpoint URL in --storage-options or the "
            "environment, your network, and that the server is up)"
        )
    line = " ".join(_scrub(text).split())
    return line if len(line) <= 2000 else line[:1997] + "..."


def _verbose() -> bool:
    context = click.get_current_context(silent=True)
    return bool(context and context.find_root().params.get("verbose"))


class _StderrHandler(logging.Handler):
    """Writes each log record (and each Python warning) as one scrubbed, printable line to the
    current ``sys.stderr``: dcp_cloud's records and warnings always, other libraries' (torch's
    fallback notes, botocore's) only with ``-v``, so that an error stays one line."""

    verbose = False

    def emit(self, record: logging.LogRecord) -> None:
        ours = record.name in ("dcp_cloud", "py.warnings") or record.name.startswith("dcp_cloud.")
        if not (ours or self.verbose):
            return
        try:
            text = record.getMessage()
            if record.name == "py.warnings":  # "file:line: Category: message\n  source line"
                text = text.strip().split("\n", 1)[0]
            if record.exc_info and self.verbose:
                text += "\n" + "".join(traceback.format_exception(*record.exc_info))
            lines = _scrub(text).rstrip("\n").split("\n")
            click.echo("\n".join(printable(line) for line in lines), err=True)
        except Exception:
            self.handleError(record)


_HANDLER = _StderrHandler()


@contextmanager
def _logging_scrubbed() -> Iterator[None]:
    """While a command runs: log records of WARNING and above (INFO of dcp_cloud with ``-v``)
    and Python warnings go through :class:`_StderrHandler`, never unscrubbed to stderr."""
    root = logging.getLogger()
    ours = logging.getLogger("dcp_cloud")
    level = ours.level
    _HANDLER.setLevel(logging.WARNING)
    _HANDLER.verbose = False
    root.addHandler(_HANDLER)
    logging.captureWarnings(True)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message="torch.distributed is disabled")
            yield
    finally:
        logging.captureWarnings(False)
        root.removeHandler(_HANDLER)
        ours.setLevel(level)


class _Cli(click.Group):
    """The ``dcp-cloud`` group: credentials on the command line are known before click parses
    it, so that its usage errors (which quote rejected values) and every log line are scrubbed."""

    def main(self, args: Any = None, *pargs: Any, **kwargs: Any) -> Any:
        argv = list(sys.argv[1:] if args is None else args)
        _SECRETS[:] = _secrets_of_argv(argv)
        with _logging_scrubbed():
            return super().main(args, *pargs, **kwargs)

    def make_context(self, *args: Any, **kwargs: Any) -> click.Context:
        try:
            return super().make_context(*args, **kwargs)
        except click.ClickException as exc:
            _scrub_click_error(exc)
            raise

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except click.ClickException as exc:
            _scrub_click_error(exc)
            raise


def _scrub_click_error(exc: click.ClickException) -> None:
    """Scrub a usage error's message in place (it quotes the value it rejected); the error is
    re-raised so that click shows it with its usage line and exit code."""
    exc.message = printable(_scrub(exc.message))  # type: ignore[misc]  # Final in click's stubs only


# -- the commands --------------------------------------------------------------------------------


@click.group(cls=_Cli, context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(__version__, prog_name="dcp-cloud")
@click.option(
    "-v",
    "--verbose",
    is_flag=True,
    help="Log transfer summaries (INFO) to stderr; on an error, also its traceback (redacted).",
)
def cli(verbose: bool) -> None:
    """Inspect and manage PyTorch Distributed Checkpoints on S3, GCS, Azure, local folders and
    any fsspec store.

    \b
    Exit codes:
      0  ok
      1  a problem was found: failed verify; missing, damaged or unsafe checkpoint; refused request
      2  usage error: bad arguments, URL (credentials or ?query in it, '..' segments) or options
      3  the store could not be reached: connection refused, unknown host, no answer in time
    Errors are one line, "dcp-cloud: error: ...", and never show credentials.
    """
    if verbose:
        _HANDLER.setLevel(logging.INFO)
        _HANDLER.verbose = True
        logging.getLogger("dcp_cloud").setLevel(logging.INFO)


@cli.command("ls", short_help="List checkpoints under a prefix: status, step, size, objects, time.")
@click.argument("url")
@_common
def ls_command(url: str, storage_options: dict[str, Any] | None, as_json: bool) -> None:
    """List the checkpoints under URL (a run folder or a bucket), committed or not."""
    from .tools.catalog import list_checkpoints

    found = list_checkpoints(url, storage_options=storage_options)
    base = _shown(url)
    if as_json:
        _emit_json([{**c.to_dict(), "url": f"{base}/{c.path}" if c.path else base} for c in found])
        return
    if not found:
        _echo(f"no checkpoints under {base}")
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
    _echo(
        f"{plural(len(found), 'checkpoint')}, {len(found) - incomplete} committed, {incomplete} incomplete, "
        f"{human_size(sum(c.size for c in found))}"
    )


@cli.command("info", short_help="Show a checkpoint's tensors (dtype, shape, size) and other values.")
@click.argument("url")
@_common
def info_command(url: str, storage_options: dict[str, Any] | None, as_json: bool) -> None:
    """Show the tensors (name, dtype, shape, size) and other values in the checkpoint at URL.
    Reads only .metadata, through an unpickler that admits DCP's metadata classes alone."""
    from .tools.info import checkpoint_info

    info = checkpoint_info(url, storage_options=storage_options)
    if as_json:
        _emit_json(info.to_dict())
        return
    _echo(f"{info.url}  save {info.save_id or '-'}")
    _echo(f"{len(info.tensors)} tensors, {human_size(info.tensor_bytes)}; {len(info.objects)} other values")
    if info.tensors:
        _echo()
        rows = [
            [t.fqn, t.dtype, "(" + ", ".join(map(str, t.shape)) + ")", human_size(t.size), str(t.chunks)]
            for t in info.tensors
        ]
        _table(["TENSOR", "DTYPE", "SHAPE", "SIZE", "SHARDS"], rows, right=frozenset({3, 4}))
    if info.objects:
        _echo()
        _echo("other values: " + ", ".join(info.objects))


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
    from .tools.verify import verify_checkpoint

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
            _echo(f"warning: {warning}", err=True)
        for problem in report.problems:
            _echo(f"FAIL {problem.kind}: {problem.message}")
        summary = (
            f"{plural(report.objects, 'object')}, {plural(report.items, 'item')}, "
            f"{plural(report.items_checksummed, 'checksum')} "
            f"({human_size(report.bytes_read)} read)"
        )
        if report.ok:
            _echo(f"OK {report.url}: {summary}")
        else:
            _echo(
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
    from .tools.gc import DEFAULT_GRACE_SECONDS, collect_garbage

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
        _echo(f"{verb} {key}")
    for key in report.aborted_uploads:
        _echo(f"{'would abort' if dry_run else 'aborted'} upload {key}")
    for name in report.kept_recent:
        _echo(f"kept {name} (younger than the grace period: maybe still saving)")
    for key in report.unreadable_metadata:
        _echo(f"warning: {key} is unreadable; everything beside it was kept", err=True)
    _echo(
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
    from .tools.manager import CheckpointManager

    manager = CheckpointManager(url, storage_options=storage_options)
    doomed = manager.prune(keep_last=keep, dry_run=dry_run)
    left = [s for s in manager.steps() if s not in doomed] if dry_run else manager.steps()
    if as_json:
        _emit_json({"url": _shown(url), "dry_run": dry_run, "deleted": doomed, "kept": left})
        return
    verb = "would delete" if dry_run else "deleted"
    for step in doomed:
        _echo(f"{verb} {_shown(manager.step_url(step))}")
    _echo(f"{verb} {plural(len(doomed), 'step')}; kept {len(left)}: {', '.join(map(str, left)) or 'none'}")


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
    from .tools.copy import copy_checkpoint

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
    _echo(
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
@_trust_pickles
@_common
def convert_command(
    url: str,
    out: str,
    fmt: str,
    trust_pickles: bool,
    storage_options: dict[str, Any] | None,
    as_json: bool,
) -> None:
    """Convert the checkpoint at URL into the local file OUT (loads it whole into memory).
    Non-tensor values load with torch's weights-only rules unless --trust-pickles."""
    from .tools.convert import flatten_tensors, to_safetensors, to_torch_save

    skipped: list[str] = []
    trust = _trust(trust_pickles)
    if fmt == "safetensors":
        skipped = to_safetensors(url, out, storage_options=storage_options, **trust)
        tensors = -1
    else:
        state = to_torch_save(url, out, storage_options=storage_options, **trust)
        tensors = len(flatten_tensors(state)[0])
    size = os.path.getsize(out)
    if as_json:
        _emit_json({"url": _shown(url), "out": out, "format": fmt, "bytes": size, "skipped": skipped})
        return
    what = f"{tensors} tensors, " if tensors >= 0 else ""
    _echo(f"wrote {out} ({fmt}, {what}{human_size(size)})")
    if skipped:
        _echo(
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
            "dcp-cloud: error: the benchmarks are not importable from here: run `dcp-cloud bench` in a "
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
