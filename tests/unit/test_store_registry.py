"""Which store a filesystem gets: by its type (subclasses included), never by its class name."""

from __future__ import annotations

import subprocess
import sys

import pytest
import s3fs
from fsspec.implementations.memory import MemoryFileSystem

from dcp_cloud.errors import StoreConfigError
from dcp_cloud.store import open_store
from dcp_cloud.store.azure import AzureBlobStore
from dcp_cloud.store.fsspec_store import FsspecStore
from dcp_cloud.store.gcs import GCSStore
from dcp_cloud.store.s3 import S3Store


class _MyS3(s3fs.S3FileSystem):
    pass


class S3FileSystem(MemoryFileSystem):  # named like s3fs's class, but not one
    pass


def test_an_s3fs_subclass_gets_the_s3_store() -> None:
    fs = _MyS3(anon=True, endpoint_url="http://127.0.0.1:1")
    store = open_store("s3://bucket/run", filesystem=fs)
    assert type(store) is S3Store
    assert store.place.bucket == "bucket" and store.place.full_key("k") == "run/k"
    with pytest.raises(StoreConfigError, match="bucket"):
        open_store("s3://", filesystem=fs)


def test_a_class_named_like_s3fs_gets_the_generic_store() -> None:
    assert type(open_store("memory://x", filesystem=S3FileSystem())) is FsspecStore


def test_cloud_stores_do_not_inherit_the_generic_store() -> None:
    for store in (S3Store, GCSStore, AzureBlobStore):
        assert not issubclass(store, FsspecStore), store


def test_matching_a_filesystem_imports_no_unused_cloud_library() -> None:
    code = (
        "import sys; from dcp_cloud.store import open_store; open_store('memory://x/y'); "
        "open_store('/tmp/dcp-cloud-registry-probe'); "
        "print(sorted(m for m in ('gcsfs', 'adlfs', 's3fs') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]", out.stdout + out.stderr
