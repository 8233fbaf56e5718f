"""A corpus of bad, hostile and awkward-but-valid inputs, generated (nothing in git).

One function per kind of input. Each writes its file(s) under ``src`` (the archive
being indexed; ``outside`` is a folder beside it, never listed) and returns the
``Case``s it made: the input's path and what must become of it under the decode
settings ``CORPUS_DECODE`` (docs/BAD_MEDIA.md is the prose version):

- ``INDEXED``: really decodable; rows of ``modalities`` are written;
- ``DEAD``: dead-lettered at ``stage`` with error class ``error`` and a message
  matching ``reason``;
- ``NOT_LISTED``: never an input (a symbolic link out of the source, a dangling one).

Everything is small (64x64 frames, a few seconds of media): the whole corpus is
made in about two seconds.
"""

from __future__ import annotations

import ctypes
import dataclasses
import fractions
import io
import os
import struct
from collections.abc import Callable, Iterator
from pathlib import Path

import av
import numpy as np
from PIL import Image

from tests import media_factory as mf
from xmodal_index.pipeline.decode import DecodeConfig, DecodeError, decode_item
from xmodal_index.pipeline.types import MediaItem, Segment

INDEXED = "indexed"
DEAD = "dead-lettered"
NOT_LISTED = "not listed"

KiB = 1 << 10
MiB = 1 << 20

# Decode settings the expectations hold for (written into the run test's [decode] table).
CORPUS_DECODE = {
    "segment_s": 1.0,
    "frame_rate_hz": 2.0,
    "max_file_bytes": 2 * MiB,
    "max_caption_bytes": 256 * KiB,
    "timeout_s": 60.0,
    "idle_timeout_s": 30.0,
}

AV = frozenset({"video", "audio"})


@dataclasses.dataclass(frozen=True)
class Case:
    name: str
    path: Path  # the input as the listing names it (the link itself for symbolic links)
    outcome: str  # INDEXED | DEAD | NOT_LISTED
    stage: str | None = None  # DEAD: the dead-letter stage
    error: str | None = None  # DEAD: the error class name
    reason: str | None = None  # DEAD: a regular expression the message matches
    modalities: frozenset[str] = frozenset()  # INDEXED: the modalities of its rows
    kind: str | None = None  # the MediaItem kind its name gives it (None: by extension)


def indexed(name: str, path: Path, modalities: frozenset[str] | set[str]) -> Case:
    return Case(name, Path(path), INDEXED, modalities=frozenset(modalities))


def dead(name: str, path: Path, stage: str, error: str, reason: str) -> Case:
    return Case(name, Path(path), DEAD, stage=stage, error=error, reason=reason)


def not_listed(name: str, path: Path) -> Case:
    return Case(name, Path(path), NOT_LISTED)


def _rng(seed: int) -> np.random.Generator:
    return np.random.default_rng(seed)


def _random_bytes(n: int, seed: int) -> bytes:
    return _rng(seed).integers(0, 256, n, dtype=np.uint8).tobytes()


def _cut(source: Path, dest: Path, fraction: float) -> Path:
    data = source.read_bytes()
    dest.write_bytes(data[:max(1, int(len(data) * fraction))])
    return dest


def _scratch(outside: Path) -> Path:
    """Where whole files are made before being cut or renamed into the source."""
    path = outside / "scratch"
    path.mkdir(exist_ok=True)
    return path


# ------------------------------------------------------------------ empty, truncated, random


def zero_byte_files(src: Path, outside: Path) -> list[Case]:
    cases = []
    for ext in (".mp4", ".mp3", ".png", ".txt", ".vtt"):
        path = src / f"empty_{ext[1:]}{ext}"  # distinct stems: empty.vtt would be a sidecar of empty.mp4
        path.write_bytes(b"")
        cases.append(dead(f"zero-byte {ext}", path, "probe", "ProbeError", r"empty file \(0 bytes\)"))
    return cases


