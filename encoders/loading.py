"""load_encoder: the one entry point that turns an EncoderConfig into a loaded model."""

from __future__ import annotations

from xmodal_index.encoders.base import CrossModalEncoder
from xmodal_index.encoders.config import EncoderConfig


def load_encoder(config: EncoderConfig) -> CrossModalEncoder:
    """Load the encoder named by ``config`` (weights only; no pickled code is executed)."""
    if config.kind == "builtin":
        from xmodal_index.encoders.builtin import load_builtin

        return load_builtin(config)
    from xmodal_index.encoders.adapters import load_adapter

    return load_adapter(config)
