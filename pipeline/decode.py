"""Probe, decode and segment one media item into encoder-ready ``Segment``s.

``decode_item`` is the one entry point: it fetches the item's bytes through
``sinks.storage.local_path``, checks them against the limits of a
``DecodeConfig`` before any real decoding, and yields segments in time order,
one fixed time segment at a time (never a whole long video in memory):

- video / audio files: frames sampled by time with decord (only the sampled
  frames are converted to RGB and resized), the audio track resampled to
  16 kHz mono float32 (``audio.py``), caption sidecars attached to every
  segment they overlap;
- images: Pillow, size checked against ``max_pixels`` before decoding;
- text: WebVTT / SRT cues grouped per segment, ``.txt`` as one row.

The decoder is chosen by content where the first bytes say what a file is (a
WebM named ``.mp4``, a PNG named ``.jpg`` or ``.mp4``, a WAV named ``.txt``),
by extension otherwise. Every failure raises a ``DecodeError`` subclass whose
``stage`` and message go to the dead-letter table (docs/BAD_MEDIA.md lists them).

Decoders run in the calling process here; ``pipeline.isolation`` runs this same
function in killable worker processes, which is what enforces ``timeout_s``,
``idle_timeout_s`` and ``memory_mb``.
"""

from __future__ import annotations

import codecs
import contextlib
import dataclasses
import importlib.util
import logging
import math
import os
from typing import Callable, Iterator

import av
import decord
import numpy as np
from PIL import Image, ImageOps

from xmodal_index.pipeline import captions
from xmodal_index.pipeline.audio import AV_OPEN_OPTIONS, AudioError, AudioTrack, PyAVAudio
from xmodal_index.pipeline.audio import TorchaudioAudio as _TorchaudioAudio
from xmodal_index.pipeline.types import Segment
from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import SinkError

logger = logging.getLogger(__name__)

