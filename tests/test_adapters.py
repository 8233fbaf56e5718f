"""Adapters for user-supplied pretrained models, on tiny random models built in tmp_path."""

from __future__ import annotations

import hashlib
import importlib.util
import json
import shutil
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from xmodal_index.encoders.adapters import MissingDependencyError
from xmodal_index.encoders.base import (
    AUDIO_SAMPLE_RATE,
    CheckpointError,
    CrossModalEncoder,
    EncoderError,
    UnsupportedModalityError,
)
from xmodal_index.encoders.config import EncoderConfig
from xmodal_index.encoders.hashing import RandomProjectionHash
from xmodal_index.encoders.loading import load_encoder

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None and importlib.util.find_spec("tokenizers")
needs_transformers = pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers/tokenizers not installed")

DIM = 24
WORDS = "a the cat dog photo of sound seven one two three".split()


def _open_clip_importable() -> bool:
    try:
        import open_clip  # noqa: F401 - imported only to see that it imports
    except Exception:  # noqa: BLE001 - open_clip imports torchvision, which fails with RuntimeError (or worse) beside some torch builds
        return False
    return True


def _images(n: int, seed: int = 0, size: tuple[int, int] = (40, 48)) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.integers(0, 256, (*size, 3), dtype=np.uint8) for _ in range(n)]


def _audio(seconds: float, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return (0.1 * rng.standard_normal(int(seconds * AUDIO_SAMPLE_RATE))).astype(np.float32)


def _assert_unit_rows(embeddings: np.ndarray, n: int) -> None:
    assert embeddings.dtype == np.float32
    assert embeddings.shape == (n, DIM)
    np.testing.assert_allclose(np.linalg.norm(embeddings, axis=1), 1.0, atol=1e-5)


# ---------------------------------------------------------------- tiny models


def _save_tokenizer(directory: Path) -> None:
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = {token: i for i, token in enumerate(["<pad>", "<unk>", "<s>", "</s>", *WORDS])}
    tokenizer = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A </s>", special_tokens=[("<s>", 2), ("</s>", 3)]
    )
    PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        pad_token="<pad>",
        unk_token="<unk>",
        bos_token="<s>",
        eos_token="</s>",
        model_max_length=32,
    ).save_pretrained(directory)


def _text_config(**extra: int) -> dict:
    return dict(
        vocab_size=4 + len(WORDS),
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        pad_token_id=0,
        bos_token_id=2,
        eos_token_id=3,
        **extra,
    )


def _save_clip(directory: Path, seed: int = 0) -> Path:
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(seed)
    config = CLIPConfig(
        text_config=_text_config(max_position_embeddings=32),
        vision_config=dict(
            hidden_size=32,
            intermediate_size=64,
            num_hidden_layers=1,
            num_attention_heads=2,
            image_size=32,
            patch_size=8,
        ),
        projection_dim=DIM,
    )
    CLIPModel(config).save_pretrained(directory)
    _save_tokenizer(directory)
    return directory


def _save_clap(directory: Path) -> Path:
    from transformers import ClapConfig, ClapFeatureExtractor, ClapModel

    torch.manual_seed(0)
    config = ClapConfig(
        text_config=_text_config(max_position_embeddings=40),
        audio_config=dict(
            spec_size=64,
            window_size=4,
            num_mel_bins=16,
            patch_size=4,
            patch_stride=(4, 4),
            hidden_size=32,
            depths=[1, 1],
            num_attention_heads=[2, 2],
            patch_embeds_hidden_size=16,
        ),
        projection_dim=DIM,
    )
    ClapModel(config).save_pretrained(directory)
    ClapFeatureExtractor(feature_size=16, max_length_s=1, truncation="rand_trunc").save_pretrained(directory)
    _save_tokenizer(directory)
    return directory


class _TinyTowers(torch.nn.Module):
    """A TorchScript-able model following the sidecar convention of adapter_torchscript."""

    def __init__(self) -> None:
        super().__init__()
        self.image = torch.nn.Linear(3 * 4 * 4, DIM)
        self.audio = torch.nn.Linear(800, DIM)
        self.text = torch.nn.Embedding(256, DIM)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.encode_image(images)

    @torch.jit.export
    def encode_image(self, images: torch.Tensor) -> torch.Tensor:
        return self.image(torch.nn.functional.adaptive_avg_pool2d(images, 4).flatten(1))

    @torch.jit.export
    def encode_audio(self, samples: torch.Tensor) -> torch.Tensor:
        return self.audio(samples)

    @torch.jit.export
    def encode_text(self, ids: torch.Tensor) -> torch.Tensor:
        mask = (ids > 0).unsqueeze(-1).float()
        return (self.text(ids) * mask).sum(1) / mask.sum(1).clamp(min=1.0)