def truncated_mp4(src: Path, outside: Path) -> list[Case]:
    """An mp4 keeps its index (moov) at the end: any cut loses it. With the index moved
    to the front (faststart), a cut leaves a readable index that promises more."""
    whole = mf.make_video(_scratch(outside) / "whole.mp4", duration_s=6.0)
    cases = [dead(f"mp4 cut at {f:.0%}", _cut(whole, src / f"cut_{round(f * 100):02d}pct.mp4", f), "probe",
                  "ProbeError", "not a readable media container") for f in (0.01, 0.5, 0.99)]
    front = mf.make_video(_scratch(outside) / "front.mp4", duration_s=6.0, faststart=True)
    cases.append(dead("faststart mp4 cut at 50%", _cut(front, src / "cut_faststart.mp4", 0.5), "decode",
                      "TruncatedMediaError", "truncated file"))
    return cases


def truncated_webm(src: Path, outside: Path) -> list[Case]:
    """WebM declares its duration in the header: a cut leaves fewer frames than that."""
    whole = mf.make_video(_scratch(outside) / "whole.webm", duration_s=6.0)
    return [
        dead("webm cut at 1%", _cut(whole, src / "cut_01pct.webm", 0.01), "decode", "DecodeError",
             "the video track has no readable frames"),
        dead("webm cut at 25%", _cut(whole, src / "cut_25pct.webm", 0.25), "decode", "TruncatedMediaError",
             r"truncated file: the video ends at 1\.\d+ s and the audio ends at"),
        dead("webm cut at 50%", _cut(whole, src / "cut_50pct.webm", 0.5), "decode", "TruncatedMediaError",
             "truncated file"),
        indexed("webm cut at 97% (within a second of its end)", _cut(whole, src / "cut_97pct.webm", 0.97), AV),
    ]


def truncated_mp3(src: Path, outside: Path) -> list[Case]:
    """MP3 has no index; its Xing header declares the length the cut no longer holds."""
    whole = mf.make_mp3(_scratch(outside) / "whole.mp3", duration_s=6.0)
    return [
        dead("mp3 cut at 1%", _cut(whole, src / "cut_01pct.mp3", 0.01), "probe", "ProbeError",
             "not a readable media container"),
        dead("mp3 cut at 50%", _cut(whole, src / "cut_50pct.mp3", 0.5), "decode", "TruncatedMediaError",
             r"truncated file: the audio ends at 2\.\d+ s of the 6\.\d+ s"),
        indexed("mp3 cut at 97% (within a second of its end)", _cut(whole, src / "cut_97pct.mp3", 0.97), {"audio"}),
    ]


def random_bytes_with_media_extensions(src: Path, outside: Path) -> list[Case]:
    cases = []
    for i, ext in enumerate((".mp4", ".webm", ".mp3", ".wav", ".ogg")):
        path = src / f"random{ext}"
        path.write_bytes(_random_bytes(20 * KiB, seed=i))
        cases.append(dead(f"random bytes {ext}", path, "probe", "ProbeError", "not a readable media container"))
    for i, ext in enumerate((".png", ".jpg")):
        path = src / f"random{ext}"
        path.write_bytes(_random_bytes(20 * KiB, seed=10 + i))
        cases.append(dead(f"random bytes {ext}", path, "probe", "ProbeError", "not a readable image"))
    path = src / "random.txt"
    path.write_bytes(_random_bytes(20 * KiB, seed=20))
    cases.append(dead("random bytes .txt", path, "probe", "ProbeError", r"binary content \(NUL bytes\)"))
    return cases


def text_named_mp4(src: Path, outside: Path) -> list[Case]:
    path = src / "notes.mp4"
    path.write_text("These are meeting notes, saved with the wrong name.\n" * 40, encoding="utf-8")
    return [dead("text file named .mp4", path, "probe", "ProbeError", "not a readable media container")]


def damaged_midway_mp4(src: Path, outside: Path) -> list[Case]:
    """Zeroed bytes inside the media data: decoders conceal the damaged frames, as players do."""
    data = bytearray(mf.make_video(_scratch(outside) / "damaged.mp4", duration_s=4.0).read_bytes())
    middle = len(data) // 2
    data[middle:middle + 512] = bytes(512)
    path = src / "damaged_midway.mp4"
    path.write_bytes(bytes(data))
    return [indexed("mp4 with zeroed bytes midway", path, AV)]


