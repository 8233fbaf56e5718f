"""Decode one media item into encoder-ready ``Segment``s: the entry point ``decode_item``.

``decode_item`` fetches the item's bytes through ``sinks.storage.local_path``,
checks them against the limits of a ``DecodeConfig`` before any real decoding
(``probe.py``), and yields segments in time order, one fixed time segment at a
time (never a whole long video in memory):

- video / audio files: frames sampled per segment as ``frame_mode`` / ``fast``
  say (``decode_video.py``: decord for uniform sampling, PyAV for key frames
  only and the fast mode; only sampled frames are converted to RGB and
  resized), the audio track resampled to 16 kHz mono float32 (``audio.py``),
  caption sidecars attached to every segment they overlap;
- images: Pillow, size checked against ``max_pixels`` before decoding;
- text: WebVTT / SRT cues grouped per segment, ``.txt`` as one row.

The decoder is chosen by content where the first bytes say what a file is (a
WebM named ``.mp4``, a PNG named ``.jpg`` or ``.mp4``, a WAV named ``.txt``),
by extension otherwise. Every failure raises a ``DecodeError`` subclass whose
``stage`` and message go to the dead-letter table (docs/BAD_MEDIA.md lists them).

Decoders run in the calling process here; ``pipeline.isolation`` runs this same
function in killable worker processes, which is what enforces ``timeout_s``,
``idle_timeout_s`` and ``memory_mb``. The names of the modules split from this
one (config, errors, probe) are re-exported here.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image, ImageOps

from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import SinkError

from . import captions
from .audio import open_audio, take_audio
from .decode_config import (  # noqa: F401 - re-exported: the names' historical home
    AUDIO_BACKENDS,
    FRAME_MODES,
    MIN_FINAL_SEGMENT_S,
    MIN_MEMORY_MB,
    DecodeConfig,
    DecodeError,
    DecoderCrashedError,
    DecodeTimeoutError,
    GiB,
    LimitExceededError,
    MiB,
    NoContentError,
    ProbeError,
    TruncatedMediaError,
    UnsupportedMediaError,
    frame_times,
    segment_bounds,
    truncation_tolerance_s,
)
from .decode_video import open_frames
from .probe import MediaInfo, StreamInfo, check_file_size, probe, read_prefix, sniff, sniff_file  # noqa: F401 - re-exported
from .types import Segment

logger = logging.getLogger(__name__)


def _decode_av(item, path: str, config: DecodeConfig) -> Iterator[Segment]:
    """Video and audio files alike: whatever video and audio tracks the content holds."""
    info = probe(path, item.uri, config)
    cues = _sidecar_cues(item, config)
    if info.video is None and info.audio is None:
        kinds = ", ".join(s.type for s in info.streams) or "none"
        raise UnsupportedMediaError(f"{item.uri}: no decodable video or audio stream (streams: {kinds})")
    bounds = segment_bounds(info.duration_s, config.segment_s)
    if not bounds:
        raise ProbeError(f"{item.uri}: zero duration")
    declared_end = bounds[-1][1]
    short = truncation_tolerance_s(declared_end)
    texts = captions.texts_per_segment(cues, bounds, config.max_text_chars)
    with contextlib.ExitStack() as stack:
        frames = None
        if info.video is not None:
            frames = open_frames(path, item.uri, info, config)
            stack.callback(frames.close)
        if frames is not None and frames.end_known and info.audio is None and declared_end - frames.end_s > short:
            raise TruncatedMediaError(f"{item.uri}: truncated file: the video ends at {frames.end_s:.2f} s "
                                      f"of the {info.duration_s:.2f} s the container declares")
        audio = None
        if info.audio is not None:
            audio = stack.enter_context(open_audio(path, item.uri, info.audio.index, info.start_s,
                                                   config.audio_sample_rate, config.audio_backend))
        for (start, end), text in zip(bounds, texts):
            if frames is not None:
                batch, sampling = frames.sample(start, end)
                yield Segment(item.uri, item.etag, "video", start, end, batch, sampling=sampling)
            if audio is not None:
                samples = take_audio(audio, start, end)
                if samples.size:
                    yield Segment(item.uri, item.etag, "audio", start, end, samples)
            if text:
                yield Segment(item.uri, item.etag, "text", start, end, text, text=text)
        audio_short = audio is None or audio.finished and declared_end - audio.end_s > short
        if audio_short and frames is not None:
            frames.finish()
        video_short = frames is None or declared_end - frames.end_s > short
        if video_short and audio_short:
            ends = [f"the {name} ends at {track.end_s:.2f} s" for name, track in (("video", frames), ("audio", audio))
                    if track is not None]
            raise TruncatedMediaError(f"{item.uri}: truncated file: {' and '.join(ends)} "
                                      f"of the {info.duration_s:.2f} s the container declares")


def _decode_image(item, path: str, config: DecodeConfig) -> Iterator[Segment]:
    check_file_size(item.uri, os.path.getsize(path), config)
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise LimitExceededError(f"{item.uri}: image declares too many pixels: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ProbeError(f"{item.uri}: not a readable image: {_pillow_reason(err, path)}") from err
    with image:
        width, height = image.size
        if width * height > config.max_pixels:
            raise LimitExceededError(f"{item.uri}: image is {width}x{height}, over max_pixels={config.max_pixels}")
        side = config.max_image_side
        try:
            if max(width, height) > side:
                image.draft("RGB", (side, side))  # JPEG decodes straight at a reduced scale
            rgb = ImageOps.exif_transpose(image).convert("RGB")
            if max(rgb.size) > side:
                rgb.thumbnail((side, side), Image.Resampling.BILINEAR)
            pixels = np.asarray(rgb, dtype=np.uint8)
        except Image.DecompressionBombError as err:
            raise LimitExceededError(f"{item.uri}: image declares too many pixels: {err}") from err
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise DecodeError(f"{item.uri}: cannot decode image: {_pillow_reason(err, path)}") from err
    yield Segment(item.uri, item.etag, "image", 0.0, 0.0, pixels)


def _pillow_reason(err: BaseException, path: str) -> str:
    """Pillow's message without the local file name it quotes (the URI comes first already)."""
    return str(err).replace(repr(path), "the file").replace(path, "the file")


