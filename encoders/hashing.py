"""A fixed random-projection hash head (SimHash) for encoders without a trained one.

``codes = sign(R @ embedding)`` with ``R`` a (bits, dim) Gaussian matrix drawn from a
seed: the Hamming distance between two codes estimates the angle between the two
embeddings (Charikar 2002), so adapters for pretrained models give K-bit codes
without any training. ``R`` depends only on (bits, dim, seed); ``spec`` names all
three and belongs in the model_id of every encoder that uses the head.
"""

from __future__ import annotations

import dataclasses
import functools

import numpy as np

from .base import EncoderError, sign_codes

_MAX_SEED = 2**32 - 1


@dataclasses.dataclass(frozen=True)
class RandomProjectionHash:
    """Sign of a seeded Gaussian projection, packed 8 bits per byte (``np.packbits`` order).

    dim: embedding dimension; bits: code length (a multiple of 8);
    seed: 0 <= seed < 2**32, draws the projection matrix.
    """

    dim: int
    bits: int
    seed: int = 0

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"hash head {self.dim = } must be > 0")
        if self.bits <= 0 or self.bits % 8:
            raise ValueError(f"hash head {self.bits = } must be a positive multiple of 8")
        if not 0 <= self.seed <= _MAX_SEED:
            raise ValueError(f"hash head {self.seed = } must be in [0, {_MAX_SEED}]")

    @property
    def spec(self) -> str:
        """Short name of the head, e.g. ``rp64x512s0`` (bits x dim, seed)."""
        return f"rp{self.bits}x{self.dim}s{self.seed}"

    @functools.cached_property
    def projection(self) -> np.ndarray:
        """The (bits, dim) float32 projection matrix.

        Drawn with numpy's legacy ``RandomState``, whose stream numpy keeps frozen
        across releases, so a given spec means the same matrix everywhere.
        """
        rng = np.random.RandomState(self.seed)
        return rng.standard_normal((self.bits, self.dim)).astype(np.float32)

    def logits(self, embeddings: np.ndarray) -> np.ndarray:
        """Real-valued projections (N, bits) of float embeddings (N, dim)."""
        x = np.asarray(embeddings, dtype=np.float32)
        if x.ndim != 2 or x.shape[1] != self.dim:
            raise EncoderError(f"hash head {self.spec} expects embeddings (N, {self.dim}), got {x.shape}")
        return x @ self.projection.T

    def codes(self, embeddings: np.ndarray) -> np.ndarray:
        """Packed codes, uint8 (N, bits // 8); bit i is 1 where projection i is > 0."""
        return sign_codes(self.logits(embeddings))
