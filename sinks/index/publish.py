"""THE PUBLISH STEP: the one writer of ``LATEST`` (and of ``HIGHWATER``) in the code base.

A version becomes visible when LATEST names it. Every path that moves LATEST (the
end of `run`, `promote` and rollbacks, ``build_version(publish=True)`` for library
users) calls :func:`publish`, which:

1. reads the version's ``manifest.json`` bytes, takes their sha256 (the digest that
   LATEST and the version's ``SEAL`` record) and checks the SEAL agrees (writing it
   when the version has none, e.g. one built before seals existed); with
   ``XMODAL_INDEX_SIGNING_KEY`` set, signs (version, digest);
2. checks that every file the manifest lists is present at its size, and with
   ``verify_sha256`` that its sha256 matches (a version left by a crashed run, or an
   old one being promoted, is read back in full);
3. applies the publish gate (optional: `promote` is the operator's decision);
4. confirms the caller still holds the workdir lease (``Lease.check``), then writes
   LATEST with a compare-and-swap against the value the caller read before it
   built (:class:`LatestState`): ``create_if_absent`` when there was no LATEST,
   ``replace_if_match`` otherwise. A writer that lost its lease, or whose LATEST
   was moved by someone else meanwhile, moves nothing: :class:`LatestMovedError`
   or ``LeaseLostError``, one line each.

Version numbers come from :func:`reserve_version`: ``HIGHWATER`` holds the highest
number ever handed out and only grows (compare-and-swap too), so a number freed by
`gc` is never reused.

LATEST holds one line, ``<version> sha256:<manifest digest>[ hmac-sha256:<hex>]``
(``seal.format_latest``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import logging
import os
from typing import Protocol

from .. import storage
from ..errors import (
    ChecksumMismatchError,
    IndexVersionError,
    ObjectNotFoundError,
    PreconditionFailedError,
)
from . import manifest as mf
from . import seal
from .publish_gate import (
    Deletion,
    GateConfig,
    GateDecision,
    gate,
)

logger = logging.getLogger(__name__)

HIGHWATER_NAME = "HIGHWATER"
_MAX_HIGHWATER_BYTES = 64


class LatestMovedError(IndexVersionError):
    """LATEST changed between the caller's read and its publish: another writer won."""


class HighWaterError(IndexVersionError):
    """HIGHWATER is unreadable, or moved while a version number was being reserved."""


class _Fence(Protocol):
    """What the publish step needs of the workdir lease (sinks.storage.lease.Lease)."""

    @property
    def generation(self) -> int: ...

    def check(self) -> None: ...


# ---------------------------------------------------------------- LATEST as read


@dataclasses.dataclass(frozen=True)
class LatestState:
    """LATEST at one moment: what it said and its storage version token (both None
    when nothing was published). A publish swaps against exactly this state."""

    record: seal.LatestRecord | None
    token: str | None

    @property
    def version(self) -> str | None:
        return None if self.record is None else self.record.version


def latest_uri(index_root: str) -> str:
    return storage.join(index_root, seal.LATEST_NAME)


def read_state(index_root: str, *, replace_unreadable: bool = False) -> LatestState:
    """LATEST with its version token, parsed strictly (bounded: a LATEST larger than
    seal.MAX_RECORD_BYTES, or not a version record, raises IndexVersionError).

    replace_unreadable: instead, give an unreadable LATEST as "names nothing" with
    its token, so that `promote` can replace it (still by compare-and-swap).
    """
    try:
        record = seal.read_latest_record(index_root)  # bounded, refuses symlinks and junk
    except IndexVersionError as err:
        if not replace_unreadable:
            raise
        logger.warning("replacing an unreadable LATEST: %s", err)
        return LatestState(None, _token_of_unreadable(latest_uri(index_root)))
    if record is None:
        return LatestState(None, None)
    try:
        data, token = storage.read_versioned(latest_uri(index_root))
    except ObjectNotFoundError:
        return LatestState(None, None)  # removed since: publishing creates it
    current = seal.parse_latest(data)
    return LatestState(current, token)


def _token_of_unreadable(uri: str) -> str | None:
    """The version token of a LATEST that does not parse (None when it is gone). A
    local LATEST that is a symlink or not a regular file is unlinked first (its
    target is never read), so the swap creates a plain file in its place."""
    if not storage.is_s3(uri):
        path = uri[len("file://"):] if uri.startswith("file://") else uri
        if os.path.islink(path) or (os.path.lexists(path) and not os.path.isfile(path)):
            try:
                os.unlink(path)
            except OSError as err:
                raise IndexVersionError(f"cannot remove the unreadable LATEST {uri!r}: {err.strerror}") from err
            return None
    try:
        return storage.read_versioned(uri)[1]
    except ObjectNotFoundError:
        return None


# ---------------------------------------------------------------- version numbers


