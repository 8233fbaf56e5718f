"""The bundled sample archive: real media with known ground truth, from a committed subset.

``build_sample_archive(out_dir)`` writes, from the licensed subset committed in
``xmodal_index/sample_data`` (FSDD spoken digits, UCI handwritten digits):

- ``videos/clip_XX.mp4``: H.264 + AAC. The video is a row of slots of ``slot_s``
  seconds; in each slot one handwritten digit is shown (8x8 scaled up, white on
  black) while the audio speaks the same digit (one FSDD recording resampled to
  the track rate at an offset inside the slot, silence around it). Beside it a
  WebVTT sidecar ``clip_XX.vtt`` with one cue per slot naming the digit.
  With two videos or more, the second to last has no caption sidecar; with three
  or more, the last is a VP9 + Opus ``.webm`` with an ``.srt`` sidecar (when this
  PyAV build can encode them; otherwise another captioned mp4).
- ``audio/utt_XX.wav``: unchanged FSDD recordings (8 kHz 16-bit PCM), each digit once per 10 files.
- ``images/img_XX.png``: handwritten digits scaled up (64x64 RGB), each digit once per 10 files.
- ``text/note_XX.txt``: short texts naming a digit.
- ``ground_truth.jsonl``: one JSON object per (file, stream, time segment)::

      {"path", "modality", "start_s", "end_s", "digit", "word", "speaker", ...}

  ``path`` is relative to the archive root. A video slot gives three lines,
  modality "video" (frames), "audio" and "text" (its caption; ``path`` names the
  video, ``sidecar`` the caption file). Audio lines add ``speech_start_s`` /
  ``speech_end_s`` (where the digit is spoken) and ``recording`` (the FSDD file);
  frame and image lines add ``image_row`` (the row in scikit-learn's
  digits.csv.gz). Images and texts have ``start_s == end_s == 0``.
- ``LICENSE.md``: the archive is an adapted work of FSDD under CC BY-SA 4.0.

Same configuration (seed included) and same PyAV/FFmpeg build => byte-identical
files (single-threaded encoders, bit-exact muxing). No Beam needed here.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import logging
import shutil
import wave
from importlib import resources
from pathlib import Path

import av
import numpy as np
from PIL import Image

from xmodal_index.encoders.signal import resample as resample  # the one resampler, re-exported

logger = logging.getLogger(__name__)

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
SPEAKERS = ("george", "jackson", "nicolas", "theo", "yweweler")
FSDD_RATE = 8000
AUDIO_RATES = (16000, 22050, 44100)
OPUS_RATES = (8000, 12000, 16000, 24000, 48000)
TEXT_TEMPLATES = (
    "a handwritten {word}",
    "someone saying the number {word}",
    "the digit {word}, written by hand",
    "a voice counting: {word}",
    "the number {word} in white on a black background",
)
GROUND_TRUTH = "ground_truth.jsonl"
LICENSE = "LICENSE.md"
OWN_PATHS = ("videos", "audio", "images", "text", GROUND_TRUTH, LICENSE)
_SPEECH_MARGIN_S = 0.05
_FADE_S = 0.01
_TAIL_ROWS = 4


class SampleArchiveError(Exception):
    """Base error of the sample archive generator."""


class SampleDataError(SampleArchiveError):
    """The committed data subset is missing or unreadable."""


class ArchiveExistsError(SampleArchiveError):
    """The output directory is not empty and overwriting was not asked for."""


class MediaWriteError(SampleArchiveError):
    """Encoding or writing a file of the archive failed."""


@dataclasses.dataclass(frozen=True)
class SampleArchiveConfig:
    """What the sample archive holds. The defaults give about 0.3 MB, written in a second or two."""

    seed: int = 0
    videos: int = 6
    segments_per_video: int = 8
    slot_s: float = 1.0
    fps: int = 10
    frame_size: int = 112
    audio_rate: int = 16000
    audio_files: int = 10
    image_files: int = 10
    text_files: int = 5

    def __post_init__(self) -> None:
        if not 0 <= self.seed < 2**63:
            raise ValueError(f"seed = {self.seed!r} must be in [0, 2**63)")
        if not 1 <= self.videos <= 100:
            raise ValueError(f"videos = {self.videos!r} must be in [1, 100]")
        if not 1 <= self.segments_per_video <= 100:
            raise ValueError(f"segments_per_video = {self.segments_per_video!r} must be in [1, 100]")
        if not 0.2 <= self.slot_s <= 10.0:
            raise ValueError(f"slot_s = {self.slot_s!r} must be in [0.2, 10] seconds")
        if not 5 <= self.fps <= 30:
            raise ValueError(f"fps = {self.fps!r} must be in [5, 30] frames per second")
        if abs(self.slot_s * self.fps - round(self.slot_s * self.fps)) > 1e-6:
            raise ValueError(f"slot_s = {self.slot_s!r} must be a whole number of frames at {self.fps} fps")
        if self.audio_rate not in AUDIO_RATES:
            raise ValueError(f"audio_rate = {self.audio_rate!r} must be one of {AUDIO_RATES} Hz")
        if abs(self.slot_s * self.audio_rate - round(self.slot_s * self.audio_rate)) > 1e-6:
            raise ValueError(f"slot_s = {self.slot_s!r} must be a whole number of samples at {self.audio_rate} Hz")
        if not (32 <= self.frame_size <= 512 and self.frame_size % 8 == 0):
            raise ValueError(f"frame_size = {self.frame_size!r} must be a multiple of 8 in [32, 512] pixels")
        for name in ("audio_files", "image_files", "text_files"):
            if not 0 <= getattr(self, name) <= 100:
                raise ValueError(f"{name} = {getattr(self, name)!r} must be in [0, 100]")

    @property
    def frames_per_slot(self) -> int:
        return round(self.slot_s * self.fps)



@dataclasses.dataclass(frozen=True)
class Recording:
    digit: int
    speaker: str
    index: int
    name: str  # e.g. "7_theo_0.wav"
    wav_bytes: bytes

    def samples(self) -> np.ndarray:
        """float32 mono samples in [-1, 1] at FSDD_RATE."""
        with wave.open(io.BytesIO(self.wav_bytes)) as w:
            if (w.getnchannels(), w.getsampwidth(), w.getframerate()) != (1, 2, FSDD_RATE):
                raise SampleDataError(f"{self.name}: expected 8 kHz mono 16-bit PCM")
            pcm = np.frombuffer(w.readframes(w.getnframes()), dtype="<i2")
        return pcm.astype(np.float32) / 32768.0


@dataclasses.dataclass(frozen=True)
class SampleSubset:
    """The committed subset: FSDD recordings and 8x8 digit images (values 0..16)."""

    recordings: tuple[Recording, ...]
    images: np.ndarray  # uint8 (N, 8, 8)
    labels: np.ndarray  # int64 (N,)
    image_rows: np.ndarray  # int64 (N,), row in scikit-learn's digits.csv.gz
    license_text: bytes

    def recordings_of(self, digit: int) -> list[Recording]:
        return [r for r in self.recordings if r.digit == digit]

    def image_indices_of(self, digit: int) -> np.ndarray:
        return np.flatnonzero(self.labels == digit)


@dataclasses.dataclass(frozen=True)
class SampleManifest:
    """What was written: every file's sha256 and size, keyed by path relative to ``root``."""

    root: str
    config: SampleArchiveConfig
    sha256: dict[str, str]
    sizes: dict[str, int]
    ground_truth: str
    ground_truth_lines: int

    @property
    def paths(self) -> list[str]:
        return sorted(self.sha256)

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes.values())

    @property
    def counts(self) -> dict[str, int]:
        """Number of files per kind (see file_kind)."""
        counts = dict.fromkeys(FILE_KINDS, 0)
        for path in self.sha256:
            counts[file_kind(path)] += 1
        return counts

    @property
    def bytes_by_kind(self) -> dict[str, int]:
        sizes = dict.fromkeys(FILE_KINDS, 0)
        for path, size in self.sizes.items():
            sizes[file_kind(path)] += size
        return sizes