MiB = 1 << 20
GiB = 1 << 30
AUDIO_BACKENDS = ("auto", "torchaudio", "pyav")
MIN_FINAL_SEGMENT_S = 0.1
MIN_MEMORY_MB = 512
# A container whose video track has fewer readable frames than this share of the
# frames its index declares is treated as truncated.
_MIN_READABLE_FRAME_SHARE = 0.9
# Demuxers that read other files or URLs named inside the content, or that are
# not media at all: never opened, whatever the extension says.
_REFUSED_DEMUXERS = frozenset({"hls", "applehttp", "dash", "concat", "lavfi", "sdp", "rtp", "rtsp", "tty", "ffmetadata"})
# Texts that make FFmpeg open other files or URLs (playlists, concat lists, session
# descriptions): refused before FFmpeg sees them, whatever the extension says.
_REFUSED_SIGNATURES = (b"#EXTM3U", b"ffconcat", b";FFMETADATA", b"v=0", b"<?xml", b"<MPD")
_SNIFF_BYTES = 192


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How items are decoded and segmented, and the limits that refuse hostile input."""

    segment_s: float = 2.0  # length of the fixed time segments, seconds
    frame_rate_hz: float = 1.0  # video frames sampled per second (at least one per segment)
    frame_size: int = 112  # sampled frames are resized to frame_size x frame_size RGB
    audio_sample_rate: int = 16000  # Hz, mono float32
    audio_backend: str = "auto"  # auto | torchaudio | pyav (auto: torchaudio when it imports)
    max_file_bytes: int = 20 * GiB  # larger objects are refused before they are fetched
    max_duration_s: float = 6 * 3600.0  # longer media (as the container declares it) is refused
    max_pixels: int = 8192 * 8192  # width * height of video frames and images
    max_streams: int = 16  # streams of one container (video, audio, subtitles, data)
    max_caption_bytes: int = 4 * MiB  # one caption file (standalone or sidecar)
    max_text_chars: int = 2000  # characters of text in one row
    timeout_s: float = 600.0  # wall-clock seconds per item (isolated decoding)
    idle_timeout_s: float = 120.0  # seconds without progress from a worker (isolated decoding)
    memory_mb: int = 4096  # address-space limit of a decode worker, MiB
    workers: int = 1  # decode worker processes of one IsolatedDecoder
    decoder_threads: int = 1  # threads of the video decoder inside one worker (0 = one per core)
    max_image_side: int = 1024  # larger images are downscaled to this long side, pixels
    # Segments of an item are held back until the whole item decoded, up to this many
    # bytes, so that an item failing midway leaves no rows; longer items stream.
    max_hold_bytes: int = 128 * MiB

    def __post_init__(self) -> None:
        positive = ("segment_s", "frame_rate_hz", "frame_size", "audio_sample_rate", "max_file_bytes",
                    "max_duration_s", "max_pixels", "max_streams", "max_caption_bytes", "max_text_chars",
                    "timeout_s", "idle_timeout_s", "workers", "max_image_side")
        for name in positive:
            value = getattr(self, name)
            if not (isinstance(value, (int, float)) and math.isfinite(value) and value > 0):
                raise ValueError(f"{name} = {value!r} must be a finite number > 0")
        if self.decoder_threads < 0:
            raise ValueError(f"decoder_threads = {self.decoder_threads!r} must be >= 0")
        if not (isinstance(self.max_hold_bytes, int) and self.max_hold_bytes >= 0):
            raise ValueError(f"max_hold_bytes = {self.max_hold_bytes!r} must be an int >= 0 (0 streams every item)")
        if not (isinstance(self.memory_mb, int) and self.memory_mb >= MIN_MEMORY_MB):
            raise ValueError(f"memory_mb = {self.memory_mb!r} must be an int >= {MIN_MEMORY_MB} "
                             "(a worker maps ~320 MiB of address space once its decoders are loaded)")
        if self.audio_backend not in AUDIO_BACKENDS:
            raise ValueError(f"audio_backend = {self.audio_backend!r} must be one of {AUDIO_BACKENDS}")
        if self.audio_backend == "torchaudio" and importlib.util.find_spec("torchaudio") is None:
            raise ValueError("audio_backend = 'torchaudio' but torchaudio is not installed: use 'auto' or 'pyav'")


class DecodeError(Exception):
    """Base error of decoding; ``stage`` says where an item failed (dead-letter column)."""

    stage = "decode"

    def __init__(self, message: str, *, stage: str | None = None) -> None:
        super().__init__(message)
        if stage is not None:
            self.stage = stage

    def __reduce__(self):  # keep ``stage`` across the worker pipe
        return _rebuild_error, (type(self), str(self), self.stage)


def _rebuild_error(cls: type, message: str, stage: str) -> DecodeError:
    return cls(message, stage=stage)


class ProbeError(DecodeError):
    """The file cannot be read as media of its kind (empty, corrupt, unknown container)."""

    stage = "probe"


class LimitExceededError(DecodeError):
    """The file is larger, longer or has more pixels or streams than the config allows."""

    stage = "probe"


class UnsupportedMediaError(DecodeError):
    """The file is valid but holds nothing this decoder can use (no video or audio stream)."""

    stage = "probe"


class NoContentError(UnsupportedMediaError):
    """Decoding finished without a single segment (blank text, captions without a cue)."""

    stage = "decode"


class TruncatedMediaError(DecodeError):
    """The tracks end well before the duration the container declares (a cut-off file)."""


class DecodeTimeoutError(DecodeError):
    """Decoding took longer than ``timeout_s``, or made no progress for ``idle_timeout_s``."""


class DecoderCrashedError(DecodeError):
    """The decode worker died (signal, abort) or ran out of memory."""


@dataclasses.dataclass(frozen=True)
class StreamInfo:
    index: int
    type: str  # video | audio | subtitle | data | attachment
    codec: str
    width: int = 0
    height: int = 0
    frames: int = 0  # frame count declared by the container index (0 when unknown)
    sample_rate: int = 0
    channels: int = 0
    attached_pic: bool = False  # cover art: a still picture, not a video track


@dataclasses.dataclass(frozen=True)
class MediaInfo:
    container: str
    size_bytes: int
    duration_s: float
    start_s: float  # presentation time of the container's first sample
    streams: tuple[StreamInfo, ...]

    @property
    def video(self) -> StreamInfo | None:
        return next((s for s in self.streams if s.type == "video" and not s.attached_pic), None)

    @property
    def audio(self) -> StreamInfo | None:
        return next((s for s in self.streams if s.type == "audio"), None)


def segment_bounds(duration_s: float, segment_s: float) -> list[tuple[float, float]]:
    """Fixed segments [k*segment_s, min((k+1)*segment_s, duration)); a final sliver
    under ``MIN_FINAL_SEGMENT_S`` is dropped unless it is the only segment."""
    if duration_s <= 0:
        return []
    n = max(1, math.ceil(duration_s / segment_s - 1e-9))
    bounds = [(round(k * segment_s, 6), round(min((k + 1) * segment_s, duration_s), 6)) for k in range(n)]
    if len(bounds) > 1 and bounds[-1][1] - bounds[-1][0] < MIN_FINAL_SEGMENT_S:
        bounds.pop()
    return bounds


def frame_times(start_s: float, end_s: float, frame_rate_hz: float) -> list[float]:
    """Evenly spaced sample times inside [start_s, end_s): the centres of
    ``max(1, round(length * rate))`` equal slices."""
    n = max(1, math.floor((end_s - start_s) * frame_rate_hz + 0.5))
    step = (end_s - start_s) / n
    return [start_s + (i + 0.5) * step for i in range(n)]


def truncation_tolerance_s(duration_s: float) -> float:
    """How far before the declared duration a track may end and still count as complete:
    a second or a tenth of the duration, whichever is more (duration estimates of
    containers without an index are that loose)."""
    return max(1.0, 0.1 * duration_s)


def check_file_size(uri: str, size: int, config: DecodeConfig) -> None:
    if size > config.max_file_bytes:
        raise LimitExceededError(f"{uri}: file is {size} bytes, over max_file_bytes={config.max_file_bytes}")


def sniff(head: bytes) -> str | None:
    """What the first bytes of a file say it is: ``"av"`` (a video or audio
    container), ``"image"``, ``"text"`` (WebVTT), or None where no signature matches."""
    if head.startswith((b"\x89PNG\r\n\x1a\n", b"\xff\xd8\xff", b"GIF87a", b"GIF89a", b"II*\x00", b"MM\x00*")):
        return "image"
    if head[:4] == b"RIFF" and head[8:12] == b"WEBP" or head[:2] == b"BM" and head[6:10] == b"\x00" * 4:
        return "image"
    if head[4:8] == b"ftyp" or head.startswith((b"\x1a\x45\xdf\xa3", b"ID3", b"OggS", b"fLaC")):
        return "av"
    if head[:4] == b"RIFF" and head[8:12] in (b"WAVE", b"AVI "):
        return "av"
    if len(head) > 188 and head[0] == head[188] == 0x47:  # MPEG-TS packets
        return "av"
    if head.startswith((codecs.BOM_UTF16_LE, codecs.BOM_UTF16_BE)):
        return None  # UTF-16 text: its BOM looks like an MPEG audio frame sync
    if len(head) > 1 and head[0] == 0xFF and head[1] & 0xE0 == 0xE0:  # MPEG audio / ADTS frame sync
        return "av"
    if head.removeprefix(codecs.BOM_UTF8).startswith(b"WEBVTT"):
        return "text"
    return None


def probe(path: str, uri: str, config: DecodeConfig) -> MediaInfo:
    """Container, streams and duration of a media file, checked against the limits."""
    size = os.path.getsize(path)
    check_file_size(uri, size, config)
    if size == 0:
        raise ProbeError(f"{uri}: empty file (0 bytes)")
    head = _read_prefix(path, uri, _SNIFF_BYTES).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(_REFUSED_SIGNATURES):
        raise UnsupportedMediaError(f"{uri}: a playlist or stream description ({head[:12]!r}...), not a media "
                                    "file: refused unopened (it would make the decoder read other files)")
    try:
        container = av.open(path, container_options=AV_OPEN_OPTIONS, metadata_errors="replace")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise ProbeError(f"{uri}: not a readable media container: {_ffmpeg_reason(err)}") from err
    with container:
        fmt = container.format.name
        if set(fmt.split(",")) & _REFUSED_DEMUXERS:
            raise UnsupportedMediaError(f"{uri}: container format {fmt!r} is refused (it is not a media file)")
        if len(container.streams) > config.max_streams:
            raise LimitExceededError(f"{uri}: {len(container.streams)} streams, over max_streams={config.max_streams}")
        streams = tuple(_stream_info(s) for s in container.streams)
        start_s = container.start_time / 1e6 if container.start_time is not None else 0.0
        try:
            duration_s = _duration(container)
        except (av.error.FFmpegError, OSError) as err:
            raise ProbeError(f"{uri}: cannot read packets to find the duration: {_ffmpeg_reason(err)}") from err
    info = MediaInfo(container=fmt, size_bytes=size, duration_s=duration_s, start_s=start_s, streams=streams)
    for s in streams:
        if s.type == "video" and s.width * s.height > config.max_pixels:
            raise LimitExceededError(
                f"{uri}: video stream {s.index} is {s.width}x{s.height}, over max_pixels={config.max_pixels}")
    if duration_s > config.max_duration_s:
        raise LimitExceededError(f"{uri}: duration {duration_s:.1f} s is over max_duration_s={config.max_duration_s}")
    return info


def _ffmpeg_reason(err: BaseException) -> str:
    """FFmpeg's reason without the file name PyAV appends (the message already starts with the URI)."""
    strerror = getattr(err, "strerror", None)
    return strerror or str(err)