def _decode_text(item, path: str, config: DecodeConfig) -> Iterator[Segment]:
    """``.txt`` files as one row; WebVTT / SRT files as cues grouped per segment."""
    check_file_size(item.uri, os.path.getsize(path), config)
    if item.uri.lower().endswith(".txt") and sniff_file(path, item.uri) != "text":
        # Only the first max_text_chars characters are kept: read no more than they can take.
        text = _text_of(read_prefix(path, item.uri, 4 * config.max_text_chars + 4), item.uri)
        text = " ".join(text.split())[:config.max_text_chars]
        if text:
            yield Segment(item.uri, item.etag, "text", 0.0, 0.0, text, text=text)
        return
    cues = _read_cues(path, item.uri, config)
    end = min(max((c.end_s for c in cues), default=0.0), config.max_duration_s)
    bounds = segment_bounds(end, config.segment_s)
    for (start, stop), text in zip(bounds, captions.texts_per_segment(cues, bounds, config.max_text_chars)):
        if text:
            yield Segment(item.uri, item.etag, "text", start, stop, text, text=text)


def _text_of(data: bytes, uri: str) -> str:
    """Bytes of a text file as str (undecodable bytes replaced); refused as binary
    when they hold a NUL character, which no UTF-8 or UTF-16 text does."""
    text = captions.decode_text(data)
    if "\x00" in text:
        raise ProbeError(f"{uri}: binary content (NUL bytes), not UTF-8 or UTF-16 text")
    return text


