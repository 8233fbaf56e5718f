"""Plain records that flow through the pipeline (picklable, no Beam imports)."""

from __future__ import annotations

import dataclasses
import hashlib
from typing import Any

from xmodal_index.sinks.storage import ObjectInfo

VIDEO_EXTS = (".mp4", ".m4v", ".mov", ".mkv", ".webm", ".avi")
AUDIO_EXTS = (".wav", ".mp3", ".flac", ".ogg", ".m4a", ".aac", ".opus")
IMAGE_EXTS = (".jpg", ".jpeg", ".png", ".bmp", ".gif", ".webp", ".tif", ".tiff")
TEXT_EXTS = (".vtt", ".srt", ".txt")
CAPTION_EXTS = (".vtt", ".srt")


def kind_of(uri: str) -> str | None:
    """Kind of an object by its extension: video | audio | image | text | None (ignored)."""
    low = uri.lower()
    for kind, exts in (("video", VIDEO_EXTS), ("audio", AUDIO_EXTS), ("image", IMAGE_EXTS), ("text", TEXT_EXTS)):
        if low.endswith(exts):
            return kind
    return None


@dataclasses.dataclass(frozen=True)
class MediaItem:
    """One unit of work: a primary object plus its caption sidecars (same stem).

    ``etag`` combines the primary's and the sidecars' etags, so a changed caption
    file re-indexes its video. A caption file with no media beside it is an item
    of kind ``text`` on its own.
    """

    uri: str
    kind: str  # video | audio | image | text
    size: int
    mtime: float
    etag: str
    sidecars: tuple[str, ...] = ()

    @staticmethod
    def combined_etag(primary: ObjectInfo, sidecars: list[ObjectInfo]) -> str:
        if not sidecars:
            return primary.etag
        h = hashlib.sha256(primary.etag.encode())
        for s in sorted(sidecars, key=lambda o: o.uri):
            h.update(b"\x00" + s.uri.encode("utf-8", "surrogateescape") + b"\x00" + s.etag.encode())
        return "c-" + h.hexdigest()[:32]


@dataclasses.dataclass
class Segment:
    """One decoded time segment of one stream of an item, ready for an encoder.

    ``payload`` follows encoders.base: image uint8 (H,W,3); video uint8 (T,H,W,3);
    audio float32 (S,) mono 16 kHz; text str.
    """

    uri: str
    etag: str
    modality: str
    start_s: float
    end_s: float
    payload: Any
    text: str | None = None
    sampling: str | None = None  # video rows: how frames were sampled (DecodeConfig.frame_mode, fast)


@dataclasses.dataclass(frozen=True)
class DeadLetter:
    """One item that failed, with the stage and the error."""

    uri: str
    etag: str
    stage: str  # list | probe | decode | encode | write
    error_type: str
    message: str


@dataclasses.dataclass(frozen=True)
class ItemOutcome:
    """What decoding produced for one item (written so the driver can update the ledger)."""

    uri: str
    etag: str
    size: int
    mtime: float
    segments: int
    finished_at: float = 0.0  # when decoding ended, seconds since the epoch (0: not recorded)
    media_s: float = 0.0  # audio/video seconds decoded (the latest segment end; 0 for images and texts)
    decode_s: float = 0.0  # seconds spent inside the decoder for this item
