"""Training-time augmentation: make the towers robust to voices, rooms and renderings.

Audio (numpy, per clip, 16 kHz): speed (pitch and tempo), a round trip through a
lower source sample rate, random equalisation, reverberation, gain and clipping,
placement in a longer window with silence around it (time shift), and additive
noise at a random SNR. On the log-mel batch: time and band masks.
Images (torch, per batch): the 8x8 digit upscaled with nearest or bilinear
interpolation to a random frame size, affine jitter (offset, scale, rotation),
polarity, contrast, blur, block-DCT quantisation (JPEG/H.264-like) and noise.
"""

from __future__ import annotations

import dataclasses
import math

import numpy as np
import torch
import torch.nn.functional as F

from .base import AUDIO_SAMPLE_RATE
from .frontends import resize_grey, standardize_grey
from .tri_modal import TRAIN_TEMPLATES, resample, spell


@dataclasses.dataclass(frozen=True)
class AugmentConfig:
    """Strength of each augmentation (probabilities in [0, 1])."""

    speed_min: float = 0.85
    speed_max: float = 1.15
    low_rate_prob: float = 0.3
    eq_prob: float = 0.5
    reverb_prob: float = 0.2
    clip_prob: float = 0.1
    window_prob: float = 0.5
    window_max_s: float = 1.5
    noise_prob: float = 0.6
    snr_min_db: float = 5.0
    snr_max_db: float = 40.0
    mask_prob: float = 0.5
    image_sizes: tuple[int, ...] = (8, 16, 28, 32, 56, 64, 112)

    def __post_init__(self) -> None:
        if not 0 < self.speed_min <= self.speed_max:
            raise ValueError(f"{self.speed_min = } and {self.speed_max = } must satisfy 0 < min <= max")
        for name in ("low_rate_prob", "eq_prob", "reverb_prob", "clip_prob", "window_prob", "noise_prob", "mask_prob"):
            value = getattr(self, name)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"{name} = {value} must be in [0, 1]")
        if self.snr_min_db > self.snr_max_db:
            raise ValueError(f"{self.snr_min_db = } must be <= {self.snr_max_db = }")
        if not self.image_sizes or min(self.image_sizes) < 4:
            raise ValueError(f"{self.image_sizes = } must be non-empty sizes >= 4")


def augment_audio(wave: np.ndarray, rng: np.random.Generator, cfg: AugmentConfig = AugmentConfig()) -> np.ndarray:
    """One randomly perturbed copy of a 16 kHz clip."""
    sr = AUDIO_SAMPLE_RATE
    x = np.asarray(wave, dtype=np.float32)
    speed = rng.uniform(cfg.speed_min, cfg.speed_max)
    if abs(speed - 1.0) > 0.01:  # linear interpolation is enough: speech content stays well below sr / 4
        x = np.interp(np.arange(0.0, x.size - 1, speed), np.arange(x.size), x).astype(np.float32)
    if rng.random() < cfg.low_rate_prob:
        low = int(rng.choice([8000, 11025]))
        x = resample(resample(x, sr, low), low, sr)[: x.size]
    if rng.random() < cfg.eq_prob:
        x = _random_eq(x, rng)
    if rng.random() < cfg.reverb_prob:
        x = _reverb(x, rng)
    peak = float(np.abs(x).max()) or 1.0
    x = x * (10.0 ** (rng.uniform(-30.0, 0.0) / 20.0) / peak)
    if rng.random() < cfg.clip_prob:
        x = np.clip(x * rng.uniform(1.5, 4.0), -1.0, 1.0)
    signal_rms = float(np.sqrt(np.mean(x**2))) + 1e-8
    if rng.random() < cfg.window_prob:
        total = max(x.size, int(rng.uniform(x.size / sr, max(x.size / sr, cfg.window_max_s)) * sr))
        offset = int(rng.integers(0, total - x.size + 1))
        x = np.concatenate([np.zeros(offset, np.float32), x, np.zeros(total - x.size - offset, np.float32)])
    if rng.random() < cfg.noise_prob:
        snr = rng.uniform(cfg.snr_min_db, cfg.snr_max_db)
        noise = _colored_noise(x.size, rng)
        x = x + noise * (signal_rms / 10.0 ** (snr / 20.0))
    return x.astype(np.float32)


