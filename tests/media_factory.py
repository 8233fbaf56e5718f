"""Small real media files for tests, generated with PyAV and Pillow.

Every helper writes one file to the path it is given and returns that path, so
tests build what they need in ``tmp_path``. The files are tiny (64x64 frames, a
few seconds) and take milliseconds to make.

Video frames are flat grey with a level that encodes the frame index
(``frame_level(i)``, cycling after ``MAX_FRAMES`` frames), so a test can tell
which frame a decoder sampled with ``frame_index_of(pixels)`` even after H.264
compression and resizing.
"""

from __future__ import annotations

import fractions
import math
import os
import struct
import zlib
from pathlib import Path

import av
import numpy as np
from PIL import Image

TONE_HZ = 440.0
_LEVEL_BASE = 16
_LEVEL_STEP = 7  # grey levels 7 apart survive yuv420 + crf 10 with a wide margin
MAX_FRAMES = (255 - _LEVEL_BASE) // _LEVEL_STEP + 1  # 35 distinct frames


def frame_level(index: int) -> int:
    """Grey level (0-255) of frame ``index`` in the generated videos."""
    if not 0 <= index < MAX_FRAMES:
        raise ValueError(f"{index = } must be in [0, {MAX_FRAMES})")
    return _LEVEL_BASE + _LEVEL_STEP * index


def frame_index_of(frame: np.ndarray) -> int:
    """The generated frame index whose grey level is nearest the frame's mean."""
    mean = float(np.asarray(frame, dtype=np.float64).mean())
    return int(np.clip(round((mean - _LEVEL_BASE) / _LEVEL_STEP), 0, MAX_FRAMES - 1))


def tone(duration_s: float, sample_rate: int, channels: int = 1, freq_hz: float = TONE_HZ) -> np.ndarray:
    """A sine tone at half amplitude, float32 (channels, samples)."""
    t = np.arange(int(round(duration_s * sample_rate))) / sample_rate
    wave = (0.5 * np.sin(2 * math.pi * freq_hz * t)).astype(np.float32)
    return np.repeat(wave[None, :], channels, axis=0)


_SAMPLE_TYPES = {"s16": (np.int16, 32767), "s32": (np.int32, 2**31 - 1), "flt": (np.float32, 0), "dbl": (np.float64, 0)}


def _encode_audio(container: av.container.OutputContainer, stream: av.audio.stream.AudioStream,
                  samples: np.ndarray, sample_rate: int, fmt: str) -> None:
    """Feed float32 (channels, n) samples to ``stream`` in codec-sized frames of format ``fmt``."""
    layout = "mono" if samples.shape[0] == 1 else "stereo"
    audio_format = av.AudioFormat(fmt)
    dtype, scale = _SAMPLE_TYPES[audio_format.packed.name]
    chunk = stream.codec_context.frame_size or 1024
    pts = 0
    for start in range(0, samples.shape[1], chunk):
        block = samples[:, start:start + chunk]
        if scale:
            block = np.clip(block, -1, 1) * scale
        data = block.astype(dtype)
        data = np.ascontiguousarray(data if audio_format.is_planar else data.T.reshape(1, -1))
        frame = av.AudioFrame.from_ndarray(data, format=fmt, layout=layout)
        frame.sample_rate = sample_rate
        frame.pts = pts
        frame.time_base = fractions.Fraction(1, sample_rate)
        pts += block.shape[1]
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def make_video(path: str | os.PathLike, *, duration_s: float = 4.0, fps: int = 8, size: int = 64,
               audio: bool = True, video: bool = True, audio_rate: int = 44100,
               container_format: str | None = None, faststart: bool = False) -> Path:
    """An H.264 (+ AAC tone) video whose frame i is flat grey ``frame_level(i % MAX_FRAMES)``.

    ``.webm`` paths get VP8 (+ Opus) instead. ``video=False`` leaves only the audio
    track (an audio file in a video container). ``faststart`` moves the mp4 index
    to the front (so a truncated copy still probes).
    """
    path = Path(path)
    n_frames = int(round(duration_s * fps))
    webm = path.suffix.lower() == ".webm"
    options = {"movflags": "+faststart"} if faststart and not webm else {}
    with av.open(str(path), mode="w", format=container_format, options=options) as out:
        vstream = None
        if video and webm:
            vstream = out.add_stream("libvpx", rate=fps, options={"crf": "4", "b:v": "1M"})
        elif video:
            vstream = out.add_stream("libx264", rate=fps, options={"crf": "10", "preset": "ultrafast"})
        if vstream is not None:
            vstream.width = vstream.height = size
            vstream.pix_fmt = "yuv420p"
        astream = None
        if audio:
            if webm:
                audio_rate = 48000
                astream = out.add_stream("libopus", rate=audio_rate, layout="stereo")
            else:
                astream = out.add_stream("aac", rate=audio_rate, layout="stereo")
        for i in range(n_frames if vstream is not None else 0):
            rgb = np.full((size, size, 3), frame_level(i % MAX_FRAMES), dtype=np.uint8)
            frame = av.VideoFrame.from_ndarray(rgb, format="rgb24")
            frame.pts = i
            frame.time_base = fractions.Fraction(1, fps)
            out.mux(vstream.encode(frame))
        if vstream is not None:
            out.mux(vstream.encode(None))
        if astream is not None:
            fmt = astream.codec_context.format.name
            _encode_audio(out, astream, tone(duration_s, audio_rate, channels=2), audio_rate, fmt)
    return path


