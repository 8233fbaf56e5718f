"""The query encoder of a served version, opened read-only: only the model's identity is trusted.

A version publishes ``encoder.json``: the builder's whole EncoderConfig. A query node
takes from it only what names the model (kind, checkpoint, dim, bits, seed, text
model) and runs it its own way: device, precision, batch size and torch threads
(``RUNTIME_FIELDS``) are the node's (EncoderConfig defaults), never the builder's. A built-in model's weights come only
from the version's own verified files (``model.safetensors``), the bundled checkpoint,
or the seeded untrained model: a checkpoint path of the build machine is refused.
The loaded encoder's model_id must match the one the version recorded.
"""

from __future__ import annotations

import json
from typing import Any

from xmodal_index.sinks.errors import IndexVersionError
from xmodal_index.sinks.serving.hot_swap import Served
from xmodal_index.sinks.serving.loader import IndexVersion

RUNTIME_FIELDS = ("device", "precision", "batch_size", "threads")
VERSION_CHECKPOINT = "model.safetensors"
_MAX_ENCODER_JSON_BYTES = 1 << 20


def serving_encoder_config(version: IndexVersion) -> Any:
    """The EncoderConfig a query node loads for ``version`` (identity from the version, runtime its own)."""
    import dataclasses

    from xmodal_index.encoders.config import BUNDLED_CHECKPOINT, EncoderConfig

    path = version.file_path("encoder.json")
    with open(path, "rb") as f:
        raw = f.read(_MAX_ENCODER_JSON_BYTES + 1)
    if len(raw) > _MAX_ENCODER_JSON_BYTES:
        raise IndexVersionError(f"version {version.version}: encoder.json is over {_MAX_ENCODER_JSON_BYTES} bytes")
    try:
        conf = json.loads(raw)
    except ValueError as err:
        raise IndexVersionError(f"version {version.version}: encoder.json is not JSON: {err}") from err
    if not isinstance(conf, dict):
        raise IndexVersionError(f"version {version.version}: encoder.json is not a JSON object")
    names = {f.name for f in dataclasses.fields(EncoderConfig)} - set(RUNTIME_FIELDS)
    identity = {k: v for k, v in conf.items() if k in names}
    if identity.get("text_model") == VERSION_CHECKPOINT:
        identity["text_model"] = version.file_path(VERSION_CHECKPOINT)
    if identity.get("kind", "builtin") == "builtin":
        checkpoint = identity.get("checkpoint", BUNDLED_CHECKPOINT)
        if checkpoint == VERSION_CHECKPOINT:
            identity["checkpoint"] = version.file_path(VERSION_CHECKPOINT)
        elif checkpoint not in (BUNDLED_CHECKPOINT, ""):
            raise IndexVersionError(f"version {version.version}: encoder.json names checkpoint "
                                    f"{str(checkpoint)[:200]!r}; a query node loads built-in weights only from "
                                    f"the version's {VERSION_CHECKPOINT}, the bundled model or an untrained seed")
    try:
        return EncoderConfig(**identity)
    except (TypeError, ValueError) as err:
        raise IndexVersionError(f"version {version.version}: encoder.json: {err}") from err


def load_serving_encoder(version: IndexVersion) -> Any:
    from xmodal_index.encoders.loading import load_encoder

    expected = version.manifest.model_id
    encoder = load_encoder(serving_encoder_config(version))
    if encoder.model_id != expected:
        raise IndexVersionError(f"version {version.version}: encoder {encoder.model_id} does not match the "
                                f"index's model_id {expected}")
    return encoder


def prepare_serving_encoder(index: IndexVersion, current: Served | None) -> Any:
    """IndexHandle prepare hook: the version's encoder, reused when the model_id is unchanged."""
    if current is not None and current.extra is not None and current.manifest.model_id == index.manifest.model_id:
        return current.extra
    return load_serving_encoder(index)