def _stream_info(stream: av.stream.Stream) -> StreamInfo:
    ctx = stream.codec_context
    common = dict(index=stream.index, type=stream.type, codec=ctx.name if ctx is not None else "none")
    if stream.type == "video":
        attached = bool(stream.disposition & av.stream.Disposition.attached_pic)
        return StreamInfo(**common, width=ctx.width or 0, height=ctx.height or 0, frames=stream.frames or 0,
                          attached_pic=attached)
    if stream.type == "audio":
        return StreamInfo(**common, sample_rate=ctx.sample_rate or 0, channels=ctx.channels or 0)
    return StreamInfo(**common)


def _duration(container: av.container.InputContainer) -> float:
    """Declared duration, else the longest stream, else the last packet's end (demux only)."""
    if container.duration and container.duration > 0:
        return container.duration / 1e6
    declared = [float(s.duration * s.time_base) for s in container.streams
                if s.duration and s.time_base and s.type in ("video", "audio")]
    if declared:
        return max(declared)
    end = 0.0
    for packet in container.demux():
        if packet.pts is not None and packet.time_base:
            end = max(end, float((packet.pts + (packet.duration or 0)) * packet.time_base))
    start = container.start_time / 1e6 if container.start_time is not None else 0.0
    return max(0.0, end - start)


