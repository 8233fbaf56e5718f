"""Adapter for any TorchScript module, described by a small JSON sidecar.

The checkpoint is ``model.pt`` (any name ending in ``.pt``/``.ts``; the sidecar is
the same path with ``.json``), or a directory holding ``model.pt`` and
``model.json``. The module is read with ``torch.jit.load`` (TorchScript code and
tensors, no Python pickle). The sidecar::

    {
      "dim": 512,
      "modalities": {"image": "encode_image", "audio": "encode_audio", "text": "encode_text"},
      "input": {
        "image_size": 224, "image_mean": [0.481, 0.458, 0.408], "image_std": [0.269, 0.261, 0.276],
        "audio_sample_rate": 16000, "audio_samples": 160000,
        "text_tokenizer": "bytes", "text_length": 77
      }
    }

``dim`` (required) is the size of what every method returns: float (N, dim).
``modalities`` maps each of image / audio / text to the name of a method of the
module (``@torch.jit.export``-ed, or ``forward``); declaring image also gives video
(mean of frame embeddings). At least one is required. The methods take:

- image: float32 (N, 3, image_size, image_size): RGB resized (shorter side) to
  ``image_size``, centre-cropped, scaled to [0, 1], then ``(x - image_mean) / image_std``
  (defaults: size 224, mean 0, std 1);
- audio: float32 (N, S) mono at ``audio_sample_rate`` Hz (default 16000; resampled
  when different). With ``audio_samples`` set, each clip is centre-cropped or
  zero-padded to exactly that many samples; without it, clips are zero-padded
  to the longest in the batch;
- text: int64 (N, text_length) token ids, zero-padded / truncated to
  ``text_length`` (default 77). ``text_tokenizer`` is ``"bytes"`` (the default: ids
  are the UTF-8 bytes, 0..255) or the path, relative to the sidecar, of a Hugging
  Face ``tokenizer.json`` (needs the ``tokenizers`` package).

Unknown keys are refused, so a typo does not silently fall back to a default.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .adapters import (
    ImagePreprocess,
    PretrainedAdapter,
    centre_crop,
    existing_path,
    import_optional,
    resample,
    resolve_device,
)
from .base import AUDIO_SAMPLE_RATE, CheckpointError, EncoderError
from .config import EncoderConfig

DEFAULT_FILE = "model.pt"
SIDECAR_MODALITIES = ("image", "audio", "text")


@dataclasses.dataclass(frozen=True)
class TorchScriptSidecar:
    """The parsed ``model.json`` next to a TorchScript module (see the module docstring)."""

    dim: int
    modalities: dict[str, str]
    image_size: int = 224
    image_mean: tuple[float, ...] = (0.0, 0.0, 0.0)
    image_std: tuple[float, ...] = (1.0, 1.0, 1.0)
    audio_sample_rate: int = AUDIO_SAMPLE_RATE
    audio_samples: int | None = None
    text_tokenizer: str = "bytes"
    text_length: int = 77

    def __post_init__(self) -> None:
        if not isinstance(self.dim, int) or self.dim <= 0:
            raise ValueError(f"sidecar {self.dim = } must be an int > 0")
        unknown = set(self.modalities) - set(SIDECAR_MODALITIES)
        if not self.modalities or unknown or not all(isinstance(name, str) for name in self.modalities.values()):
            raise ValueError(
                f"sidecar modalities {self.modalities} must map a non-empty subset of {SIDECAR_MODALITIES} "
                "to method names"
            )
        if self.image_size <= 0 or self.audio_sample_rate <= 0 or self.text_length <= 0:
            raise ValueError(
                f"sidecar {self.image_size = }, {self.audio_sample_rate = } and {self.text_length = } must be > 0"
            )
        if self.audio_samples is not None and self.audio_samples <= 0:
            raise ValueError(f"sidecar {self.audio_samples = } must be > 0 or null")

    @classmethod
    def from_file(cls, file: Path) -> TorchScriptSidecar:
        try:
            raw = json.loads(file.read_text(encoding="utf-8"))
        except FileNotFoundError as err:
            raise CheckpointError(f"torchscript sidecar {file} is missing; it declares dim and modalities") from err
        except (OSError, ValueError) as err:
            raise CheckpointError(f"cannot read torchscript sidecar {file}: {err}") from err
        try:
            unknown = set(raw) - {"dim", "modalities", "input"}
            if unknown:
                raise ValueError(f"unknown keys {sorted(unknown)}")
            inputs = dict(raw.get("input", {}))
            for key in ("image_mean", "image_std"):
                if key in inputs:
                    inputs[key] = tuple(inputs[key])
            return cls(dim=raw.get("dim"), modalities=dict(raw.get("modalities", {})), **inputs)
        except (TypeError, ValueError, AttributeError) as err:
            raise CheckpointError(f"torchscript sidecar {file} is invalid: {err}") from err


def _module_file(checkpoint: str) -> Path:
    path = existing_path(checkpoint, "torchscript")
    if path.is_dir():
        path = path / DEFAULT_FILE
        if not path.is_file():
            raise CheckpointError(f"torchscript checkpoint directory {checkpoint} holds no {DEFAULT_FILE}")
    return path


class TorchScriptAdapter(PretrainedAdapter):
    """Any TorchScript module whose methods map image / audio / text batches to (N, dim)."""

    kind = "torchscript"

    def __init__(self, config: EncoderConfig) -> None:
        file = _module_file(config.checkpoint)
        sidecar_file = file.with_suffix(".json")
        self.sidecar = TorchScriptSidecar.from_file(sidecar_file)
        device = resolve_device(config)
        try:
            self.module = torch.jit.load(str(file), map_location=device).eval()
        except Exception as err:  # torch raises RuntimeError or ValueError for a bad archive
            raise CheckpointError(f"cannot load torchscript module {file}: {err}") from err
        self.methods = {}
        for modality, name in self.sidecar.modalities.items():
            if not callable(getattr(self.module, name, None)):
                raise CheckpointError(
                    f"torchscript module {file} has no method {name!r} that {sidecar_file} names for {modality}"
                )
            self.methods[modality] = getattr(self.module, name)
        self.preprocess = ImagePreprocess(
            size=(self.sidecar.image_size, self.sidecar.image_size),
            resize=self.sidecar.image_size,
            mean=self.sidecar.image_mean,
            std=self.sidecar.image_std,
        )
        self.tokenizer = self._load_tokenizer(sidecar_file)
        modalities = set(self.sidecar.modalities) | ({"video"} if "image" in self.sidecar.modalities else set())
        super().__init__(
            config,
            checkpoint_path=file,
            weight_files=[file],
            model_dim=self.sidecar.dim,
            modalities=tuple(modalities),
            device=device,
        )

    def _load_tokenizer(self, sidecar_file: Path) -> Any:
        if self.sidecar.text_tokenizer == "bytes":
            return None
        tokenizers = import_optional("tokenizers", self.kind, "tokenizers")
        file = sidecar_file.parent / self.sidecar.text_tokenizer
        try:
            return tokenizers.Tokenizer.from_file(str(file))
        except Exception as err:  # tokenizers raises a plain Exception for a missing or bad file
            raise CheckpointError(f"cannot load tokenizer {file} named by {sidecar_file}: {err}") from err

    def _forward(self, modality: str, batch: list[Any]) -> torch.Tensor:
        if modality == "image":
            inputs = self.preprocess(batch)
        elif modality == "audio":
            inputs = self._audio(batch)
        else:
            inputs = self._tokens(batch)
        output = self.methods[modality](inputs.to(self.device))
        if not isinstance(output, torch.Tensor):
            raise EncoderError(f"{self.model_id} method for {modality} returned {type(output).__name__}, not a tensor")
        return output

    def _audio(self, batch: list[np.ndarray]) -> torch.Tensor:
        clips = [resample(clip, AUDIO_SAMPLE_RATE, self.sidecar.audio_sample_rate) for clip in batch]
        length = self.sidecar.audio_samples or max(len(clip) for clip in clips)
        out = np.zeros((len(clips), length), dtype=np.float32)
        for i, clip in enumerate(clips):
            clip = centre_crop(clip, length)
            out[i, : len(clip)] = clip
        return torch.from_numpy(out)

    def _tokens(self, texts: list[str]) -> torch.Tensor:
        length = self.sidecar.text_length
        out = np.zeros((len(texts), length), dtype=np.int64)
        for i, text in enumerate(texts):
            if self.tokenizer is None:
                ids = list(text.encode("utf-8"))
            else:
                ids = self.tokenizer.encode(text).ids
            ids = ids[:length]
            out[i, : len(ids)] = ids
        return torch.from_numpy(out)
