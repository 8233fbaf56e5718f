"""Fixed (untrained) front-ends: log-mel for audio, pixels for images, n-grams for text.

The mel spectrogram follows torchaudio.transforms.MelSpectrogram with
``sample_rate=16000, n_fft=400, hop_length=160, n_mels=64`` (periodic Hann window,
``center=True`` with reflect padding, power 2, HTK mel scale, no filter-bank
normalisation), written with plain torch ops so it runs where torchaudio cannot be
installed. Where torchaudio imports, its transform is a drop-in replacement.

On top of the spectrogram the audio front-end normalises what varies between
recordings but not between words: loudness (log spectrum relative to its peak),
bandwidth (only the mel bands under ``max_hz`` are kept, so 8 kHz and 44.1 kHz
sources look alike), leading/trailing silence (energy-based trimming) and speaking
rate (the voiced region is resampled to a fixed number of frames).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from .base import AUDIO_SAMPLE_RATE, EncoderError
from .text_grams import TextFrontendConfig, text_ngrams  # noqa: F401 - re-exported


class FrontendError(EncoderError):
    """A payload cannot be turned into model input."""


def hz_to_mel_htk(hz: torch.Tensor | float) -> torch.Tensor:
    return 2595.0 * torch.log10(1.0 + torch.as_tensor(hz, dtype=torch.float64) / 700.0)


def mel_to_hz_htk(mel: torch.Tensor) -> torch.Tensor:
    return 700.0 * (10.0 ** (mel / 2595.0) - 1.0)


def mel_filterbank(n_freqs: int, f_min: float, f_max: float, n_mels: int, sample_rate: int) -> torch.Tensor:
    """Triangular HTK-scale filter bank, shape (n_freqs, n_mels), as torchaudio's melscale_fbanks(norm=None)."""
    all_freqs = torch.linspace(0, sample_rate // 2, n_freqs, dtype=torch.float64)
    m_pts = torch.linspace(float(hz_to_mel_htk(f_min)), float(hz_to_mel_htk(f_max)), n_mels + 2, dtype=torch.float64)
    f_pts = mel_to_hz_htk(m_pts)
    f_diff = f_pts[1:] - f_pts[:-1]
    slopes = f_pts.unsqueeze(0) - all_freqs.unsqueeze(1)
    down = -slopes[:, :-2] / f_diff[:-1]
    up = slopes[:, 2:] / f_diff[1:]
    return torch.clamp(torch.minimum(down, up), min=0.0).to(torch.float32)


class MelSpectrogram(torch.nn.Module):
    """Power mel spectrogram (..., time) -> (..., n_mels, frames); torchaudio semantics."""

    def __init__(self, sample_rate: int = AUDIO_SAMPLE_RATE, n_fft: int = 400, hop_length: int = 160, n_mels: int = 64):
        super().__init__()
        self.n_fft = n_fft
        self.hop_length = hop_length
        self.register_buffer("window", torch.hann_window(n_fft, periodic=True), persistent=False)
        self.register_buffer(
            "fbank", mel_filterbank(n_fft // 2 + 1, 0.0, sample_rate / 2, n_mels, sample_rate), persistent=False
        )

    def forward(self, waveform: torch.Tensor) -> torch.Tensor:
        shape = waveform.shape
        flat = waveform.reshape(-1, shape[-1])
        half = self.n_fft // 2
        mel = self.from_padded(F.pad(flat[:, None], (half, half), mode="reflect")[:, 0])
        return mel.reshape(shape[:-1] + mel.shape[-2:])

    def from_padded(self, padded: torch.Tensor) -> torch.Tensor:
        """(B, samples) already centre-padded by n_fft // 2 on each side -> (B, n_mels, frames)."""
        spec = torch.stft(
            padded,
            n_fft=self.n_fft,
            hop_length=self.hop_length,
            win_length=self.n_fft,
            window=self.window,
            center=False,
            normalized=False,
            onesided=True,
            return_complex=True,
        )
        ri = torch.view_as_real(spec)
        power = ri[..., 0] ** 2 + ri[..., 1] ** 2  # |X|^2, (B, n_freqs, frames); cheaper than abs().pow(2)
        return torch.matmul(power.transpose(-1, -2), self.fbank).transpose(-1, -2)


@dataclasses.dataclass(frozen=True)
class AudioFrontendConfig:
    """Log-mel front-end settings (sample rate of the input is AUDIO_SAMPLE_RATE).

    max_hz: only mel bands centred below this frequency reach the tower.
    frames: the voiced region is resampled to this many 10 ms frames.
    trim_db: frames quieter than (loudest frame - trim_db) count as silence.
    floor_db: log-mel values are clipped at (peak - floor_db).
    max_s: longer audio is cut to its first max_s seconds.
    """

    n_mels: int = 64
    max_hz: float = 3900.0
    frames: int = 48
    trim_db: float = 30.0
    floor_db: float = 80.0
    max_s: float = 60.0

    def __post_init__(self) -> None:
        if self.n_mels <= 0:
            raise ValueError(f"{self.n_mels = } must be > 0")
        if not 0 < self.max_hz <= AUDIO_SAMPLE_RATE / 2:
            raise ValueError(f"{self.max_hz = } must be in (0, {AUDIO_SAMPLE_RATE / 2}]")
        if self.frames < 4:
            raise ValueError(f"{self.frames = } must be >= 4")
        if self.trim_db <= 0 or self.floor_db <= 0:
            raise ValueError(f"{self.trim_db = } and {self.floor_db = } must be > 0")
        if self.max_s <= 0:
            raise ValueError(f"{self.max_s = } must be > 0")

    @property
    def bands(self) -> int:
        """Number of mel bands kept (centre frequency below max_hz)."""
        m_max = float(hz_to_mel_htk(AUDIO_SAMPLE_RATE / 2))
        centres = mel_to_hz_htk(torch.linspace(0.0, m_max, self.n_mels + 2, dtype=torch.float64)[1:-1])
        return int((centres < self.max_hz).sum())


class AudioFrontend(torch.nn.Module):
    """Waveforms (16 kHz float32, any length) -> normalised log-mel (N, 1, bands, frames)."""

    def __init__(self, config: AudioFrontendConfig = AudioFrontendConfig()):
        super().__init__()
        self.config = config
        self.mel = MelSpectrogram(n_mels=config.n_mels)
        self.bands = config.bands

    def forward(self, waves: Sequence[np.ndarray]) -> torch.Tensor:
        """All clips of a batch in one STFT; each clip's result does not depend on the others."""
        cfg = self.config
        device = self.mel.window.device
        half = self.mel.n_fft // 2
        max_len = int(cfg.max_s * AUDIO_SAMPLE_RATE)
        padded, lengths = [], []
        for i, w in enumerate(waves):
            arr = np.asarray(w, dtype=np.float32)
            if arr.ndim != 1:
                raise FrontendError(f"audio payload {i} has shape {arr.shape}; expected mono (samples,)")
            if arr.size == 0:
                raise FrontendError(f"audio payload {i} is empty")
            if not np.isfinite(arr).all():
                arr = np.nan_to_num(arr, nan=0.0, posinf=0.0, neginf=0.0)
            t = torch.from_numpy(arr[:max_len].copy()).to(device)
            if t.numel() <= half:  # reflect padding needs more samples than half a window
                t = F.pad(t, (0, half + 1 - t.numel()))
            lengths.append(t.numel())
            padded.append(F.pad(t[None], (half, half), mode="reflect")[0])
        batch = torch.zeros(len(padded), max(p.numel() for p in padded), device=device)
        for i, p in enumerate(padded):
            batch[i, : p.numel()] = p
        n_frames = 1 + torch.tensor(lengths, device=device) // self.mel.hop_length
        mel = self.mel.from_padded(batch)[:, : self.bands]  # (B, bands, T)
        valid = torch.arange(mel.shape[2], device=device)[None, :] < n_frames[:, None]  # (B, T)

        logmel = 10.0 * torch.log10(mel + 1e-10)
        peak = logmel.masked_fill(~valid[:, None, :], float("-inf")).amax(dim=(1, 2))
        logmel = torch.clamp(logmel - peak[:, None, None], min=-cfg.floor_db)  # loudness-invariant, dB below peak

        # voiced region: frames within trim_db of the loudest frame, plus 2 frames each side
        energy = (10.0 * torch.log10(mel.sum(1) + 1e-10)).masked_fill(~valid, float("-inf"))
        voiced = (energy >= energy.amax(dim=1, keepdim=True) - cfg.trim_db) & valid
        first = voiced.int().argmax(dim=1)
        last = voiced.shape[1] - 1 - voiced.flip(1).int().argmax(dim=1)
        start = torch.clamp(first - 2, min=0)
        length = torch.minimum(n_frames, last + 3) - start

        # resample each region to cfg.frames (linear, align_corners=False, as F.interpolate)
        k = torch.arange(cfg.frames, device=device, dtype=torch.float32)
        scale = length.to(torch.float32)[:, None] / cfg.frames
        src = torch.clamp((k[None, :] + 0.5) * scale - 0.5, min=0.0)
        idx0 = torch.minimum(src.floor().long(), length[:, None] - 1)
        lam = torch.clamp(src - idx0, 0.0, 1.0)
        idx1 = idx0 + (idx0 < length[:, None] - 1).long()
        bands = logmel.shape[1]
        g0 = logmel.gather(2, (start[:, None] + idx0)[:, None, :].expand(-1, bands, -1))
        g1 = logmel.gather(2, (start[:, None] + idx1)[:, None, :].expand(-1, bands, -1))
        region = g0 + lam[:, None, :] * (g1 - g0)

        mean = region.mean(dim=(1, 2), keepdim=True)
        std = region.std(dim=(1, 2), keepdim=True)
        return ((region - mean) / (std + 1e-5))[:, None]


@dataclasses.dataclass(frozen=True)
class ImageFrontendConfig:
    """Image front-end: grey levels, polarity normalised (dark background), resized to size x size."""

    size: int = 32

    def __post_init__(self) -> None:
        if self.size < 8:
            raise ValueError(f"{self.size = } must be >= 8")


def image_features(images: Sequence[np.ndarray], config: ImageFrontendConfig = ImageFrontendConfig()) -> torch.Tensor:
    """uint8 images (H, W, 3) of any size -> float32 (N, 1, size, size), zero mean, unit variance.

    Polarity is normalised so that the border (the background) is dark: a dark digit
    on white paper and a white digit on black give the same input.
    """
    out = []
    for i, img in enumerate(images):
        arr = np.asarray(img)
        if arr.ndim == 2:
            arr = arr[:, :, None]
        if arr.ndim != 3 or arr.shape[2] not in (1, 3, 4) or arr.shape[0] < 1 or arr.shape[1] < 1:
            raise FrontendError(f"image payload {i} has shape {arr.shape}; expected (H, W, 3) uint8")
        grey = torch.from_numpy(np.ascontiguousarray(arr[:, :, :3], dtype=np.float32)).mean(dim=2) / 255.0
        out.append(resize_grey(grey[None], config.size)[0])
    return standardize_grey(torch.stack(out))


def resize_grey(grey: torch.Tensor, size: int) -> torch.Tensor:
    """(N, H, W) grey levels -> (N, size, size), antialiased bilinear."""
    if grey.shape[-2:] == (size, size):
        return grey
    return F.interpolate(grey[:, None], size=(size, size), mode="bilinear", align_corners=False, antialias=True)[:, 0]


def standardize_grey(x: torch.Tensor) -> torch.Tensor:
    """(N, S, S) grey levels in [0, 1] -> (N, 1, S, S): dark background, zero mean, unit variance."""
    border = torch.cat([x[:, 0], x[:, -1], x[:, :, 0], x[:, :, -1]], dim=1).mean(dim=1)
    flip = border > x.mean(dim=(1, 2))
    x = torch.where(flip[:, None, None], 1.0 - x, x)
    mean = x.mean(dim=(1, 2), keepdim=True)
    std = x.std(dim=(1, 2), keepdim=True)
    return ((x - mean) / (std + 1e-3))[:, None]


def text_features(texts: Sequence[str],
                  config: TextFrontendConfig = TextFrontendConfig(),  # noqa: B008 - frozen, immutable
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Texts -> (flat bucket ids, offsets) for torch.nn.EmbeddingBag."""
    ids: list[int] = []
    offsets: list[int] = []
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise FrontendError(f"text payload {i} is {type(text).__name__}, expected str")
        offsets.append(len(ids))
        ids.extend(text_ngrams(text, config))
    return torch.tensor(ids, dtype=torch.long), torch.tensor(offsets, dtype=torch.long)


def frames_for_seconds(seconds: float, hop_length: int = 160) -> int:
    """Number of mel frames torch.stft(center=True) gives for ``seconds`` of 16 kHz audio."""
    return 1 + int(math.floor(seconds * AUDIO_SAMPLE_RATE)) // hop_length
