"""Adapters for pretrained models that users bring as local files.

Choosing one is configuration, not code::

    EncoderConfig(kind="hf_clip", checkpoint="/models/clip-vit-b32", dim=512, bits=64)

=========== ================================================================ ===================
kind        checkpoint (a local path)                                        modalities
=========== ================================================================ ===================
hf_clip     a ``save_pretrained`` directory of a transformers ``CLIPModel``   video, image, text
            with its tokenizer (and ``preprocessor_config.json`` if any)
hf_clap     a ``save_pretrained`` directory of a transformers ``ClapModel``   audio, text
            with its tokenizer (and ``preprocessor_config.json`` if any)
open_clip   a directory with ``open_clip_config.json`` and the weights        video, image, text
            (the layout open_clip models have on the Hugging Face hub)
torchscript a TorchScript file ``model.pt`` with a ``model.json`` sidecar      as the sidecar says
            (see ``adapter_torchscript``), or a directory holding both
=========== ================================================================ ===================

What every adapter guarantees (the ``CrossModalEncoder`` contract):

- weights are read as data only: safetensors where the model has them,
  ``torch.jit.load`` for TorchScript, never a pickle that can run code;
- ``dim`` is the model's projection dimension and must equal ``config.dim``;
- embeddings are L2-normalised float32; a video is the mean of its frames' image
  embeddings; codes come from a fixed ``RandomProjectionHash(dim, bits, seed)``;
- ``model_id`` is ``"<kind>:<model name>+<hash head spec>@<sha256>"``, the sha256
  taken over the model's weight files in sorted order (for a single file it
  equals ``sha256sum`` of that file);
- forward passes hold at most ``config.batch_size`` items (frames for video);
- device "auto" picks CUDA when available; precision "auto" is fp32 on CPU and
  fp16 (autocast) on CUDA.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import importlib
import logging
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any, ClassVar

import numpy as np
import torch
from PIL import Image

from .base import (
    MODALITIES,
    CheckpointError,
    EncodedBatch,
    EncoderError,
    UnsupportedModalityError,
    l2_normalize,
)
from .config import EncoderConfig
from .hashing import RandomProjectionHash
from .signal import resample as resample  # the one resampler, re-exported

logger = logging.getLogger(__name__)

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)
_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
_HASH_CHUNK_BYTES = 1 << 20


class MissingDependencyError(EncoderError):
    """The library an adapter needs (transformers, open_clip) is not importable."""


def load_adapter(config: EncoderConfig) -> PretrainedAdapter:
    """Load the adapter named by ``config.kind`` from the local path ``config.checkpoint``."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.kind == "torchscript":
        from .adapter_torchscript import TorchScriptAdapter

        return TorchScriptAdapter(config)
    if config.kind == "hf_clip":
        from .adapter_hf import HfClipAdapter

        return HfClipAdapter(config)
    if config.kind == "hf_clap":
        from .adapter_hf import HfClapAdapter

        return HfClapAdapter(config)
    if config.kind == "open_clip":
        from .adapter_openclip import OpenClipAdapter

        return OpenClipAdapter(config)
    raise EncoderError(f"encoder kind {config.kind!r} is not an adapter (torchscript, hf_clip, hf_clap, open_clip)")


def import_optional(module: str, kind: str, package: str, extra: str = "adapters") -> ModuleType:
    """Import an adapter's library, or raise MissingDependencyError naming the package and the extra."""
    try:
        return importlib.import_module(module)
    except Exception as err:  # a broken install fails with RuntimeError/OSError as often as ImportError
        raise MissingDependencyError(
            f"encoder kind {kind!r} needs the {package!r} package, which cannot be imported ({err}); "
            f"install it with: pip install 'xmodal-index[{extra}]'"
        ) from err


def resolve_device(config: EncoderConfig) -> torch.device:
    if config.device == "cuda" and not torch.cuda.is_available():
        raise EncoderError("encoder device 'cuda' was asked for but torch.cuda.is_available() is False")
    if config.device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(config.device)


def resolve_dtype(config: EncoderConfig, device: torch.device) -> torch.dtype:
    if config.precision == "auto":
        return torch.float16 if device.type == "cuda" else torch.float32
    return _DTYPES[config.precision]


