"""Probe, decode and segment one media item into encoder-ready ``Segment``s.

``decode_item`` is the one entry point: it fetches the item's bytes through
``sinks.storage.local_path``, checks them against the limits of a
``DecodeConfig`` before any real decoding, and yields segments in time order,
one fixed time segment at a time (never a whole long video in memory):

- video / audio files: frames sampled by time with decord (only the sampled
  frames are converted to RGB and resized), the audio track resampled to
  16 kHz mono float32 with PyAV (or torchaudio), caption sidecars attached to
  every segment they overlap;
- images: Pillow, size checked against ``max_pixels`` before decoding;
- text: WebVTT / SRT cues grouped per segment, ``.txt`` as one row.

Decoders run in the calling process here; ``pipeline.isolation`` runs this same
function in killable worker processes, which is what enforces ``timeout_s``,
``idle_timeout_s`` and ``memory_mb``.
"""

from __future__ import annotations

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
_AV_OPEN_OPTIONS = {"protocol_whitelist": "file"}


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How items are decoded and segmented, and the limits that refuse hostile input."""

    segment_s: float = 2.0  # length of the fixed time segments, seconds
    frame_rate_hz: float = 1.0  # video frames sampled per second (at least one per segment)
    frame_size: int = 112  # sampled frames are resized to frame_size x frame_size RGB
    audio_sample_rate: int = 16000  # Hz, mono float32
    audio_backend: str = "auto"  # auto | torchaudio | pyav (auto: torchaudio when it imports)
    max_file_bytes: int = 20 * GiB
    max_duration_s: float = 6 * 3600.0
    max_pixels: int = 8192 * 8192  # width * height of video frames and images
    max_streams: int = 16
    max_caption_bytes: int = 4 * MiB
    max_text_chars: int = 2000  # characters of text in one row
    timeout_s: float = 600.0  # wall-clock seconds per item (isolated decoding)
    idle_timeout_s: float = 120.0  # seconds without progress from a worker (isolated decoding)
    memory_mb: int = 4096  # address-space limit of a decode worker, MiB
    workers: int = 1  # decode worker processes of one IsolatedDecoder
    decoder_threads: int = 1  # threads of the video decoder inside one worker (0 = one per core)
    max_image_side: int = 1024  # larger images are downscaled to this long side, pixels

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


class ProbeError(DecodeError):
    """The file cannot be read as media of its kind (empty, corrupt, unknown container)."""

    stage = "probe"


class LimitExceededError(DecodeError):
    """The file is larger, longer or has more pixels or streams than the config allows."""

    stage = "probe"


class UnsupportedMediaError(DecodeError):
    """The file is valid but holds nothing this decoder can use (no video or audio stream)."""

    stage = "probe"


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


def check_file_size(uri: str, size: int, config: DecodeConfig) -> None:
    if size > config.max_file_bytes:
        raise LimitExceededError(f"{uri}: file is {size} bytes, over max_file_bytes={config.max_file_bytes}")


def probe(path: str, uri: str, config: DecodeConfig) -> MediaInfo:
    """Container, streams and duration of a media file, checked against the limits."""
    size = os.path.getsize(path)
    check_file_size(uri, size, config)
    if size == 0:
        raise ProbeError(f"{uri}: empty file (0 bytes)")
    try:
        container = av.open(path, container_options=_AV_OPEN_OPTIONS, metadata_errors="replace")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise ProbeError(f"{uri}: not a readable media container: {err}") from err
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
            raise ProbeError(f"{uri}: cannot read packets to find the duration: {err}") from err
    info = MediaInfo(container=fmt, size_bytes=size, duration_s=duration_s, start_s=start_s, streams=streams)
    for s in streams:
        if s.type == "video" and s.width * s.height > config.max_pixels:
            raise LimitExceededError(
                f"{uri}: video stream {s.index} is {s.width}x{s.height}, over max_pixels={config.max_pixels}")
    if duration_s > config.max_duration_s:
        raise LimitExceededError(f"{uri}: duration {duration_s:.1f} s is over max_duration_s={config.max_duration_s}")
    return info


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


class _FrameSampler:
    """Frames of one video at given times, resized by decord (only sampled frames reach RGB).

    decord cannot produce some output widths (96 among them: its copy check fails);
    for those the frames are decoded at their own size and resized with Pillow.
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
            raise DecodeError(f"{uri}: truncated file: {n} of {declared} indexed video frames are readable")
        try:
            starts = self._reader.get_frame_timestamp(np.arange(n))[:, 0]
        except (decord.DECORDError, RuntimeError) as err:
            raise DecodeError(f"{uri}: cannot read the video frame index: {err}") from err
        self._starts = starts - starts[0]

    def _open(self, size: int) -> decord.VideoReader:
        try:
            return decord.VideoReader(self._path, width=size, height=size, num_threads=self._config.decoder_threads)
        except (decord.DECORDError, RuntimeError) as err:
            raise DecodeError(f"{self._uri}: cannot read the video track: {err}") from err

    def frames_at(self, times: list[float]) -> np.ndarray:
        idx = np.searchsorted(self._starts, np.asarray(times), side="right") - 1
        idx = np.clip(idx, 0, len(self._starts) - 1).tolist()
        try:
            batch = self._reader.get_batch(idx).asnumpy()
        except (decord.DECORDError, RuntimeError) as err:
            if self._resize or "must exactly match" not in str(err):
                raise DecodeError(f"{self._uri}: cannot decode video frames {idx}: {err}") from err
            logger.debug("%s: decord cannot resize to %d px; resizing with Pillow", self._uri, self._config.frame_size)
            self._reader, self._resize = self._open(-1), True
            return self.frames_at(times)
        if not self._resize:
            return batch
        size = (self._config.frame_size, self._config.frame_size)
        return np.stack([np.asarray(Image.fromarray(f).resize(size, Image.Resampling.BILINEAR)) for f in batch])


