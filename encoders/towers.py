"""Trainable towers that map each modality's front-end output into the common space.

Two architectures share one interface (``CrossModalNet.embed(modality, inputs)``):
  deep:   small CNNs for audio (log-mel) and images, an n-gram bag + MLP for text;
  linear: one linear map per modality on pooled front-end features (fitted in
          closed form by CCA, the classic baseline).
Hash heads (one linear layer per code length) sit on the common space and are shared
by all modalities, so codes of matching items agree whatever their modality.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from .frontends import AudioFrontendConfig, ImageFrontendConfig, TextFrontendConfig

ARCHS = ("deep", "linear")
HASH_BITS = (16, 32, 64, 128)


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """Shape of a built-in model; stored as JSON in every checkpoint."""

    dim: int = 256
    bits: tuple[int, ...] = HASH_BITS
    arch: str = "deep"
    width: int = 32
    audio: AudioFrontendConfig = AudioFrontendConfig()
    image: ImageFrontendConfig = ImageFrontendConfig()
    text: TextFrontendConfig = TextFrontendConfig()

    def __post_init__(self) -> None:
        if self.dim <= 0:
            raise ValueError(f"{self.dim = } must be > 0")
        if not self.bits or any(b not in HASH_BITS for b in self.bits):
            raise ValueError(f"{self.bits = } must be a non-empty subset of {HASH_BITS}")
        if self.arch not in ARCHS:
            raise ValueError(f"{self.arch = } is not one of {ARCHS}")
        if self.width < 8:
            raise ValueError(f"{self.width = } must be >= 8")

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ModelConfig:
        raw: dict[str, Any] = json.loads(text)
        return cls(
            dim=int(raw["dim"]),
            bits=tuple(int(b) for b in raw["bits"]),
            arch=str(raw["arch"]),
            width=int(raw["width"]),
            audio=AudioFrontendConfig(**raw["audio"]),
            image=ImageFrontendConfig(**raw["image"]),
            text=TextFrontendConfig(**raw["text"]),
        )


def _conv(cin: int, cout: int) -> list[nn.Module]:
    return [nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout), nn.ReLU(inplace=True)]


class ConvTower(nn.Module):
    """(N, 1, H, W) -> (N, dim): a small VGG-style CNN, mean+max pooled, projected."""

    def __init__(self, width: int, dim: int):
        super().__init__()
        self.blocks = nn.Sequential(
            *_conv(1, width),
            nn.MaxPool2d(2),
            *_conv(width, 2 * width),
            nn.MaxPool2d(2),
            *_conv(2 * width, 4 * width),
            nn.MaxPool2d(2),
            *_conv(4 * width, 4 * width),
        )
        self.proj = nn.Sequential(nn.Dropout(0.2), nn.Linear(8 * width, dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.blocks(x)
        pooled = torch.cat([h.mean(dim=(2, 3)), h.amax(dim=(2, 3))], dim=1)
        return self.proj(pooled)


class TextTower(nn.Module):
    """Hashed character n-grams -> (N, dim) through an embedding bag and an MLP."""

    def __init__(self, buckets: int, width: int, dim: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(buckets, 4 * width, mode="mean")
        self.mlp = nn.Sequential(nn.ReLU(), nn.Linear(4 * width, 4 * width), nn.ReLU(), nn.Linear(4 * width, dim))

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, offsets = x
        return self.mlp(self.bag(ids, offsets))


def pooled_audio(x: torch.Tensor) -> torch.Tensor:
    """Fixed pooling of log-mel (N, 1, bands, frames) for the linear model: 4 time chunks + std."""
    chunks = F.adaptive_avg_pool2d(x, (x.shape[2], 4)).flatten(1)
    return torch.cat([chunks, x.std(dim=3).flatten(1)], dim=1)


def pooled_image(x: torch.Tensor) -> torch.Tensor:
    """Fixed pooling of images (N, 1, S, S) for the linear model: 8x8 area means."""
    return F.adaptive_avg_pool2d(x, (8, 8)).flatten(1)


class LinearAudio(nn.Module):
    def __init__(self, bands: int, dim: int):
        super().__init__()
        self.lin = nn.Linear(5 * bands, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(pooled_audio(x))


class LinearImage(nn.Module):
    def __init__(self, dim: int):
        super().__init__()
        self.lin = nn.Linear(64, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.lin(pooled_image(x))


class LinearText(nn.Module):
    def __init__(self, buckets: int, dim: int):
        super().__init__()
        self.bag = nn.EmbeddingBag(buckets, dim, mode="mean")
        self.bias = nn.Parameter(torch.zeros(dim))

    def forward(self, x: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        ids, offsets = x
        return self.bag(ids, offsets) + self.bias


class CrossModalNet(nn.Module):
    """Towers for audio, image and text plus one hash head per code length."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        self.config = config
        bands = config.audio.bands
        if config.arch == "deep":
            self.audio = ConvTower(config.width, config.dim)
            self.image = ConvTower(config.width // 2, config.dim)
            self.text = TextTower(config.text.buckets, config.width, config.dim)
        else:
            self.audio = LinearAudio(bands, config.dim)
            self.image = LinearImage(config.dim)
            self.text = LinearText(config.text.buckets, config.dim)
        self.heads = nn.ModuleDict({str(b): nn.Linear(config.dim, b) for b in config.bits})

    def tower(self, modality: str) -> nn.Module:
        return {"audio": self.audio, "image": self.image, "text": self.text}[modality]

    def embed(self, modality: str, inputs: Any) -> torch.Tensor:
        """Front-end output -> unnormalised embeddings (N, dim)."""
        return self.tower(modality)(inputs)

    def hash_logits(self, normalized: torch.Tensor, bits: int) -> torch.Tensor:
        """L2-normalised embeddings -> real-valued hash logits (N, bits); code bit = logit > 0.

        The input is scaled by sqrt(dim) so that its coordinates have unit variance and
        freshly initialised heads give logits of order one (tanh is then not flat).
        """
        return self.heads[str(bits)](normalized * self.config.dim**0.5)