def existing_path(checkpoint: str, kind: str) -> Path:
    path = Path(checkpoint).expanduser()
    if not path.exists():
        raise CheckpointError(f"{kind} checkpoint {checkpoint} does not exist")
    return path


def existing_dir(checkpoint: str, kind: str) -> Path:
    path = existing_path(checkpoint, kind)
    if not path.is_dir():
        raise CheckpointError(f"{kind} checkpoint {checkpoint} must be a model directory, not a file")
    return path


def weights_digest(files: Sequence[Path]) -> str:
    """sha256 over the bytes of ``files`` in sorted path order."""
    digest = hashlib.sha256()
    for file in sorted(files):
        try:
            with open(file, "rb") as fh:
                while chunk := fh.read(_HASH_CHUNK_BYTES):
                    digest.update(chunk)
        except OSError as err:
            raise CheckpointError(f"cannot read weight file {file}: {err}") from err
    return digest.hexdigest()


@dataclasses.dataclass(frozen=True)
class ImagePreprocess:
    """CLIP-style image front-end: resize the shorter side, centre-crop, normalise.

    size: (height, width) the model takes; resize: shorter side after resizing
    (bicubic), before the centre crop; mean / std: per RGB channel, on [0, 1] values.
    """

    size: tuple[int, int]
    resize: int
    mean: tuple[float, ...] = OPENAI_CLIP_MEAN
    std: tuple[float, ...] = OPENAI_CLIP_STD

    def __post_init__(self) -> None:
        if len(self.size) != 2 or min(self.size) <= 0:
            raise ValueError(f"image preprocess {self.size = } must be (height, width) > 0")
        if self.resize <= 0:
            raise ValueError(f"image preprocess {self.resize = } must be > 0")
        if len(self.mean) != 3 or len(self.std) != 3 or min(self.std) <= 0:
            raise ValueError(f"image preprocess {self.mean = } and {self.std = } need 3 values, std > 0")

    def __call__(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 (H, W, 3) RGB arrays -> float32 (N, 3, height, width)."""
        out = np.empty((len(images), *self.size, 3), dtype=np.float32)
        for i, image in enumerate(images):
            out[i] = self._one(image)
        out = (out / 255.0 - np.asarray(self.mean, np.float32)) / np.asarray(self.std, np.float32)
        return torch.from_numpy(out).permute(0, 3, 1, 2).contiguous()

    def _one(self, image: np.ndarray) -> np.ndarray:
        height, width = image.shape[:2]
        scale = self.resize / min(height, width)
        new_w, new_h = max(int(width * scale), self.size[1]), max(int(height * scale), self.size[0])
        resized = Image.fromarray(image).resize((new_w, new_h), Image.Resampling.BICUBIC)
        top, left = (new_h - self.size[0]) // 2, (new_w - self.size[1]) // 2
        return np.asarray(resized.crop((left, top, left + self.size[1], top + self.size[0])), dtype=np.float32)


def centre_crop(audio: np.ndarray, samples: int) -> np.ndarray:
    """The middle ``samples`` of a signal longer than that; shorter signals unchanged."""
    if len(audio) <= samples:
        return audio
    start = (len(audio) - samples) // 2
    return audio[start : start + samples]


def check_payloads(modality: str, payloads: Sequence[Any]) -> list[Any]:
    """Validate payloads against the contract in ``base`` (EncoderError names the bad one)."""
    checked = []
    for i, item in enumerate(payloads):
        if modality == "text":
            if not isinstance(item, str):
                raise EncoderError(f"text payload {i} must be str, got {type(item).__name__}")
            checked.append(item)
            continue
        if not isinstance(item, np.ndarray):
            raise EncoderError(f"{modality} payload {i} must be a numpy array, got {type(item).__name__}")
        if modality == "audio":
            if item.ndim != 1 or item.size == 0:
                raise EncoderError(f"audio payload {i} must be non-empty mono samples (S,), got shape {item.shape}")
            checked.append(item.astype(np.float32, copy=False))
            continue
        frame_dims = 3 if modality == "image" else 4
        if item.dtype != np.uint8 or item.ndim != frame_dims or item.shape[-1] != 3 or 0 in item.shape:
            layout = "(H, W, 3)" if modality == "image" else "(T, H, W, 3)"
            raise EncoderError(
                f"{modality} payload {i} must be uint8 {layout} RGB, got {item.dtype} shape {item.shape}"
            )
        checked.append(item)
    return checked


def pooled_output(output: Any) -> torch.Tensor:
    """Feature tensor of a model call that returns a tensor or a ModelOutput with pooler_output."""
    if isinstance(output, torch.Tensor):
        return output
    return output.pooler_output


class PretrainedAdapter:
    """Shared behaviour of all adapters; subclasses load a model and implement ``_forward``."""

    kind: ClassVar[str]

    def __init__(
        self,
        config: EncoderConfig,
        *,
        checkpoint_path: Path,
        weight_files: Sequence[Path],
        model_dim: int,
        modalities: Sequence[str],
        device: torch.device,
    ) -> None:
        if model_dim != config.dim:
            raise CheckpointError(
                f"{self.kind} model {checkpoint_path} has projection dim {model_dim} but encoder dim = {config.dim}; "
                f"set the encoder dim to {model_dim}"
            )
        if not weight_files:
            raise CheckpointError(f"{self.kind} checkpoint {checkpoint_path} holds no weight files")
        self.config = config
        self.dim = model_dim
        self.bits = config.bits
        self.modalities = tuple(m for m in MODALITIES if m in modalities)
        self.checkpoint_path = str(checkpoint_path)
        self.device = device
        self.dtype = resolve_dtype(config, device)
        self.hash_head = RandomProjectionHash(dim=model_dim, bits=config.bits, seed=config.seed)
        name = checkpoint_path.name if checkpoint_path.is_dir() else checkpoint_path.stem
        self.model_id = f"{self.kind}:{name}+{self.hash_head.spec}@{weights_digest(weight_files)}"
        logger.info("loaded encoder %s on %s (%s)", self.model_id, device, self.dtype)

    def encode(self, modality: str, payloads: Sequence[Any]) -> EncodedBatch:
        """Encode payloads of one modality: L2-normalised float32 (N, dim) and packed codes."""
        if modality not in self.modalities:
            raise UnsupportedModalityError(
                f"{self.model_id} encodes {', '.join(self.modalities)}; not {modality!r}"
            )
        items = check_payloads(modality, payloads)
        if modality == "video":
            embeddings = self._encode_video(items)
        else:
            embeddings = l2_normalize(self._embed(modality, items))
        return EncodedBatch(embeddings=embeddings, codes=self.hash_head.codes(embeddings))

    def _encode_video(self, videos: list[np.ndarray]) -> np.ndarray:
        frames = [frame for video in videos for frame in video]
        per_frame = l2_normalize(self._embed("image", frames))
        bounds = np.cumsum([len(video) for video in videos])[:-1]
        pooled = [chunk.mean(axis=0) for chunk in np.split(per_frame, bounds)] if videos else []
        return l2_normalize(np.asarray(pooled, dtype=np.float32).reshape(len(videos), self.dim))

    def _embed(self, modality: str, items: list[Any]) -> np.ndarray:
        """Unnormalised float32 (N, dim), ``config.batch_size`` items per forward pass."""
        out = np.empty((len(items), self.dim), dtype=np.float32)
        step = self.config.batch_size
        for start in range(0, len(items), step):
            batch = items[start : start + step]
            with torch.inference_mode(), self._autocast():
                features = self._forward(modality, batch)
            if tuple(features.shape) != (len(batch), self.dim):
                raise EncoderError(
                    f"{self.model_id} returned shape {tuple(features.shape)} for {len(batch)} {modality} "
                    f"payloads; expected ({len(batch)}, {self.dim})"
                )
            out[start : start + len(batch)] = features.float().cpu().numpy()
        if not np.isfinite(out).all():
            raise EncoderError(f"{self.model_id} produced non-finite {modality} embeddings (precision {self.dtype})")
        return out

    def _autocast(self) -> contextlib.AbstractContextManager:
        if self.dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(device_type=self.device.type, dtype=self.dtype)

    def _forward(self, modality: str, batch: list[Any]) -> torch.Tensor:
        """Features (len(batch), dim) for one batch of checked image, audio or text payloads."""
        raise NotImplementedError
