"""Recognising and displaying checkpoint URLs."""

from __future__ import annotations

import re

import fsspec.registry

_SCHEME = re.compile(r"^([a-zA-Z][a-zA-Z0-9+.-]*)://")


def url_scheme(url: str) -> str:
    """The URL's scheme in lower case; ``file`` for a plain path."""
    match = _SCHEME.match(url)
    return match.group(1).lower() if match else "file"


def redact_url(url: str) -> str:
    """The URL without credentials in its user-info part or query string."""
    url = re.sub(r"^([a-zA-Z][a-zA-Z0-9+.-]*://)[^/@]*@", r"\1", url)
    return url.split("?", 1)[0]


def is_supported_url(url: str) -> bool:
    """Whether ``url`` is a local path or uses a scheme some fsspec backend knows."""
    if not url:
        return False
    if not _SCHEME.match(url):
        return True
    scheme = url_scheme(url)
    return scheme in fsspec.registry.known_implementations or scheme in fsspec.registry.registry