def read_highwater(index_root: str) -> tuple[int, str | None]:
    """(highest version number handed out, HIGHWATER's version token); (0, None) when absent."""
    uri = storage.join(index_root, HIGHWATER_NAME)
    try:
        data, token = storage.read_versioned(uri)
    except ObjectNotFoundError:
        return 0, None
    text = data[:_MAX_HIGHWATER_BYTES + 1].decode("ascii", errors="replace").strip()
    if len(data) > _MAX_HIGHWATER_BYTES:
        raise HighWaterError(f"{uri} holds more than {_MAX_HIGHWATER_BYTES} bytes; it must name one version")
    try:
        return mf.version_number(text), token
    except IndexVersionError as err:
        raise HighWaterError(f"{uri}: {err}") from None


def reserve_version(index_root: str) -> str:
    """Hand out the next version number: one above HIGHWATER, every version directory
    (complete or not) and LATEST, recorded in HIGHWATER before it is returned.

    Numbers only grow, so a version deleted by `gc` never comes back under another
    content. Raises HighWaterError when another writer moved HIGHWATER meanwhile.
    """
    high, token = read_highwater(index_root)
    numbers = [high, *(mf.version_number(v) for v in mf.list_versions(index_root)),
               *(mf.version_number(v) for v in mf.incomplete_versions(index_root))]
    latest = mf.read_latest(index_root)
    if latest is not None:
        numbers.append(mf.version_number(latest))
    version = mf.version_name(max(numbers) + 1)
    uri = storage.join(index_root, HIGHWATER_NAME)
    data = f"{version}\n".encode("ascii")
    try:
        if token is None:
            storage.create_if_absent(uri, data)
        else:
            storage.replace_if_match(uri, data, token)
    except PreconditionFailedError as err:
        raise HighWaterError(f"{uri} moved while reserving {version}: another writer is building "
                             f"versions of {index_root}") from err
    return version


# ---------------------------------------------------------------- verification


@dataclasses.dataclass(frozen=True)
class SealedVersion:
    """A version whose stored manifest was read, checked against its SEAL and files."""

    manifest: mf.Manifest
    digest: str
    signature: str | None


def _sha256_object(uri: str) -> str:
    digest = hashlib.sha256()
    with storage.open_read(uri) as f:
        while block := f.read(1 << 20):
            digest.update(block)
    return digest.hexdigest()


def verify_version(index_root: str, version: str, *, verify_sha256: bool = False) -> SealedVersion:
    """Read ``version``'s manifest, seal it (or check its SEAL) and check its files.

    Raises IndexVersionError (ChecksumMismatchError for a file whose sha256 differs)
    naming the version and the first problems found.
    """
    mf.version_number(version)
    uri = mf.manifest_uri(index_root, version)
    try:
        data = storage.read_bytes(uri)
    except ObjectNotFoundError as err:
        raise IndexVersionError(f"version {version} has no manifest at {uri!r} (missing or interrupted build)") from err
    manifest = mf.Manifest.from_json(data, source=uri)
    if manifest.version != version:
        raise IndexVersionError(f"{uri!r} describes version {seal.sanitise(manifest.version)}, not {version}")
    digest = seal.manifest_digest(data)
    key = seal.signing_key_from_env()
    signature = seal.sign(version, digest, key)
    if storage.exists(seal.seal_uri(index_root, version)):
        sealed, sealed_signature = seal.read_seal(index_root, version)
        if sealed != digest:
            raise IndexVersionError(f"refusing {version}: its manifest.json (sha256 {digest[:12]}...) is not the one "
                                    f"its SEAL records ({sealed[:12]}...): changed after it was built")
        if key is not None and sealed_signature is not None and not seal.verify_signature(
                version, digest, sealed_signature, key):
            raise IndexVersionError(f"refusing {version}: its SEAL's hmac-sha256 does not verify with "
                                    f"{seal.SIGNING_KEY_ENV}")
        if signature is not None and sealed_signature is None:
            seal.write_seal(index_root, version, digest, signature)  # built unsigned, published signed
    else:
        seal.write_seal(index_root, version, digest, signature)  # a version built before seals existed
    problems = mf.missing_files(index_root, manifest)
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise IndexVersionError(f"refusing {version}: " + "; ".join(problems[:3]) + more)
    if verify_sha256:
        for entry in manifest.all_files():
            got = _sha256_object(mf.entry_uri(index_root, manifest, entry))
            if got != entry.sha256:
                raise ChecksumMismatchError(f"refusing {version}: {entry.file} has sha256 {got[:12]}..., "
                                            f"the manifest says {entry.sha256[:12]}...")
    return SealedVersion(manifest, digest, signature)


# ---------------------------------------------------------------- publish


