"""Adapters for Hugging Face transformers CLIP (image, video, text) and CLAP (audio, text).

The checkpoint is a local ``save_pretrained`` directory: ``config.json``, the
weights (``*.safetensors``, else ``pytorch_model*.bin``, which transformers reads
weights-only), the tokenizer files, and optionally ``preprocessor_config.json``.
Nothing is downloaded. Preprocessing runs here, without torchvision: CLIP images
are resized, centre-cropped and normalised with the directory's mean/std; CLAP
audio (16 kHz) is centre-cropped to the feature extractor's ``max_length_s``,
resampled to its rate and turned into log-mels by ``ClapFeatureExtractor``. Long
clips are cropped rather than randomly chunked, and ``is_longer`` is always False,
so the same audio always gives the same embedding whatever else is in the batch.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from .adapters import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    PretrainedAdapter,
    centre_crop,
    existing_dir,
    import_optional,
    pooled_output,
    resample,
    resolve_device,
)
from .base import AUDIO_SAMPLE_RATE, CheckpointError
from .config import EncoderConfig

PREPROCESSOR_FILE = "preprocessor_config.json"


WEIGHT_NAMES = ("model.safetensors", "pytorch_model.bin")


def hf_weight_files(path: Path, kind: str) -> list[Path]:
    """The weight files transformers loads from ``path``, safetensors first: the single
    file, or the shards listed by its ``.index.json``. Other files (an open_clip copy of
    the same weights, say) are not part of the model."""
    for name in WEIGHT_NAMES:
        if (path / name).is_file():
            return [path / name]
        index = path / f"{name}.index.json"
        if index.is_file():
            shards = _read_json(index, kind).get("weight_map", {}).values()
            return sorted({path / shard for shard in shards})
    return []


def _load_pretrained(loader: Any, path: Path, kind: str, what: str, **kwargs: Any) -> Any:
    try:
        return loader.from_pretrained(str(path), local_files_only=True, **kwargs)
    except Exception as err:  # transformers raises OSError, ValueError, KeyError... for a bad directory
        raise CheckpointError(f"cannot load the {what} of {kind} checkpoint {path}: {err}") from err


def _load_model(model_cls: Any, path: Path, kind: str, model_type: str, device: torch.device) -> Any:
    """Load weights into ``model_cls``, refusing another architecture or weights that leave parts random."""
    weights = hf_weight_files(path, kind)
    if not weights:
        raise CheckpointError(
            f"{kind} checkpoint {path} holds none of {', '.join(WEIGHT_NAMES)} (or their .index.json)"
        )
    found_type = _read_json(path / "config.json", kind).get("model_type")
    if found_type != model_type:
        raise CheckpointError(
            f"{kind} needs a {model_type!r} model but {path}/config.json has model_type {found_type!r}"
        )
    use_safetensors = weights[0].suffix == ".safetensors"
    model, info = _load_pretrained(
        model_cls, path, kind, "model", use_safetensors=use_safetensors, output_loading_info=True
    )
    if info.get("missing_keys"):
        missing = sorted(info["missing_keys"])
        raise CheckpointError(f"{kind} checkpoint {path} lacks {len(missing)} weights, e.g. {missing[:3]}")
    return model.to(device).eval()


def _read_json(file: Path, kind: str) -> dict[str, Any]:
    try:
        content = json.loads(file.read_text(encoding="utf-8"))
    except (OSError, ValueError) as err:
        raise CheckpointError(f"cannot read {kind} config file {file}: {err}") from err
    if not isinstance(content, dict):
        raise CheckpointError(f"{kind} config file {file} holds {type(content).__name__}, not an object")
    return content


def _read_preprocessor(path: Path, kind: str) -> dict[str, Any]:
    file = path / PREPROCESSOR_FILE
    return _read_json(file, kind) if file.is_file() else {}


def _edge(value: Any, default: int) -> int:
    """A size entry of preprocessor_config.json: an int or {"shortest_edge"|"height": n}."""
    if isinstance(value, int):
        return value
    if isinstance(value, dict):
        return int(value.get("shortest_edge", value.get("height", default)))
    return default


def _text_inputs(tokenizer: Any, texts: list[str], max_length: int, device: torch.device) -> dict[str, torch.Tensor]:
    encoded = tokenizer(texts, padding=True, truncation=True, max_length=max_length, return_tensors="pt")
    return {"input_ids": encoded["input_ids"].to(device), "attention_mask": encoded["attention_mask"].to(device)}


class HfClipAdapter(PretrainedAdapter):
    """A transformers ``CLIPModel``: image and text towers; video = mean of frames."""

    kind = "hf_clip"

    def __init__(self, config: EncoderConfig) -> None:
        transformers = import_optional("transformers", self.kind, "transformers")
        path = existing_dir(config.checkpoint, self.kind)
        device = resolve_device(config)
        self.model = _load_model(transformers.CLIPModel, path, self.kind, "clip", device)
        self.tokenizer = _load_pretrained(transformers.AutoTokenizer, path, self.kind, "tokenizer")
        model_config = self.model.config
        self.max_text_tokens = min(self.tokenizer.model_max_length, model_config.text_config.max_position_embeddings)
        image_size = model_config.vision_config.image_size
        pre = _read_preprocessor(path, self.kind)
        self.preprocess = ImagePreprocess(
            size=(image_size, image_size),
            resize=_edge(pre.get("size"), image_size),
            mean=tuple(pre.get("image_mean", OPENAI_CLIP_MEAN)),
            std=tuple(pre.get("image_std", OPENAI_CLIP_STD)),
        )
        super().__init__(
            config,
            checkpoint_path=path,
            weight_files=hf_weight_files(path, self.kind),
            model_dim=model_config.projection_dim,
            modalities=("image", "video", "text"),
            device=device,
        )

    def _forward(self, modality: str, batch: list[Any]) -> torch.Tensor:
        if modality == "image":
            pixels = self.preprocess(batch).to(self.device)
            return pooled_output(self.model.get_image_features(pixel_values=pixels))
        inputs = _text_inputs(self.tokenizer, batch, self.max_text_tokens, self.device)
        return pooled_output(self.model.get_text_features(**inputs))


class HfClapAdapter(PretrainedAdapter):
    """A transformers ``ClapModel``: audio and text towers."""

    kind = "hf_clap"

    def __init__(self, config: EncoderConfig) -> None:
        transformers = import_optional("transformers", self.kind, "transformers")
        path = existing_dir(config.checkpoint, self.kind)
        device = resolve_device(config)
        self.model = _load_model(transformers.ClapModel, path, self.kind, "clap", device)
        self.tokenizer = _load_pretrained(transformers.AutoTokenizer, path, self.kind, "tokenizer")
        model_config = self.model.config
        text_config = model_config.text_config
        # RoBERTa positions start after the padding index.
        position_offset = 0 if text_config.pad_token_id is None else text_config.pad_token_id + 1
        self.max_text_tokens = min(
            self.tokenizer.model_max_length, text_config.max_position_embeddings - position_offset
        )
        if (path / PREPROCESSOR_FILE).is_file():
            self.features = _load_pretrained(transformers.ClapFeatureExtractor, path, self.kind, "feature extractor")
        else:
            audio_config = model_config.audio_config
            self.features = transformers.ClapFeatureExtractor(
                feature_size=audio_config.num_mel_bins,
                truncation="fusion" if audio_config.enable_fusion else "rand_trunc",
            )
        self.max_input_samples = int(self.features.max_length_s * AUDIO_SAMPLE_RATE)
        super().__init__(
            config,
            checkpoint_path=path,
            weight_files=hf_weight_files(path, self.kind),
            model_dim=model_config.projection_dim,
            modalities=("audio", "text"),
            device=device,
        )

    def _forward(self, modality: str, batch: list[Any]) -> torch.Tensor:
        if modality == "text":
            inputs = _text_inputs(self.tokenizer, batch, self.max_text_tokens, self.device)
            return pooled_output(self.model.get_text_features(**inputs))
        rate = self.features.sampling_rate
        clips = [self._clip(audio) for audio in batch]
        features = self.features(clips, sampling_rate=rate, return_tensors="pt")["input_features"]
        is_longer = torch.zeros((len(batch), 1), dtype=torch.bool, device=self.device)
        output = self.model.get_audio_features(
            input_features=features.to(self.device, torch.float32), is_longer=is_longer
        )
        return pooled_output(output)

    def _clip(self, audio: Any) -> Any:
        """The centre ``max_length_s`` of a 16 kHz clip, at the feature extractor's rate."""
        clip = resample(centre_crop(audio, self.max_input_samples), AUDIO_SAMPLE_RATE, self.features.sampling_rate)
        return centre_crop(clip, self.features.nb_max_samples)
