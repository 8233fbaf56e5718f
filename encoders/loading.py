"""load_encoder: the one entry point that turns an EncoderConfig into a loaded model."""

from __future__ import annotations

from .base import CrossModalEncoder
from .config import EncoderConfig


def load_encoder(config: EncoderConfig) -> CrossModalEncoder:
    """Load the encoder named by ``config`` (weights only; no pickled code is executed)."""
    if config.text_kind:
        import dataclasses

        from .adapter_st import with_text_model

        base = load_encoder(dataclasses.replace(config, text_kind="", text_model=""))
        device = "cuda" if config.device == "cuda" else str(getattr(base, "device", "cpu"))
        return with_text_model(base, config.text_kind, config.text_model, device=device,
                               batch_size=config.batch_size, seed=config.seed)
    if config.kind == "builtin":
        from .builtin import load_builtin

        return load_builtin(config)
    from .adapters import load_adapter

    return load_adapter(config)
