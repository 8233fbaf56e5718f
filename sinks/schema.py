"""The one definition of the embedding-row Arrow schema (SPEC 4.3) and of segment ids."""

from __future__ import annotations

import hashlib

import pyarrow as pa

MODALITIES = ("video", "audio", "image", "text")

DEADLETTER_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("stage", pa.string()),  # list | probe | decode | encode | write
        ("error_type", pa.string()),
        ("message", pa.string()),
        ("run_id", pa.string()),
        ("at", pa.timestamp("us", tz="UTC")),
    ]
)

LEDGER_SCHEMA = pa.schema(
    [
        ("uri", pa.string()),
        ("etag", pa.string()),
        ("size", pa.int64()),
        ("mtime", pa.float64()),
        ("state", pa.string()),  # indexed | failed | deleted
        ("segments", pa.int64()),
        ("model_id", pa.string()),
        ("run_id", pa.string()),
    ]
)


def embedding_schema(dim: int, bits: int, float16: bool = False) -> pa.Schema:
    """Schema of one embedding row; ``dim`` floats and ``bits // 8`` hash bytes."""
    if dim <= 0:
        raise ValueError(f"{dim = } must be > 0")
    if bits <= 0 or bits % 8:
        raise ValueError(f"{bits = } must be a positive multiple of 8")
    value_type = pa.float16() if float16 else pa.float32()
    return pa.schema(
        [
            ("segment_id", pa.int64()),
            ("uri", pa.string()),
            ("etag", pa.string()),
            ("modality", pa.string()),
            ("start_s", pa.float64()),
            ("end_s", pa.float64()),
            ("embedding", pa.list_(value_type, dim)),
            ("hash_code", pa.binary(bits // 8)),
            ("model_id", pa.string()),
            ("run_id", pa.string()),
            ("text", pa.string()),  # caption / sidecar text of text rows, else null
            ("sampling", pa.string()),  # video rows: uniform | fast | keyframes | keyframes-nearest, else null
        ],
        metadata={b"dim": str(dim).encode(), b"bits": str(bits).encode()},
    )


def segment_id(uri: str, etag: str, modality: str, start_s: float) -> int:
    """Stable non-negative int64 id of one segment row.

    Derived from content identity (uri, etag, modality, start rounded to the
    millisecond), never from a row position: reruns give the same ids.
    """
    key = f"{uri}\x00{etag}\x00{modality}\x00{round(float(start_s) * 1000)}".encode("utf-8", "surrogateescape")
    digest = hashlib.blake2b(key, digest_size=8).digest()
    return int.from_bytes(digest, "big") & 0x7FFF_FFFF_FFFF_FFFF
