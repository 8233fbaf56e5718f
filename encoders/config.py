"""EncoderConfig: which model maps media into the common space, and how it runs."""

from __future__ import annotations

import dataclasses

ENCODER_KINDS = ("builtin", "torchscript", "hf_clip", "hf_clap", "open_clip")
DEVICES = ("auto", "cpu", "cuda")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
BUNDLED_CHECKPOINT = "bundled"
TEXT_KINDS = ("", "sentence_transformers")  # "": the encoder's own text tower (adapter_st.py)


@dataclasses.dataclass(frozen=True)
class EncoderConfig:
    """Which encoder to load and how to run it.

    kind: builtin (trained by `xmodal-index train`), or an adapter for a model the
      user brings as local files: torchscript, hf_clip, hf_clap, open_clip.
    checkpoint: builtin: "bundled" (the checkpoint shipped with the package), a path
      to a checkpoint written by `xmodal-index train`, or "" for a deterministic
      untrained model (seeded by ``seed``). Adapters: the local model path.
    dim: dimension of the common space; bits: hash code length in bits.
    batch_size: maximum items per forward pass.
    """

    kind: str = "builtin"
    checkpoint: str = BUNDLED_CHECKPOINT
    dim: int = 256
    bits: int = 64
    seed: int = 0
    device: str = "auto"
    precision: str = "auto"
    batch_size: int = 64
    threads: int = 0  # torch intra-op threads; 0 leaves torch's default
    text_kind: str = ""  # "sentence_transformers": text rows and queries also by that model (adapter_st.py)
    text_model: str = ""  # with text_kind: a local model directory or an installed model package's name

    def __post_init__(self) -> None:
        if self.kind not in ENCODER_KINDS:
            raise ValueError(f"encoder kind {self.kind!r} is not one of {', '.join(ENCODER_KINDS)}")
        if self.dim <= 0:
            raise ValueError(f"encoder {self.dim = } must be > 0")
        if self.bits not in (16, 32, 64, 128):
            raise ValueError(f"encoder {self.bits = } must be one of 16, 32, 64, 128")
        if self.device not in DEVICES:
            raise ValueError(f"encoder device {self.device!r} is not one of {', '.join(DEVICES)}")
        if self.precision not in PRECISIONS:
            raise ValueError(f"encoder precision {self.precision!r} is not one of {', '.join(PRECISIONS)}")
        if self.batch_size <= 0:
            raise ValueError(f"encoder {self.batch_size = } must be > 0")
        if self.threads < 0:
            raise ValueError(f"encoder {self.threads = } must be >= 0")
        if self.text_kind not in TEXT_KINDS:
            kinds = ", ".join(repr(k) for k in TEXT_KINDS)
            raise ValueError(f"encoder text_kind {self.text_kind!r} is not one of {kinds}")
        if bool(self.text_kind) != bool(self.text_model):
            raise ValueError("encoder text_kind and text_model go together: text_kind = \"sentence_transformers\" "
                             "with text_model = a local model directory or an installed model package")
        if self.kind != "builtin" and (not self.checkpoint or self.checkpoint == BUNDLED_CHECKPOINT):
            raise ValueError(f"encoder kind {self.kind!r} needs checkpoint= the local path of the model")
