"""A local server in a child process on 127.0.0.1: start, wait until it answers, stop."""

from __future__ import annotations

import abc
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def find_executable(name: str, env_var: str) -> str | None:
    """``$env_var``, else ``name`` on PATH, else ``name`` beside this Python (a virtualenv's bin)."""
    explicit = os.environ.get(env_var)
    if explicit:
        return explicit
    found = shutil.which(name)
    if found:
        return found
    beside = Path(sys.executable).parent / name
    return str(beside) if beside.exists() else None


class ChildServer(abc.ABC):
    """Base of the local test servers: a command run in a child process, answering over HTTP.

    Subclasses set ``name`` and implement ``command``; ``probe_url`` is the URL polled until the
    server answers. Usable as a context
    manager; ``stop`` always removes the server's temporary folder.
    """

    name = "server"

    def __init__(self, port: int | None = None) -> None:
        self.port = port or free_port()
        self.workdir = tempfile.mkdtemp(prefix=f"dcp-cloud-{self.name}-")
        self._process: subprocess.Popen[bytes] | None = None

    @property
    def endpoint_url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @abc.abstractmethod
    def command(self) -> list[str]:
        """The server's command line."""

    def probe_url(self) -> str:
        return self.endpoint_url + "/"

    def environment(self) -> dict[str, str]:
        return dict(os.environ)

    def start(self, timeout: float = 60.0) -> Any:
        log = open(os.path.join(self.workdir, "server.log"), "wb")
        try:
            self._process = subprocess.Popen(
                self.command(),
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                env=self.environment(),
                cwd=self.workdir,
            )
        finally:
            log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                output = self.log_tail()
                self.stop()
                raise RuntimeError(f"{self.name} exited with code {self._process_code}: {output}")
            try:
                urllib.request.urlopen(self.probe_url(), timeout=1).close()
                return self
            except urllib.error.HTTPError:  # it answers, if not to an anonymous probe
                return self
            except OSError:
                time.sleep(0.1)
        output = self.log_tail()
        self.stop()
        raise RuntimeError(f"{self.name} did not answer on {self.endpoint_url} within {timeout} s: {output}")

    _process_code: int | None = None

    def log_tail(self, limit: int = 2000) -> str:
        try:
            with open(os.path.join(self.workdir, "server.log"), "rb") as log:
                return log.read()[-limit:].decode(errors="replace")
        except OSError:
            return ""

    def stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.terminate()
                try:
                    self._process.wait(timeout=10)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process_code = self._process.returncode
        self._process = None
        shutil.rmtree(self.workdir, ignore_errors=True)

    def __enter__(self) -> Any:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