_DECORD_ERRORS = (decord.DECORDError, RuntimeError, IndexError, ValueError, OSError)


class _FrameSampler:
    """Frames of one video at given times, resized by decord (only sampled frames reach RGB).

    decord applies the display rotation of the stream. It cannot produce some output
    widths (96 among them: its copy check fails); for those the frames are decoded
    at their own size and resized with Pillow.
    """

    def __init__(self, path: str, uri: str, info: MediaInfo, config: DecodeConfig) -> None:
        self._path, self._uri, self._config = path, uri, config
        self._reader = self._open(config.frame_size)
        self._resize = False
        n = len(self._reader)
        if n == 0:
            raise DecodeError(f"{uri}: the video track has no readable frames")
        declared = info.video.frames if info.video else 0
        if declared and n < _MIN_READABLE_FRAME_SHARE * declared:
            raise TruncatedMediaError(f"{uri}: truncated file: {n} of {declared} indexed video frames are readable")
        try:
            times = self._reader.get_frame_timestamp(np.arange(n))
        except _DECORD_ERRORS as err:  # decord counted frames it then cannot find
            raise DecodeError(f"{uri}: the video track has no readable frames ({err})") from err
        if len(times) == 0:
            raise DecodeError(f"{uri}: the video track has no readable frames")
        self._starts = times[:, 0] - times[0, 0]
        self.end_s = float(max(times[-1, 1], times[-1, 0]) - times[0, 0])  # end of the last readable frame

    def _open(self, size: int) -> decord.VideoReader:
        try:
            return decord.VideoReader(self._path, width=size, height=size, num_threads=self._config.decoder_threads)
        except _DECORD_ERRORS as err:
            raise DecodeError(f"{self._uri}: cannot read the video track: {err}") from err

    def frames_at(self, times: list[float]) -> np.ndarray:
        idx = np.searchsorted(self._starts, np.asarray(times), side="right") - 1
        idx = np.clip(idx, 0, len(self._starts) - 1).tolist()
        try:
            batch = self._reader.get_batch(idx).asnumpy()
        except _DECORD_ERRORS as err:
            if self._resize or "must exactly match" not in str(err):
                raise DecodeError(f"{self._uri}: cannot decode video frames {idx}: {err}") from err
            logger.debug("%s: decord cannot resize to %d px; resizing with Pillow", self._uri, self._config.frame_size)
            self._reader, self._resize = self._open(-1), True
            return self.frames_at(times)
        if not self._resize:
            return batch
        size = (self._config.frame_size, self._config.frame_size)
        return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in batch])