# ------------------------------------------------------------------ content against the name


def wrong_extensions(src: Path, outside: Path) -> list[Case]:
    """Valid files under another kind's extension are decoded by what they contain."""
    scratch = _scratch(outside)
    webm = mf.make_video(scratch / "real.webm", duration_s=2.0)
    mp4 = mf.make_video(scratch / "real.mp4", duration_s=2.0)
    png = mf.make_png(scratch / "real.png")
    wav = mf.make_wav(scratch / "real.wav", duration_s=1.0)
    vtt = mf.make_vtt(scratch / "real.vtt", [(0.0, 1.5, "captions in a text file")])
    pairs = [("webm named .mp4", webm, "webm_content.mp4", AV),
             ("png named .jpg", png, "png_content.jpg", {"image"}),
             ("mp4 named .png", mp4, "mp4_content.png", AV),
             ("png named .mp4", png, "png_content.mp4", {"image"}),
             ("wav named .txt", wav, "wav_content.txt", {"audio"}),
             ("wav named .mp3", wav, "wav_content.mp3", {"audio"}),
             ("webvtt named .txt", vtt, "vtt_content.txt", {"text"})]
    cases = []
    for name, source, target, modalities in pairs:
        (src / target).write_bytes(source.read_bytes())
        cases.append(indexed(name, src / target, modalities))
    utf16 = src / "utf16_with_bom.txt"  # its BOM (FF FE) looks like an MPEG audio frame sync
    utf16.write_bytes("Notes saved by an old editor, in UTF-16.".encode("utf-16"))
    cases.append(indexed("UTF-16 text with a BOM", utf16, {"text"}))
    return cases


def one_track_only(src: Path, outside: Path) -> list[Case]:
    video = mf.make_video(src / "video_only.mp4", duration_s=3.0, audio=False)
    audio = mf.make_video(src / "audio_only.mp4", duration_s=3.0, video=False)
    return [indexed("video without audio", video, {"video"}), indexed("audio without video", audio, {"audio"})]


def no_media_streams(src: Path, outside: Path) -> list[Case]:
    """An MPEG-TS holding only null packets (no stream at all), and one holding a data stream."""
    empty = src / "no_streams.mp4"
    empty.write_bytes((b"\x47\x1f\xff\x10" + b"\xff" * 184) * 64)
    data_only = src / "data_stream_only.mp4"
    with av.open(str(data_only), "w", format="mpegts") as out:
        stream = out.add_data_stream("bin_data")
        for i in range(3):
            packet = av.Packet(b"telemetry %d" % i)
            packet.stream, packet.pts, packet.dts = stream, i * 1000, i * 1000
            packet.time_base = fractions.Fraction(1, 1000)
            out.mux(packet)
    return [dead("no streams", empty, "probe", "ProbeError", "not a readable media container"),
            dead("data stream only", data_only, "probe", "UnsupportedMediaError",
                 r"no decodable video or audio stream \(streams: data\)")]


def playlists_naming_other_files(src: Path, outside: Path) -> list[Case]:
    """Texts that would make FFmpeg open other files (here a FIFO outside the source,
    which would block whoever opens it): refused unopened."""
    fifo = outside / "blocking.ts"
    if not fifo.exists():
        os.mkfifo(fifo)
    hls = src / "playlist.mp4"
    hls.write_text(f"#EXTM3U\n#EXT-X-TARGETDURATION:1\n#EXTINF:1.0,\n{fifo}\n#EXT-X-ENDLIST\n")
    concat = src / "concat_list.webm"
    concat.write_text(f"ffconcat version 1.0\nfile '{fifo}'\n")
    return [dead("HLS playlist named .mp4", hls, "probe", "UnsupportedMediaError", "a playlist or stream description"),
            dead("concat list named .webm", concat, "probe", "UnsupportedMediaError",
                 "a playlist or stream description")]


# ------------------------------------------------------------------ shapes and time


