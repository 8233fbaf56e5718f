"""The tri-modal digits benchmark: spoken digits (FSDD), digit images, digit words.

Loaders take explicit paths (nothing is read from a fixed location):
  load_fsdd(DIR): ``{digit}_{speaker}_{index}.wav`` files in DIR or DIR/recordings,
    resampled to 16 kHz mono float32;
  load_digit_images(CSV): 64 pixel columns (0..16, 8x8) then the label, optionally
    gzip-compressed, rendered as uint8 RGB (ink bright on a dark background);
  digit_texts(variants): the ten digit words in several spellings.
"""

from __future__ import annotations

import dataclasses
import gzip
import re
import wave
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .base import AUDIO_SAMPLE_RATE, EncoderError
from .signal import resample as resample  # the one resampler, re-exported

DIGIT_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
FSDD_NAME = re.compile(r"^(\d)_([A-Za-z]+)_(\d+)\.wav$")

# Text spellings: "{w}" word, "{d}" numeral. TRAIN_TEMPLATES are seen in training;
# EVAL_TEMPLATES are the query/database texts of the benchmark.
TRAIN_TEMPLATES = (
    "{w}", "{W}", "{WU}", "{d}", "the digit {w}", "digit {d}", "the number {w}", "number {d}",
    "{w}.", "a {w}", "spoken {w}", "say {w}", "{d} ({w})", "the word {w}", "it says {w}",
)
EVAL_TEMPLATES = ("{w}", "{W}", "{d}", "the digit {w}")


class BenchmarkDataError(EncoderError):
    """A benchmark file is missing or malformed."""


@dataclasses.dataclass(frozen=True)
class AudioClips:
    waves: list[np.ndarray]  # float32 mono at AUDIO_SAMPLE_RATE
    labels: np.ndarray  # int64 digit
    speakers: np.ndarray  # str speaker name
    names: list[str]

    def subset(self, mask: np.ndarray) -> AudioClips:
        idx = np.flatnonzero(mask)
        return AudioClips([self.waves[i] for i in idx], self.labels[idx], self.speakers[idx],
                          [self.names[i] for i in idx])


@dataclasses.dataclass(frozen=True)
class DigitImages:
    images: np.ndarray  # uint8 (N, 8, 8, 3)
    labels: np.ndarray  # int64

    def subset(self, idx: np.ndarray) -> DigitImages:
        return DigitImages(self.images[idx], self.labels[idx])


@dataclasses.dataclass(frozen=True)
class DigitTexts:
    texts: list[str]
    labels: np.ndarray


def read_wav(path: str | Path) -> tuple[np.ndarray, int]:
    """PCM WAV -> (float32 mono in [-1, 1], sample rate)."""
    try:
        with wave.open(str(path), "rb") as w:
            sr, width, channels, n = w.getframerate(), w.getsampwidth(), w.getnchannels(), w.getnframes()
            raw = w.readframes(n)
    except (OSError, wave.Error, EOFError) as err:
        raise BenchmarkDataError(f"cannot read WAV {path}: {err}") from err
    if width == 1:
        data = (np.frombuffer(raw, np.uint8).astype(np.float32) - 128.0) / 128.0
    elif width == 2:
        data = np.frombuffer(raw, "<i2").astype(np.float32) / 32768.0
    elif width == 4:
        data = np.frombuffer(raw, "<i4").astype(np.float32) / 2147483648.0
    else:
        raise BenchmarkDataError(f"WAV {path} has unsupported sample width {width} bytes")
    if channels > 1:
        data = data[: data.size // channels * channels].reshape(-1, channels).mean(axis=1)
    return data, sr


def load_fsdd(directory: str | Path, sample_rate: int = AUDIO_SAMPLE_RATE) -> AudioClips:
    """All FSDD recordings under ``directory`` (or its ``recordings/``), sorted by name."""
    root = Path(directory)
    if (root / "recordings").is_dir():
        root = root / "recordings"
    files = [(p, m) for p in sorted(root.glob("*.wav")) if (m := FSDD_NAME.match(p.name))]
    if not files:
        raise BenchmarkDataError(f"no {{digit}}_{{speaker}}_{{index}}.wav files in {directory}")
    waves, labels, speakers, names = [], [], [], []
    for p, m in files:
        data, sr = read_wav(p)
        waves.append(resample(data, sr, sample_rate))
        labels.append(int(m.group(1)))
        speakers.append(m.group(2))
        names.append(p.name)
    return AudioClips(waves, np.asarray(labels, np.int64), np.asarray(speakers), names)


def load_digit_images(csv_path: str | Path) -> DigitImages:
    """8x8 digit images from a CSV of 64 pixel values (0..16) then the label."""
    path = Path(csv_path)
    opener = gzip.open if path.suffix == ".gz" else open
    try:
        with opener(path, "rt") as f:
            table = np.loadtxt(f, delimiter=",", dtype=np.float64, ndmin=2)
    except (OSError, ValueError, EOFError) as err:
        raise BenchmarkDataError(f"cannot read digits CSV {path}: {err}") from err
    if table.shape[1] != 65:
        raise BenchmarkDataError(f"digits CSV {path} has {table.shape[1]} columns, expected 65 (64 pixels + label)")
    pixels = np.clip(table[:, :64], 0, 16) * (255.0 / 16.0)
    grey = np.round(pixels).astype(np.uint8).reshape(-1, 8, 8)
    images = np.repeat(grey[..., None], 3, axis=3)
    return DigitImages(images, table[:, 64].astype(np.int64))


def spell(template: str, digit: int) -> str:
    word = DIGIT_WORDS[digit]
    return template.format(w=word, W=word.capitalize(), WU=word.upper(), d=digit)


def digit_texts(templates: Sequence[str] = EVAL_TEMPLATES) -> DigitTexts:
    """Every digit spelled with every template, ordered by template then digit."""
    texts, labels = [], []
    for t in templates:
        for d in range(10):
            texts.append(spell(t, d))
            labels.append(d)
    return DigitTexts(texts, np.asarray(labels, np.int64))