def _read_cues(path: str, uri: str, config: DecodeConfig) -> list[captions.Cue]:
    """Cues of one caption file, refused when over max_caption_bytes or when no cue parses."""
    data = read_prefix(path, uri, config.max_caption_bytes + 1)
    if len(data) > config.max_caption_bytes:
        raise LimitExceededError(f"{uri}: caption file is over max_caption_bytes={config.max_caption_bytes}")
    if not data:
        raise ProbeError(f"{uri}: empty file (0 bytes)")
    parsed = captions.parse_captions(_text_of(data, uri), max_cue_chars=config.max_text_chars,
                                     max_time_s=config.max_duration_s)
    if parsed.skipped:
        logger.info("%s: skipped %d malformed caption cue(s)", uri, parsed.skipped)
    if not parsed.cues and parsed.skipped:
        raise ProbeError(f"{uri}: no valid caption cue ({parsed.skipped} malformed)")
    return list(parsed.cues)


def _sidecar_cues(item, config: DecodeConfig) -> list[captions.Cue]:
    """Cues of every timed caption sidecar of an item, merged in time order."""
    cues: list[captions.Cue] = []
    for uri in item.sidecars:
        if not uri.lower().endswith(captions.TIMED_CAPTION_EXTS):
            logger.warning("%s: sidecar %s has no timing (not .vtt or .srt); ignored", item.uri, uri)
            continue
        try:
            with _fetch(uri) as path:
                cues.extend(_read_cues(path, uri, config))
        except DecodeError as err:  # the item fails; its message names the item, then the sidecar
            raise type(err)(f"{item.uri}: caption sidecar {err}", stage=err.stage) from err
    return sorted(cues, key=lambda c: (c.start_s, c.end_s))


@contextlib.contextmanager
def _fetch(uri: str) -> Iterator[str]:
    """``storage.local_path`` with storage failures reported as probe errors."""
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(storage.local_path(uri))
        except SinkError as err:
            raise ProbeError(f"{uri}: cannot fetch: {err}") from err
        except OSError as err:  # a local path the filesystem refuses (too long, not a file)
            raise ProbeError(f"{uri}: cannot fetch: {err.strerror or err}") from err
        yield path


_DECODERS: dict[str, Callable[..., Iterator[Segment]]] = {
    "video": _decode_av,
    "audio": _decode_av,
    "image": _decode_image,
    "text": _decode_text,
}
_BY_CONTENT: dict[str, Callable[..., Iterator[Segment]]] = {"av": _decode_av, "image": _decode_image,
                                                              "text": _decode_text}


def decode_item(item, config: DecodeConfig) -> Iterator[Segment]:
    """Decode one ``MediaItem`` into segments, in time order, streaming.

    Raises a ``DecodeError`` subclass naming the URI and the reason; an error can
    come after some segments were yielded (a file truncated mid-way), so callers
    treat an item as failed as a whole. An item that yields no segment at all
    raises ``NoContentError``.
    """
    decoder = _DECODERS.get(item.kind)
    if decoder is None:
        raise UnsupportedMediaError(f"{item.uri}: unknown kind {item.kind!r} (expected one of {sorted(_DECODERS)})")
    check_file_size(item.uri, item.size, config)  # refuse before fetching a huge object
    with _fetch(item.uri) as path:
        size = os.path.getsize(path)
        check_file_size(item.uri, size, config)
        if size == 0:
            raise ProbeError(f"{item.uri}: empty file (0 bytes)")
        content = sniff_file(path, item.uri)
        if content is not None and _BY_CONTENT[content] is not decoder:
            logger.info("%s: content is %s, not %s as the name says: decoding it by content", item.uri, content,
                        item.kind)
            decoder = _BY_CONTENT[content]
        n = 0
        for segment in decoder(item, path, config):
            n += 1
            yield segment
    if n == 0:
        raise NoContentError(f"{item.uri}: nothing to index: decoding gave no segment")