def extreme_dimensions(src: Path, outside: Path) -> list[Case]:
    tiny = mf.make_video(src / "tiny_2x2.mp4", duration_s=2.0, size=2, audio=False)
    tall = _make_flat_video(src / "tall_16x1024.mp4", width=16, height=1024, pts=range(16), rate=8)
    dot = mf.make_png(src / "one_pixel.png", width=1, height=1)
    sliver = mf.make_png(src / "sliver_1x4000.png", width=1, height=4000)
    return [indexed("2x2 video", tiny, {"video"}), indexed("16x1024 video", tall, {"video"}),
            indexed("1x1 image", dot, {"image"}), indexed("1x4000 image", sliver, {"image"})]


# Frames of the variable-frame-rate clip: presentation times in 1/25 s and what a
# viewer sees from then on (frame i is grey level media_factory.frame_level(i)).
VFR_PTS = (0, 1, 2, 25, 26, 75, 100)
VFR_RATE = 25


def variable_frame_rate(src: Path, outside: Path) -> list[Case]:
    path = _make_flat_video(src / "variable_rate.mp4", width=64, height=64, pts=VFR_PTS, rate=VFR_RATE)
    return [indexed("variable frame rate", path, {"video"})]


def rotated_video(src: Path, outside: Path) -> list[Case]:
    """64x32 frames, left half white, stored with a 90 degree display rotation:
    upright, the white half is at the bottom."""
    path = src / "rotated.mp4"
    with av.open(str(path), "w") as out:
        stream = out.add_stream("libx264", rate=8, options={"preset": "ultrafast", "crf": "10"})
        stream.width, stream.height, stream.pix_fmt = 64, 32, "yuv420p"
        stream.set_display_rotation(90)
        image = np.zeros((32, 64, 3), np.uint8)
        image[:, :32] = 255
        for i in range(16):
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = i, fractions.Fraction(1, 8)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return [indexed("rotated video", path, {"video"})]


def long_duration_in_a_tiny_file(src: Path, outside: Path) -> list[Case]:
    """Two frames ten hours apart (a few KB that declare 10 h): refused by its length.
    A WAV whose header declares two hours of samples but holds one second: FFmpeg
    measures WAV data by what the file holds, so it is one second long."""
    long = _make_flat_video(src / "ten_hours.mkv", width=64, height=64, pts=(0, 36_000), rate=1,
                            container_format="matroska")
    wav = src / "lying_header.wav"
    rate, seconds_declared = 16000, 2 * 3600
    samples = (mf.tone(1.0, rate)[0] * 32767).astype("<i2").tobytes()
    declared = seconds_declared * rate * 2
    header = (b"RIFF" + struct.pack("<I", 36 + declared) + b"WAVE" + b"fmt " +
              struct.pack("<IHHIIHH", 16, 1, 1, rate, rate * 2, 2, 16) + b"data" + struct.pack("<I", declared))
    wav.write_bytes(header + samples)
    return [dead("10 h declared by 2 frames", long, "probe", "LimitExceededError", "over max_duration_s"),
            indexed("wav header declaring 2 h of 1 s", wav, {"audio"})]


def many_streams(src: Path, outside: Path) -> list[Case]:
    path = src / "twenty_tracks.mkv"
    with av.open(str(path), "w", format="matroska") as out:
        streams = [out.add_stream("pcm_s16le", rate=8000, layout="mono") for _ in range(20)]
        for stream in streams:
            frame = av.AudioFrame.from_ndarray(np.zeros((1, 800), np.int16), format="s16", layout="mono")
            frame.sample_rate, frame.pts, frame.time_base = 8000, 0, fractions.Fraction(1, 8000)
            out.mux(stream.encode(frame))
            out.mux(stream.encode(None))
    return [dead("20 streams", path, "probe", "LimitExceededError", "20 streams, over max_streams=16")]


def oversized_file(src: Path, outside: Path) -> list[Case]:
    path = mf.make_wav(src / "too_big.wav", duration_s=70.0, sample_rate=16000)  # 2.2 MB
    return [dead("file over max_file_bytes", path, "probe", "LimitExceededError", "over max_file_bytes")]


