"""Signal helpers shared by the encoders, the adapters and the sample archive (numpy only)."""

from __future__ import annotations

import numpy as np


def resample(x: np.ndarray, sr_in: int, sr_out: int) -> np.ndarray:
    """Band-limited (FFT) resampling of a mono signal from sr_in to sr_out Hz (float32 out;
    a new array even when the rates agree)."""
    x = np.asarray(x, dtype=np.float32)
    if sr_in == sr_out or x.size == 0:
        return x.copy()
    if sr_in <= 0 or sr_out <= 0:
        raise ValueError(f"sample rates must be > 0, got {sr_in = } and {sr_out = }")
    n_out = max(1, int(round(x.size * sr_out / sr_in)))
    pad = min(x.size, 64)  # soften the wrap-around of the FFT at the ends
    padded = np.concatenate([np.zeros(pad, np.float32), x, np.zeros(pad, np.float32)])
    n_pad_out = max(1, int(round(padded.size * sr_out / sr_in)))
    spec = np.fft.rfft(padded)
    keep = min(spec.size, n_pad_out // 2 + 1)
    out_spec = np.zeros(n_pad_out // 2 + 1, dtype=np.complex128)
    out_spec[:keep] = spec[:keep]
    y = np.fft.irfft(out_spec, n=n_pad_out) * (n_pad_out / padded.size)
    start = int(round(pad * sr_out / sr_in))
    return y[start : start + n_out].astype(np.float32)
