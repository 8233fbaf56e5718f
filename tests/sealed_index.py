"""Small real index versions for query-node tests, sealed with sinks.index.seal.

``build_small`` builds a version with the product's builder (without moving LATEST);
``seal_latest`` points LATEST at a version the way the publish step records it
(``"<version> sha256:<manifest digest>[ hmac-sha256:<hex>]"``) and rewrites its SEAL;
``rewrite_manifest`` changes a manifest as an attacker with write access to the
index store would, re-sealing it so that only the check under test can refuse it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from typing import Any

import numpy as np

from xmodal_index.sinks import storage
from xmodal_index.sinks.embeddings_io import rows_batch
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index import seal
from xmodal_index.sinks.index.build import IndexBuildConfig, build_version
from xmodal_index.sinks.schema import segment_id

DIM, BITS = 16, 32
MODEL = "tiny@feedbeef"
BUILD = IndexBuildConfig(recall_sample=20)


def build_small(root: str, n: int = 40, *, seed: int = 1, modality: str = "video") -> str:
    """Build (not publish) a version of ``n`` rows under ``root``; returns its name."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codes = np.packbits((x @ rng.standard_normal((DIM, BITS)) > 0).astype(np.uint8), axis=1)
    uris = [f"s3://archive/s{seed}/{i:04d}.mp4" for i in range(n)]
    ids = [segment_id(u, "e1", modality, 0.0) for u in uris]

    def batches():
        yield rows_batch(ids, uris, ["e1"] * n, [modality] * n, [0.0] * n, [1.0] * n, x, codes,
                         model_id=MODEL, run_id=f"r{seed}")

    return build_version(batches, str(root), model_id=MODEL, dim=DIM, bits=BITS, config=BUILD,
                         publish=False).version


def seal_latest(root: str, version: str, key: bytes | None = None, *, signature: str | None = None,
                write_seal: bool = True) -> str:
    """Point LATEST at ``version`` with its manifest digest (signed with ``key``, or carrying
    the given ``signature``) and write the matching SEAL; returns the digest."""
    digest = seal.manifest_digest(storage.read_bytes(mf.manifest_uri(root, version)))
    sig = signature if signature is not None else seal.sign(version, digest, key)
    storage.write_bytes(storage.join(root, seal.LATEST_NAME), seal.format_latest(version, digest, sig).encode())
    if write_seal:
        seal.write_seal(root, version, digest, sig)
    return digest


def manifest_data(root: str, version: str) -> dict[str, Any]:
    return json.loads(storage.read_bytes(mf.manifest_uri(root, version)))


def rewrite_manifest(root: str, version: str, change: Callable[[dict[str, Any]], None], *,
                     reseal: bool = True) -> bytes:
    """Apply ``change`` to the manifest's JSON object, store it, and (by default) re-seal
    LATEST and SEAL to it; returns the bytes stored."""
    data = manifest_data(root, version)
    change(data)
    raw = (json.dumps(data, sort_keys=True, separators=(",", ":")) + "\n").encode()
    storage.write_bytes(mf.manifest_uri(root, version), raw)
    if reseal:
        seal_latest(root, version)
    return raw


def tree(path: str) -> set[str]:
    """Every file and directory under ``path`` (relative), for before/after comparisons."""
    out = set()
    for base, dirs, files in os.walk(path):
        for name in dirs + files:
            out.add(os.path.relpath(os.path.join(base, name), path))
    return out