def _save_torchscript(directory: Path, modalities: dict[str, str] | None = None, seed: int = 0) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    module = torch.jit.script(_TinyTowers().eval())
    module.save(str(directory / "model.pt"))
    sidecar = {
        "dim": DIM,
        "modalities": modalities or {"image": "encode_image", "audio": "encode_audio", "text": "encode_text"},
        "input": {"image_size": 16, "audio_samples": 800, "text_length": 12},
    }
    (directory / "model.json").write_text(json.dumps(sidecar))
    return directory / "model.pt"


@pytest.fixture(scope="module")
def clip_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers/tokenizers not installed")
    return _save_clip(tmp_path_factory.mktemp("hf") / "clip")


@pytest.fixture(scope="module")
def clip(clip_dir: Path) -> CrossModalEncoder:
    return load_encoder(EncoderConfig(kind="hf_clip", checkpoint=str(clip_dir), dim=DIM, bits=64, batch_size=4))


@pytest.fixture(scope="module")
def clap(tmp_path_factory: pytest.TempPathFactory) -> CrossModalEncoder:
    if not HAS_TRANSFORMERS:
        pytest.skip("transformers/tokenizers not installed")
    directory = _save_clap(tmp_path_factory.mktemp("hf") / "clap")
    return load_encoder(EncoderConfig(kind="hf_clap", checkpoint=str(directory), dim=DIM, bits=32, batch_size=2))


