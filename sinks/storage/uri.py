"""The URI forms storage understands: local paths, ``file://`` and ``s3://``."""

from __future__ import annotations

import os

from ..errors import StorageError


def is_s3(uri: str) -> bool:
    return uri.startswith("s3://")


def filesystem_path(uri: str) -> str:
    """The filesystem path of a local path or ``file://`` URI; any other scheme is an error."""
    if uri.startswith("file://"):
        return uri[len("file://"):]
    if "://" in uri:
        raise StorageError(f"unsupported URI scheme in {uri!r}: use a local path, file:// or s3://")
    return uri


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for p in parts:
        out = out + "/" + p.strip("/")
    return out


def normalize_uri(uri: str) -> str:
    """One spelling per location, for comparing with listed URIs: a local path or
    file:// URI becomes the absolute local path (listings return absolute paths);
    s3:// URIs are returned as given."""
    if is_s3(uri):
        return uri
    return os.path.abspath(filesystem_path(uri))
