"""The built-in encoder honours the CrossModalEncoder contract."""

from __future__ import annotations

import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal_index.encoders.base import CheckpointError, CrossModalEncoder, UnsupportedModalityError
from xmodal_index.encoders.builtin import build_model, bundled_checkpoint_path, file_sha256, load_builtin
from xmodal_index.encoders.config import EncoderConfig
from xmodal_index.encoders.loading import load_encoder
from xmodal_index.encoders.towers import ModelConfig
from xmodal_index.encoders.training import write_checkpoint


def _payloads(modality: str, n: int, seed: int = 0) -> list:
    rng = np.random.default_rng(seed)
    if modality == "audio":
        return [(0.3 * np.sin(2 * np.pi * (200 + 50 * i) * np.arange(16000 + 800 * i) / 16000)).astype(np.float32)
                for i in range(n)]
    if modality == "image":
        return [rng.integers(0, 256, (20 + i, 30 + 2 * i, 3), dtype=np.uint8) for i in range(n)]
    if modality == "video":
        return [rng.integers(0, 256, (1 + i % 3, 48, 64, 3), dtype=np.uint8) for i in range(n)]
    return [f"caption number {i}" for i in range(n)]


@pytest.fixture(scope="module")
def untrained():
    return load_builtin(EncoderConfig(checkpoint="", seed=3, bits=32, batch_size=4))


@pytest.mark.parametrize("modality", ["audio", "image", "video", "text"])
def test_encode_returns_normalised_embeddings_and_packed_codes(untrained, modality):
    batch = untrained.encode(modality, _payloads(modality, 5))
    assert batch.embeddings.dtype == np.float32 and batch.embeddings.shape == (5, 256)
    np.testing.assert_allclose(np.linalg.norm(batch.embeddings, axis=1), 1.0, atol=1e-5)
    assert batch.codes.dtype == np.uint8 and batch.codes.shape == (5, 4)


def test_encoder_satisfies_protocol(untrained):
    assert isinstance(untrained, CrossModalEncoder)
    assert untrained.modalities == ("video", "audio", "image", "text")
    assert untrained.checkpoint_path is None
    assert untrained.model_id.startswith("builtin-untrained-seed3@")


def test_batches_larger_than_batch_size_match_one_by_one(untrained):
    payloads = _payloads("audio", 9)
    together = untrained.encode("audio", payloads).embeddings
    alone = np.concatenate([untrained.encode("audio", [p]).embeddings for p in payloads])
    np.testing.assert_allclose(together, alone, atol=1e-5)


def test_one_frame_video_encodes_like_the_image(untrained):
    frame = _payloads("image", 1)[0]
    video = untrained.encode("video", [frame[None]]).embeddings
    image = untrained.encode("image", [frame]).embeddings
    np.testing.assert_allclose(video, image, atol=1e-5)


def test_audio_of_any_length_from_short_to_long(untrained):
    lengths = [3200, 16000, 16000 * 20]
    batch = untrained.encode("audio", [np.full(n, 0.01, dtype=np.float32) for n in lengths])
    assert np.isfinite(batch.embeddings).all() and batch.embeddings.shape == (3, 256)


def test_empty_batch_gives_empty_arrays(untrained):
    batch = untrained.encode("text", [])
    assert batch.embeddings.shape == (0, 256) and batch.codes.shape == (0, 4)


def test_unknown_modality_is_refused(untrained):
    with pytest.raises(UnsupportedModalityError, match="smell"):
        untrained.encode("smell", ["x"])


