"""Fixed front-ends: log-mel with torchaudio's semantics, image and text featurisation."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

from xmodal_index.encoders.frontends import (
    AudioFrontend,
    FrontendError,
    MelSpectrogram,
    frames_for_seconds,
    image_features,
    mel_filterbank,
    text_features,
    text_ngrams,
)
from xmodal_index.encoders.tri_modal import resample

SR = 16000


def _reference_mel(x: np.ndarray, n_fft: int = 400, hop: int = 160, n_mels: int = 64) -> np.ndarray:
    """Independent numpy mel spectrogram: reflect pad, periodic Hann, |rfft|^2, HTK triangles."""
    padded = np.pad(x.astype(np.float64), n_fft // 2, mode="reflect")
    window = 0.5 - 0.5 * np.cos(2 * np.pi * np.arange(n_fft) / n_fft)
    n_frames = 1 + (len(padded) - n_fft) // hop
    frames = np.stack([padded[i * hop : i * hop + n_fft] * window for i in range(n_frames)])
    power = np.abs(np.fft.rfft(frames, axis=1)) ** 2  # (frames, freqs)
    freqs = np.linspace(0, SR / 2, n_fft // 2 + 1)

    def mel(f):
        return 2595 * np.log10(1 + f / 700)

    edges_mel = np.linspace(mel(0), mel(SR / 2), n_mels + 2)
    edges = 700 * (10 ** (edges_mel / 2595) - 1)
    fb = np.zeros((len(freqs), n_mels))
    for m in range(n_mels):
        lo, mid, hi = edges[m], edges[m + 1], edges[m + 2]
        rising = (freqs - lo) / (mid - lo)
        falling = (hi - freqs) / (hi - mid)
        fb[:, m] = np.clip(np.minimum(rising, falling), 0, None)
    return (power @ fb).T  # (n_mels, frames)


def test_mel_spectrogram_matches_an_independent_reference():
    x = np.random.default_rng(0).standard_normal(12345).astype(np.float32) * 0.1
    ours = MelSpectrogram()(torch.from_numpy(x)).numpy()
    ref = _reference_mel(x)
    assert ours.shape == ref.shape == (64, frames_for_seconds(12345 / SR))
    np.testing.assert_allclose(ours, ref, rtol=2e-3, atol=1e-6 * ref.max())


def test_filterbank_triangles_peak_at_their_centre_frequency():
    fb = mel_filterbank(201, 0.0, 8000.0, 64, SR)
    assert fb.shape == (201, 64)
    assert torch.all(fb >= 0) and float(fb.max()) <= 1.0
    centres = fb.argmax(dim=0)
    assert torch.all(centres[1:] >= centres[:-1])  # ordered from low to high frequency


def test_a_tone_lights_the_band_of_its_frequency():
    t = np.arange(SR) / SR
    mel = MelSpectrogram()(torch.from_numpy(np.sin(2 * np.pi * 1000 * t).astype(np.float32)))
    fb = mel_filterbank(201, 0.0, 8000.0, 64, SR)
    band_for_1k = int(fb[25].argmax())  # rfft bin 25 = 1000 Hz at n_fft 400
    assert int(mel.mean(dim=1).argmax()) == band_for_1k


@pytest.mark.skipif(importlib.util.find_spec("torchaudio") is None, reason="torchaudio not installed")
def test_equal_to_torchaudio_where_it_imports():
    try:
        import torchaudio
    except Exception as err:  # noqa: BLE001 - an installed but broken torchaudio (binary mismatch) is not our concern
        pytest.skip(f"torchaudio does not import: {err}")
    x = torch.randn(8000) * 0.1
    ref = torchaudio.transforms.MelSpectrogram(sample_rate=SR, n_fft=400, hop_length=160, n_mels=64)(x)
    torch.testing.assert_close(MelSpectrogram()(x), ref, rtol=1e-4, atol=1e-5)


def _word_like(seed: int = 0, seconds: float = 0.4) -> np.ndarray:
    """A synthetic 'word': two formant-like tones with an envelope."""
    t = np.arange(int(seconds * SR)) / SR
    env = np.sin(np.pi * t / seconds) ** 2
    f0 = 150 + 20 * seed
    x = env * (np.sin(2 * np.pi * f0 * 3 * t) + 0.5 * np.sin(2 * np.pi * f0 * 11 * t * (1 + 0.3 * t)))
    return (0.3 * x).astype(np.float32)


def test_audio_features_ignore_loudness():
    fe = AudioFrontend()
    x = _word_like()
    a, b = fe([x, x * 0.01])
    assert float((a - b).abs().max()) < 0.05  # standardised units; only the 1e-10 power floor differs


def test_audio_features_ignore_silence_around_the_word():
    fe = AudioFrontend()
    x = _word_like()
    padded = np.concatenate([np.zeros(SR // 2, np.float32), x, np.zeros(SR // 3, np.float32)])
    a, b = fe([x, padded])
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.95


def test_audio_features_agree_across_source_sample_rates():
    fe = AudioFrontend()
    x = _word_like()
    via_8k = resample(resample(x, SR, 8000), 8000, SR)
    via_44k = resample(resample(x, SR, 44100), 44100, SR)
    a, b, c = fe([x, via_8k, via_44k])
    for other in (b, c):
        assert torch.nn.functional.cosine_similarity(a.flatten(), other.flatten(), dim=0) > 0.95


def test_audio_features_have_a_fixed_shape_for_any_length():
    fe = AudioFrontend()
    out = fe([np.zeros(100, np.float32), _word_like(seconds=0.2), _word_like(seconds=20.0)])
    assert out.shape == (3, 1, fe.bands, fe.config.frames) and torch.isfinite(out).all()


def test_audio_payload_must_be_mono():
    with pytest.raises(FrontendError, match="mono"):
        AudioFrontend()([np.zeros((100, 2), np.float32)])


def _digit_like() -> np.ndarray:
    img = np.zeros((8, 8), np.uint8)
    img[1:7, 3:5] = 255
    img[1, 2] = 200
    return np.repeat(img[..., None], 3, axis=2)


def test_image_features_ignore_polarity():
    img = _digit_like()
    a, b = image_features([img, 255 - img])
    torch.testing.assert_close(a, b)


def test_upscaled_frame_looks_like_the_small_image():
    img = _digit_like()
    big = np.repeat(np.repeat(img, 14, axis=0), 14, axis=1)  # nearest upscale to 112x112
    a, b = image_features([img, big])
    assert a.shape == (1, 32, 32)
    assert torch.nn.functional.cosine_similarity(a.flatten(), b.flatten(), dim=0) > 0.9


def test_image_features_accept_any_size_and_grey():
    out = image_features([np.zeros((3, 500, 3), np.uint8), np.full((64, 64), 7, np.uint8)])
    assert out.shape == (2, 1, 32, 32) and torch.isfinite(out).all()


def test_text_ngrams_are_case_and_space_insensitive_and_stable():
    assert text_ngrams("  Seven ") == text_ngrams("seven")
    assert text_ngrams("the  digit seven") == text_ngrams("The digit\tseven")
    assert text_ngrams("seven") != text_ngrams("eleven")
    assert all(0 <= i < 2048 for i in text_ngrams("the digit 7, written by hand"))


def test_text_features_build_embedding_bag_inputs():
    ids, offsets = text_features(["one", "", "nine nine"])
    assert offsets.tolist()[0] == 0 and len(offsets) == 3
    assert offsets[1] > 0 and offsets[2] > offsets[1]  # the empty text still gets one id
    with pytest.raises(FrontendError, match="str"):
        text_features([3])
