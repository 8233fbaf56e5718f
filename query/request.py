"""A query as the core takes it: validated once, whichever front end built it.

The rules here are the only ones: exactly one of text/audio/image/video/embedding;
text is a non-empty string; media is a file path; an embedding is a finite
vector of the version's dim; start_s/end_s only for audio and video; k and
per_modality within [1, MAX_K]; modalities among the indexed streams.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import numpy as np

from xmodal_index.sinks.schema import MODALITIES

from .errors import BadQueryError
from .media import check_range

QUERY_KEYS = ("text", "audio", "image", "video")
INPUT_KEYS = (*QUERY_KEYS, "embedding")
MAX_K = 10000
MAX_TEXT_CHARS = 10000


@dataclasses.dataclass(frozen=True)
class Query:
    """What to embed: ``modality`` is text/audio/image/video/embedding; ``value`` its text,
    file path or vector; ``start_s``/``end_s`` a clip range of an audio or video file."""

    modality: str
    value: Any
    start_s: float | None = None
    end_s: float | None = None

    def __post_init__(self) -> None:
        if self.modality not in INPUT_KEYS:
            raise BadQueryError(f"query modality {self.modality!r} must be one of {', '.join(INPUT_KEYS)}")
        if self.modality == "text":
            check_text(self.value)
        elif self.modality == "embedding":
            if self.start_s is not None or self.end_s is not None:
                raise BadQueryError("start_s/end_s apply to audio and video queries, not embedding")
        else:
            if not isinstance(self.value, str) or not self.value:
                raise BadQueryError(f"the {self.modality} query must be a file path, got {self.value!r}")
            check_range(self.modality, self.start_s, self.end_s)
        if self.modality == "text" and (self.start_s is not None or self.end_s is not None):
            raise BadQueryError("start_s/end_s apply to audio and video queries, not text")

    @classmethod
    def of(cls, *, text: str | None = None, audio: str | None = None, image: str | None = None,
           video: str | None = None, embedding: Any = None, start_s: float | None = None,
           end_s: float | None = None) -> Query:
        given = {k: v for k, v in (("text", text), ("audio", audio), ("image", image), ("video", video),
                                   ("embedding", embedding)) if v is not None}
        if len(given) != 1:
            got = ", ".join(given) or "none"
            raise BadQueryError(f"give exactly one of {', '.join(INPUT_KEYS)}; got {got}")
        (modality, value), = given.items()
        return cls(modality, value, start_s, end_s)


def check_text(text: Any) -> str:
    """The one rule for text queries, on every front end: a non-empty string."""
    if not isinstance(text, str) or not text.strip():
        raise BadQueryError("text must be a non-empty string")
    if len(text) > MAX_TEXT_CHARS:
        raise BadQueryError(f"text has {len(text)} characters; at most {MAX_TEXT_CHARS} are allowed")
    return text


def check_embedding(value: Any, dim: int) -> np.ndarray:
    """A (1, dim) float32 L2-normalised query vector from a list or array of ``dim`` finite numbers."""
    if isinstance(value, (str, bytes)):
        raise BadQueryError(f"embedding must be a list of {dim} numbers, not {type(value).__name__}")
    try:
        vec = np.asarray(value, dtype=np.float64)
    except (TypeError, ValueError) as err:
        raise BadQueryError(f"embedding must be a list of {dim} numbers: {err}") from err
    if vec.ndim == 2 and vec.shape[0] == 1:
        vec = vec[0]
    if vec.ndim != 1 or vec.shape[0] != dim:
        raise BadQueryError(f"embedding has shape {vec.shape}; this index needs {dim} numbers")
    if not np.all(np.isfinite(vec)):
        raise BadQueryError("embedding holds NaN or infinite values")
    norm = float(np.linalg.norm(vec))
    if norm == 0.0 or not math.isfinite(norm):
        raise BadQueryError("embedding is the zero vector: it has no direction to search")
    return (vec / norm).astype(np.float32)[None, :]


def check_k(value: Any, name: str = "k") -> int:
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or not 1 <= value <= MAX_K:
        raise BadQueryError(f"{name} = {value!r} must be an integer in [1, {MAX_K}]")
    return int(value)


def parse_modalities(value: str | Sequence[str] | None, where: str = "modalities") -> tuple[str, ...] | None:
    """None (all streams), or the named streams, from a list or a comma-separated string."""
    if value is None:
        return None
    if isinstance(value, str):
        items: list[Any] = [m.strip() for m in value.split(",") if m.strip()]
    elif isinstance(value, (list, tuple)):
        items = list(value)
    else:
        raise BadQueryError(f"{where} = {value!r} must be a list or a comma-separated string of "
                            f"{', '.join(MODALITIES)}")
    bad = [m for m in items if m not in MODALITIES]
    if bad or not items:
        raise BadQueryError(f"{where} = {value!r}: each must be one of {', '.join(MODALITIES)}")
    return tuple(dict.fromkeys(items))
