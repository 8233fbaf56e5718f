"""The built-in cross-modal encoder: fixed front-ends, trained towers, hash heads.

``load_builtin(EncoderConfig)`` returns a ``BuiltinEncoder`` from
  - ``checkpoint="bundled"``: the checkpoint shipped in ``encoders/checkpoints/``;
  - ``checkpoint=""``: an untrained model initialised deterministically from ``seed``;
  - ``checkpoint=PATH``: a ``.safetensors`` file written by ``xmodal-index train``.
Checkpoints hold weights only and are read with safetensors (no pickle). Their
metadata carries the model config JSON, a digest of the weights (checked on load),
the training data fingerprint, the objective and the creating command.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import threading
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .base import (
    MODALITIES,
    CheckpointError,
    EncodedBatch,
    EncoderError,
    UnsupportedModalityError,
    l2_normalize,
    sign_codes,
)
from .config import BUNDLED_CHECKPOINT, EncoderConfig
from .frontends import AudioFrontend, image_features, text_features
from .towers import CrossModalNet, ModelConfig

logger = logging.getLogger(__name__)

CHECKPOINT_FORMAT = "xmodal-index-builtin/1"
CHECKPOINT_DIR = Path(__file__).resolve().parent / "checkpoints"
BUNDLED_FILE = "builtin-digits.safetensors"


def bundled_checkpoint_path() -> Path:
    """Path of the checkpoint shipped with the package."""
    return CHECKPOINT_DIR / BUNDLED_FILE


def weights_digest(state: dict[str, torch.Tensor]) -> str:
    """sha256 over tensor names, dtypes, shapes and bytes (order-independent)."""
    h = hashlib.sha256()
    for name in sorted(state):
        t = state[name].detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


def build_model(config: ModelConfig, seed: int) -> CrossModalNet:
    """A fresh model whose initial weights depend only on ``config`` and ``seed``."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        net = CrossModalNet(config)
    return net


@dataclasses.dataclass(frozen=True)
class LoadedCheckpoint:
    path: Path
    sha256: str
    model_config: ModelConfig
    state: dict[str, torch.Tensor]
    metadata: dict[str, str]


def read_checkpoint(path: str | Path) -> LoadedCheckpoint:
    """Read and verify a checkpoint file (safetensors only, weights digest checked)."""
    from safetensors import SafetensorError
    from safetensors.torch import load as st_load

    path = Path(path)
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise CheckpointError(f"cannot read checkpoint {path}: {err}") from err
    try:
        state = st_load(raw)
        metadata = _safetensors_metadata(raw)
    except (SafetensorError, ValueError, json.JSONDecodeError) as err:
        raise CheckpointError(f"checkpoint {path} is not a readable safetensors file: {err}") from err
    if metadata.get("format") != CHECKPOINT_FORMAT:
        raise CheckpointError(
            f"checkpoint {path} has format {metadata.get('format')!r}, expected {CHECKPOINT_FORMAT!r}")
    try:
        model_config = ModelConfig.from_json(metadata["model_config"])
    except (KeyError, TypeError, ValueError) as err:
        raise CheckpointError(f"checkpoint {path} has no valid model_config: {err}") from err
    digest = weights_digest(state)
    if digest != metadata.get("weights_sha256"):
        raise CheckpointError(
            f"checkpoint {path} weights do not match their recorded digest "
            f"({digest[:12]} != {str(metadata.get('weights_sha256'))[:12]}): file modified or corrupt"
        )
    return LoadedCheckpoint(path, hashlib.sha256(raw).hexdigest(), model_config, state, metadata)


