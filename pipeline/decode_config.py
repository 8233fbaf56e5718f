"""DecodeConfig, the decode errors and the time grid of segments: no media library imported.

Light on purpose: job configs, the CLI and Beam graph construction import this
module without loading FFmpeg (PyAV) or decord; the decoders themselves live in
``probe.py``, ``decode_video.py``, ``audio.py`` and ``decode.py``.

Frame sampling (``frame_mode``, ``fast``) trades decode cost against what the
video rows see:

- ``uniform`` (default): ``frame_rate_hz`` frames per segment at evenly spaced
  times; every frame of the file is decoded (H.264 cannot skip frames between
  key frames), only the sampled ones are converted and resized (decord).
- ``uniform`` with ``fast = true``: the same sample times, decoded by PyAV with
  the in-loop deblocking filter skipped and non-reference frames dropped
  (FFmpeg's ``skip_loop_filter=all``, ``skip_frame=nonref``, ``flags2=+fast``):
  each sample is the nearest earlier decoded frame (at most a frame or two
  away) and shows slight blocking; about 2x cheaper.
- ``keyframes``: only key frames are decoded (``skip_frame=nonkey``), each
  segment is represented by the key frames inside it, or when it holds none by
  the one nearest to it (the row's ``sampling`` column says ``keyframes-nearest``);
  cost falls by about the GOP length, and segments between key frames share
  the picture of a neighbour.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math

MiB = 1 << 20
GiB = 1 << 30
AUDIO_BACKENDS = ("auto", "torchaudio", "pyav")
FRAME_MODES = ("uniform", "keyframes")
DEVICES = ("cpu", "cuda")
MIN_FINAL_SEGMENT_S = 0.1
MIN_MEMORY_MB = 512

# Values of the embedding rows' ``sampling`` column (video rows; null for the others).
SAMPLING_UNIFORM = "uniform"
SAMPLING_FAST = "fast"
SAMPLING_KEYFRAMES = "keyframes"
SAMPLING_KEYFRAMES_NEAREST = "keyframes-nearest"  # the segment holds no key frame: the nearest one


@dataclasses.dataclass(frozen=True)
class DecodeConfig:
    """How items are decoded and segmented, and the limits that refuse hostile input."""

    segment_s: float = 2.0  # length of the fixed time segments, seconds
    frame_rate_hz: float = 1.0  # video frames sampled per second (at least one per segment)
    frame_size: int = 112  # sampled frames are resized to frame_size x frame_size RGB
    frame_mode: str = "uniform"  # uniform | keyframes (decode only key frames; see the module docstring)
    fast: bool = False  # uniform mode: skip the loop filter and non-reference frames (PyAV)
    device: str = "cpu"  # cpu | cuda (NVDEC through PyAV; falls back to the CPU with a warning)
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
        if self.frame_mode not in FRAME_MODES:
            raise ValueError(f"frame_mode = {self.frame_mode!r} must be one of {FRAME_MODES}")
        if not isinstance(self.fast, bool):
            raise ValueError(f"fast = {self.fast!r} must be true or false")
        if self.fast and self.frame_mode != "uniform":
            raise ValueError(f"fast = True applies to frame_mode = 'uniform' only (frame_mode = {self.frame_mode!r} "
                             "already decodes only key frames)")
        if self.device not in DEVICES:
            raise ValueError(f"device = {self.device!r} must be one of {DEVICES}")
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