# ------------------------------------------------------------------ images


def image_bombs(src: Path, outside: Path) -> list[Case]:
    """Tiny files whose headers declare billions of pixels."""
    png = mf.make_png_declaring(src / "bomb.png", 100_000, 100_000)
    gif = src / "bomb.gif"
    gif.write_bytes(b"GIF89a" + struct.pack("<HHBBB", 65535, 65535, 0, 0, 0) +
                    b"\x2c" + struct.pack("<HHHHB", 0, 0, 1, 1, 0) + b"\x02\x02\x4c\x01\x00\x3b")
    jpg = src / "bomb.jpg"
    buf = io.BytesIO()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(buf, format="JPEG")
    data = bytearray(buf.getvalue())
    sof = data.index(b"\xff\xc0")
    data[sof + 5:sof + 9] = struct.pack(">HH", 60000, 60000)
    jpg.write_bytes(bytes(data))
    below_pillow = mf.make_png_declaring(src / "over_max_pixels.png", 9000, 9000)  # 81 Mpx: only our limit
    return [dead("png declaring 100000x100000", png, "probe", "LimitExceededError", "too many pixels"),
            dead("gif declaring 65535x65535", gif, "probe", "LimitExceededError", "too many pixels"),
            dead("jpeg declaring 60000x60000", jpg, "probe", "LimitExceededError", "too many pixels"),
            dead("png declaring 9000x9000", below_pillow, "probe", "LimitExceededError",
                 "9000x9000, over max_pixels=67108864")]


# ------------------------------------------------------------------ captions and text


def malformed_captions(src: Path, outside: Path) -> list[Case]:
    bad = src / "all_bad.vtt"
    bad.write_text("WEBVTT\n\n00:00:xx.000 --> 00:00:01.000\nno\n\n00:00:03.000 --> 00:00:01.000\nbackwards\n")
    mixed = src / "mixed.srt"
    mixed.write_bytes(b"1\r\n00:00:00,000 --> 00:00:01,500\r\nkept\r\n\r\n2\r\nnot a timing line\r\nlost\r\n\r\n"
                      b"3\r\n00:00:02,000 --> 00:00:03,000\r\ncaf\xe9 in Latin-1\r\n")
    binary = src / "binary.vtt"
    binary.write_bytes(b"WEBVTT\n\n" + _random_bytes(4 * KiB, seed=30))
    header_only = src / "header_only.vtt"
    header_only.write_text("WEBVTT\n\nNOTE nothing else\n")
    blank = src / "blank.txt"
    blank.write_text(" \n\t\n   \n")
    return [dead("captions with only malformed cues", bad, "probe", "ProbeError",
                 r"no valid caption cue \(2 malformed\)"),
            indexed("captions partly malformed, Latin-1 bytes", mixed, {"text"}),
            dead("captions with binary content", binary, "probe", "ProbeError", "binary content"),
            dead("captions without a cue", header_only, "decode", "NoContentError", "nothing to index"),
            dead("blank text file", blank, "decode", "NoContentError", "nothing to index")]