@dataclasses.dataclass(frozen=True)
class PublishResult:
    """published: LATEST now names ``version`` (or already did). reason: one line.
    decision: the gate's, when a gate was applied."""

    version: str
    digest: str
    published: bool
    previous: str | None
    reason: str
    forced: bool = False
    decision: GateDecision | None = None


def _current_manifest(index_root: str, expected: LatestState) -> tuple[mf.Manifest | None, str]:
    """The manifest LATEST named when read (None when none), and a note when it cannot
    be compared (unreadable, or not the manifest LATEST sealed)."""
    if expected.record is None:
        return None, ""
    version = expected.record.version
    try:
        data = storage.read_bytes(mf.manifest_uri(index_root, version))
        current = mf.Manifest.from_json(data, source=mf.manifest_uri(index_root, version))
    except (IndexVersionError, ObjectNotFoundError) as err:
        return None, f" (LATEST {version} is unreadable, not compared: {err})"
    if expected.record.digest is not None and seal.manifest_digest(data) != expected.record.digest:
        return None, f" (LATEST {version}'s manifest is not the one LATEST sealed, not compared)"
    return current, ""


def publish(index_root: str, version: str, *, expected: LatestState, lease: _Fence | None = None,
            gate_config: GateConfig | None = None, force: bool = False, deletion: Deletion | None = None,
            verify_sha256: bool = False) -> PublishResult:
    """Point LATEST at ``version`` if LATEST still holds ``expected`` and (with
    ``lease``) the caller still holds the workdir lease; see the module docstring.

    gate_config: apply the publish gate against the version ``expected`` names
    (None: no gate). force: publish even when the gate refuses (the reason says
    so). deletion: live items of the current version the candidate drops, for the
    gate. Returns the result (``published`` False only when the gate refused).
    Raises LatestMovedError, LeaseLostError or IndexVersionError.
    """
    sealed = verify_version(index_root, version, verify_sha256=verify_sha256)
    candidate = sealed.manifest
    previous = expected.version
    decision = None
    forced = False
    if gate_config is not None:
        current, note = _current_manifest(index_root, expected)
        decision = gate(candidate, current, gate_config, deletion)
        if note:
            logger.warning("publish gate: %s", note.strip(" ()"))
            decision = dataclasses.replace(decision, reason=decision.reason + note, current_version=previous)
        if not decision.ok and not force:
            logger.warning("not published: %s of %s: %s", version, index_root, decision.reason)
            return PublishResult(version, sealed.digest, False, previous, decision.reason, decision=decision)
        forced = not decision.ok
    fencing = (candidate.metrics or {}).get("fencing_token")
    if lease is not None and isinstance(fencing, int) and fencing > lease.generation:
        raise LatestMovedError(f"not publishing {version}: it was built under lease generation {fencing}, "
                               f"newer than this holder's {lease.generation}")
    record = seal.LatestRecord(version, sealed.digest, sealed.signature)
    if expected.record == record:
        reason = f"{version} is already the current version"
    else:
        if lease is not None:
            lease.check()  # right before the swap: a writer that lost its lease moves nothing
        _swap(index_root, expected, record)
        reason = f"LATEST {previous or 'none'} -> {version}"
    if decision is not None:
        reason = f"{'forced: ' if forced else ''}{decision.reason}"
        decision = dataclasses.replace(decision, published=True, forced=forced, reason=reason)
    logger.info("published %s of %s (manifest sha256 %s): %s", version, index_root, sealed.digest, reason)
    return PublishResult(version, sealed.digest, True, previous, reason, forced=forced, decision=decision)


def _swap(index_root: str, expected: LatestState, record: seal.LatestRecord) -> None:
    uri = latest_uri(index_root)
    data = seal.format_latest(record.version, record.digest or "", record.signature).encode("ascii")
    try:
        if expected.token is None:
            storage.create_if_absent(uri, data)
        else:
            storage.replace_if_match(uri, data, expected.token)
    except PreconditionFailedError:
        try:
            now = seal.read_latest_record(index_root)
        except IndexVersionError:
            now = None
        raise LatestMovedError(
            f"not publishing {record.version}: LATEST of {index_root} changed since it was read "
            f"(was {expected.version or 'absent'}, now {now.version if now else 'unreadable or absent'}): "
            "another writer published meanwhile") from None


def publish_unfenced(index_root: str, version: str) -> PublishResult:
    """Point LATEST at an uploaded version now, without gate or lease (library use:
    ``build_version(publish=True)``); still a compare-and-swap against LATEST as read
    here, so a concurrent writer is detected rather than overwritten."""
    return publish(index_root, version, expected=read_state(index_root))


__all__ = [
    "HIGHWATER_NAME",
    "HighWaterError",
    "LatestMovedError",
    "LatestState",
    "PublishResult",
    "SealedVersion",
    "publish",
    "publish_unfenced",
    "read_highwater",
    "read_state",
    "reserve_version",
    "verify_version",
]
