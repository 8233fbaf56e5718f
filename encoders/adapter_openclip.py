"""Adapter for open_clip models stored as local files (image, video, text).

The checkpoint is a directory in the layout open_clip models have on the Hugging
Face hub: ``open_clip_config.json`` (``{"model_cfg": {...}, "preprocess_cfg": {...}}``)
and one weight file, the first present of ``WEIGHT_FILES`` (else the only
``*.safetensors``). open_clip builds the architecture from the config, then reads
the weights weights-only (``load_checkpoint(..., weights_only=True)``); nothing is
downloaded. Images are resized (shorter side), centre-cropped and normalised here
with the preprocess config's size, mean and std, so torchvision transforms are not
used. open_clip itself imports torchvision, so both must be importable: PyPI's
torchvision has to be the build made for the installed torch.
"""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

import torch

from .adapters import (
    OPENAI_CLIP_MEAN,
    OPENAI_CLIP_STD,
    ImagePreprocess,
    PretrainedAdapter,
    existing_dir,
    import_optional,
    resolve_device,
)
from .base import CheckpointError
from .config import EncoderConfig

logger = logging.getLogger(__name__)

CONFIG_FILE = "open_clip_config.json"
WEIGHT_FILES = (
    "open_clip_model.safetensors",
    "open_clip_pytorch_model.safetensors",
    "model.safetensors",
    "open_clip_pytorch_model.bin",
    "pytorch_model.bin",
)


def openclip_weight_file(path: Path) -> Path:
    for name in WEIGHT_FILES:
        if (path / name).is_file():
            return path / name
    candidates = sorted(path.glob("*.safetensors"))
    if len(candidates) != 1:
        raise CheckpointError(
            f"open_clip checkpoint {path} needs one of {', '.join(WEIGHT_FILES)} "
            f"(or a single *.safetensors); found {[c.name for c in candidates]}"
        )
    return candidates[0]


def _embed_dim(path: Path) -> int:
    """model_cfg.embed_dim of the directory's open_clip_config.json."""
    file = path / CONFIG_FILE
    try:
        config = json.loads(file.read_text(encoding="utf-8"))
        return int(config["model_cfg"]["embed_dim"])
    except FileNotFoundError as err:
        raise CheckpointError(f"open_clip checkpoint {path} has no {CONFIG_FILE}") from err
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise CheckpointError(f"open_clip config {file} is unreadable or has no model_cfg.embed_dim: {err}") from err


def _square(size: Any) -> tuple[int, int]:
    if isinstance(size, int):
        return size, size
    height, width = size
    return int(height), int(width)


class OpenClipAdapter(PretrainedAdapter):
    """An open_clip CLIP / CustomTextCLIP: ``encode_image`` and ``encode_text``."""

    kind = "open_clip"

    def __init__(self, config: EncoderConfig) -> None:
        path = existing_dir(config.checkpoint, self.kind)
        embed_dim = _embed_dim(path)
        weights = openclip_weight_file(path)
        open_clip = import_optional("open_clip", self.kind, "open_clip_torch", extra="open-clip")
        device = resolve_device(config)
        try:
            model = open_clip.create_model(f"local-dir:{path}", load_weights=False, pretrained_text=False)
            open_clip.load_checkpoint(model, str(weights), strict=True, weights_only=True)
            self.tokenizer = open_clip.get_tokenizer(f"local-dir:{path}")
        except Exception as err:  # open_clip raises ValueError, RuntimeError, OSError... for a bad directory
            raise CheckpointError(f"cannot load open_clip checkpoint {path}: {err}") from err
        self.model = model.to(device).eval()
        pre = open_clip.get_model_preprocess_cfg(model)
        size = _square(pre.get("size", 224))
        if pre.get("resize_mode", "shortest") != "shortest":
            logger.warning("open_clip resize_mode %r of %s is applied as 'shortest'", pre["resize_mode"], path)
        self.preprocess = ImagePreprocess(
            size=size,
            resize=min(size),
            mean=tuple(pre.get("mean", OPENAI_CLIP_MEAN)),
            std=tuple(pre.get("std", OPENAI_CLIP_STD)),
        )
        super().__init__(
            config,
            checkpoint_path=path,
            weight_files=[weights],
            model_dim=embed_dim,
            modalities=("image", "video", "text"),
            device=device,
        )

    def _forward(self, modality: str, batch: list[Any]) -> torch.Tensor:
        if modality == "image":
            return self.model.encode_image(self.preprocess(batch).to(self.device))
        return self.model.encode_text(self.tokenizer(batch).to(self.device))