class _AudioTrack:
    """One audio track resampled to mono float32, handed out segment by segment.

    Subclasses fill ``_chunks`` in ``_pull``; only the samples of the segment being
    cut (plus one decoded packet) are held. Sample 0 is the container's first
    presentation time; a track that starts later is led by silence.
    """

    def __init__(self, uri: str, rate: int) -> None:
        self._uri = uri
        self._rate = rate
        self._chunks: list[np.ndarray] = []
        self._pos = 0  # absolute sample index of the first buffered sample
        self._end = 0  # absolute sample index after the last buffered sample
        self._started = False
        self._eof = False

    def _pull(self) -> None:
        raise NotImplementedError

    def _start_at(self, offset: int) -> None:
        self._pos = self._end = offset
        self._started = True

    def _push(self, samples: np.ndarray) -> None:
        if samples.size:
            self._chunks.append(samples)
            self._end += samples.size

    def take(self, start_s: float, end_s: float) -> np.ndarray:
        """Samples of [start_s, end_s); shorter (or empty) where the track ends first."""
        a, b = round(start_s * self._rate), round(end_s * self._rate)
        while (not self._started or self._end < b) and not self._eof:
            self._pull()
        buf = (self._chunks[0] if len(self._chunks) == 1
               else np.concatenate(self._chunks) if self._chunks else np.zeros(0, np.float32))
        hi = min(b, self._end)
        out = np.zeros(0, np.float32)
        if hi > a:
            lead = max(0, min(self._pos, hi) - a)
            first = min(max(a - self._pos, 0), len(buf))
            last = max(hi - self._pos, first)
            out = np.concatenate([np.zeros(lead, np.float32), buf[first:last]]) if lead else buf[first:last].copy()
        cut = min(max(b - self._pos, 0), len(buf))
        self._chunks = [buf[cut:]] if cut < len(buf) else []
        self._pos += cut
        return np.clip(out, -1.0, 1.0, out=out)

    @property
    def end_s(self) -> float:
        return self._end / self._rate

    def ended_before(self, end_s: float) -> bool:
        """Whether the track ran out well before ``end_s`` (a truncated file): more
        than a second and more than a tenth short, beyond duration estimates' error."""
        return self._eof and end_s - self.end_s > max(1.0, 0.1 * end_s)

    def close(self) -> None:
        pass