@pytest.fixture(scope="module")
def script_file(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return _save_torchscript(tmp_path_factory.mktemp("ts") / "towers")


@pytest.fixture(scope="module")
def towers(script_file: Path) -> CrossModalEncoder:
    return load_encoder(EncoderConfig(kind="torchscript", checkpoint=str(script_file), dim=DIM, bits=16))


# ---------------------------------------------------------------- hf_clip


@needs_transformers
def test_hf_clip_encodes_image_video_and_text_into_unit_vectors_with_codes(clip: CrossModalEncoder) -> None:
    assert isinstance(clip, CrossModalEncoder)
    assert set(clip.modalities) == {"image", "video", "text"}
    videos = [np.stack(_images(3, seed=1)), np.stack(_images(1, seed=2))]
    for modality, payloads in [("image", _images(5)), ("video", videos), ("text", ["a photo of a cat", "seven", ""])]:
        batch = clip.encode(modality, payloads)
        _assert_unit_rows(batch.embeddings, len(payloads))
        assert batch.codes.dtype == np.uint8 and batch.codes.shape == (len(payloads), 64 // 8)


@needs_transformers
def test_hf_clip_embeddings_do_not_depend_on_batch_composition(clip: CrossModalEncoder) -> None:
    images, texts = _images(6), ["a cat", "the photo of a dog one two three", "seven"]
    together = clip.encode("image", images).embeddings
    alone = np.concatenate([clip.encode("image", [image]).embeddings for image in images])
    np.testing.assert_allclose(together, alone, atol=1e-5)
    text_together = clip.encode("text", texts).embeddings
    text_alone = np.concatenate([clip.encode("text", [text]).embeddings for text in texts])
    np.testing.assert_allclose(text_together, text_alone, atol=1e-5)


@needs_transformers
def test_hf_clip_video_is_the_normalised_mean_of_its_frames(clip: CrossModalEncoder) -> None:
    frames = _images(4, seed=3)
    per_frame = clip.encode("image", frames).embeddings
    expected = per_frame.mean(axis=0) / np.linalg.norm(per_frame.mean(axis=0))
    np.testing.assert_allclose(clip.encode("video", [np.stack(frames)]).embeddings[0], expected, atol=1e-5)


@needs_transformers
def test_hf_clip_model_id_names_kind_dir_hash_head_and_weights_sha(clip: CrossModalEncoder, clip_dir: Path) -> None:
    sha = hashlib.sha256((clip_dir / "model.safetensors").read_bytes()).hexdigest()
    assert clip.model_id == f"hf_clip:clip+rp64x{DIM}s0@{sha}"
    assert clip.checkpoint_path == str(clip_dir)


@needs_transformers
def test_hf_clip_model_id_changes_when_weights_change(clip: CrossModalEncoder, tmp_path: Path) -> None:
    other = load_encoder(
        EncoderConfig(kind="hf_clip", checkpoint=str(_save_clip(tmp_path / "clip", seed=1)), dim=DIM, bits=64)
    )
    assert other.model_id != clip.model_id
    assert other.model_id.split("@")[0] == clip.model_id.split("@")[0]


@needs_transformers
def test_hf_clip_refuses_audio(clip: CrossModalEncoder) -> None:
    with pytest.raises(UnsupportedModalityError, match="audio"):
        clip.encode("audio", [_audio(1.0)])


@needs_transformers
def test_hf_clip_with_a_wrong_dim_names_both_dims(clip_dir: Path) -> None:
    with pytest.raises(CheckpointError, match=rf"projection dim {DIM}.*dim = 512"):
        load_encoder(EncoderConfig(kind="hf_clip", checkpoint=str(clip_dir), dim=512))


@needs_transformers
def test_hf_clip_refuses_weights_that_leave_part_of_the_model_random(clip_dir: Path, tmp_path: Path) -> None:
    from safetensors.torch import load_file, save_file

    partial = tmp_path / "partial"
    shutil.copytree(clip_dir, partial)
    weights = load_file(str(partial / "model.safetensors"))
    del weights["text_projection.weight"]
    save_file(weights, str(partial / "model.safetensors"))
    with pytest.raises(CheckpointError, match=r"lacks 1 weights.*text_projection"):
        load_encoder(EncoderConfig(kind="hf_clip", checkpoint=str(partial), dim=DIM))


@needs_transformers
def test_hf_clap_refuses_a_clip_directory(clip_dir: Path) -> None:
    with pytest.raises(CheckpointError, match="needs a 'clap' model but .* has model_type 'clip'"):
        load_encoder(EncoderConfig(kind="hf_clap", checkpoint=str(clip_dir), dim=DIM))


@needs_transformers
def test_hf_clip_bf16_on_cpu_still_returns_float32_unit_vectors(clip_dir: Path) -> None:
    encoder = load_encoder(
        EncoderConfig(kind="hf_clip", checkpoint=str(clip_dir), dim=DIM, device="cpu", precision="bf16")
    )
    _assert_unit_rows(encoder.encode("image", _images(2)).embeddings, 2)


@needs_transformers
def test_hf_clip_rejects_an_image_that_is_not_uint8_rgb(clip: CrossModalEncoder) -> None:
    with pytest.raises(EncoderError, match=r"image payload 1 must be uint8 \(H, W, 3\)"):
        clip.encode("image", [_images(1)[0], np.zeros((8, 8), dtype=np.float32)])


# ---------------------------------------------------------------- hf_clap


@needs_transformers
def test_hf_clap_encodes_audio_of_any_length_and_text(clap: CrossModalEncoder) -> None:
    assert set(clap.modalities) == {"audio", "text"}
    clips = [_audio(0.3), _audio(1.0, seed=1), _audio(2.5, seed=2)]
    audio = clap.encode("audio", clips)
    _assert_unit_rows(audio.embeddings, 3)
    assert audio.codes.shape == (3, 32 // 8)
    _assert_unit_rows(clap.encode("text", ["the sound of a dog", "seven"]).embeddings, 2)


@needs_transformers
def test_hf_clap_same_audio_gives_the_same_embedding_in_any_batch(clap: CrossModalEncoder) -> None:
    long_clip, short_clip = _audio(2.5, seed=4), _audio(0.5, seed=5)
    first = clap.encode("audio", [long_clip, short_clip]).embeddings
    again = clap.encode("audio", [short_clip, _audio(0.7, seed=6), long_clip]).embeddings
    np.testing.assert_allclose(first[0], again[2], atol=1e-5)
    np.testing.assert_allclose(first[1], again[0], atol=1e-5)


@needs_transformers
def test_hf_clap_refuses_images(clap: CrossModalEncoder) -> None:
    with pytest.raises(UnsupportedModalityError, match="image"):
        clap.encode("image", _images(1))


# ---------------------------------------------------------------- torchscript


def test_torchscript_encodes_every_declared_modality(towers: CrossModalEncoder) -> None:
    assert set(towers.modalities) == {"image", "video", "audio", "text"}
    for modality, payloads in [
        ("image", _images(3)),
        ("video", [np.stack(_images(2))]),
        ("audio", [_audio(0.01), _audio(0.2)]),
        ("text", ["seven", "héllo"]),
    ]:
        batch = towers.encode(modality, payloads)
        _assert_unit_rows(batch.embeddings, len(payloads))
        assert batch.codes.shape == (len(payloads), 16 // 8)


def test_torchscript_text_reaches_the_module_as_utf8_byte_ids(towers: CrossModalEncoder, script_file: Path) -> None:
    module = torch.jit.load(str(script_file))
    ids = torch.zeros((1, 12), dtype=torch.int64)
    ids[0, :3] = torch.tensor(list(b"abc"))
    expected = module.encode_text(ids).detach().numpy()[0]
    np.testing.assert_allclose(
        towers.encode("text", ["abc"]).embeddings[0], expected / np.linalg.norm(expected), atol=1e-6
    )


def test_torchscript_batch_size_does_not_change_results(towers: CrossModalEncoder, script_file: Path) -> None:
    small = load_encoder(EncoderConfig(kind="torchscript", checkpoint=str(script_file), dim=DIM, bits=16, batch_size=2))
    images = _images(5, seed=7)
    np.testing.assert_allclose(
        small.encode("image", images).embeddings, towers.encode("image", images).embeddings, atol=1e-6
    )


def test_torchscript_loads_from_its_directory_too(towers: CrossModalEncoder, script_file: Path) -> None:
    same = load_encoder(EncoderConfig(kind="torchscript", checkpoint=str(script_file.parent), dim=DIM, bits=16))
    assert same.model_id.split("@")[1] == towers.model_id.split("@")[1]
    assert same.model_id.split("@")[1] == hashlib.sha256(script_file.read_bytes()).hexdigest()


def test_torchscript_model_id_changes_when_weights_change(towers: CrossModalEncoder, tmp_path: Path) -> None:
    other = load_encoder(
        EncoderConfig(kind="torchscript", checkpoint=str(_save_torchscript(tmp_path, seed=1)), dim=DIM, bits=16)
    )
    assert other.model_id != towers.model_id


def test_torchscript_modalities_come_from_the_sidecar(tmp_path: Path) -> None:
    file = _save_torchscript(tmp_path, modalities={"text": "encode_text"})
    encoder = load_encoder(EncoderConfig(kind="torchscript", checkpoint=str(file), dim=DIM, bits=16))
    assert encoder.modalities == ("text",)
    with pytest.raises(UnsupportedModalityError, match="video"):
        encoder.encode("video", [np.stack(_images(2))])


def test_torchscript_sidecar_naming_a_missing_method_is_refused(tmp_path: Path) -> None:
    file = _save_torchscript(tmp_path, modalities={"audio": "encode_sound"})
    with pytest.raises(CheckpointError, match="no method 'encode_sound'"):
        load_encoder(EncoderConfig(kind="torchscript", checkpoint=str(file), dim=DIM))


def test_torchscript_without_sidecar_is_refused(tmp_path: Path) -> None:
    file = _save_torchscript(tmp_path)
    file.with_suffix(".json").unlink()
    with pytest.raises(CheckpointError, match=r"sidecar .*model\.json is missing"):
        load_encoder(EncoderConfig(kind="torchscript", checkpoint=str(file), dim=DIM))


def test_torchscript_unreadable_module_is_named_in_the_error(tmp_path: Path) -> None:
    file = _save_torchscript(tmp_path)
    file.write_bytes(b"not a torchscript archive")
    with pytest.raises(CheckpointError, match=f"cannot load torchscript module {file}"):
        load_encoder(EncoderConfig(kind="torchscript", checkpoint=str(file), dim=DIM))


def test_torchscript_with_a_wrong_dim_names_both_dims(script_file: Path) -> None:
    with pytest.raises(CheckpointError, match=rf"projection dim {DIM}.*dim = 256"):
        load_encoder(EncoderConfig(kind="torchscript", checkpoint=str(script_file), dim=256))


# ---------------------------------------------------------------- all kinds


@pytest.mark.parametrize("kind", ["torchscript", "hf_clip", "hf_clap", "open_clip"])
def test_missing_checkpoint_path_is_named_in_the_error(kind: str, tmp_path: Path) -> None:
    missing = tmp_path / "no-such-model"
    with pytest.raises(CheckpointError, match=str(missing)):
        load_encoder(EncoderConfig(kind=kind, checkpoint=str(missing), dim=DIM))


def test_missing_library_error_names_the_package(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    directory = tmp_path / "oc"
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"embed_dim": DIM}}))
    (directory / "open_clip_model.safetensors").write_bytes(b"")
    monkeypatch.setitem(sys.modules, "open_clip", None)
    with pytest.raises(MissingDependencyError, match="open_clip_torch"):
        load_encoder(EncoderConfig(kind="open_clip", checkpoint=str(directory), dim=DIM))


@pytest.mark.skipif(not _open_clip_importable(), reason="open_clip (and the torchvision it imports) is not importable")
def test_open_clip_encodes_image_video_and_text(tmp_path: Path) -> None:
    import open_clip
    from safetensors.torch import save_file

    model_cfg = {
        "embed_dim": DIM,
        "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "head_width": 16, "patch_size": 8},
        "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
    }
    directory = tmp_path / "tiny-open-clip"
    directory.mkdir()
    (directory / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    torch.manual_seed(0)
    model = open_clip.CLIP(**model_cfg)
    weights = {name: tensor.contiguous() for name, tensor in model.state_dict().items()}
    save_file(weights, str(directory / "open_clip_model.safetensors"))

    encoder = load_encoder(EncoderConfig(kind="open_clip", checkpoint=str(directory), dim=DIM, bits=32))
    assert encoder.model_id.startswith(f"open_clip:tiny-open-clip+rp32x{DIM}s0@")
    for modality, payloads in [("image", _images(2)), ("video", [np.stack(_images(3))]), ("text", ["a cat", "seven"])]:
        _assert_unit_rows(encoder.encode(modality, payloads).embeddings, len(payloads))
    with pytest.raises(UnsupportedModalityError):
        encoder.encode("audio", [_audio(0.5)])


# ---------------------------------------------------------------- through the pipeline


def _segments(modalities: tuple[str, ...]) -> list:
    from xmodal_index.pipeline.types import Segment

    payloads = {
        "image": _images(1)[0],
        "video": np.stack(_images(2, seed=1)),
        "audio": _audio(0.5),
        "text": "a photo of a cat",
    }
    return [Segment(f"mem://{m}", "e1", m, 0.0, 1.0, payloads[m]) for m in modalities for _ in range(2)]


@pytest.mark.parametrize("kind", ["torchscript", "hf_clip", "hf_clap"])
def test_adapters_run_through_encode_segments(kind: str, script_file: Path, tmp_path: Path) -> None:
    import apache_beam as beam
    from apache_beam.testing.test_pipeline import TestPipeline
    from apache_beam.testing.util import assert_that, equal_to

    from xmodal_index.pipeline.encode import EncodeSegments

    if kind == "torchscript":
        checkpoint = script_file
    elif not HAS_TRANSFORMERS:
        pytest.skip("transformers/tokenizers not installed")
    else:
        checkpoint = (_save_clip if kind == "hf_clip" else _save_clap)(tmp_path / kind)
    config = EncoderConfig(kind=kind, checkpoint=str(checkpoint), dim=DIM, bits=32, batch_size=3)
    encoder = load_encoder(config)
    segments = _segments(encoder.modalities)
    expected = [(s.uri, s.modality, DIM, 4, encoder.model_id) for s in segments]

    with TestPipeline() as pipeline:
        rows, dead = pipeline | beam.Create(segments) | EncodeSegments(config, run_id="run-1")
        summary = rows | beam.Map(
            lambda r: (r["uri"], r["modality"], len(r["embedding"]), len(r["hash_code"]), r["model_id"])
        )
        assert_that(summary, equal_to(expected), label="rows")
        assert_that(dead, equal_to([]), label="no dead letters")


# ---------------------------------------------------------------- hash head


def test_hash_codes_are_the_signs_of_the_seeded_projection() -> None:
    head = RandomProjectionHash(dim=DIM, bits=32, seed=3)
    embeddings = np.random.default_rng(0).standard_normal((5, DIM)).astype(np.float32)
    expected = np.packbits((embeddings @ head.projection.T > 0).astype(np.uint8), axis=1)
    np.testing.assert_array_equal(head.codes(embeddings), expected)
    np.testing.assert_array_equal(RandomProjectionHash(dim=DIM, bits=32, seed=3).projection, head.projection)
    assert not np.array_equal(RandomProjectionHash(dim=DIM, bits=32, seed=4).projection, head.projection)
    assert head.spec == f"rp32x{DIM}s3"


def test_hash_hamming_distance_grows_with_the_angle() -> None:
    head = RandomProjectionHash(dim=64, bits=128, seed=0)
    rng = np.random.default_rng(1)
    base = rng.standard_normal(64)
    near = base + 0.1 * rng.standard_normal(64)
    far = rng.standard_normal(64)
    codes = np.unpackbits(head.codes(np.stack([base, near, far])), axis=1)
    assert (codes[0] != codes[1]).sum() < (codes[0] != codes[2]).sum()


def test_hash_seed_is_part_of_the_model_id(script_file: Path) -> None:
    ids = {
        load_encoder(EncoderConfig(kind="torchscript", checkpoint=str(script_file), dim=DIM, seed=seed)).model_id
        for seed in (0, 1)
    }
    assert len(ids) == 2
