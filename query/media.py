"""Query media -> encoder payloads: a whole file, a clip range of it, or its segments.

Decoding reuses ``xmodal_index.pipeline.decode`` (Beam-free), segmenting a file
exactly as ``run`` does (the run's ``segment_s`` and ``frame_rate_hz``), so a
query clip cut on segment boundaries embeds exactly as the indexed segment did.
"""

from __future__ import annotations

import dataclasses
import math
import os
from collections.abc import Iterator
from typing import Any

import numpy as np

from .errors import BadQueryError, QueryError

MEDIA_MODALITIES = ("audio", "image", "video")
RANGED_MODALITIES = ("audio", "video")
DEFAULT_SEGMENT_S = 2.0  # DecodeConfig's default: what `run` uses when its config says nothing
DEFAULT_FRAME_RATE_HZ = 2.0


@dataclasses.dataclass(frozen=True)
class QuerySegmenting:
    """How query media is cut and sampled: the building run's decode settings."""

    segment_s: float = DEFAULT_SEGMENT_S  # length of the fixed time segments, seconds
    frame_rate_hz: float = DEFAULT_FRAME_RATE_HZ  # video frames sampled per second
    # Other settings of the run's decode section (frame_size, frame sampling mode, ...).
    run_decode: tuple[tuple[str, Any], ...] = ()

    def __post_init__(self) -> None:
        for name in ("segment_s", "frame_rate_hz"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
                    or value <= 0:
                raise BadQueryError(f"{name} = {value!r} must be a finite number > 0")

    @classmethod
    def from_run(cls, decode: dict[str, Any]) -> QuerySegmenting:
        try:
            return cls(segment_s=float(decode.get("segment_s", DEFAULT_SEGMENT_S)),
                       frame_rate_hz=float(decode.get("frame_rate_hz", DEFAULT_FRAME_RATE_HZ)),
                       run_decode=tuple(sorted((k, v) for k, v in decode.items()
                                               if isinstance(v, (str, int, float, bool)))))
        except (TypeError, ValueError, BadQueryError):
            return cls()

    def decode_config(self) -> Any:
        """The ``DecodeConfig`` a query file is decoded with: the run's, where it still validates."""
        from xmodal_index.pipeline.decode import DecodeConfig

        names = {f.name for f in dataclasses.fields(DecodeConfig)}
        kept = {k: v for k, v in self.run_decode if k in names and k not in ("segment_s", "frame_rate_hz")}
        try:
            return DecodeConfig(segment_s=self.segment_s, frame_rate_hz=self.frame_rate_hz, **kept)
        except (TypeError, ValueError):
            return DecodeConfig(segment_s=self.segment_s, frame_rate_hz=self.frame_rate_hz)


@dataclasses.dataclass(frozen=True)
class QuerySegment:
    """One time segment of a query file and its encoder payload."""

    start_s: float
    end_s: float
    payload: Any


def check_range(modality: str, start_s: float | None, end_s: float | None) -> tuple[float, float]:
    """Validated [start_s, end_s) in seconds (end defaults to the end of the file)."""
    if start_s is None and end_s is None:
        return 0.0, math.inf
    if modality not in RANGED_MODALITIES:
        raise BadQueryError(f"start_s/end_s apply to audio and video queries, not {modality}")
    start = 0.0 if start_s is None else start_s
    end = math.inf if end_s is None else end_s
    for name, value in (("start_s", start), ("end_s", end)):
        if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0 \
                or (name == "start_s" and math.isinf(value)):
            raise BadQueryError(f"{name} = {value!r} must be a number of seconds >= 0")
    if end <= start:
        raise BadQueryError(f"end_s = {end!r} must be greater than start_s = {start!r}")
    return float(start), float(end)


def _decoded(modality: str, path: str, segmenting: QuerySegmenting) -> Iterator[Any]:
    from xmodal_index.pipeline.decode import DecodeError, decode_item
    from xmodal_index.pipeline.types import MediaItem

    if not isinstance(path, str) or not path:
        raise BadQueryError(f"the {modality} query needs a file path, got {path!r}")
    if not os.path.isfile(path):
        raise BadQueryError(f"{modality} file {path!r} does not exist")
    st = os.stat(path)
    item = MediaItem(uri=os.path.abspath(path), kind=modality, size=st.st_size, mtime=st.st_mtime, etag="query")
    cfg = segmenting.decode_config()
    try:
        for seg in decode_item(item, cfg):
            if seg.modality == modality:
                yield seg
    except DecodeError as err:
        raise QueryError(f"cannot decode {modality} file {path!r}: {err}") from err


def decode_query_segments(modality: str, path: str, segmenting: QuerySegmenting = QuerySegmenting(), *,
                          start_s: float | None = None, end_s: float | None = None) -> list[QuerySegment]:
    """The file's segments of ``modality`` inside [start_s, end_s), cut like ``run`` cuts them;
    segments the range cuts are trimmed to it (audio samples, video frames by time)."""
    from xmodal_index.pipeline.decode import frame_times

    if modality not in MEDIA_MODALITIES:
        raise BadQueryError(f"{modality!r} is not a media modality ({', '.join(MEDIA_MODALITIES)})")
    start, end = check_range(modality, start_s, end_s)
    out: list[QuerySegment] = []
    for seg in _decoded(modality, path, segmenting):
        if modality == "image":
            out.append(QuerySegment(seg.start_s, seg.end_s, seg.payload))
            break
        if seg.end_s <= start:
            continue
        if seg.start_s >= end:
            break
        lo, hi = max(start, seg.start_s), min(end, seg.end_s)
        if modality == "audio":
            rate = len(seg.payload) / max(seg.end_s - seg.start_s, 1e-9)
            a = int(round((lo - seg.start_s) * rate))
            b = int(round((hi - seg.start_s) * rate))
            payload = seg.payload[a:b]
            if payload.size:
                out.append(QuerySegment(lo, hi, np.ascontiguousarray(payload, dtype=np.float32)))
        else:
            times = frame_times(seg.start_s, seg.end_s, segmenting.frame_rate_hz)
            keep = [i for i, t in enumerate(times[:len(seg.payload)]) if lo <= t < hi]
            if not keep:  # a range shorter than the frame spacing: its nearest frame
                mid = (lo + hi) / 2
                keep = [min(range(min(len(times), len(seg.payload))), key=lambda i: abs(times[i] - mid))]
            out.append(QuerySegment(lo, hi, seg.payload[keep]))
    if not out:
        where = "" if math.isinf(end) and start == 0 else f" in [{start:g}, {end:g}) s"
        raise BadQueryError(f"{modality} file {path!r} has no {modality}{where}")
    return out


def decode_query_media(modality: str, path: str, segmenting: QuerySegmenting = QuerySegmenting(), *,
                       start_s: float | None = None, end_s: float | None = None) -> Any:
    """One payload for the whole file or its [start_s, end_s) range: audio samples joined,
    video frames joined, an image as is."""
    parts = decode_query_segments(modality, path, segmenting, start_s=start_s, end_s=end_s)
    if modality == "audio":
        return np.concatenate([p.payload for p in parts]).astype(np.float32)
    if modality == "video":
        return np.concatenate([p.payload for p in parts], axis=0)
    return parts[0].payload
