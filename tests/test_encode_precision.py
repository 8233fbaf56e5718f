"""CPU encoders: bf16 autocast where the CPU computes bf16 natively, outputs within tolerance of fp32."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xmodal_index.encoders import builtin
from xmodal_index.encoders.builtin import cpu_has_native_bf16, load_builtin
from xmodal_index.encoders.config import EncoderConfig


def _payloads(modality: str, n: int = 12):
    rng = np.random.default_rng(3)
    if modality == "image":
        return [rng.integers(0, 256, (64, 64, 3), dtype=np.uint8) for _ in range(n)]
    if modality == "video":
        return [rng.integers(0, 256, (2, 112, 112, 3), dtype=np.uint8) for _ in range(n)]
    if modality == "audio":
        t = np.arange(16000) / 16000
        return [(0.3 * np.sin(2 * np.pi * (200 + 50 * k) * t)).astype(np.float32) for k in range(n)]
    return [f"the digit {w}" for w in ("zero", "one", "two", "three", "four", "five", "six", "seven")]


@pytest.fixture(scope="module")
def encoders():
    fp32 = load_builtin(EncoderConfig(device="cpu", precision="fp32"))
    bf16 = load_builtin(EncoderConfig(device="cpu", precision="bf16"))
    return fp32, bf16


@pytest.mark.parametrize("modality", ["image", "video", "audio", "text"])
def test_bf16_embeddings_stay_within_tolerance_of_fp32(encoders, modality):
    fp32, bf16 = encoders
    items = _payloads(modality)
    a = fp32.encode(modality, items).embeddings
    b = bf16.encode(modality, items).embeddings
    assert b.dtype == np.float32 and b.shape == a.shape
    cosine = np.sum(a * b, axis=1)
    assert cosine.min() > 0.99
    # each bf16 embedding is nearest its own fp32 embedding among the batch's
    assert (np.argmax(b @ a.T, axis=1) == np.arange(len(items))).all()


def test_auto_precision_uses_bf16_on_the_cpu_only_where_it_is_native(monkeypatch):
    cpu = torch.device("cpu")
    expected = torch.bfloat16 if cpu_has_native_bf16() else None
    assert builtin.resolve_precision("auto", cpu) == expected
    monkeypatch.setattr(torch.backends.cpu, "get_cpu_capability", lambda: "AVX2")
    assert builtin.resolve_precision("auto", cpu) is None
    assert builtin.resolve_precision("fp32", cpu) is None


def test_cuda_encoder_falls_back_to_the_cpu_with_one_warning(monkeypatch, caplog):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    with caplog.at_level("WARNING", logger="xmodal_index.encoders.builtin"):
        enc = load_builtin(EncoderConfig(device="cuda", precision="fp32"))
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert enc.device.type == "cpu"
    assert len(warnings) == 1 and "encoder device 'cuda' unavailable" in warnings[0]
    cpu = load_builtin(EncoderConfig(device="cpu", precision="fp32"))
    np.testing.assert_allclose(enc.encode("text", ["seven"]).embeddings, cpu.encode("text", ["seven"]).embeddings,
                               atol=1e-6)