def _fast_len(n: int) -> int:
    return 1 << max(0, int(n - 1).bit_length())


def _random_eq(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    size = _fast_len(x.size)
    spec = np.fft.rfft(x, size)
    f = np.linspace(0.0, 1.0, spec.size)
    gain_db = rng.uniform(-6, 6) * (f - 0.5)  # tilt
    for _ in range(int(rng.integers(1, 4))):
        centre, width, height = rng.uniform(0.02, 0.6), rng.uniform(0.02, 0.15), rng.uniform(-9, 9)
        gain_db += height * np.exp(-0.5 * ((f - centre) / width) ** 2)
    return np.fft.irfft(spec * 10.0 ** (gain_db / 20.0), n=size)[: x.size].astype(np.float32)


def _reverb(x: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    sr = AUDIO_SAMPLE_RATE
    rt60 = rng.uniform(0.1, 0.5)
    n = int(rt60 * sr)
    t = np.arange(n) / sr
    ir = rng.standard_normal(n) * np.exp(-6.9 * t / rt60)
    ir[0] = 1.0 / rng.uniform(0.2, 1.0)
    size = _fast_len(x.size + n - 1)
    wet = np.fft.irfft(np.fft.rfft(x, size) * np.fft.rfft(ir, size), n=size)[: x.size]
    return (wet / (np.abs(wet).max() + 1e-8)).astype(np.float32)


def _colored_noise(n: int, rng: np.random.Generator) -> np.ndarray:
    white = rng.standard_normal(n)
    exponent = rng.choice([0.0, 0.5, 1.0])  # white, pink, brown
    if exponent:
        size = _fast_len(n)
        spec = np.fft.rfft(white, size)
        f = np.maximum(np.arange(spec.size), 1.0)
        white = np.fft.irfft(spec / f**exponent, n=size)[:n]
    return (white / (white.std() + 1e-8)).astype(np.float32)


def mask_logmel(x: torch.Tensor, generator: torch.Generator, prob: float) -> torch.Tensor:
    """Zero random time spans and band spans of normalised log-mel (N, 1, bands, frames)."""
    x = x.clone()
    n, _, bands, frames = x.shape
    for i in range(n):
        if torch.rand((), generator=generator) < prob:
            w = int(torch.randint(1, max(2, frames // 8), (), generator=generator))
            s = int(torch.randint(0, frames - w + 1, (), generator=generator))
            x[i, :, :, s : s + w] = 0.0
        if torch.rand((), generator=generator) < prob:
            w = int(torch.randint(1, max(2, bands // 8), (), generator=generator))
            s = int(torch.randint(0, bands - w + 1, (), generator=generator))
            x[i, :, s : s + w, :] = 0.0
    return x


def _dct_matrix(n: int) -> torch.Tensor:
    k = torch.arange(n, dtype=torch.float32)
    m = torch.cos(math.pi * (2 * k[None, :] + 1) * k[:, None] / (2 * n)) * math.sqrt(2.0 / n)
    m[0] /= math.sqrt(2.0)
    return m


def _block_quantize(x: torch.Tensor, step: float) -> torch.Tensor:
    """JPEG-like: 8x8 block DCT, coarser steps for higher frequencies, inverse DCT."""
    n, h, w = x.shape
    if h % 8 or w % 8:
        return x
    d = _dct_matrix(8)
    blocks = x.reshape(n, h // 8, 8, w // 8, 8).permute(0, 1, 3, 2, 4)
    coef = d @ blocks @ d.T
    freq = torch.arange(8, dtype=torch.float32)
    q = step * (1.0 + freq[:, None] + freq[None, :])
    coef = torch.round(coef / q) * q
    out = d.T @ coef @ d
    return out.permute(0, 1, 3, 2, 4).reshape(n, h, w)


def augment_images(
    grey: torch.Tensor, size: int, generator: torch.Generator, cfg: AugmentConfig = AugmentConfig()
) -> torch.Tensor:
    """Grey digit images (N, h, w) in [0, 1], ink bright -> augmented tower input (N, 1, size, size)."""
    n = grey.shape[0]
    out = torch.empty(n, size, size)
    chunks = torch.arange(n).chunk(max(1, min(4, n)))
    for idx in chunks:
        s = cfg.image_sizes[int(torch.randint(len(cfg.image_sizes), (), generator=generator))]
        mode = "nearest" if torch.rand((), generator=generator) < 0.5 else "bilinear"
        x = grey[idx, None]
        kwargs = {} if mode == "nearest" else {"align_corners": False}
        x = F.interpolate(x, size=(s, s), mode=mode, **kwargs)
        x = _affine(x, generator)
        if torch.rand((), generator=generator) < 0.4:
            x = _blur(x, float(torch.empty(()).uniform_(0.3, 1.2, generator=generator)) * s / 16.0)
        x = x[:, 0]
        if torch.rand((), generator=generator) < 0.5:
            x = 1.0 - x
        lo = float(torch.empty(()).uniform_(0.0, 0.3, generator=generator))
        hi = float(torch.empty(()).uniform_(0.7, 1.0, generator=generator))
        x = lo + (hi - lo) * x
        if torch.rand((), generator=generator) < 0.5:
            x = _block_quantize(x, float(torch.empty(()).uniform_(0.02, 0.12, generator=generator)))
        sigma = float(torch.empty(()).uniform_(0.0, 0.05, generator=generator))
        x = x + sigma * torch.randn(x.shape, generator=generator)
        x = torch.round(torch.clamp(x, 0.0, 1.0) * 255.0) / 255.0
        out[idx] = resize_grey(x, size)
    return standardize_grey(out)


def _affine(x: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    n = x.shape[0]
    angle = (torch.rand(n, generator=generator) - 0.5) * math.radians(24)
    scale = 0.85 + 0.3 * torch.rand(n, generator=generator)
    shift = (torch.rand(n, 2, generator=generator) - 0.5) * 0.25
    cos, sin = torch.cos(angle) / scale, torch.sin(angle) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    return F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)


def _blur(x: torch.Tensor, sigma: float) -> torch.Tensor:
    radius = max(1, int(math.ceil(2 * sigma)))
    t = torch.arange(-radius, radius + 1, dtype=torch.float32)
    k = torch.exp(-0.5 * (t / max(sigma, 1e-3)) ** 2)
    k = k / k.sum()
    x = F.conv2d(F.pad(x, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    return F.conv2d(F.pad(x, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))


FILLER_WORDS = (
    "a", "an", "the", "this", "is", "of", "in", "on", "at", "with", "and", "by", "for", "here", "there", "it",
    "someone", "voice", "saying", "says", "said", "spoken", "word", "number", "digit", "figure", "written",
    "handwritten", "hand", "drawn", "image", "picture", "photo", "frame", "video", "clip", "audio", "sound",
    "white", "black", "background", "grey", "counting", "count", "shows", "showing", "label", "caption",
    "man", "woman", "person", "reads", "slowly", "loud", "quiet", "small", "large", "big", "old", "new", "scene",
)


def augment_text(digit: int, rng: np.random.Generator) -> str:
    """A random training text naming ``digit``: a template, or the digit among filler words."""
    if rng.random() < 0.5:
        return spell(TRAIN_TEMPLATES[int(rng.integers(len(TRAIN_TEMPLATES)))], digit)
    token = spell(("{w}", "{W}", "{d}", "{w}", "{w},", "{w}.")[int(rng.integers(6))], digit)
    before = [FILLER_WORDS[i] for i in rng.integers(0, len(FILLER_WORDS), int(rng.integers(0, 6)))]
    after = [FILLER_WORDS[i] for i in rng.integers(0, len(FILLER_WORDS), int(rng.integers(0, 5)))]
    return " ".join(before + [token] + after)
