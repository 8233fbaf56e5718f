"""Seals of published index versions: the manifest digest, an optional HMAC, LATEST and SEAL.

A version is sealed by the sha256 of its ``manifest.json`` bytes as stored (manifests
are written as canonical JSON, so the digest is stable). Two small text objects carry
the seal, both written by the publish step and read by query nodes:

- ``INDEX_ROOT/LATEST``: ``"<version> sha256:<hex>[ hmac-sha256:<hex>]\\n"``, the
  version served by default and the digest its manifest must have.
- ``INDEX_ROOT/<version>/SEAL``: ``"sha256:<hex>[ hmac-sha256:<hex>]\\n"``, checked
  when a version is opened by name (``query --version V``).

The HMAC-SHA256 is over the ASCII string ``"<version> sha256:<digest>"`` with the key
in ``XMODAL_INDEX_SIGNING_KEY`` (its UTF-8 bytes). A query node with that variable set
accepts only versions carrying a valid HMAC; without it, the HMAC is not checked.

Both objects are read bounded (never more than :data:`MAX_RECORD_BYTES`), a local
LATEST or SEAL that is a symlink or not a regular file is refused, and error messages
echo at most a short, sanitised prefix of what was read.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import hmac
import os
import re
import stat
from typing import IO

from .. import storage
from ..errors import IndexVersionError, ObjectNotFoundError, StorageError

LATEST_NAME = "LATEST"
SEAL_NAME = "SEAL"
SIGNING_KEY_ENV = "XMODAL_INDEX_SIGNING_KEY"
MAX_RECORD_BYTES = 256
VERSION_PATTERN = r"v\d{6,12}"
_ECHO_CHARS = 24

_HEX64 = r"[0-9a-f]{64}"
_LATEST_RE = re.compile(rf"({VERSION_PATTERN})(?: sha256:({_HEX64})(?: hmac-sha256:({_HEX64}))?)?\n?")
_SEAL_RE = re.compile(rf"sha256:({_HEX64})(?: hmac-sha256:({_HEX64}))?\n?")
_DIGEST_RE = re.compile(_HEX64)
_SAFE_CHARS = re.compile(r"[^A-Za-z0-9._:\- ]")


@dataclasses.dataclass(frozen=True)
class LatestRecord:
    """What LATEST says: the version, its manifest digest (None in a LATEST written
    before digests were recorded: such a version must be republished) and the HMAC."""

    version: str
    digest: str | None
    signature: str | None


def sanitise(text: str | bytes, limit: int = _ECHO_CHARS) -> str:
    """A short, printable prefix of untrusted text, for one-line error messages."""
    if isinstance(text, bytes):
        text = text[: limit * 4].decode("utf-8", errors="replace")
    head = _SAFE_CHARS.sub("?", text[:limit])
    return repr(head + ("..." if len(text) > limit else ""))


def manifest_digest(data: bytes) -> str:
    """sha256 hex of the manifest.json bytes as stored."""
    return hashlib.sha256(data).hexdigest()


def _message(version: str, digest: str) -> bytes:
    return f"{version} sha256:{digest}".encode("ascii")


def sign(version: str, digest: str, key: bytes | None) -> str | None:
    """HMAC-SHA256 (hex) over ``"<version> sha256:<digest>"``; None without a key."""
    if key is None:
        return None
    _check_fields(version, digest)
    return hmac.new(key, _message(version, digest), hashlib.sha256).hexdigest()


def verify_signature(version: str, digest: str, signature: str | None, key: bytes) -> bool:
    """True when ``signature`` is the HMAC of (version, digest) under ``key``."""
    if signature is None:
        return False
    expected = sign(version, digest, key)
    return expected is not None and hmac.compare_digest(expected, signature)


def _check_fields(version: str, digest: str, signature: str | None = None) -> None:
    if not isinstance(version, str) or not re.fullmatch(VERSION_PATTERN, version):
        raise IndexVersionError(f"{sanitise(str(version))} is not a version name (expected v000001, v000002, ...)")
    if not isinstance(digest, str) or not _DIGEST_RE.fullmatch(digest):
        raise IndexVersionError(f"{sanitise(str(digest))} is not a sha256 hex digest")
    if signature is not None and (not isinstance(signature, str) or not _DIGEST_RE.fullmatch(signature)):
        raise IndexVersionError(f"{sanitise(str(signature))} is not an hmac-sha256 hex digest")


def format_latest(version: str, digest: str, signature: str | None) -> str:
    """``"<version> sha256:<hex>[ hmac-sha256:<hex>]\\n"``."""
    _check_fields(version, digest, signature)
    sig = f" hmac-sha256:{signature}" if signature else ""
    return f"{version} sha256:{digest}{sig}\n"


def parse_latest(text: str | bytes) -> LatestRecord:
    """Parse LATEST's content strictly; IndexVersionError (one line) for anything else.

    A bare version name (the format before digests) parses with ``digest=None``.
    """
    if len(text) > MAX_RECORD_BYTES:
        raise IndexVersionError(f"LATEST holds more than {MAX_RECORD_BYTES} bytes "
                                f"(starts {sanitise(text)}); it must name one version")
    if isinstance(text, bytes):
        try:
            text = text.decode("ascii")
        except UnicodeDecodeError:
            raise IndexVersionError(f"LATEST is not ASCII text naming a version (starts {sanitise(text)})") from None
    match = _LATEST_RE.fullmatch(text)
    if match is None:
        raise IndexVersionError(f"LATEST does not name a version as '<version> sha256:<hex>' "
                                f"(starts {sanitise(text)})")
    return LatestRecord(match.group(1), match.group(2), match.group(3))


def read_at_most(f: IO[bytes], limit: int) -> bytes:
    """At most ``limit`` bytes of ``f``; a buffered reader is read through its raw
    stream so that no more than ``limit`` bytes are ever requested."""
    raw = getattr(f, "raw", f)
    parts: list[bytes] = []
    got = 0
    while got < limit:
        chunk = raw.read(min(limit - got, 1 << 20))
        if not chunk:
            break
        parts.append(chunk)
        got += len(chunk)
    return b"".join(parts)


def _read_bounded(uri: str, what: str) -> bytes | None:
    """At most MAX_RECORD_BYTES of a small record; None when absent. A local symlink,
    a non-regular file or a larger object is refused."""
    limit = MAX_RECORD_BYTES
    if storage.is_s3(uri):
        try:
            with storage.open_read(uri) as f:
                data = read_at_most(f, limit + 1)
        except ObjectNotFoundError:
            return None
    else:
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0)
        try:
            fd = os.open(path, flags)
        except FileNotFoundError:
            if os.path.islink(path):
                raise IndexVersionError(f"{what} {uri!r} is a symlink; refusing to follow it") from None
            return None
        except OSError as err:
            if err.errno == errno.ELOOP:
                raise IndexVersionError(f"{what} {uri!r} is a symlink; refusing to follow it") from None
            raise StorageError(f"cannot read {what} {uri!r}: {err.strerror}") from err
        try:
            st = os.fstat(fd)
            if not stat.S_ISREG(st.st_mode):
                raise IndexVersionError(f"{what} {uri!r} is not a regular file")
            data = os.read(fd, limit + 1)
        finally:
            os.close(fd)
    if len(data) > limit:
        raise IndexVersionError(f"{what} {uri!r} holds more than {limit} bytes; refusing it")
    return data


def read_latest_record(index_root: str) -> LatestRecord | None:
    """The parsed LATEST of ``index_root``; None when nothing was published yet."""
    uri = storage.join(index_root, LATEST_NAME)
    data = _read_bounded(uri, "LATEST")
    if data is None:
        return None
    try:
        return parse_latest(data)
    except IndexVersionError as err:
        raise IndexVersionError(f"{uri}: {err}") from None


def seal_uri(index_root: str, version: str) -> str:
    return storage.join(index_root, version, SEAL_NAME)


def write_seal(index_root: str, version: str, digest: str, signature: str | None) -> None:
    """Write ``<version>/SEAL`` (``sha256:<hex>[ hmac-sha256:<hex>]``) beside manifest.json."""
    _check_fields(version, digest, signature)
    sig = f" hmac-sha256:{signature}" if signature else ""
    storage.write_bytes(seal_uri(index_root, version), f"sha256:{digest}{sig}\n".encode("ascii"))


def read_seal(index_root: str, version: str) -> tuple[str, str | None]:
    """(digest, signature) from ``<version>/SEAL``; IndexVersionError when absent or malformed."""
    if not isinstance(version, str) or not re.fullmatch(VERSION_PATTERN, version):
        raise IndexVersionError(f"{sanitise(str(version))} is not a version name (expected v000001, v000002, ...)")
    uri = seal_uri(index_root, version)
    data = _read_bounded(uri, "SEAL")
    if data is None:
        raise IndexVersionError(f"version {version} has no SEAL ({uri}): it was published before manifests "
                                f"were sealed; republish it with `xmodal-index promote {version} --index ...`")
    try:
        match = _SEAL_RE.fullmatch(data.decode("ascii"))
    except UnicodeDecodeError:
        match = None
    if match is None:
        raise IndexVersionError(f"{uri} is not 'sha256:<hex>[ hmac-sha256:<hex>]' (starts {sanitise(data)})")
    return match.group(1), match.group(2)


def signing_key_from_env(environ: dict[str, str] | None = None) -> bytes | None:
    """The HMAC key from ``XMODAL_INDEX_SIGNING_KEY`` (its UTF-8 bytes); None when unset.

    A variable that is set but empty is an error, not "no signing": a deployment that
    meant to require signatures must not silently accept unsigned versions.
    """
    env = os.environ if environ is None else environ
    value = env.get(SIGNING_KEY_ENV)
    if value is None:
        return None
    if not value.strip():
        raise IndexVersionError(f"{SIGNING_KEY_ENV} is set but empty; unset it or give a key "
                                "(e.g. `openssl rand -hex 32`)")
    return value.encode("utf-8")