_torchaudio_ok: bool | None = None


def _torchaudio_importable() -> bool:
    global _torchaudio_ok
    if _torchaudio_ok is None:
        try:
            import torchaudio  # noqa: F401, PLC0415
            _torchaudio_ok = True
        except (ImportError, OSError):
            _torchaudio_ok = False
    return _torchaudio_ok


@contextlib.contextmanager
def open_audio(path: str, uri: str, stream_index: int, origin_s: float, rate: int,
               backend: str) -> Iterator[AudioTrack]:
    """The audio track of a file with the configured backend (``auto`` falls back to PyAV)."""
    track: AudioTrack | None = None
    if backend == "torchaudio" or (backend == "auto" and _torchaudio_importable()):
        try:
            track = _TorchaudioAudio(path, uri, rate)
        except AudioError as err:
            if backend == "torchaudio":
                raise DecodeError(str(err)) from err
            logger.info("%s: torchaudio cannot read it; decoding audio with PyAV", uri)
    if track is None:
        try:
            track = PyAVAudio(path, uri, stream_index, origin_s, rate)
        except AudioError as err:
            raise DecodeError(str(err)) from err
    try:
        yield track
    finally:
        track.close()


def _take_audio(audio: AudioTrack, start: float, end: float) -> np.ndarray:
    try:
        return audio.take(start, end)
    except AudioError as err:
        raise DecodeError(str(err)) from err


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
    frames = _FrameSampler(path, item.uri, info, config) if info.video is not None else None
    if frames is not None and info.audio is None and declared_end - frames.end_s > short:
        raise TruncatedMediaError(f"{item.uri}: truncated file: the video ends at {frames.end_s:.2f} s "
                                  f"of the {info.duration_s:.2f} s the container declares")
    texts = captions.texts_per_segment(cues, bounds, config.max_text_chars)
    with contextlib.ExitStack() as stack:
        audio = None
        if info.audio is not None:
            audio = stack.enter_context(open_audio(path, item.uri, info.audio.index, info.start_s,
                                                   config.audio_sample_rate, config.audio_backend))
        for (start, end), text in zip(bounds, texts):
            if frames is not None:
                batch = frames.frames_at(frame_times(start, end, config.frame_rate_hz))
                yield Segment(item.uri, item.etag, "video", start, end, batch)
            if audio is not None:
                samples = _take_audio(audio, start, end)
                if samples.size:
                    yield Segment(item.uri, item.etag, "audio", start, end, samples)
            if text:
                yield Segment(item.uri, item.etag, "text", start, end, text, text=text)
        video_short = frames is None or declared_end - frames.end_s > short
        audio_short = audio is None or audio.finished and declared_end - audio.end_s > short
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
    if item.uri.lower().endswith(".txt") and _sniff_file(path, item.uri) != "text":
        # Only the first max_text_chars characters are kept: read no more than they can take.
        text = _text_of(_read_prefix(path, item.uri, 4 * config.max_text_chars + 4), item.uri)
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


def _read_prefix(path: str, uri: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as err:
        raise ProbeError(f"{uri}: cannot read: {err.strerror or err}") from err


def _read_cues(path: str, uri: str, config: DecodeConfig) -> list[captions.Cue]:
    """Cues of one caption file, refused when over max_caption_bytes or when no cue parses."""
    data = _read_prefix(path, uri, config.max_caption_bytes + 1)
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


def _sniff_file(path: str, uri: str) -> str | None:
    return sniff(_read_prefix(path, uri, _SNIFF_BYTES))


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
        content = _sniff_file(path, item.uri)
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
