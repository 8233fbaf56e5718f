"""The typed hit every front end returns, and its JSON form (SPEC 4.1)."""

from __future__ import annotations

import dataclasses
from typing import Any


@dataclasses.dataclass(frozen=True)
class Hit:
    """One matching moment: a segment of one indexed object, best first in a result list.

    ``score`` is the inner product (cosine) of the query and the segment, or, in a
    fused multi-modality ranking, the fused score (see ``xmodal_index.query.fusion``).
    """

    uri: str
    modality: str
    start_s: float
    end_s: float
    score: float
    segment_id: int
    text: str | None = None

    @classmethod
    def of(cls, hit: Any, score: float | None = None) -> Hit:
        """From the loader's hit (or anything with the same fields)."""
        return cls(uri=hit.uri, modality=hit.modality, start_s=float(hit.start_s), end_s=float(hit.end_s),
                   score=float(hit.score if score is None else score), segment_id=int(hit.segment_id),
                   text=hit.text)

    def to_json(self) -> dict[str, Any]:
        return {"uri": self.uri, "modality": self.modality, "start_s": self.start_s, "end_s": self.end_s,
                "score": round(float(self.score), 6), "segment_id": int(self.segment_id), "text": self.text}


def hit_json(hit: Any) -> dict[str, Any]:
    """JSON object of any hit (core or loader)."""
    return Hit.of(hit).to_json()
