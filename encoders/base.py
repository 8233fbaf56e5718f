"""The encoder contract every model (built-in or adapter) fulfils.

Payloads per modality (what the decoders produce and the query command passes):
  image: np.ndarray uint8 (H, W, 3) RGB
  video: np.ndarray uint8 (T, H, W, 3) RGB, T >= 1 frames sampled from one segment
  audio: np.ndarray float32 (S,) mono at ``AUDIO_SAMPLE_RATE`` Hz, values in [-1, 1]
  text:  str
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any, Protocol, runtime_checkable

import numpy as np

MODALITIES = ("video", "audio", "image", "text")
AUDIO_SAMPLE_RATE = 16000


class EncoderError(Exception):
    """Base error of the encoders package."""


class CheckpointError(EncoderError):
    """A checkpoint is missing, unreadable or does not match its config."""


class UnsupportedModalityError(EncoderError):
    """The encoder has no tower for the requested modality."""


@dataclasses.dataclass(frozen=True)
class EncodedBatch:
    """Output of one encode call: N L2-normalised embeddings and N packed hash codes."""

    embeddings: np.ndarray  # float32 (N, dim), rows L2-normalised
    codes: np.ndarray  # uint8 (N, bits // 8), np.packbits order (first bit = MSB of byte 0)

    def __post_init__(self) -> None:
        if self.embeddings.ndim != 2 or self.codes.ndim != 2:
            raise EncoderError(f"embeddings {self.embeddings.shape} and codes {self.codes.shape} must be 2-D")
        if len(self.embeddings) != len(self.codes):
            raise EncoderError(f"{len(self.embeddings)} embeddings but {len(self.codes)} codes")


@runtime_checkable
class CrossModalEncoder(Protocol):
    """A loaded model that maps any supported modality into one common space."""

    model_id: str  # "name@<sha256 of the checkpoint file(s)>"
    dim: int
    bits: int
    modalities: tuple[str, ...]

    def encode(self, modality: str, payloads: Sequence[Any]) -> EncodedBatch:
        """Encode a batch of payloads of one modality."""
        ...


def l2_normalize(x: np.ndarray, eps: float = 1e-12) -> np.ndarray:
    x = np.asarray(x, dtype=np.float32)
    norms = np.linalg.norm(x, axis=1, keepdims=True)
    return x / np.maximum(norms, eps)


def sign_codes(logits: np.ndarray) -> np.ndarray:
    """Binarise real-valued hash logits (>0 -> 1) and pack them 8 bits per byte."""
    bits = (np.asarray(logits) > 0).astype(np.uint8)
    return np.packbits(bits, axis=1)