class _PyAVAudio(_AudioTrack):
    """Streaming decode with PyAV, resampled by libswresample."""

    MAX_BAD_PACKETS = 50

    def __init__(self, path: str, uri: str, stream_index: int, origin_s: float, rate: int) -> None:
        super().__init__(uri, rate)
        self._origin_s = origin_s
        try:
            self._container = av.open(path, container_options=_AV_OPEN_OPTIONS, metadata_errors="replace")
            stream = self._container.streams[stream_index]
            self._packets = self._container.demux(stream)
        except (av.error.FFmpegError, IndexError) as err:
            raise DecodeError(f"{uri}: cannot open audio stream {stream_index}: {err}") from err
        self._resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
        self._input_shape: tuple | None = None  # (sample format, layout, rate) the resampler was set up for
        self._bad_packets = 0

    def _pull(self) -> None:
        try:
            packet = next(self._packets)
        except StopIteration:
            self._resample(None)
            self._eof = True
            return
        except av.error.FFmpegError as err:
            raise DecodeError(f"{self._uri}: cannot read audio packets: {err}") from err
        try:
            frames = packet.decode()
        except av.error.FFmpegError as err:  # a damaged packet: skip it, as players do
            self._bad_packets += 1
            if self._bad_packets > self.MAX_BAD_PACKETS:
                raise DecodeError(f"{self._uri}: over {self.MAX_BAD_PACKETS} undecodable audio packets: {err}") from err
            return
        for frame in frames:
            if not self._started:
                t = frame.time if frame.time is not None else self._origin_s
                self._start_at(round((t - self._origin_s) * self._rate))
            self._resample(frame)

    def _resample(self, frame: av.AudioFrame | None) -> None:
        try:
            if frame is not None:
                shape = (frame.format.name, frame.layout.name, frame.sample_rate)
                if shape != self._input_shape:  # the stream changed its rate or channels mid-way
                    if self._input_shape is not None:
                        self._resample(None)
                    self._resampler = av.AudioResampler(format="flt", layout="mono", rate=self._rate)
                    self._input_shape = shape
            for out in self._resampler.resample(frame):
                self._push(out.to_ndarray().reshape(-1))
        except (av.error.FFmpegError, ValueError) as err:
            raise DecodeError(f"{self._uri}: cannot resample audio: {err}") from err
        if not self._started and frame is None:
            self._start_at(0)

    def close(self) -> None:
        self._container.close()


class _TorchaudioAudio(_AudioTrack):
    """Chunked ``torchaudio.load`` + ``torchaudio.functional.resample`` (the default stream)."""

    CHUNK_S = 30.0

    def __init__(self, path: str, uri: str, rate: int) -> None:
        super().__init__(uri, rate)
        import torchaudio  # noqa: PLC0415 (optional, heavy)

        self._ta = torchaudio
        self._path = path
        self._offset = 0  # source frames read so far
        self._source_rate = 0
        self._pull()

    def _pull(self) -> None:
        chunk = round(self.CHUNK_S * (self._source_rate or 48000))
        try:
            wave, source_rate = self._ta.load(self._path, frame_offset=self._offset, num_frames=chunk)
            got = wave.shape[-1]
            if got and source_rate != self._rate:
                wave = self._ta.functional.resample(wave, source_rate, self._rate)
        except (RuntimeError, OSError, ValueError) as err:
            raise DecodeError(f"{self._uri}: torchaudio cannot read audio: {err}") from err
        self._source_rate = source_rate
        if not self._started:
            self._start_at(0)
        self._offset += got
        self._push(wave.mean(dim=0).float().numpy())
        self._eof = got < chunk


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
               backend: str) -> Iterator[_AudioTrack]:
    """The audio track of a file with the configured backend (``auto`` falls back to PyAV)."""
    track: _AudioTrack | None = None
    if backend == "torchaudio" or (backend == "auto" and _torchaudio_importable()):
        try:
            track = _TorchaudioAudio(path, uri, rate)
        except DecodeError:
            if backend == "torchaudio":
                raise
            logger.info("%s: torchaudio cannot read it; decoding audio with PyAV", uri)
    if track is None:
        track = _PyAVAudio(path, uri, stream_index, origin_s, rate)
    try:
        yield track
    finally:
        track.close()


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
    frames = _FrameSampler(path, item.uri, info, config) if info.video is not None else None
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
                samples = audio.take(start, end)
                if samples.size:
                    yield Segment(item.uri, item.etag, "audio", start, end, samples)
            if text:
                yield Segment(item.uri, item.etag, "text", start, end, text, text=text)
        if frames is None and audio is not None and audio.ended_before(bounds[-1][1]):
            raise DecodeError(f"{item.uri}: truncated file: the audio ends at {audio.end_s:.2f} s "
                              f"of the {info.duration_s:.2f} s the container declares")