def _safetensors_metadata(raw: bytes) -> dict[str, str]:
    if len(raw) < 8:
        raise ValueError("file shorter than a safetensors header")
    n = int.from_bytes(raw[:8], "little")
    if n > len(raw) - 8:
        raise ValueError(f"header length {n} exceeds file size")
    header = json.loads(raw[8 : 8 + n])
    meta = header.get("__metadata__") or {}
    return {str(k): str(v) for k, v in meta.items()}


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        logger.warning("encoder device 'cuda' unavailable (torch.cuda.is_available() is False): encoding on the CPU")
        return torch.device("cpu")
    return torch.device(device)


def resolve_precision(precision: str, device: torch.device) -> torch.dtype | None:
    """Autocast dtype for ``precision`` on ``device``; None means plain fp32."""
    if precision == "fp32":
        return None
    if precision == "auto":
        if device.type != "cuda":
            return torch.bfloat16 if cpu_has_native_bf16() else None
        return torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    return {"bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def cpu_has_native_bf16() -> bool:
    """Whether this CPU computes bf16 natively (AVX-512 BF16 or AMX) and torch's kernels use it:
    there bf16 autocast is 2-3.5x faster than fp32 for the built-in CNNs; elsewhere it is emulated
    and slower, so ``precision = "auto"`` stays fp32."""
    if torch.backends.cpu.get_cpu_capability() not in ("AVX512", "AVX512_BF16", "AMX"):
        return False
    try:
        with open("/proc/cpuinfo") as f:
            flags = next((line for line in f if line.startswith("flags")), "").split()
    except OSError:
        return False
    return "avx512_bf16" in flags or "amx_bf16" in flags


class BuiltinEncoder:
    """A loaded built-in model; satisfies encoders.base.CrossModalEncoder.

    ``encode`` is deterministic (eval mode) and serialised by a lock, so one instance
    may be shared between threads.
    """

    modalities: tuple[str, ...] = MODALITIES

    def __init__(
        self,
        net: CrossModalNet,
        model_id: str,
        bits: int,
        checkpoint_path: str | None = None,
        device: str = "cpu",
        precision: str = "fp32",
        batch_size: int = 64,
        metadata: dict[str, str] | None = None,
    ):
        if bits not in net.config.bits:
            raise CheckpointError(f"model has hash heads for {net.config.bits} bits, not {bits = }")
        self.device = resolve_device(device)
        self.autocast_dtype = resolve_precision(precision, self.device)
        self.net = net.to(self.device).eval().to(memory_format=torch.channels_last)
        self.audio_frontend = AudioFrontend(net.config.audio).to(self.device)
        self.model_id = model_id
        self.dim = net.config.dim
        self.bits = bits
        self.checkpoint_path = checkpoint_path
        self.batch_size = batch_size
        self.metadata = dict(metadata or {})
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return f"BuiltinEncoder({self.model_id!r}, dim={self.dim}, bits={self.bits}, device={self.device.type})"

    def encode(self, modality: str, payloads: Sequence[Any]) -> EncodedBatch:
        emb = self.embed(modality, payloads)
        return EncodedBatch(embeddings=emb, codes=self.codes(emb, self.bits))

    def embed(self, modality: str, payloads: Sequence[Any]) -> np.ndarray:
        """L2-normalised float32 embeddings (N, dim) of one modality's payloads."""
        if modality not in self.modalities:
            raise UnsupportedModalityError(f"modality {modality!r} is not one of {self.modalities}")
        payloads = list(payloads)
        if not payloads:
            return np.zeros((0, self.dim), dtype=np.float32)
        if modality == "video":
            return self._embed_video(payloads)
        out = [self._embed_batch(modality, payloads[i : i + self.batch_size])
               for i in range(0, len(payloads), self.batch_size)]
        return l2_normalize(np.concatenate(out))

    def codes(self, embeddings: np.ndarray, bits: int) -> np.ndarray:
        """Packed hash codes (N, bits // 8) of normalised embeddings, for any head the model has."""
        if bits not in self.net.config.bits:
            raise CheckpointError(f"model has hash heads for {self.net.config.bits} bits, not {bits = }")
        if len(embeddings) == 0:
            return np.zeros((0, bits // 8), dtype=np.uint8)
        with self._lock, torch.inference_mode():
            x = torch.from_numpy(np.ascontiguousarray(embeddings, dtype=np.float32)).to(self.device)
            logits = self.net.hash_logits(x, bits).float().cpu().numpy()
        return sign_codes(logits)

    def _embed_video(self, videos: list[Any]) -> np.ndarray:
        frames: list[np.ndarray] = []
        owners: list[int] = []
        for i, v in enumerate(videos):
            arr = np.asarray(v)
            if arr.ndim != 4 or arr.shape[0] < 1:
                raise EncoderError(f"video payload {i} has shape {arr.shape}; expected (T, H, W, 3) with T >= 1")
            frames.extend(arr)
            owners.extend([i] * arr.shape[0])
        per_frame = self.embed("image", frames)
        owner = np.asarray(owners)
        pooled = np.stack([per_frame[owner == i].mean(axis=0) for i in range(len(videos))])
        return l2_normalize(pooled)

    def _embed_batch(self, modality: str, payloads: list[Any]) -> np.ndarray:
        with self._lock, torch.inference_mode():
            if modality == "audio":
                inputs: Any = self.audio_frontend(payloads).contiguous(memory_format=torch.channels_last)
            elif modality == "image":
                inputs = image_features(payloads, self.net.config.image).to(self.device)
                inputs = inputs.contiguous(memory_format=torch.channels_last)
            else:
                ids, offsets = text_features(payloads, self.net.config.text)
                inputs = (ids.to(self.device), offsets.to(self.device))
            if self.autocast_dtype is not None:
                with torch.autocast(device_type=self.device.type, dtype=self.autocast_dtype):
                    out = self.net.embed(modality, inputs)
            else:
                out = self.net.embed(modality, inputs)
            return out.float().cpu().numpy()


def load_builtin(config: EncoderConfig) -> BuiltinEncoder:
    """Load the built-in encoder named by ``config`` (see module docstring)."""
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.checkpoint == "":
        return untrained_encoder(config)
    path = bundled_checkpoint_path() if config.checkpoint == BUNDLED_CHECKPOINT else Path(config.checkpoint)
    ckpt = read_checkpoint(path)
    mc = ckpt.model_config
    if mc.dim != config.dim:
        raise CheckpointError(f"checkpoint {path} has dim {mc.dim} but the encoder config asks for dim {config.dim}")
    if config.bits not in mc.bits:
        raise CheckpointError(f"checkpoint {path} has hash heads for {mc.bits} bits "
                              f"but the encoder config asks for bits {config.bits}")
    net = CrossModalNet(mc)
    try:
        net.load_state_dict(ckpt.state, strict=True)
    except RuntimeError as err:
        raise CheckpointError(f"checkpoint {path} weights do not fit its model config: {err}") from err
    name = ckpt.metadata.get("name", "builtin")
    logger.info("loaded built-in encoder %s from %s", name, path)
    return BuiltinEncoder(
        net,
        model_id=f"{name}@{ckpt.sha256}",
        bits=config.bits,
        checkpoint_path=str(path),
        device=config.device,
        precision=config.precision,
        batch_size=config.batch_size,
        metadata=ckpt.metadata,
    )


def untrained_encoder(config: EncoderConfig) -> BuiltinEncoder:
    """Deterministic untrained model: same seed and dim give the same weights and model_id."""
    from safetensors.torch import save as st_save

    net = build_model(ModelConfig(dim=config.dim), config.seed)
    state = {k: v.contiguous() for k, v in net.state_dict().items()}
    digest = hashlib.sha256(st_save(state)).hexdigest()
    return BuiltinEncoder(
        net,
        model_id=f"builtin-untrained-seed{config.seed}@{digest}",
        bits=config.bits,
        checkpoint_path=None,
        device=config.device,
        precision=config.precision,
        batch_size=config.batch_size,
    )
