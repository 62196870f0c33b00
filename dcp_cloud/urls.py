"""Recognising, checking and displaying checkpoint URLs.

One rule for every store: a checkpoint URL carries no credentials and no query string, and its
path is already in normal form. :func:`normalize_url` enforces it (refusing with
:class:`~dcp_cloud.errors.StoreConfigError` what it cannot normalize safely), so the URL a store
uses is the URL its messages show. :func:`redact_url` and :func:`scrub_text` keep credentials out
of anything displayed, whatever string reaches them.
"""

from __future__ import annotations

import os
import re
from collections.abc import Iterable
from typing import Any
from urllib.parse import unquote

from fsspec.registry import known_implementations, registry

from .errors import StoreConfigError

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")
#: schemes whose URLs name local files: a ``..`` there is the user's own path, normalized
LOCAL_SCHEMES = frozenset({"file", "local"})
#: Azure schemes where ``container@account.host`` is an authority, not user-info
_AZURE_SCHEMES = frozenset({"az", "abfs", "abfss", "adl", "wasb", "wasbs"})
_CONTAINER = re.compile(r"^(?:\$root|\$web|\$logs|[a-z0-9](?:[a-z0-9-]{1,61}[a-z0-9])?)$")
#: control characters (C0, DEL, C1), line and paragraph separators and bidirectional overrides:
#: in a URL or a displayed name they forge lines or reorder text on a terminal
_CONTROL = re.compile(r"[\x00-\x1f\x7f-\x9f\u2028\u2029\u200e\u200f\u202a-\u202e\u2066-\u2069]")
#: a scheme followed by ':' but not '//' (``s3:/bucket``): a mistyped URL, not a file name
_BARE_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]+):(?!//)")
_URL_IN_TEXT = re.compile(r"[a-zA-Z][a-zA-Z0-9+.-]*://[^\s'\"<>`]+")
_SECRET_FIELD = re.compile(
    r"(?i)\b(AccountKey|SharedAccessSignature|sig|signature|X-Amz-Signature|X-Amz-Credential|"
    r"X-Amz-Security-Token|access_token|token|secret|password)=([^&;\s'\"]+)"
)
_SECRET_NAME = re.compile(r"(?i)key|sig|token|secret|password|credential")
#: storage option names whose values are safe to show (all others are treated as secrets)
PUBLIC_OPTIONS = frozenset(
    {
        "endpoint_url",
        "endpoint",
        "region_name",
        "region",
        "project",
        "profile",
        "account_name",
        "account_host",
        "addressing_style",
        "signature_version",
        "mode",
        "location",
        "default_fill_cache",
        "version_aware",
    }
)
#: shown in place of a removed secret
MASK = "***"


def url_scheme(url: str) -> str:
    """The URL's scheme in lower case; ``file`` for a plain path."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else "file"


def _split(url: str) -> tuple[str, str] | None:
    """``(scheme://, rest)`` of a URL with a scheme, None for a plain path."""
    match = _SCHEME.match(url)
    return (match.group(0), url[match.end() :]) if match else None


def _is_port(text: str) -> bool:
    return text == "" or text.isdigit()


def _userinfo_end(scheme: str, rest: str) -> int | None:
    """Where the user-info part of ``rest`` (the URL after ``scheme://``, query removed) ends:
    the index of its ``@``, ``len(authority)`` when the whole authority looks like credentials
    without an ``@``, or None when there is no user-info.

    A password may hold ``@`` and ``/`` unencoded, so when the authority has a ``user:password``
    colon the user-info runs to the last ``@`` in the URL: that may hide part of a path holding
    ``@``, never part of a secret.
    """
    authority = rest.split("/", 1)[0]
    if "@" in authority:
        at = authority.rindex("@")
        if scheme in _AZURE_SCHEMES and _CONTAINER.match(authority[:at]):
            return None  # abfs://container@account.dfs.core.windows.net/...
        if ":" in authority[: authority.index("@")]:
            return rest.rindex("@")  # user:password, where the password may hold '@' and '/'
        return at
    if ":" in authority and not _is_port(authority.split(":", 1)[1]):
        return rest.rindex("@") if "@" in rest else len(authority)
    decoded = unquote(authority)
    if decoded != authority and ("@" in decoded or ":" in decoded):
        return len(authority)  # percent-encoded credentials: no bucket name holds '%'
    return None


def has_credentials(url: str) -> bool:
    """Whether ``url`` carries user-info (``user:password@``) that may be a credential."""
    parts = _split(url)
    if parts is None:
        return False
    prefix, rest = parts
    return _userinfo_end(prefix[:-3].lower(), rest.split("?", 1)[0]) is not None


def redact_url(url: str | os.PathLike[str]) -> str:
    """``url`` without credentials: its user-info part and query string removed.

    A plain local path is returned as it is (``?`` is an ordinary character in a file name).
    """
    url = os.fspath(url)
    parts = _split(url)
    if parts is None:
        return url
    prefix, rest = parts
    rest = rest.split("?", 1)[0]
    end = _userinfo_end(prefix[:-3].lower(), rest)
    if end is None:
        return prefix + rest
    if end < len(rest) and rest[end] == "@":
        return prefix + rest[end + 1 :]
    return prefix + MASK + rest[end:]


def scrub_text(text: str, secrets: Iterable[str] = ()) -> str:
    """``text`` with every URL in it redacted, ``key=value`` credential fields masked, and each
    of ``secrets`` (strings of 4 characters or more) replaced by ``***``.

    For messages that may embed what a client library put there (endpoint URLs, request URLs
    with SAS tokens, the options it was given).
    """
    for secret in sorted({s for s in secrets if len(s) >= 4}, key=len, reverse=True):
        text = text.replace(secret, MASK)
    text = _URL_IN_TEXT.sub(_redact_match, text)
    return _SECRET_FIELD.sub(lambda m: f"{m.group(1)}={MASK}", text)


def _redact_match(match: re.Match[str]) -> str:
    """A URL found in text, redacted; punctuation that closes the sentence around it is kept
    out of the URL (``(see http://host:9000).``)."""
    url = match.group(0)
    body = url.rstrip(").,;:]}")
    return redact_url(body) + url[len(body) :]


def printable(text: str) -> str:
    """``text`` with control characters, line separators and direction overrides written as
    escapes (``\\x1b``, ``\\u202e``), for showing names that come from a store on one line
    of a terminal or a log."""
    return _CONTROL.sub(lambda m: m.group(0).encode("unicode_escape").decode("ascii"), text)


def secret_values(value: Any, name: str = "") -> list[str]:
    """What must never be displayed of ``value`` (storage options: dicts, lists, nested): every
    string, except under option names known to hold no secret (``endpoint_url``, ``region_name``,
    ``account_name``, ...), where only the user-info and query of a URL count."""
    found: list[str] = []
    if isinstance(value, str):
        if name.lower() not in PUBLIC_OPTIONS:
            found.append(value)
            found.extend(_connection_string_secrets(value))
        found.extend(url_secrets(value))
    elif isinstance(value, dict):
        for key, item in value.items():
            found.extend(secret_values(item, str(key)))
    elif isinstance(value, (list, tuple, set, frozenset)):
        for item in value:
            found.extend(secret_values(item, name))
    return found


def _connection_string_secrets(value: str) -> list[str]:
    """The credential fields of an Azure-style connection string (``AccountKey=...;``), which a
    client may show on their own."""
    if ";" not in value or "=" not in value:
        return []
    fields = (part.partition("=") for part in value.split(";"))
    return [v for k, _, v in fields if v and _SECRET_NAME.search(k)]


def url_secrets(url: str) -> list[str]:
    """The user-info and query string of ``url`` (and their decoded forms), if any."""
    parts = _split(url)
    if parts is None:
        return []
    prefix, rest = parts
    path, sep, query = rest.partition("?")
    found = [query, unquote(query)] if sep else []
    end = _userinfo_end(prefix[:-3].lower(), path)
    if end is not None:
        userinfo = path[:end]
        found += [userinfo, unquote(userinfo), *userinfo.split(":", 1)]
        found += [unquote(piece) for piece in userinfo.split(":", 1)]
    return [s for s in found if s]


def normalize_url(url: str | os.PathLike[str], local_paths: bool = True) -> str:
    """The checkpoint URL in the one form every store uses and every message shows.

    - The scheme is written in lower case (``S3://b/x`` is ``s3://b/x``).
    - A local path (plain, ``file://`` or ``local://``) becomes absolute with
      :func:`os.path.expanduser` and :func:`os.path.abspath` (``~``, ``..`` and ``.`` resolved,
      trailing ``/`` dropped).
    - Any other URL keeps its text, less leading and trailing ``/`` after ``scheme://``
      (``s3:///b/x`` is ``s3://b/x``); it is refused when it carries credentials as user-info
      (``s3://key:secret@bucket/...``), a query string (``?...``), ``.``/``..``/empty path
      segments (``s3://b/a/../c``, ``s3://b/a//c``, also percent-encoded) or backslashes, since
      object stores take those literally as part of a key while a reader would take them as a
      path.
    - Refused everywhere: control characters, line separators and bidirectional overrides
      (they forge lines in logs and terminals), whitespace around a URL with a scheme, and a
      known scheme without ``//`` (``s3:/bucket/run``), which would otherwise name a local
      folder called ``s3:``.

    ``local_paths=False`` is for a plain path handed to a filesystem object that is not local
    (``"bucket/run"`` with an ``S3FileSystem``): it is checked like the path of a URL.

    Raises :class:`StoreConfigError` saying what to change; the message never shows the
    credentials or the query.
    """
    url = os.fspath(url)
    if not isinstance(url, str):
        raise StoreConfigError(f"the checkpoint URL must be a str, not {type(url).__name__}")
    if not url:
        raise StoreConfigError("the checkpoint URL is empty; pass e.g. 's3://bucket/run1/step-100'")
    shown = redact_url(url)
    _check_characters(url, shown)
    parts = _split(url)
    if parts is None:
        _check_bare_scheme(url, shown)
        if local_paths:
            return os.path.abspath(os.path.expanduser(url))
        _check_segments(url.strip("/"), shown)
        return url.rstrip("/") or url
    prefix, rest = parts
    scheme = prefix[:-3].lower()
    prefix = scheme + "://"
    if has_credentials(url):
        raise StoreConfigError(
            f"{shown}: the URL carries credentials before '@' (user-info); dcp_cloud never takes "
            "credentials from a URL. Remove them from the URL and pass them in storage_options "
            '(S3: {"key": ..., "secret": ...}; Azure: {"account_name": ..., "sas_token": ...}) or '
            "through the store's standard environment variables."
        )
    if "?" in rest:
        raise StoreConfigError(
            f"{shown}: the URL has a query string ('?...'), which the store would take as part of "
            "the object keys. Remove it; pass SAS tokens, versions and other options in "
            "storage_options instead."
        )
    if scheme in LOCAL_SCHEMES:
        return prefix + os.path.abspath(os.path.expanduser(rest or "."))
    rest = rest.strip("/")
    _check_segments(rest, shown)
    if scheme in _AZURE_SCHEMES:
        _check_azure_path(rest, shown)
    return prefix + rest


def _check_characters(url: str, shown: str) -> None:
    """Refuse control and direction characters anywhere, and whitespace around a URL."""
    if _CONTROL.search(url):
        raise StoreConfigError(
            f"{shown!r}: the URL holds a control character (newline, tab, line separator, "
            "direction override, ...); remove it"
        )
    stripped = url.strip()
    if stripped != url and _SCHEME.match(stripped):
        raise StoreConfigError(
            f"{shown!r}: the URL has leading or trailing whitespace, which would become part of "
            "the path or make it a local folder name; remove it"
        )


def _check_bare_scheme(path: str, shown: str) -> None:
    """Refuse ``s3:/bucket`` and ``file:/tmp/x``: a known scheme missing its ``//``."""
    match = _BARE_SCHEME.match(path)
    if match is None:
        return
    scheme = match.group(1).lower()
    if scheme in known_implementations or scheme in registry or scheme in LOCAL_SCHEMES:
        raise StoreConfigError(
            f"{shown}: {scheme}: is not followed by '//', so this would name a local folder "
            f"called {match.group(0)!r}. Write {scheme}://... (a local file: a plain path or "
            "file:///absolute/path)."
        )


def _check_segments(path: str, shown: str) -> None:
    """Refuse empty, ``.`` and ``..`` segments (also percent-encoded, ``%2F..%2F`` included)
    and backslashes in ``path`` (a URL's path, no leading ``/``)."""
    if "\\" in path:
        raise StoreConfigError(
            f"{shown}: the URL holds a backslash; some stores read it as a path separator and "
            "others keep it in the key. Write the URL with '/' only."
        )
    if path:
        for segment in path.split("/"):
            if segment == "":
                raise StoreConfigError(
                    f"{shown}: the URL has an empty path segment ('//'); object stores keep it as "
                    "part of the key. Write the URL with single slashes."
                )
            decoded = re.split(r"[/\\]", unquote(segment))
            if any(piece in (".", "..") for piece in decoded):
                raise StoreConfigError(
                    f"{shown}: the URL has a {segment!r} path segment; object stores keep it "
                    "literally as part of the key. Write the URL without '.' and '..' segments."
                )


def _check_azure_path(path: str, shown: str) -> None:
    """Refuse what Azure does not keep as written: a segment ending in ``.`` (Azure advises
    against names ending in a dot, which URL normalization may drop), and ``container@account``
    without the account's host name (adlfs ignores such an account and uses the one from the
    options, so the URL would not say where the data is)."""
    authority, _, rest = path.partition("/")
    if any(segment.endswith(".") for segment in rest.split("/")):
        raise StoreConfigError(
            f"{shown}: a path segment ends with '.', which Azure may drop from blob names; "
            "rename it without the trailing dot."
        )
    if "@" in authority and "." not in authority.rsplit("@", 1)[1]:
        raise StoreConfigError(
            f"{shown}: write the account as its host name (container@ACCOUNT.blob.core.windows.net "
            "or container@ACCOUNT.dfs.core.windows.net), or use az://container/... with "
            'storage_options {"account_name": ...}.'
        )


def is_supported_url(url: str) -> bool:
    """Whether ``url`` is a local path or uses a scheme some fsspec backend knows."""
    if not url:
        return False
    if not _SCHEME.match(url):
        return True
    scheme = url_scheme(url)
    return scheme in known_implementations or scheme in registry


def is_usable_url(url: str) -> bool:
    """Whether ``url`` is supported (:func:`is_supported_url`) and passes :func:`normalize_url`."""
    if not is_supported_url(url):
        return False
    try:
        normalize_url(url)
    except StoreConfigError:
        return False
    return True