def _decode_image(item, path: str, config: DecodeConfig) -> Iterator[Segment]:
    size = os.path.getsize(path)
    check_file_size(item.uri, size, config)
    if size == 0:
        raise ProbeError(f"{item.uri}: empty file (0 bytes)")
    try:
        image = Image.open(path)
    except Image.DecompressionBombError as err:
        raise LimitExceededError(f"{item.uri}: image declares too many pixels: {err}") from err
    except (OSError, SyntaxError, ValueError) as err:
        raise ProbeError(f"{item.uri}: not a readable image: {err}") from err
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
        except (OSError, SyntaxError, ValueError, EOFError) as err:
            raise DecodeError(f"{item.uri}: cannot decode image: {err}") from err
    yield Segment(item.uri, item.etag, "image", 0.0, 0.0, pixels)


def _decode_text(item, path: str, config: DecodeConfig) -> Iterator[Segment]:
    check_file_size(item.uri, os.path.getsize(path), config)
    if item.uri.lower().endswith(".txt"):
        # Only the first max_text_chars characters are kept: read no more than they can take.
        data = _read_prefix(path, item.uri, 4 * config.max_text_chars + 4)
        text = " ".join(captions.decode_text(data).split())[:config.max_text_chars]
        if text:
            yield Segment(item.uri, item.etag, "text", 0.0, 0.0, text, text=text)
        return
    cues = _read_cues(path, item.uri, config)
    end = min(max((c.end_s for c in cues), default=0.0), config.max_duration_s)
    bounds = segment_bounds(end, config.segment_s)
    for (start, stop), text in zip(bounds, captions.texts_per_segment(cues, bounds, config.max_text_chars)):
        if text:
            yield Segment(item.uri, item.etag, "text", start, stop, text, text=text)


def _read_prefix(path: str, uri: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as err:
        raise ProbeError(f"{uri}: cannot read: {err}") from err


def _read_cues(path: str, uri: str, config: DecodeConfig) -> list[captions.Cue]:
    """Cues of one caption file, refused when over max_caption_bytes or when no cue parses."""
    data = _read_prefix(path, uri, config.max_caption_bytes + 1)
    if len(data) > config.max_caption_bytes:
        raise LimitExceededError(f"{uri}: caption file is over max_caption_bytes={config.max_caption_bytes}")
    parsed = captions.parse_captions(captions.decode_text(data), max_cue_chars=config.max_text_chars,
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
        with _fetch(uri) as path:
            cues.extend(_read_cues(path, uri, config))
    return sorted(cues, key=lambda c: (c.start_s, c.end_s))


@contextlib.contextmanager
def _fetch(uri: str) -> Iterator[str]:
    """``storage.local_path`` with storage failures reported as probe errors."""
    with contextlib.ExitStack() as stack:
        try:
            path = stack.enter_context(storage.local_path(uri))
        except SinkError as err:
            raise ProbeError(f"{uri}: cannot fetch: {err}") from err
        yield path


_DECODERS: dict[str, Callable[..., Iterator[Segment]]] = {
    "video": _decode_av,
    "audio": _decode_av,
    "image": _decode_image,
    "text": _decode_text,
}


def decode_item(item, config: DecodeConfig) -> Iterator[Segment]:
    """Decode one ``MediaItem`` into segments, in time order, streaming.

    Raises a ``DecodeError`` subclass naming the URI and the reason; an error can
    come after some segments were yielded (a file truncated mid-way), so callers
    treat an item as failed as a whole.
    """
    decoder = _DECODERS.get(item.kind)
    if decoder is None:
        raise UnsupportedMediaError(f"{item.uri}: unknown kind {item.kind!r} (expected one of {sorted(_DECODERS)})")
    check_file_size(item.uri, item.size, config)  # refuse before fetching a huge object
    with _fetch(item.uri) as path:
        yield from decoder(item, path, config)
