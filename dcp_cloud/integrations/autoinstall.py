"""Opt-in without code: ``DCP_CLOUD_INSTALL=1`` runs :func:`dcp_cloud.install` in every Python
process of an environment where the hook is enabled.

Two explicit steps, both needed:

1. ``python -m dcp_cloud.integrations.autoinstall enable`` writes ``dcp_cloud_autoinstall.pth``
   into the environment's site-packages (``disable`` removes it, ``status`` shows both steps).
2. ``DCP_CLOUD_INSTALL=1`` in the environment of the processes that should use dcp_cloud, and
   optionally ``DCP_CLOUD_INSTALL_OPTIONS`` holding :func:`~dcp_cloud.install`'s keyword
   arguments as a JSON object (``{"part_size": 67108864}``; credentials belong in each cloud's
   own variables, not here).

At interpreter start the ``.pth`` line only reads the variable. When it is set, this module (stdlib
only, loaded from its file without importing dcp_cloud or torch) registers an import hook; when
``torch.distributed.checkpoint`` is first imported the hook calls ``install()``. Nothing can stop
the interpreter from starting: any failure becomes one warning on stderr, and DCP then keeps its
own storage auto-detection.
"""

from __future__ import annotations

import argparse
import importlib.abc
import importlib.machinery
import json
import os
import sys
import sysconfig
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

ENV_VAR = "DCP_CLOUD_INSTALL"
OPTIONS_VAR = "DCP_CLOUD_INSTALL_OPTIONS"
PTH_NAME = "dcp_cloud_autoinstall.pth"
MODULE = "dcp_cloud.integrations.autoinstall"
_MARKER = "# dcp_cloud auto-install hook"
_TARGET = "torch.distributed.checkpoint"
_TRUE = frozenset({"1", "true", "yes", "on"})


def requested(environ: Mapping[str, str] = os.environ) -> bool:
    """Whether ``DCP_CLOUD_INSTALL`` asks for the hook (``1``, ``true``, ``yes``, ``on``)."""
    return environ.get(ENV_VAR, "").strip().lower() in _TRUE


def options(environ: Mapping[str, str] = os.environ) -> dict[str, Any]:
    """:func:`~dcp_cloud.install`'s keyword arguments from ``DCP_CLOUD_INSTALL_OPTIONS``."""
    text = environ.get(OPTIONS_VAR, "").strip()
    if not text:
        return {}
    try:
        value = json.loads(text)
    except ValueError as exc:
        raise ValueError(f"{OPTIONS_VAR} is not valid JSON ({exc}); write a JSON object") from None
    if not isinstance(value, dict):
        raise ValueError(
            f"{OPTIONS_VAR} must be a JSON object of install() options, not {type(value).__name__}"
        )
    return value


def install_from_env() -> bool:
    """Run ``install(**options)`` now; warn instead of raising. Whether it was installed."""
    try:
        from dcp_cloud.integrations.install import install

        install(**options())
        return True
    except Exception as exc:
        message = (
            f"dcp_cloud: {ENV_VAR} is set but install() failed: {exc}. DCP keeps torch's own "
            "storage auto-detection in this process."
        )
        try:
            warnings.warn(message, RuntimeWarning, stacklevel=2)
        except Warning:  # warnings are errors here (-W error): the import must still succeed
            sys.stderr.write(message + "\n")
        return False


class _InstallAfterLoad(importlib.abc.Loader):
    """Runs the real loader, then :func:`install_from_env`."""

    def __init__(self, loader: importlib.abc.Loader) -> None:
        self._loader = loader

    def create_module(self, spec: importlib.machinery.ModuleSpec) -> ModuleType | None:
        return self._loader.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        # the module sees its own loader, as if no hook had been there
        if module.__spec__ is not None:
            module.__spec__.loader = self._loader
        module.__loader__ = self._loader
        self._loader.exec_module(module)
        install_from_env()


class _ImportHook(importlib.abc.MetaPathFinder):
    """Finds nothing itself: wraps the loader of ``torch.distributed.checkpoint``, once."""

    def find_spec(
        self, fullname: str, path: Sequence[str] | None, target: ModuleType | None = None
    ) -> importlib.machinery.ModuleSpec | None:
        if fullname != _TARGET:
            return None
        _remove_hooks()
        for finder in sys.meta_path:
            find = getattr(finder, "find_spec", None)
            spec = find(fullname, path, target) if find is not None else None
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = _InstallAfterLoad(spec.loader)
                return spec
        return None


