"""The built-in text front end without torch: hashed character n-grams of a text.

``frontends.py`` re-exports these (the torch front ends live there); the
torch-free text query path (``builtin_text.py``) uses them directly.
"""

from __future__ import annotations

import dataclasses
import zlib


@dataclasses.dataclass(frozen=True)
class TextFrontendConfig:
    """Character n-grams (n in [min_n, max_n], words padded with spaces) hashed into buckets."""

    buckets: int = 2048
    min_n: int = 1
    max_n: int = 4
    max_chars: int = 2000

    def __post_init__(self) -> None:
        if self.buckets <= 0:
            raise ValueError(f"{self.buckets = } must be > 0")
        if not 1 <= self.min_n <= self.max_n:
            raise ValueError(f"{self.min_n = } and {self.max_n = } must satisfy 1 <= min_n <= max_n")
        if self.max_chars <= 0:
            raise ValueError(f"{self.max_chars = } must be > 0")


def text_ngrams(text: str, config: TextFrontendConfig = TextFrontendConfig()) -> list[int]:
    """Bucket ids of the character n-grams of ``text`` (lower-cased, whitespace folded)."""
    words = " ".join(text[: config.max_chars].lower().split())
    padded = f" {words} "
    ids = []
    for n in range(config.min_n, config.max_n + 1):
        for i in range(len(padded) - n + 1):
            gram = padded[i : i + n]
            if gram.strip():
                ids.append(zlib.crc32(f"{n}:{gram}".encode("utf-8", "surrogatepass")) % config.buckets)
    return ids or [zlib.crc32(b"<empty>") % config.buckets]
