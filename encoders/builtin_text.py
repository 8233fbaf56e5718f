"""The built-in encoder's text tower in numpy: text queries without importing torch.

A text query to an index built with the built-in encoder needs only the text
tower (hashed character n-grams -> embedding bag -> MLP) and a hash head: a few
small matrix products. ``BuiltinTextEncoder`` runs them with numpy from the same
safetensors checkpoint (read with ``safetensors.numpy``: no pickle, no torch), so
a CLI text query does not pay torch's import (about 1.7 s on the reference
machine). It has the same ``model_id`` as ``load_builtin`` gives for that file
(``<name>@<sha256 of the file>``) and computes in float32: where the index was
encoded under bf16 autocast the embeddings differ by bf16 rounding (cosine to
the torch embedding > 0.999, tests/test_query_fast_path.py checks).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import (
    CheckpointError,
    EncodedBatch,
    EncoderError,
    UnsupportedModalityError,
    l2_normalize,
    sign_codes,
)
from .text_grams import TextFrontendConfig, text_ngrams

_DEEP_KEYS = ("text.bag.weight", "text.mlp.1.weight", "text.mlp.1.bias", "text.mlp.3.weight", "text.mlp.3.bias")
_LINEAR_KEYS = ("text.bag.weight", "text.bias")


class BuiltinTextEncoder:
    """Text-only built-in encoder (numpy); ``encode("text", texts)`` as ``BuiltinEncoder`` does."""

    modalities = ("text",)

    def __init__(self, path: str | Path, bits: int) -> None:
        from safetensors import SafetensorError
        from safetensors.numpy import load

        path = Path(path)
        try:
            raw = path.read_bytes()
            header_len = int.from_bytes(raw[:8], "little")
            meta = json.loads(raw[8:8 + header_len]).get("__metadata__") or {}
            config = json.loads(meta["model_config"])
            state = load(raw)
        except (OSError, ValueError, KeyError, TypeError, SafetensorError) as err:
            raise CheckpointError(f"checkpoint {path} is not a readable built-in checkpoint: {err}") from err
        self.arch = config.get("arch")
        keys = _DEEP_KEYS if self.arch == "deep" else _LINEAR_KEYS
        missing = [k for k in (*keys, f"heads.{bits}.weight", f"heads.{bits}.bias") if k not in state]
        if missing:
            raise CheckpointError(f"checkpoint {path} lacks {missing} for a {bits}-bit text query")
        self.weights = {k: np.asarray(state[k], dtype=np.float32) for k in keys}
        self.head_w = np.asarray(state[f"heads.{bits}.weight"], dtype=np.float32)
        self.head_b = np.asarray(state[f"heads.{bits}.bias"], dtype=np.float32)
        self.text_config = TextFrontendConfig(**config.get("text", {}))
        self.dim = int(config["dim"])
        self.bits = bits
        self.model_id = f"{meta.get('name', 'builtin')}@{hashlib.sha256(raw).hexdigest()}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """Unnormalised text embeddings (N, dim)."""
        bag = self.weights["text.bag.weight"]
        rows = []
        for i, text in enumerate(texts):
            if not isinstance(text, str):
                raise EncoderError(f"text payload {i} is {type(text).__name__}, expected str")
            rows.append(bag[text_ngrams(text, self.text_config)].mean(axis=0))
        x = np.stack(rows) if rows else np.zeros((0, bag.shape[1]), np.float32)
        if self.arch != "deep":
            return x + self.weights["text.bias"]
        h = np.maximum(x, 0.0) @ self.weights["text.mlp.1.weight"].T + self.weights["text.mlp.1.bias"]
        return np.maximum(h, 0.0) @ self.weights["text.mlp.3.weight"].T + self.weights["text.mlp.3.bias"]

    def encode(self, modality: str, payloads: Sequence[Any]) -> EncodedBatch:
        if modality != "text":
            raise UnsupportedModalityError(f"{self.model_id} (numpy text path) embeds text only, not {modality}")
        emb = l2_normalize(self.embed(list(payloads)))
        logits = (emb * self.dim ** 0.5) @ self.head_w.T + self.head_b
        return EncodedBatch(emb.astype(np.float32), sign_codes(logits))