def test_same_seed_gives_same_model_in_a_fresh_process(untrained):
    code = (
        "from xmodal_index.encoders.builtin import load_builtin;"
        "from xmodal_index.encoders.config import EncoderConfig;"
        "e = load_builtin(EncoderConfig(checkpoint='', seed=3, bits=32));"
        "print(e.model_id); print(e.encode('text', ['seven']).embeddings[0, :8].tolist())"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout.splitlines()
    assert out[0] == untrained.model_id
    np.testing.assert_allclose(eval(out[1]), untrained.encode("text", ["seven"]).embeddings[0, :8], atol=1e-6)


def test_different_seed_gives_different_model_id(untrained):
    other = load_builtin(EncoderConfig(checkpoint="", seed=4, bits=32))
    assert other.model_id != untrained.model_id


def test_encode_is_safe_from_several_threads(untrained):
    payloads = _payloads("image", 6)
    expected = untrained.encode("image", payloads).embeddings
    results: list[np.ndarray] = []

    def work() -> None:
        results.append(untrained.encode("image", payloads).embeddings)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert len(results) == 4
    for r in results:
        np.testing.assert_allclose(r, expected, atol=1e-6)


def test_bundled_checkpoint_loads_by_default():
    enc = load_encoder(EncoderConfig())
    path = bundled_checkpoint_path()
    assert enc.checkpoint_path == str(path)
    assert enc.model_id.endswith("@" + file_sha256(path))
    assert enc.encode("text", ["seven"]).codes.shape == (1, 8)


def _write(tmp_path: Path, seed: int = 0, dim: int = 32, bits: tuple[int, ...] = (16, 64)) -> Path:
    net = build_model(ModelConfig(dim=dim, bits=bits, width=8), seed)
    return write_checkpoint(
        net, tmp_path / f"m{seed}.safetensors", name="tiny", objective="none", data_fingerprint="abc", command="test"
    )


def test_checkpoint_path_loads_with_name_and_file_sha256(tmp_path):
    path = _write(tmp_path)
    enc = load_builtin(EncoderConfig(checkpoint=str(path), dim=32, bits=16))
    assert enc.model_id == "tiny@" + file_sha256(path)
    assert enc.metadata["data_fingerprint"] == "abc"


def test_dim_mismatch_names_both_dims(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(CheckpointError, match=r"dim 32.*dim 256"):
        load_builtin(EncoderConfig(checkpoint=str(path), dim=256, bits=16))


def test_bits_missing_from_checkpoint_is_refused(tmp_path):
    path = _write(tmp_path)
    with pytest.raises(CheckpointError, match="32"):
        load_builtin(EncoderConfig(checkpoint=str(path), dim=32, bits=32))


def test_tampered_weights_are_refused(tmp_path):
    path = _write(tmp_path)
    raw = bytearray(path.read_bytes())
    raw[-5] ^= 0xFF  # a byte inside the last tensor's data
    path.write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match="digest"):
        load_builtin(EncoderConfig(checkpoint=str(path), dim=32, bits=16))


def test_file_that_is_not_safetensors_is_refused(tmp_path):
    path = tmp_path / "evil.safetensors"
    path.write_bytes(b"\x80\x04\x95 pickled data, not a checkpoint")
    with pytest.raises(CheckpointError, match="evil.safetensors"):
        load_builtin(EncoderConfig(checkpoint=str(path), dim=32, bits=16))


def test_missing_checkpoint_names_the_path(tmp_path):
    with pytest.raises(CheckpointError, match="nowhere.safetensors"):
        load_builtin(EncoderConfig(checkpoint=str(tmp_path / "nowhere.safetensors")))


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_mixed_precision_matches_cpu():
    cpu = load_builtin(EncoderConfig(checkpoint="", seed=1, device="cpu", precision="fp32"))
    gpu = load_builtin(EncoderConfig(checkpoint="", seed=1, device="cuda", precision="auto"))
    assert gpu.device.type == "cuda" and gpu.autocast_dtype in (torch.bfloat16, torch.float16)
    for modality in ("audio", "image", "video", "text"):
        payloads = _payloads(modality, 70)
        a = cpu.encode(modality, payloads).embeddings
        b = gpu.encode(modality, payloads).embeddings
        assert b.shape == a.shape
        assert float(np.mean(np.sum(a * b, axis=1))) > 0.98
