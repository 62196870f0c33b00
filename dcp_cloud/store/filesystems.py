"""One filesystem, and so one client, per store configuration and process.

Building a cloud client is the largest fixed cost of a small save or load: botocore loads its
service model, a connection pool and credentials are set up, TLS sessions are negotiated. fsspec
caches filesystems too, but per thread (a save from a background thread, as ``async_save``
makes, builds a new client each time) and not when a caller skips its cache. This cache keeps
one filesystem per configuration for the whole process, whichever thread asks.

What may share a filesystem: the same filesystem class, the same options (endpoint,
credentials, client settings, the same objects where options hold objects such as credential
providers), the same options taken from the URL, and the same credential-bearing environment
variables, and the same contents of the credential files those name (``~/.aws/credentials``,
``GOOGLE_APPLICATION_CREDENTIALS``, a ``token`` file, ...). Anything else gets its own. Keys
are keyed digests (HMAC with a per-process random key), so a key reveals nothing of the
credentials; the filesystems themselves hold their options, as any fsspec filesystem does.

After a fork the child starts with an empty cache: a filesystem's sessions belong to the
parent's event loop thread, which the child does not have. The parent's entries are kept
referenced in the child (never used), so collecting them does not run their finalizers
against the parent's loop.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any

#: environment variables that choose credentials, endpoints, regions or proxies for the
#: cloud clients: a change in any of them gets a new client
_ENV_PREFIXES = ("AWS_", "BOTO_", "GOOGLE_", "GCE_", "GCSFS_", "CLOUDSDK_", "AZURE_", "MSI_", "IDENTITY_")
_ENV_NAMES = ("STORAGE_EMULATOR_HOST", "HTTP_PROXY", "HTTPS_PROXY", "NO_PROXY", "ALL_PROXY")

#: filesystems kept at once; the least recently used is dropped past it (its client closes
#: when no store holds it any more)
CAPACITY = 16


#: keys the digests: a configuration key cannot be tested against guessed secrets offline
_DIGEST_KEY = os.urandom(32)
#: bytes of a credential file that take part in the key
_FILE_PREFIX = 1 << 20


def owned(value: Any) -> Any:
    """``value`` with its dicts, lists and tuples copied all the way down (any other object is
    kept as it is): a caller who edits the options it passed cannot change a cached client."""
    if isinstance(value, Mapping):
        return {k: owned(v) for k, v in value.items()}
    if isinstance(value, list):
        return [owned(v) for v in value]
    if isinstance(value, tuple):
        return tuple(owned(v) for v in value)
    return value


def _credential_files(options: Mapping[str, Any]) -> list[list[str]]:
    """The credential files a client of these options may read, each with a digest of its
    contents: a file rewritten with other credentials gets a new client."""
    env = os.environ
    gcloud = env.get("CLOUDSDK_CONFIG") or os.path.join("~", ".config", "gcloud")
    paths = [
        env.get("AWS_SHARED_CREDENTIALS_FILE") or os.path.join("~", ".aws", "credentials"),
        env.get("AWS_CONFIG_FILE") or os.path.join("~", ".aws", "config"),
        env.get("GOOGLE_APPLICATION_CREDENTIALS"),
        os.path.join(gcloud, "application_default_credentials.json"),
    ]
    token = options.get("token")
    if isinstance(token, (str, os.PathLike)):
        paths.append(os.fspath(token))
    files = []
    for path in paths:
        if not path:
            continue
        full = os.path.abspath(os.path.expanduser(str(path)))
        try:
            with open(full, "rb") as f:
                digest = hashlib.sha256(f.read(_FILE_PREFIX)).hexdigest()
        except OSError:
            digest = ""
        files.append([full, digest])
    return files


def _environment() -> list[tuple[str, str]]:
    """The environment variables that may change what a client does, sorted."""
    return sorted(
        (name, value)
        for name, value in os.environ.items()
        if name.upper().startswith(_ENV_PREFIXES) or name.upper() in _ENV_NAMES
    )


def _canonical(value: Any, objects: list[Any]) -> Any:
    """``value`` as JSON-able data; any object that is not plain data (a credential provider,
    a session) stands for itself by identity and is appended to ``objects``."""
    if value is None or isinstance(value, (bool, int, float, str)):
        return [type(value).__name__, value]
    if isinstance(value, bytes):
        return ["bytes", value.hex()]
    if isinstance(value, Mapping) and all(isinstance(k, str) for k in value):
        return ["dict", [[k, _canonical(value[k], objects)] for k in sorted(value)]]
    if isinstance(value, (list, tuple)):
        return [type(value).__name__, [_canonical(v, objects) for v in value]]
    objects.append(value)
    return ["object", f"{type(value).__module__}.{type(value).__qualname__}", id(value)]


def configuration_key(cls: type, options: Mapping[str, Any]) -> tuple[str, list[Any]]:
    """A digest of everything that configures a filesystem of class ``cls`` with ``options``
    (the URL's own options included), and the objects it identifies by identity: the cache
    must keep those alive while the key is in use, so that no other object takes their id."""
    objects: list[Any] = []
    document = [
        f"{cls.__module__}.{cls.__qualname__}",
        _canonical(dict(options), objects),
        _environment(),
        _credential_files(options.get("options", options)),
    ]
    body = json.dumps(document, separators=(",", ":")).encode()
    return hmac.new(_DIGEST_KEY, body, hashlib.sha256).hexdigest(), objects


class FilesystemCache:
    """Filesystems by configuration key, shared by all threads of one process."""

    def __init__(self, capacity: int = CAPACITY) -> None:
        self.capacity = capacity
        #: filesystems built by this cache in this process (a miss each)
        self.built = 0
        self._entries: OrderedDict[str, tuple[Any, list[Any]]] = OrderedDict()
        self._lock = threading.Lock()
        self._pid = os.getpid()
        self._inherited: list[Any] = []

    def get(self, key: str, objects: list[Any], build: Callable[[], Any]) -> Any:
        """The filesystem for ``key``; ``build()`` makes it on a miss (under the lock, so two
        threads never build the same configuration twice)."""
        with self._lock:
            self._check_process()
            entry = self._entries.get(key)
            if entry is not None:
                self._entries.move_to_end(key)
                return entry[0]
            filesystem = build()
            self.built += 1
            self._entries[key] = (filesystem, objects)
            while len(self._entries) > self.capacity:
                self._entries.popitem(last=False)
            return filesystem

    def clear(self) -> None:
        """Forget every filesystem (their clients close once no store holds them)."""
        with self._lock:
            self._entries.clear()

    def __len__(self) -> int:
        with self._lock:
            self._check_process()
            return len(self._entries)

    def _check_process(self) -> None:
        if self._pid != os.getpid():
            self._after_fork()

    def _after_fork(self) -> None:
        # Called in a fresh child: the lock may have been held by a parent thread at the fork.
        self._lock = threading.Lock()
        self._inherited.extend(entry[0] for entry in self._entries.values())
        self._entries = OrderedDict()
        self._pid = os.getpid()


#: the process's cache
FILESYSTEMS = FilesystemCache()

if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=FILESYSTEMS._after_fork)