def make_wav(path: str | os.PathLike, *, duration_s: float = 0.5, sample_rate: int = 8000,
             channels: int = 1, freq_hz: float = TONE_HZ) -> Path:
    """A 16-bit PCM WAV tone."""
    path = Path(path)
    with av.open(str(path), mode="w", format="wav") as out:
        stream = out.add_stream("pcm_s16le", rate=sample_rate, layout="mono" if channels == 1 else "stereo")
        _encode_audio(out, stream, tone(duration_s, sample_rate, channels, freq_hz), sample_rate, "s16")
    return path


def make_mp3(path: str | os.PathLike, *, duration_s: float = 1.0, sample_rate: int = 22050,
             freq_hz: float = TONE_HZ) -> Path:
    """An MP3 tone (libmp3lame)."""
    path = Path(path)
    with av.open(str(path), mode="w", format="mp3") as out:
        stream = out.add_stream("libmp3lame", rate=sample_rate, layout="mono")
        fmt = stream.codec_context.format.name
        _encode_audio(out, stream, tone(duration_s, sample_rate, 1, freq_hz), sample_rate, fmt)
    return path


def make_png(path: str | os.PathLike, *, width: int = 48, height: int = 32,
             color: tuple[int, int, int] = (200, 30, 60)) -> Path:
    """A flat-colour RGB PNG."""
    path = Path(path)
    Image.new("RGB", (width, height), color).save(path)
    return path


def make_png_declaring(path: str | os.PathLike, width: int, height: int) -> Path:
    """A tiny PNG whose header declares ``width`` x ``height`` (an image bomb's shape).

    Only the IHDR chunk is rewritten; the pixel data stays that of a 1x1 image,
    so decoding it would fail, but a decoder that checks the size first never tries.
    """
    def chunk(tag: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + tag + data + struct.pack(">I", zlib.crc32(tag + data) & 0xFFFFFFFF)

    path = Path(path)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    raw = zlib.compress(b"\x00\x00\x00\x00")
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", raw) + chunk(b"IEND", b""))
    return path


def _ts(seconds: float, sep: str) -> str:
    ms = int(round(seconds * 1000))
    h, rem = divmod(ms, 3_600_000)
    m, rem = divmod(rem, 60_000)
    s, ms = divmod(rem, 1000)
    return f"{h:02d}:{m:02d}:{s:02d}{sep}{ms:03d}"


def make_vtt(path: str | os.PathLike, cues: list[tuple[float, float, str]]) -> Path:
    """A WebVTT file with the given (start_s, end_s, text) cues."""
    path = Path(path)
    blocks = ["WEBVTT", ""]
    for i, (start, end, text) in enumerate(cues, 1):
        blocks += [f"cue-{i}", f"{_ts(start, '.')} --> {_ts(end, '.')}", text, ""]
    path.write_text("\n".join(blocks), encoding="utf-8")
    return path


def make_srt(path: str | os.PathLike, cues: list[tuple[float, float, str]]) -> Path:
    """A SubRip file with the given (start_s, end_s, text) cues (CRLF line ends, as in the wild)."""
    path = Path(path)
    blocks = []
    for i, (start, end, text) in enumerate(cues, 1):
        blocks += [str(i), f"{_ts(start, ',')} --> {_ts(end, ',')}", text, ""]
    path.write_bytes("\r\n".join(blocks).encode("utf-8"))
    return path


# Cues that cross the 2 s segment boundaries of a 4 s clip: the first lies in
# segment 0 only, the second spans segments 0 and 1, the third lies in segment 1.
BOUNDARY_CUES = [
    (0.2, 1.0, "hello there"),
    (1.5, 2.5, "across the boundary"),
    (3.0, 3.8, "the end"),
]