def huge_captions(src: Path, outside: Path) -> list[Case]:
    """Over max_caption_bytes; and, within it, the inputs that make naive parsers
    quadratic: one cue of tens of thousands of tags, thousands of cues overlapping
    every segment."""
    limit = CORPUS_DECODE["max_caption_bytes"]
    huge = src / "huge.vtt"
    cue = "00:00:00.000 --> 00:00:01.000\nwords words words\n\n"
    huge.write_text("WEBVTT\n\n" + cue * (limit // len(cue) + 1))
    tags = src / "tag_flood.vtt"
    tags.write_text("WEBVTT\n\n00:00:00.000 --> 00:00:01.000\n" + "<b>x" * (limit // 5) + "\n")
    overlap = src / "overlap_flood.srt"
    block = "{i}\n00:00:00,000 --> 00:01:00,000\nsame words\n\n"
    overlap.write_text("".join(block.format(i=i) for i in range(limit // 50)))
    return [dead("caption over max_caption_bytes", huge, "probe", "LimitExceededError", "over max_caption_bytes"),
            indexed("one cue of 50k tags", tags, {"text"}),
            indexed("5k cues overlapping every segment", overlap, {"text"})]


def bad_sidecars(src: Path, outside: Path) -> list[Case]:
    """A caption sidecar belongs to its video: an unreadable one fails the item, naming the sidecar."""
    broken = mf.make_video(src / "with_broken_captions.mp4", duration_s=2.0)
    (src / "with_broken_captions.vtt").write_text("WEBVTT\n\n1:2:3:4 --> nonsense\nbad\n")
    large = mf.make_video(src / "with_huge_captions.mp4", duration_s=2.0)
    (src / "with_huge_captions.srt").write_text("x" * (CORPUS_DECODE["max_caption_bytes"] + 1))
    good = mf.make_video(src / "with_latin1_captions.mp4", duration_s=2.0)
    (src / "with_latin1_captions.srt").write_bytes(b"1\n00:00:00,000 --> 00:00:01,500\nd\xe9j\xe0 vu\n")
    return [dead("video with malformed sidecar", broken, "probe", "ProbeError",
                 r"with_broken_captions\.mp4: caption sidecar .*with_broken_captions\.vtt: no valid caption cue"),
            dead("video with oversized sidecar", large, "probe", "LimitExceededError",
                 r"caption sidecar .*with_huge_captions\.srt: caption file is over max_caption_bytes"),
            indexed("video with Latin-1 sidecar", good, AV | {"text"})]


# ------------------------------------------------------------------ names and links


HOSTILE_NAMES = ("ctl\n\x1b[31mred\r.png", "-rf --no-preserve-root.png", "..png", "a\\..\\..\\b.png",
                 "\u202egnp.exe.png", "tab\there.png", "quote'\"`$(true).png")


def hostile_names(src: Path, outside: Path) -> list[Case]:
    """Names with control characters, dots, backslashes, shell syntax: plain names to us."""
    cases = []
    for i, name in enumerate(HOSTILE_NAMES):
        path = src / name
        path.write_bytes(mf.make_png(_scratch(outside) / f"hostile{i}.png", color=(20 * i, 100, 200)).read_bytes())
        cases.append(indexed(f"hostile name {name!r}", path, {"image"}))
    longest = mf.make_png(src / ("n" * 251 + ".png"))
    cases.append(indexed("255-byte file name", longest, {"image"}))
    return cases


def non_utf8_name(src: Path, outside: Path) -> list[Case]:
    """A name that is not UTF-8 (Latin-1 bytes, as old archives have): Python sees it
    with a surrogate escape."""
    raw = os.fsencode(str(src)) + b"/caf\xe9.png"
    mf.make_png(_scratch(outside) / "latin1.png")
    os.replace(os.fsencode(str(_scratch(outside) / "latin1.png")), raw)
    return [indexed("non-UTF-8 file name", Path(os.fsdecode(raw)), {"image"})]


def symbolic_links(src: Path, outside: Path) -> list[Case]:
    """Links are followed inside the source only; links out of it, dangling links and loops
    are dead letters at stage list (a linked directory is not entered)."""
    (src / "linked").mkdir(exist_ok=True)
    target = mf.make_png(src / "linked" / "target.png")
    inside = src / "link_inside.png"
    inside.symlink_to(os.path.join("linked", "target.png"))
    secret = mf.make_png(outside / "secret.png", color=(1, 2, 3))
    out_abs = src / "link_outside_absolute.png"
    out_abs.symlink_to(secret)
    out_rel = src / "link_outside_relative.png"
    out_rel.symlink_to(os.path.relpath(secret, src))
    dangling = src / "dangling.png"
    dangling.symlink_to(src / "no_such_file.png")
    loop = src / "loop.png"
    loop.symlink_to("loop.png")
    linked_dir = src / "linked_dir"
    linked_dir.symlink_to(outside, target_is_directory=True)
    return [indexed("link target inside the source", target, {"image"}),
            indexed("link inside the source", inside, {"image"}),
            dead("link to a file outside (absolute)", out_abs, "list", "SymlinkOutsideSourceError",
                 "outside the source root"),
            dead("link to a file outside (relative)", out_rel, "list", "SymlinkOutsideSourceError",
                 "outside the source root"),
            dead("dangling link", dangling, "list", "BrokenSymlinkError", "target does not exist"),
            dead("link to itself", loop, "list", "BrokenSymlinkError", "loop of links"),
            not_listed("file under a linked directory", linked_dir / "secret.png")]


# ------------------------------------------------------------------ faults


FAULT_URI_PREFIX = "fault://"


def _segments(uri: str, n: int, nbytes: int = 100_000) -> Iterator[Segment]:
    for k in range(n):
        yield Segment(uri, "e", "audio", float(k), float(k + 1), np.zeros(nbytes // 4, np.float32))


def decode_or_fail(item: MediaItem, config: DecodeConfig) -> Iterator[Segment]:
    """A decode function (``DecodeSegments(decode_fn=...)``) for fault tests: items
    named ``fault://NAME`` yield 100 kB segments, then fail as NAME says (good,
    fails-small, fails-large, crashes: a SIGSEGV); other items go to decode_item."""
    if not item.uri.startswith(FAULT_URI_PREFIX):
        yield from decode_item(item, config)
        return
    name = item.uri[len(FAULT_URI_PREFIX):]
    if name == "good":
        yield from _segments(item.uri, 3)
    elif name == "fails-small":
        yield from _segments(item.uri, 2)
        raise DecodeError(f"{item.uri}: damaged midway")
    elif name == "fails-large":
        yield from _segments(item.uri, 20)
        raise DecodeError(f"{item.uri}: damaged after the hold filled")
    elif name == "crashes":
        yield from _segments(item.uri, 2)
        ctypes.string_at(0)  # reads address 0: SIGSEGV
    else:
        raise ValueError(f"unknown fault {name!r}")


# ------------------------------------------------------------------ helpers


def _make_flat_video(path: Path, *, width: int, height: int, pts, rate: int,
                     container_format: str | None = None) -> Path:
    """H.264 frames at the given presentation times (in 1/rate s), frame i flat grey
    ``frame_level(i)``."""
    with av.open(str(path), "w", format=container_format) as out:
        stream = out.add_stream("libx264", rate=rate, options={"preset": "ultrafast", "crf": "10"})
        stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
        for i, t in enumerate(pts):
            image = np.full((height, width, 3), mf.frame_level(i % mf.MAX_FRAMES), np.uint8)
            frame = av.VideoFrame.from_ndarray(image, format="rgb24")
            frame.pts, frame.time_base = t, fractions.Fraction(1, rate)
            out.mux(stream.encode(frame))
        out.mux(stream.encode(None))
    return path


GENERATORS: tuple[Callable[[Path, Path], list[Case]], ...] = (
    zero_byte_files, truncated_mp4, truncated_webm, truncated_mp3, random_bytes_with_media_extensions,
    text_named_mp4, damaged_midway_mp4, wrong_extensions, one_track_only, no_media_streams,
    playlists_naming_other_files, extreme_dimensions, variable_frame_rate, rotated_video,
    long_duration_in_a_tiny_file, many_streams, oversized_file, image_bombs, malformed_captions, huge_captions,
    bad_sidecars, hostile_names, non_utf8_name, symbolic_links,
)


def build_corpus(src: Path, outside: Path, *, skip: tuple[Callable, ...] = ()) -> list[Case]:
    """Every case, written under ``src`` (created) with helpers under ``outside``."""
    src.mkdir(parents=True, exist_ok=True)
    outside.mkdir(parents=True, exist_ok=True)
    cases: list[Case] = []
    for make in GENERATORS:
        if make not in skip:
            cases.extend(make(src, outside))
    names = [c.name for c in cases]
    duplicates = {n for n in names if names.count(n) > 1}
    if duplicates:
        raise ValueError(f"case names must be unique: {sorted(duplicates)}")
    return cases