FILE_KINDS = ("video", "caption", "audio", "image", "text", "other")
_KIND_BY_SUFFIX = {".mp4": "video", ".webm": "video", ".vtt": "caption", ".srt": "caption",
                   ".wav": "audio", ".png": "image", ".txt": "text"}


def file_kind(path: str) -> str:
    """Kind of an archive file: video, caption, audio, image, text or other."""
    return _KIND_BY_SUFFIX.get(Path(path).suffix.lower(), "other")


def sample_data_root():
    """The committed subset's folder (an importlib.resources Traversable)."""
    return resources.files("xmodal_index") / "sample_data"


def load_sample_subset() -> SampleSubset:
    """Read the committed subset; raises SampleDataError naming what is missing."""
    root = sample_data_root()
    try:
        recordings = []
        for entry in sorted((root / "fsdd").iterdir(), key=lambda e: e.name):
            if not entry.name.endswith(".wav"):
                continue
            digit, speaker, index = entry.name[:-4].split("_")
            recordings.append(Recording(int(digit), speaker, int(index), entry.name, entry.read_bytes()))
        table = np.loadtxt(io.StringIO((root / "digits" / "digits_subset.csv").read_text("utf-8")),
                           delimiter=",", skiprows=1, dtype=np.int64, ndmin=2)
        license_text = (root / LICENSE).read_bytes()
    except (OSError, ValueError) as err:
        raise SampleDataError(f"committed sample data under {root} is missing or unreadable: {err}") from err
    if table.shape[1] != 66 or table[:, 2:].min() < 0 or table[:, 2:].max() > 16:
        raise SampleDataError(f"{root}/digits/digits_subset.csv: expected source_row,label and 64 pixels 0..16")
    subset = SampleSubset(tuple(recordings), table[:, 2:].reshape(-1, 8, 8).astype(np.uint8),
                          table[:, 1].copy(), table[:, 0].copy(), license_text)
    for digit in range(10):
        if not subset.recordings_of(digit) or not len(subset.image_indices_of(digit)):
            raise SampleDataError(f"committed sample data under {root} has no recording or image of digit {digit}")
    return subset


