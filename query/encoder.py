"""The query encoder of a version: the encoder it was built with, from the files published beside its shards."""

from __future__ import annotations

import dataclasses
import json
from typing import Any

from .errors import QueryError

# Files of a version that an encoder config may name by their bare name.
_VERSION_FILES = ("model.safetensors",)


def load_query_encoder(version: Any) -> Any:
    """Load the encoder named by the version's ``encoder.json``; refuse one whose model_id differs
    from what the version records (a query must be embedded by the model that built the index)."""
    from xmodal_index.encoders.config import EncoderConfig
    from xmodal_index.encoders.loading import load_encoder

    try:
        with open(version.file_path("encoder.json"), encoding="utf-8") as f:
            conf = json.load(f)
    except (OSError, ValueError) as err:
        raise QueryError(f"version {version.version}: cannot read its encoder.json: {err}") from err
    if not isinstance(conf, dict):
        raise QueryError(f"version {version.version}: encoder.json is not a JSON object")
    expected = conf.pop("model_id", version.manifest.model_id)
    for key in ("checkpoint", "text_model"):
        if conf.get(key) in _VERSION_FILES:
            conf[key] = version.file_path(conf[key])
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    try:
        config = EncoderConfig(**{k: v for k, v in conf.items() if k in names})
    except (TypeError, ValueError) as err:
        raise QueryError(f"version {version.version}: encoder.json is not a valid encoder config: {err}") from err
    encoder = load_encoder(config)
    if encoder.model_id != expected:
        raise QueryError(f"encoder {encoder.model_id} does not match the index's model_id {expected}")
    return encoder


def load_text_query_encoder(version: Any) -> Any | None:
    """A torch-free text encoder for a version built by the built-in encoder alone (its numpy
    text tower, same model_id), or None when the version's encoder has no such path."""
    from xmodal_index.encoders.base import EncoderError
    from xmodal_index.encoders.builtin_text import BuiltinTextEncoder
    from xmodal_index.encoders.config import BUNDLED_CHECKPOINT

    try:
        with open(version.file_path("encoder.json"), encoding="utf-8") as f:
            conf = json.load(f)
    except Exception:  # noqa: BLE001 - the full loader reports what is wrong
        return None
    if not isinstance(conf, dict) or conf.get("kind", "builtin") != "builtin" or conf.get("text_kind"):
        return None
    checkpoint = conf.get("checkpoint")
    if checkpoint in _VERSION_FILES:
        path = version.file_path(checkpoint)
    elif checkpoint == BUNDLED_CHECKPOINT:
        from importlib import resources

        path = str(resources.files("xmodal_index.encoders") / "checkpoints" / "builtin-digits.safetensors")
    else:
        return None
    try:
        encoder = BuiltinTextEncoder(path, int(conf.get("bits", 64)))
    except (EncoderError, ValueError, TypeError):
        return None
    expected = conf.get("model_id", version.manifest.model_id)
    return encoder if encoder.model_id == expected and encoder.dim == version.manifest.dim else None

