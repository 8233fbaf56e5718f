"""What a media file is before it is decoded: content sniffing and PyAV probing.

``probe`` opens a container once (never a playlist, a concat list or anything
that would make FFmpeg read other files or URLs), lists its streams and their
declared sizes and finds its duration, and checks all of them against the
limits of a ``DecodeConfig`` before any frame is decoded.
"""

from __future__ import annotations

import codecs
import dataclasses
import os

import av

from .audio import AV_OPEN_OPTIONS
from .decode_config import DecodeConfig, LimitExceededError, ProbeError, UnsupportedMediaError

# Demuxers that read other files or URLs named inside the content, or that are
# not media at all: never opened, whatever the extension says.
_REFUSED_DEMUXERS = frozenset({"hls", "applehttp", "dash", "concat", "lavfi", "sdp", "rtp", "rtsp", "tty",
                               "ffmetadata"})
# Texts that make FFmpeg open other files or URLs (playlists, concat lists, session
# descriptions): refused before FFmpeg sees them, whatever the extension says.
_REFUSED_SIGNATURES = (b"#EXTM3U", b"ffconcat", b";FFMETADATA", b"v=0", b"<?xml", b"<MPD")
SNIFF_BYTES = 192


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
    head = read_prefix(path, uri, SNIFF_BYTES).removeprefix(codecs.BOM_UTF8).lstrip()
    if head.startswith(_REFUSED_SIGNATURES):
        raise UnsupportedMediaError(f"{uri}: a playlist or stream description ({head[:12]!r}...), not a media "
                                    "file: refused unopened (it would make the decoder read other files)")
    try:
        container = av.open(path, container_options=AV_OPEN_OPTIONS, metadata_errors="replace")
    except (av.error.FFmpegError, OSError, UnicodeDecodeError) as err:
        raise ProbeError(f"{uri}: not a readable media container: {ffmpeg_reason(err)}") from err
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
            raise ProbeError(f"{uri}: cannot read packets to find the duration: {ffmpeg_reason(err)}") from err
    info = MediaInfo(container=fmt, size_bytes=size, duration_s=duration_s, start_s=start_s, streams=streams)
    for s in streams:
        if s.type == "video" and s.width * s.height > config.max_pixels:
            raise LimitExceededError(
                f"{uri}: video stream {s.index} is {s.width}x{s.height}, over max_pixels={config.max_pixels}")
    if duration_s > config.max_duration_s:
        raise LimitExceededError(f"{uri}: duration {duration_s:.1f} s is over max_duration_s={config.max_duration_s}")
    return info


def ffmpeg_reason(err: BaseException) -> str:
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


def read_prefix(path: str, uri: str, limit: int) -> bytes:
    try:
        with open(path, "rb") as f:
            return f.read(limit)
    except OSError as err:
        raise ProbeError(f"{uri}: cannot read: {err.strerror or err}") from err


def sniff_file(path: str, uri: str) -> str | None:
    return sniff(read_prefix(path, uri, SNIFF_BYTES))