def _remove_hooks() -> None:
    # by class name: the .pth loads this file as its own module, and the package may load it again
    sys.meta_path[:] = [f for f in sys.meta_path if type(f).__name__ != _ImportHook.__name__]


def activate(environ: Mapping[str, str] = os.environ) -> None:
    """When ``DCP_CLOUD_INSTALL`` asks for it: install now if DCP is already imported, else
    when it is. Does nothing otherwise. Never raises."""
    try:
        if not requested(environ):
            return
        if _TARGET in sys.modules:
            install_from_env()
            return
        _remove_hooks()
        sys.meta_path.insert(0, _ImportHook())
    except Exception as exc:  # the interpreter must start whatever happens here
        sys.stderr.write(f"dcp_cloud: {ENV_VAR} is set but the auto-install hook failed: {exc!r}\n")


def pth_text(module_file: str | None = None) -> str:
    """The ``.pth`` file: reads the variable, and only when set loads this file and activates."""
    path = os.path.abspath(module_file or __file__)
    body = (
        "try:\n"
        " import importlib.util as u\n"
        f" s = u.spec_from_file_location('_dcp_cloud_autoinstall', {path!r})\n"
        " m = u.module_from_spec(s); sys.modules[s.name] = m; s.loader.exec_module(m); m.activate()\n"
        "except Exception as e:\n"
        " sys.modules.pop('_dcp_cloud_autoinstall', None)\n"
        f" sys.stderr.write('dcp_cloud: {ENV_VAR} is set but the auto-install hook could not load: %r\\n' % (e,))\n"
    )
    line = (
        f"import os, sys; exec({body!r}) "
        f"if os.environ.get({ENV_VAR!r}, '').strip().lower() in {tuple(sorted(_TRUE))!r} else None"
    )
    return f"{_MARKER}: does nothing unless {ENV_VAR}=1; remove with `python -m {MODULE} disable`\n{line}\n"


def site_packages() -> Path:
    """This environment's site-packages (where ``enable`` writes by default)."""
    return Path(sysconfig.get_paths()["purelib"])


def enable(directory: Path | None = None) -> Path:
    """Write the ``.pth`` file; returns its path."""
    target = (directory or site_packages()) / PTH_NAME
    if target.is_symlink() or (target.exists() and not _is_ours(target)):
        raise RuntimeError(
            f"{target} exists and was not written by dcp_cloud (or is a link); not replacing it. "
            "Remove it yourself if it is stale, then run enable again"
        )
    temp = target.with_name(f".{PTH_NAME}.{os.getpid()}.tmp")
    fd = os.open(temp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_NOFOLLOW", 0), 0o644)
    with os.fdopen(fd, "w") as handle:
        handle.write(pth_text())
    os.replace(temp, target)  # replaces the name itself, never a file a link points to
    return target


def _is_ours(path: Path) -> bool:
    try:
        return path.read_text(errors="replace").startswith(_MARKER)
    except OSError:
        return False


def disable(directory: Path | None = None) -> Path | None:
    """Remove the ``.pth`` file if it is ours; returns its path, or None when there was none."""
    target = (directory or site_packages()) / PTH_NAME
    if not target.exists():
        return None
    if not target.read_text().startswith(_MARKER):
        raise RuntimeError(f"{target} was not written by dcp_cloud; not removing it")
    target.unlink()
    return target


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=f"python -m {MODULE}",
        description=f"Make {ENV_VAR}=1 run dcp_cloud.install() in this environment's Python processes.",
    )
    parser.add_argument("command", choices=["enable", "disable", "status"])
    parser.add_argument(
        "--dir", type=Path, default=None, help="site-packages folder (default: this environment's)"
    )
    args = parser.parse_args(argv)
    if args.command == "enable":
        path = enable(args.dir)
        print(f"wrote {path}; set {ENV_VAR}=1 in the environment of the processes that should use dcp_cloud")
    elif args.command == "disable":
        removed = disable(args.dir)
        print(f"removed {removed}" if removed else "no hook installed")
    else:
        path = (args.dir or site_packages()) / PTH_NAME
        print(f"hook file: {path} ({'present' if path.exists() else 'absent'})")
        print(f"{ENV_VAR}={os.environ.get(ENV_VAR, '')!r} ({'on' if requested() else 'off'})")
        try:
            # option names only: values may hold credentials
            print(f"{OPTIONS_VAR}: options {', '.join(sorted(options())) or '(none)'}")
        except ValueError as exc:
            print(f"{OPTIONS_VAR}: invalid: {exc}")
            return 1
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
