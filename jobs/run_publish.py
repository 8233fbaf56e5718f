"""The index step of `run`, after the ledger commit: does the committed ledger need a
new index version, is one already uploaded, and publishing it through the one publish
step (``sinks/index/publish.py``).

- **Nothing changed**: a version records ``rows_fingerprint`` (what its live rows are:
  the indexed ledger entries' uri, etag, segment count and model), its ``model_id``
  and its index ``build_config``. When LATEST's version has the same three, the run
  builds and publishes nothing.
- **Resume**: a complete version newer than LATEST with the same three (left by a
  run that stopped after uploading it) is read back in full (every sha256) and
  published instead of building another one.
- **Mass deletion**: the live items of LATEST's version (the ledger snapshot it was
  built from) that the candidate no longer holds are counted for the publish gate.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
from collections.abc import Iterable, Mapping
from typing import Any

from xmodal_index.sinks.errors import IndexVersionError, SinkError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index import publish
from xmodal_index.sinks.index.publish_gate import Deletion
from xmodal_index.sinks.ledger import LedgerEntry, read_snapshot

logger = logging.getLogger(__name__)

FINGERPRINT_KEY = "rows_fingerprint"
FENCING_KEY = "fencing_token"
SNAPSHOT_KEY = "ledger_snapshot"


def rows_fingerprint(entries: Iterable[LedgerEntry]) -> str:
    """sha256 over the sorted (uri, etag, segments, model_id) of the indexed entries:
    equal for two ledgers whose live rows are the same content (a re-embedding of an
    unchanged input by the same model gives the same rows)."""
    digest = hashlib.sha256()
    for key in sorted((e.uri, e.etag, str(e.segments), e.model_id) for e in entries if e.state == "indexed"):
        digest.update(json.dumps(key).encode("utf-8") + b"\n")
    return digest.hexdigest()


def _normalised(config: Mapping[str, Any]) -> Any:
    return json.loads(json.dumps(dict(config), sort_keys=True, default=str))


@dataclasses.dataclass(frozen=True)
class Content:
    """What a version must hold to stand for the committed ledger."""

    fingerprint: str
    model_id: str
    build_config: Any  # the [index] config, JSON-normalised

    @classmethod
    def of(cls, entries: Iterable[LedgerEntry], model_id: str, build_config: Mapping[str, Any]) -> Content:
        return cls(rows_fingerprint(entries), model_id, _normalised(build_config))

    def matches(self, manifest: mf.Manifest) -> bool:
        return ((manifest.metrics or {}).get(FINGERPRINT_KEY) == self.fingerprint
                and manifest.model_id == self.model_id
                and _normalised(manifest.build_config) == self.build_config)


def latest_manifest(index_root: str, state: publish.LatestState) -> mf.Manifest | None:
    """The manifest of the version LATEST named (None when none, or unreadable)."""
    if state.version is None:
        return None
    try:
        return mf.read_manifest(index_root, state.version)
    except SinkError as err:
        logger.warning("LATEST %s of %s is unreadable: %s", state.version, index_root, err)
        return None


def uploaded_version(index_root: str, state: publish.LatestState, content: Content) -> str | None:
    """The newest complete, never-published version above LATEST that holds ``content``
    and reads back intact (every file's sha256): a run stopped after uploading it."""
    floor = mf.version_number(state.version) if state.version else 0
    for version in reversed(mf.list_versions(index_root)):
        if mf.version_number(version) <= floor:
            break
        try:
            if not content.matches(mf.read_manifest(index_root, version)):
                continue
            publish.verify_version(index_root, version, verify_sha256=True)
        except IndexVersionError as err:
            logger.warning("not resuming %s of %s: %s", version, index_root, err)
            continue
        return version
    return None


def deletion(workdir: str, current: mf.Manifest | None, before: Mapping[str, LedgerEntry],
             after: Mapping[str, LedgerEntry]) -> Deletion | None:
    """How many of the current version's live items ``after`` no longer indexes.

    The current version's items are those of the ledger snapshot it was built from;
    ``before`` (the ledger this run started from) stands in when that snapshot is
    unknown or gone. None when nothing is published.
    """
    if current is None:
        return None
    baseline = before
    name = (current.metrics or {}).get(SNAPSHOT_KEY)
    if isinstance(name, str):
        try:
            baseline = read_snapshot(workdir, name)
        except SinkError as err:
            logger.warning("cannot read %s, the ledger of %s (counting deletions against the previous ledger): %s",
                           name, current.version, err)
    live_before = {uri for uri, e in baseline.items() if e.state == "indexed"}
    live_after = {uri for uri, e in after.items() if e.state == "indexed"}
    return Deletion(deleted=len(live_before - live_after), live_before=len(live_before))
