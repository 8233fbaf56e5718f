"""Training built-in models: the loop, the data fingerprint and checkpoint writing.

``train_model(TrainingSet, TrainConfig)`` learns towers and hash heads from
  (b) labelled items (spoken digits, digit images, digit words: the label links the
      modalities, every same-label item is a positive), and
  (a) co-occurrence tuples (the audio, frame and caption of one archive segment: no
      labels, only the items of one tuple are positives).
objective "cca" fits the linear baseline in closed form instead of running the loop.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as _dt
import hashlib
import json
import logging
import math
import os
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from .augment import AugmentConfig, augment_audio, augment_images, augment_text, mask_logmel
from .builtin import CHECKPOINT_FORMAT, build_model, resolve_device, weights_digest
from .frontends import AudioFrontend, image_features, text_features
from .objectives import (
    OBJECTIVES,
    contrastive_loss,
    dcca_loss,
    hashing_loss,
    itq_rotation,
    linear_gcca,
    triplet_loss,
)
from .towers import HASH_BITS, CrossModalNet, ModelConfig, pooled_audio, pooled_image
from .tri_modal import TRAIN_TEMPLATES, AudioClips, DigitImages, spell

logger = logging.getLogger(__name__)


class TrainingError(Exception):
    """Training cannot start or cannot finish (bad data, bad config)."""


@dataclasses.dataclass(frozen=True)
class TrainConfig:
    """How to train. Units: lr per step, temperature on cosine similarity, epochs over the audio clips."""

    objective: str = "contrastive"
    dim: int = 256
    bits: tuple[int, ...] = HASH_BITS
    epochs: int = 30
    batch_size: int = 128
    lr: float = 3e-3
    weight_decay: float = 1e-4
    temperature: float = 0.1
    margin: float = 0.2
    hash_weight: float = 1.0
    width: int = 32
    seed: int = 0
    augment: bool = True
    device: str = "auto"
    cca_reg: float = 1e-3
    cca_pairings: int = 2
    cca_power: float = 4.0
    cpu_bf16: bool = True  # bf16 autocast when training on a CPU with native bf16 (about 2-3x faster)

    def __post_init__(self) -> None:
        if self.objective not in OBJECTIVES:
            raise ValueError(f"{self.objective = } is not one of {OBJECTIVES}")
        if self.dim <= 0 or self.epochs < 0 or self.batch_size < 2:
            raise ValueError(f"{self.dim = } must be > 0, {self.epochs = } >= 0, {self.batch_size = } >= 2")
        if not self.bits or any(b not in HASH_BITS for b in self.bits):
            raise ValueError(f"{self.bits = } must be a non-empty subset of {HASH_BITS}")
        if self.lr <= 0 or self.temperature <= 0 or self.margin < 0 or self.hash_weight < 0:
            raise ValueError(f"{self.lr = } and {self.temperature = } must be > 0, "
                             f"{self.margin = } and {self.hash_weight = } >= 0")
        if self.cca_pairings < 1 or self.cca_reg <= 0:
            raise ValueError(f"{self.cca_pairings = } must be >= 1 and {self.cca_reg = } > 0")


@dataclasses.dataclass(frozen=True)
class TrainingSet:
    """What a model learns from. Any part may be empty; at least two modalities must meet.

    audio/images carry digit labels; texts are spelled from TRAIN_TEMPLATES for the
    labels present. cooccur: unlabelled tuples {modality: payload} of one segment.
    """

    audio: AudioClips | None = None
    images: DigitImages | None = None
    texts: bool = True
    cooccur: tuple[dict[str, Any], ...] = ()


def data_fingerprint(data: TrainingSet) -> str:
    """sha256 over the content and labels of every training item (order-independent)."""
    items: list[str] = []
    if data.audio is not None:
        for w, y, s in zip(data.audio.waves, data.audio.labels, data.audio.speakers):
            digest = hashlib.sha256(np.ascontiguousarray(w, np.float32).tobytes()).hexdigest()
            items.append(f"audio|{int(y)}|{s}|{digest}")
    if data.images is not None:
        for im, y in zip(data.images.images, data.images.labels):
            items.append(f"image|{int(y)}|{hashlib.sha256(np.ascontiguousarray(im).tobytes()).hexdigest()}")
    if data.texts:
        items.extend(f"text|{t}" for t in TRAIN_TEMPLATES)
    for tup in data.cooccur:
        h = hashlib.sha256()
        for m in sorted(tup):
            v = tup[m]
            h.update(m.encode() + (v.encode() if isinstance(v, str) else np.ascontiguousarray(v).tobytes()))
        items.append(f"cooccur|{h.hexdigest()}")
    h = hashlib.sha256()
    for line in sorted(items):
        h.update(line.encode() + b"\n")
    return h.hexdigest()


@dataclasses.dataclass
class TrainResult:
    net: CrossModalNet
    losses: list[float]  # mean loss per epoch (empty for cca)
    seconds: float


def train_model(
    data: TrainingSet, config: TrainConfig, progress: Callable[[int, int, float], None] | None = None
) -> TrainResult:
    """Train a model on ``data``; ``progress(epoch, epochs, loss)`` is called after each epoch."""
    _check_data(data)
    start = time.perf_counter()
    if config.objective == "cca":
        net = fit_linear_cca(data, config)
        return TrainResult(net, [], time.perf_counter() - start)
    trainer = _Trainer(data, config)
    losses = []
    for epoch in range(config.epochs):
        loss = trainer.run_epoch()
        losses.append(loss)
        logger.info("epoch %d/%d loss %.4f (%.0f s)", epoch + 1, config.epochs, loss, time.perf_counter() - start)
        if progress is not None:
            progress(epoch + 1, config.epochs, loss)
    net = trainer.net.eval().cpu().to(memory_format=torch.contiguous_format)
    return TrainResult(net, losses, time.perf_counter() - start)


def _check_data(data: TrainingSet) -> None:
    labelled = sum(x is not None and len(x.labels) > 0 for x in (data.audio, data.images)) + int(data.texts)
    if labelled < 2 and not data.cooccur:
        raise TrainingError("training needs at least two labelled modalities or some co-occurrence tuples")


def _cpu_has_bf16() -> bool:
    try:
        return bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        return False


def _label_index(labels: np.ndarray) -> dict[int, np.ndarray]:
    return {int(y): np.flatnonzero(labels == y) for y in np.unique(labels)}


class _Trainer:
    def __init__(self, data: TrainingSet, config: TrainConfig):
        self.data = data
        self.config = config
        self.device = resolve_device(config.device)
        torch.set_flush_denormal(True)  # denormal activations make CPU training many times slower
        self.rng = np.random.default_rng(config.seed)
        self.gen = torch.Generator().manual_seed(config.seed)
        self.aug = AugmentConfig()
        model_config = ModelConfig(dim=config.dim, bits=tuple(sorted(config.bits)), width=config.width)
        self.cpu_bf16 = self.device.type == "cpu" and config.cpu_bf16 and _cpu_has_bf16()
        self.net = build_model(model_config, config.seed).to(self.device).train()
        self.net = self.net.to(memory_format=torch.channels_last)
        self.frontend = AudioFrontend(model_config.audio).to(self.device)
        self.image_by_label = _label_index(data.images.labels) if data.images is not None else {}
        if data.audio is not None:
            self.anchor = data.audio.labels
        else:
            self.anchor = data.images.labels if data.images is not None else np.zeros(0, np.int64)
        steps = (max(1, math.ceil(len(self.anchor) / config.batch_size))
                 + math.ceil(len(data.cooccur) / config.batch_size))
        fp16 = self.device.type == "cuda" and not torch.cuda.is_bf16_supported()
        self.scaler = torch.amp.GradScaler("cuda", enabled=fp16)  # loss scaling only for fp16 autocast
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=config.lr, weight_decay=config.weight_decay)
        self.sched = torch.optim.lr_scheduler.OneCycleLR(
            self.opt, max_lr=config.lr, total_steps=max(1, steps * config.epochs), pct_start=0.15
        )

    def run_epoch(self) -> float:
        self.net.train()
        b = self.config.batch_size
        order = self.rng.permutation(len(self.anchor))
        total, count = 0.0, 0
        for i in range(0, len(order), b):
            idx = order[i : i + b]
            if len(idx) < 2:
                continue
            with self._autocast():
                loss = self._labelled_loss(idx)
            if loss.requires_grad:
                total, count = total + self._update(loss), count + 1
        co = self.rng.permutation(len(self.data.cooccur))
        for i in range(0, len(co), b):
            idx = co[i : i + b]
            if len(idx) < 2:
                continue
            with self._autocast():
                loss = self._cooccur_loss(idx)
            if loss is not None:
                total, count = total + self._update(loss), count + 1
        return total / max(count, 1)

    def _autocast(self) -> Any:
        """Mixed precision: bf16 (fp16 without bf16) on CUDA, bf16 on CPUs with native bf16, else fp32."""
        if self.device.type == "cuda":
            dtype = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
            return torch.autocast(device_type="cuda", dtype=dtype)
        if self.cpu_bf16:
            return torch.autocast(device_type="cpu", dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def _labelled_loss(self, idx: np.ndarray) -> torch.Tensor:
        d, cfg = self.data, self.config
        labels = self.anchor[idx]
        emb: dict[str, torch.Tensor] = {}
        if d.audio is not None:
            emb["audio"] = self._audio([d.audio.waves[j] for j in idx])
        if d.images is not None:
            picks = np.array([self.rng.choice(self.image_by_label[int(y)]) for y in labels])
            emb["image"] = self._images(d.images.images[picks])
        if d.texts:
            emb["text"] = self._texts([spell(TRAIN_TEMPLATES[0], int(y)) if not cfg.augment
                                       else augment_text(int(y), self.rng) for y in labels])
        lab = torch.as_tensor(labels, device=self.device)
        return self._loss(emb, lab)

    def _cooccur_loss(self, idx: np.ndarray) -> torch.Tensor | None:
        tuples = [self.data.cooccur[j] for j in idx]
        emb: dict[str, torch.Tensor] = {}
        for m in ("audio", "image", "text"):
            if all(m in t for t in tuples):
                payloads = [t[m] for t in tuples]
                if m == "audio":
                    emb[m] = self._audio(payloads)
                elif m == "image":
                    emb[m] = self.net.embed("image", image_features(payloads, self.net.config.image).to(self.device))
                else:
                    emb[m] = self._texts(payloads)
        if len(emb) < 2:
            return None
        return self._loss(emb, None)

    def _loss(self, emb: dict[str, torch.Tensor], labels: torch.Tensor | None) -> torch.Tensor:
        cfg = self.config
        names = sorted(emb)
        loss = torch.zeros((), device=self.device)
        for i, a in enumerate(names):
            for bname in names[i + 1 :]:
                za, zb = emb[a].float(), emb[bname].float()
                if cfg.objective == "contrastive":
                    loss = loss + contrastive_loss(za, zb, labels, labels, cfg.temperature)
                elif cfg.objective == "triplet":
                    loss = loss + triplet_loss(za, zb, labels, labels, cfg.margin)
                else:
                    loss = loss + dcca_loss(za, zb, k=min(32, len(za) - 1))
                if cfg.hash_weight > 0:
                    na, nb = F.normalize(za, dim=1), F.normalize(zb, dim=1)
                    for bits in self.net.config.bits:
                        ha = torch.tanh(self.net.hash_logits(na, bits).float())
                        hb = torch.tanh(self.net.hash_logits(nb, bits).float())
                        hash_loss = hashing_loss(ha, hb, labels, labels).total
                        loss = loss + cfg.hash_weight / len(self.net.config.bits) * hash_loss
        return loss

    def _update(self, loss: torch.Tensor) -> float:
        self.opt.zero_grad(set_to_none=True)
        self.scaler.scale(loss).backward()
        self.scaler.unscale_(self.opt)
        torch.nn.utils.clip_grad_norm_(self.net.parameters(), 5.0)
        self.scaler.step(self.opt)
        self.scaler.update()
        self.sched.step()
        return float(loss.detach())

    def _audio(self, waves: list[np.ndarray]) -> torch.Tensor:
        if self.config.augment:
            waves = [augment_audio(w, self.rng, self.aug) for w in waves]
        with torch.no_grad():
            x = self.frontend(waves)
            if self.config.augment:
                x = mask_logmel(x.cpu(), self.gen, self.aug.mask_prob).to(self.device)
        return self.net.embed("audio", x.contiguous(memory_format=torch.channels_last))

    def _images(self, images: np.ndarray) -> torch.Tensor:
        if self.config.augment:
            grey = torch.from_numpy(images[..., :3].astype(np.float32).mean(axis=3) / 255.0)
            x = augment_images(grey, self.net.config.image.size, self.gen, self.aug)
        else:
            x = image_features(list(images), self.net.config.image)
        return self.net.embed("image", x.to(self.device).contiguous(memory_format=torch.channels_last))

    def _texts(self, texts: list[str]) -> torch.Tensor:
        ids, offsets = text_features(texts, self.net.config.text)
        return self.net.embed("text", (ids.to(self.device), offsets.to(self.device)))


def fit_linear_cca(data: TrainingSet, config: TrainConfig) -> CrossModalNet:
    """Linear baseline: generalised CCA on fixed pooled front-end features of label-paired triples."""
    if data.audio is None or data.images is None:
        raise TrainingError("the cca objective needs labelled audio and images")
    mc = ModelConfig(dim=config.dim, bits=tuple(sorted(config.bits)), arch="linear", width=config.width)
    net = build_model(mc, config.seed).eval()
    rng = np.random.default_rng(config.seed)
    frontend = AudioFrontend(mc.audio)
    with torch.no_grad():
        audio = torch.cat([pooled_audio(frontend(data.audio.waves[i : i + 256]))
                           for i in range(0, len(data.audio.waves), 256)]).numpy()
        image = pooled_image(image_features(list(data.images.images), mc.image)).numpy()
    by_image = _label_index(data.images.labels)
    rows_a, rows_i, texts = [], [], []
    for _ in range(config.cca_pairings):
        for j, y in enumerate(data.audio.labels):
            rows_a.append(j)
            rows_i.append(rng.choice(by_image[int(y)]))
            texts.append(augment_text(int(y), rng))
    views = [audio[rows_a], image[rows_i]]
    if data.texts:
        views.append(_text_counts(texts, mc))
    n_shared = min(config.dim, len(rows_a))
    fit = linear_gcca(views, n_shared, reg=config.cca_reg)
    scale = (fit.eigenvalues / max(fit.eigenvalues.max(), 1e-12)) ** config.cca_power
    state = net.state_dict()
    pad = config.dim - n_shared

    def project(w: np.ndarray, mu: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        ws = np.pad(w * scale[None, :], ((0, 0), (0, pad)))
        return torch.from_numpy(ws.astype(np.float32)), torch.from_numpy((-mu @ ws).astype(np.float32))

    wa, ba = project(fit.weights[0], fit.means[0])
    wi, bi = project(fit.weights[1], fit.means[1])
    state["audio.lin.weight"], state["audio.lin.bias"] = wa.T.contiguous(), ba
    state["image.lin.weight"], state["image.lin.bias"] = wi.T.contiguous(), bi
    if data.texts:
        wt, bt = project(fit.weights[2], fit.means[2])
        state["text.bag.weight"], state["text.bias"] = wt.contiguous(), bt
    # hash heads: CCA-ITQ (Gong et al. 2013), a rotation of the leading weighted components
    shared = np.concatenate([(v - m) @ (w * scale[None, :]) for v, m, w in zip(views, fit.means, fit.weights)])
    for bits in mc.bits:
        k = min(bits, n_shared)
        rotation = itq_rotation(shared[:, :k], seed=config.seed)
        head = np.zeros((bits, config.dim), dtype=np.float32)
        head[:k, :k] = rotation.T
        state[f"heads.{bits}.weight"] = torch.from_numpy(head)
        state[f"heads.{bits}.bias"] = torch.zeros(bits)
    net.load_state_dict(state)
    return net


def _text_counts(texts: list[str], mc: ModelConfig) -> np.ndarray:
    ids, offsets = text_features(texts, mc.text)
    out = np.zeros((len(texts), mc.text.buckets), dtype=np.float32)
    bounds = list(offsets.tolist()) + [len(ids)]
    for i in range(len(texts)):
        chunk = ids[bounds[i] : bounds[i + 1]].numpy()
        np.add.at(out[i], chunk, 1.0 / len(chunk))
    return out


def write_checkpoint(
    net: CrossModalNet,
    path: str | Path,
    *,
    name: str,
    objective: str,
    data_fingerprint: str,
    command: str,
    extra: dict[str, str] | None = None,
) -> Path:
    """Write ``net`` as one safetensors file (weights + metadata), atomically."""
    from safetensors.torch import save as st_save

    path = Path(path)
    state = {k: v.detach().cpu().contiguous().clone() for k, v in net.state_dict().items()}
    metadata = {
        "format": CHECKPOINT_FORMAT,
        "name": name,
        "model_config": net.config.to_json(),
        "weights_sha256": weights_digest(state),
        "objective": objective,
        "data_fingerprint": data_fingerprint,
        "command": command,
        "created_at": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "torch_version": torch.__version__,
    }
    for key, value in (extra or {}).items():
        metadata.setdefault(key, json.dumps(value) if not isinstance(value, str) else value)
    raw = st_save(state, metadata=metadata)
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(raw)
        os.chmod(tmp, 0o644)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return path