def digit_gray(image8: np.ndarray, size: int) -> np.ndarray:
    """An 8x8 digit (0..16) scaled up to (size, size) uint8, nearest neighbour, white on black."""
    gray = ((image8.astype(np.uint16) * 255 + 8) // 16).astype(np.uint8)
    scale = size // 8
    return np.repeat(np.repeat(gray, scale, axis=0), scale, axis=1)


def digit_frame(image8: np.ndarray, size: int) -> np.ndarray:
    """The same as digit_gray, as (size, size, 3) uint8 RGB."""
    return np.repeat(digit_gray(image8, size)[:, :, None], 3, axis=2)


def _yuv_frame(gray: np.ndarray) -> av.VideoFrame:
    """A yuv420p frame (limited range) of a gray image, built without a colour conversion.

    The planes live in one zeroed numpy buffer with a few spare rows after the
    last plane, so an encoder reading slightly past a plane reads zeros.
    """
    h, w = gray.shape
    buf = np.zeros((h * 3 // 2 + _TAIL_ROWS, w), dtype=np.uint8)
    buf[:h] = 16 + (gray.astype(np.int32) * 219 + 127) // 255
    buf[h : h * 3 // 2] = 128
    return av.VideoFrame.from_numpy_buffer(buf[: h * 3 // 2], format="yuv420p")


@dataclasses.dataclass(frozen=True)
class _Slot:
    digit: int
    recording: Recording
    image_index: int
    speech_offset: int  # samples from the slot start, at the track rate
    speech: np.ndarray  # float32 at the track rate, fits inside the slot


def _rng(seed: int, *stream: int) -> np.random.Generator:
    return np.random.default_rng(np.random.SeedSequence([seed, *stream]))


def _digit_sequence(rng: np.random.Generator, n: int) -> list[int]:
    digits: list[int] = []
    while len(digits) < n:
        perm = [int(d) for d in rng.permutation(10)]
        if digits and perm[0] == digits[-1]:
            perm = perm[1:] + perm[:1]
        digits.extend(perm)
    return digits[:n]


def _plan_video(subset: SampleSubset, config: SampleArchiveConfig, video: int, rate: int) -> list[_Slot]:
    rng = _rng(config.seed, 1, video)
    speakers = [SPEAKERS[int(i)] for i in rng.permutation(len(SPEAKERS))]
    n_slot = round(config.slot_s * rate)
    margin = round(_SPEECH_MARGIN_S * rate)
    slots = []
    for s, digit in enumerate(_digit_sequence(rng, config.segments_per_video)):
        choices = [r for r in subset.recordings_of(digit) if r.speaker == speakers[s % len(speakers)]]
        recording = choices[int(rng.integers(len(choices)))] if choices else subset.recordings_of(digit)[0]
        image_index = int(rng.choice(subset.image_indices_of(digit)))
        speech = np.clip(resample(recording.samples(), FSDD_RATE, rate), -1.0, 1.0)
        room = n_slot - 2 * margin
        if len(speech) > room:  # longer than the slot: trim with a short fade-out
            speech = speech[:room].copy()
            fade = min(room, round(_FADE_S * rate))
            speech[room - fade:] *= np.linspace(1.0, 0.0, fade, dtype=np.float32)
        offset = margin + int(rng.integers(room - len(speech) + 1))
        slots.append(_Slot(digit, recording, image_index, offset, speech))
    return slots


def _encode_video(path: Path, slots: list[_Slot], subset: SampleSubset, config: SampleArchiveConfig,
                  rate: int, webm: bool) -> None:
    fmt, vcodec, acodec = ("webm", "libvpx-vp9", "libopus") if webm else ("mp4", "libx264", "aac")
    if webm:
        voptions = {"threads": "1", "crf": "32", "b": "0", "deadline": "good", "cpu-used": "4"}
    else:
        # x264's assembly paths give run-to-run differences at some frame sizes
        # (112x112 among them); its C paths are deterministic and fast enough here.
        voptions = {"threads": "1", "crf": "23", "preset": "medium", "x264-params": "asm=0"}
    n_slot = round(config.slot_s * rate)
    audio = np.zeros(n_slot * len(slots), dtype=np.float32)
    for s, slot in enumerate(slots):
        start = s * n_slot + slot.speech_offset
        audio[start:start + len(slot.speech)] = slot.speech
    try:
        with av.open(str(path), "w", format=fmt, options={"fflags": "+bitexact"}) as out:
            vstream = out.add_stream(vcodec, rate=config.fps, options=voptions)
            vstream.width = vstream.height = config.frame_size
            vstream.pix_fmt = "yuv420p"
            vstream.codec_context.gop_size = config.frames_per_slot
            astream = out.add_stream(acodec, rate=rate, layout="mono")
            astream.bit_rate = 24000 if webm else (32000 if rate <= 16000 else 64000)
            frame_index = 0
            for slot in slots:
                gray = digit_gray(subset.images[slot.image_index], config.frame_size)
                for _ in range(config.frames_per_slot):
                    frame = _yuv_frame(gray)
                    frame.pts = frame_index
                    frame_index += 1
                    out.mux(vstream.encode(frame))
            out.mux(vstream.encode(None))
            sample_fmt = "flt" if webm else "fltp"
            for start in range(0, len(audio), 1024):
                chunk = audio[start:start + 1024]
                frame = av.AudioFrame.from_ndarray(chunk[None, :], format=sample_fmt, layout="mono")
                frame.sample_rate = rate
                frame.pts = start
                out.mux(astream.encode(frame))
            out.mux(astream.encode(None))
    except (av.FFmpegError, OSError, ValueError) as err:
        raise MediaWriteError(f"could not write {path}: {err}") from err


def _timestamp(seconds: float, sep: str) -> str:
    ms = round(seconds * 1000)
    return f"{ms // 3_600_000:02d}:{ms // 60_000 % 60:02d}:{ms // 1000 % 60:02d}{sep}{ms % 1000:03d}"


def _captions(slots: list[_Slot], slot_s: float, srt: bool) -> str:
    sep = "," if srt else "."
    blocks = [] if srt else ["WEBVTT\n"]
    for s, slot in enumerate(slots):
        times = f"{_timestamp(s * slot_s, sep)} --> {_timestamp((s + 1) * slot_s, sep)}"
        blocks.append(f"{s + 1}\n{times}\n{DIGIT_WORDS[slot.digit]}\n")
    return "\n".join(blocks)


def webm_available() -> bool:
    """Whether this PyAV build can encode the VP9 + Opus webm clip."""
    return {"libvpx-vp9", "libopus"} <= set(av.codecs_available)


def _line(path: str, modality: str, start_s: float, end_s: float, digit: int, speaker: str | None,
          **extra) -> dict:
    """One ground-truth line: the fixed keys first, then the modality's extra keys."""
    return {"path": path, "modality": modality, "start_s": round(start_s, 6), "end_s": round(end_s, 6),
            "digit": digit, "word": DIGIT_WORDS[digit], "speaker": speaker, **extra}


def _video_lines(rel: str, caption: str | None, slots: list[_Slot], subset: SampleSubset,
                 config: SampleArchiveConfig, rate: int) -> list[dict]:
    lines = []
    for s, slot in enumerate(slots):
        start, end = s * config.slot_s, (s + 1) * config.slot_s
        lines.append(_line(rel, "video", start, end, slot.digit, None, slot=s,
                           image_row=int(subset.image_rows[slot.image_index])))
        speech_start = start + slot.speech_offset / rate
        lines.append(_line(rel, "audio", start, end, slot.digit, slot.recording.speaker, slot=s,
                           speech_start_s=round(speech_start, 6),
                           speech_end_s=round(speech_start + len(slot.speech) / rate, 6),
                           recording=slot.recording.name))
        if caption is not None:
            lines.append(_line(rel, "text", start, end, slot.digit, None, slot=s, sidecar=caption))
    return lines


def _prepare(out: Path, overwrite: bool) -> None:
    if out.exists() and not out.is_dir():
        raise ArchiveExistsError(f"output path '{out}' exists and is not a directory")
    if out.is_dir() and any(out.iterdir()):
        if not overwrite:
            raise ArchiveExistsError(f"output directory '{out}' is not empty")
        for name in OWN_PATHS:
            target = out / name
            if target.is_dir() and not target.is_symlink():
                shutil.rmtree(target)
            elif target.exists() or target.is_symlink():
                target.unlink()
    for sub in ("videos", "audio", "images", "text"):
        (out / sub).mkdir(parents=True, exist_ok=True)


def build_sample_archive(out_dir: str, *, seed: int = 0, videos: int = 6, segments_per_video: int = 8,
                         slot_s: float = 1.0, overwrite: bool = False) -> SampleManifest:
    """Write the sample archive into ``out_dir`` (created if missing) and return its manifest.

    A non-empty ``out_dir`` raises ArchiveExistsError unless ``overwrite``; then the
    archive's own paths (``OWN_PATHS``) are removed first and other files are kept.
    """
    config = SampleArchiveConfig(seed=seed, videos=videos, segments_per_video=segments_per_video, slot_s=slot_s)
    return write_sample_archive(out_dir, config, overwrite=overwrite)


def write_sample_archive(out_dir: str, config: SampleArchiveConfig, *, overwrite: bool = False) -> SampleManifest:
    """Like build_sample_archive, with every setting of SampleArchiveConfig."""
    out = Path(out_dir)
    subset = load_sample_subset()
    try:
        _prepare(out, overwrite)
        n_lines = _write(out, config, subset)
        return _manifest(out, config, n_lines)
    except OSError as err:
        raise MediaWriteError(f"could not write the sample archive under '{out}': {err}") from err


def _write(out: Path, config: SampleArchiveConfig, subset: SampleSubset) -> int:
    """Write every file of the archive; returns the number of ground-truth lines."""
    lines: list[dict] = []
    have_webm = webm_available()
    for v in range(config.videos):
        webm = have_webm and config.videos >= 3 and v == config.videos - 1
        captioned = not (config.videos >= 2 and v == config.videos - 2)
        rate = config.audio_rate if not webm or config.audio_rate in OPUS_RATES else 48000
        slots = _plan_video(subset, config, v, rate)
        rel = f"videos/clip_{v:02d}.{'webm' if webm else 'mp4'}"
        _encode_video(out / rel, slots, subset, config, rate, webm)
        caption = None
        if captioned:
            caption = f"videos/clip_{v:02d}.{'srt' if webm else 'vtt'}"
            (out / caption).write_text(_captions(slots, config.slot_s, srt=webm), encoding="utf-8")
        lines.extend(_video_lines(rel, caption, slots, subset, config, rate))
        logger.debug("wrote %s (%d slots, captions: %s)", rel, len(slots), caption)

    rng = _rng(config.seed, 2)
    for i, digit in enumerate(_digit_sequence(rng, config.audio_files)):
        choices = subset.recordings_of(digit)
        recording = choices[int(rng.integers(len(choices)))]
        rel = f"audio/utt_{i:02d}.wav"
        (out / rel).write_bytes(recording.wav_bytes)
        duration = len(recording.samples()) / FSDD_RATE
        lines.append(_line(rel, "audio", 0.0, duration, digit, recording.speaker, speech_start_s=0.0,
                           speech_end_s=round(duration, 6), recording=recording.name))

    rng = _rng(config.seed, 3)
    for i, digit in enumerate(_digit_sequence(rng, config.image_files)):
        index = int(rng.choice(subset.image_indices_of(digit)))
        rel = f"images/img_{i:02d}.png"
        Image.fromarray(digit_frame(subset.images[index], 64)).save(out / rel, format="PNG")
        lines.append(_line(rel, "image", 0.0, 0.0, digit, None, image_row=int(subset.image_rows[index])))

    rng = _rng(config.seed, 4)
    for i, digit in enumerate(_digit_sequence(rng, config.text_files)):
        rel = f"text/note_{i:02d}.txt"
        text = TEXT_TEMPLATES[i % len(TEXT_TEMPLATES)].format(word=DIGIT_WORDS[digit])
        (out / rel).write_text(text + "\n", encoding="utf-8")
        lines.append(_line(rel, "text", 0.0, 0.0, digit, None))

    (out / GROUND_TRUTH).write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    (out / LICENSE).write_bytes(subset.license_text)
    return len(lines)


def _manifest(out: Path, config: SampleArchiveConfig, n_lines: int) -> SampleManifest:
    sha, sizes = {}, {}
    for name in OWN_PATHS:
        target = out / name
        for path in sorted([target] if target.is_file() else target.rglob("*")):
            if path.is_file():
                rel = path.relative_to(out).as_posix()
                data = path.read_bytes()
                sha[rel] = hashlib.sha256(data).hexdigest()
                sizes[rel] = len(data)
    manifest = SampleManifest(str(out), config, dict(sorted(sha.items())), dict(sorted(sizes.items())),
                              GROUND_TRUTH, n_lines)
    logger.info("sample archive %s: %d files, %d bytes", out, len(sha), manifest.total_bytes)
    return manifest
