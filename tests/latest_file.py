"""LATEST written directly, bypassing the publish step: what a writer outside this
package (a hand-edited pointer, an attacker with write access to the index store)
leaves behind. Query-node tests use it to point LATEST at versions the publish step
would refuse; nothing in the package writes LATEST this way."""

from __future__ import annotations

from xmodal_index.sinks import storage
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index import seal


def write_latest_unchecked(index_root: str, version: str) -> None:
    """Point LATEST at ``version`` with the digest of its stored manifest (signed when
    XMODAL_INDEX_SIGNING_KEY is set), without any check."""
    digest = seal.manifest_digest(storage.read_bytes(mf.manifest_uri(index_root, version)))
    signature = seal.sign(version, digest, seal.signing_key_from_env())
    storage.write_bytes(storage.join(index_root, seal.LATEST_NAME),
                        seal.format_latest(version, digest, signature).encode("ascii"))
