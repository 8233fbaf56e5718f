"""EncodeSegments: batched encoding of decoded segments with Beam's RunInference.

The model handler loads the encoder once per worker process (RunInference shares
it across the bundles and threads of a process) and encodes each batch grouped by
modality. A batch that fails to encode goes to the dead-letter output, one row per
item, and the run goes on.

Workers on other machines must not depend on the submitting process's files: a
checkpoint given as a local path travels with the job (``stage_checkpoint``): it
is uploaded beside the run's outputs when the workdir is object storage (and the
workers download it once per process), or made absolute when the workdir is a
local file system the workers share. ``bundled`` and untrained encoders need
nothing but the package.
"""

from __future__ import annotations

import atexit
import dataclasses
import logging
import os
import shutil
import tempfile
from collections import defaultdict
from collections.abc import Iterable, Iterator, Sequence
from typing import Any

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, RunInference

from xmodal_index.encoders.base import CrossModalEncoder
from xmodal_index.encoders.config import BUNDLED_CHECKPOINT, EncoderConfig
from xmodal_index.encoders.loading import load_encoder
from xmodal_index.sinks import storage
from xmodal_index.sinks.schema import segment_id
from xmodal_index.sinks.workdir import Workdir

from .types import DeadLetter, Segment

logger = logging.getLogger(__name__)

METRICS_NAMESPACE = "xmodal_index"


def encode_segments(model: CrossModalEncoder, segments: Sequence[Segment], run_id: str) -> list[dict[str, Any]]:
    """Encode segments of any modalities with ``model``; rows in input order (SPEC 4.3 fields)."""
    by_modality: dict[str, list[int]] = defaultdict(list)
    for i, seg in enumerate(segments):
        by_modality[seg.modality].append(i)
    rows: list[dict[str, Any] | None] = [None] * len(segments)
    for modality, idx in by_modality.items():
        out = model.encode(modality, [segments[i].payload for i in idx])
        for j, i in enumerate(idx):
            seg = segments[i]
            rows[i] = {
                "segment_id": segment_id(seg.uri, seg.etag, seg.modality, seg.start_s),
                "uri": seg.uri,
                "etag": seg.etag,
                "modality": seg.modality,
                "start_s": float(seg.start_s),
                "end_s": float(seg.end_s),
                "embedding": np.asarray(out.embeddings[j], dtype=np.float32),
                "hash_code": out.codes[j].tobytes(),
                "model_id": model.model_id,
                "run_id": run_id,
                "text": seg.text,
                "sampling": seg.sampling,
            }
    return rows  # type: ignore[return-value]


def stage_checkpoint(config: EncoderConfig, workdir: str, stage_uri: str) -> EncoderConfig:
    """``config`` with its checkpoint reachable from any worker (see the module docstring).

    A local checkpoint file or folder is copied under ``stage_uri`` when ``workdir``
    is object storage; with a local workdir its path is made absolute.
    """
    ckpt = config.checkpoint
    if ckpt in ("", BUNDLED_CHECKPOINT) or storage.is_s3(ckpt):
        return config
    local = os.path.abspath(ckpt)
    if not storage.is_s3(workdir):
        return dataclasses.replace(config, checkpoint=local)
    if not os.path.exists(local):
        raise FileNotFoundError(f"encoder checkpoint {ckpt!r} not found (resolved to {local})")
    target = storage.join(stage_uri, os.path.basename(local.rstrip(os.sep)))
    if os.path.isdir(local):
        for root, _, files in os.walk(local):
            for name in sorted(files):
                path = os.path.join(root, name)
                storage.put_file(path, storage.join(target, os.path.relpath(path, local).replace(os.sep, "/")))
    else:
        storage.put_file(local, target)
    logger.info("encoder checkpoint %s staged at %s for the workers", ckpt, target)
    return dataclasses.replace(config, checkpoint=target)


def _fetch_checkpoint(uri: str, into: str) -> str:
    """A staged checkpoint (file or folder) copied into the local folder ``into``; its local path."""
    name = uri.rstrip("/").rsplit("/", 1)[-1]
    local = os.path.join(into, name)
    if storage.exists(uri):
        with storage.local_path(uri) as path:
            with open(path, "rb") as src, open(local, "wb") as dst:
                while chunk := src.read(1 << 20):
                    dst.write(chunk)
        return local
    for obj in storage.list_objects(uri):
        rel = obj.uri[len(uri.rstrip("/")) + 1:]
        dest = os.path.join(local, *rel.split("/"))
        os.makedirs(os.path.dirname(dest), exist_ok=True)
        with storage.local_path(obj.uri) as path, open(path, "rb") as src, open(dest, "wb") as dst:
            while chunk := src.read(1 << 20):
                dst.write(chunk)
    return local


class SegmentModelHandler(ModelHandler[Segment, dict, CrossModalEncoder]):
    """RunInference model handler for any CrossModalEncoder named by an EncoderConfig."""

    def __init__(self, config: EncoderConfig, run_id: str):
        super().__init__()
        self._config = config
        self._run_id = run_id

    def load_model(self) -> CrossModalEncoder:
        config = self._config
        if storage.is_s3(config.checkpoint):  # staged by stage_checkpoint: one copy per worker process
            into = tempfile.mkdtemp(prefix="xmodal-encoder-")
            atexit.register(shutil.rmtree, into, True)
            config = dataclasses.replace(config, checkpoint=_fetch_checkpoint(config.checkpoint, into))
        model = load_encoder(config)
        logger.info("loaded encoder %s", model.model_id)
        return model

    def run_inference(
        self, batch: Sequence[Segment], model: CrossModalEncoder, inference_args: dict | None = None
    ) -> Iterable[dict]:
        return encode_segments(model, batch, self._run_id)

    def get_num_bytes(self, batch: Sequence[Segment]) -> int:
        total = 0
        for seg in batch:
            p = seg.payload
            total += p.nbytes if isinstance(p, np.ndarray) else len(str(p))
        return total

    def batch_elements_kwargs(self) -> dict:
        return {"min_batch_size": 1, "max_batch_size": self._config.batch_size}

    def get_metrics_namespace(self) -> str:
        return METRICS_NAMESPACE


def _encode_failures(failure) -> Iterator[tuple[tuple[str, str], DeadLetter]]:
    batch, err = failure
    err_type, err_text = "EncodeError", str(err)
    if isinstance(err, tuple) and len(err) >= 2:
        err_type = getattr(err[0], "__name__", str(err[0]))
        err_text = str(err[1])
    elif isinstance(err, BaseException):
        err_type, err_text = type(err).__name__, str(err)
    for seg in batch:
        yield (seg.uri, seg.etag), DeadLetter(seg.uri, seg.etag, "encode", err_type, err_text[:2000])


class EncodeSegments(beam.PTransform):
    """PCollection[Segment] -> (rows, dead letters).

    rows: dicts with the embedding-row fields; dead letters: one DeadLetter per item
    that had a batch fail to encode.
    """

    def __init__(self, config: EncoderConfig, run_id: str, workdir: str | None = None):
        super().__init__()
        self._config = config
        self._run_id = run_id
        if workdir is not None:  # the checkpoint travels with the job (stage_checkpoint)
            self._config = stage_checkpoint(config, workdir, Workdir(workdir).staged_encoder(run_id))

    def expand(self, segments):
        handler = SegmentModelHandler(self._config, self._run_id)
        rows, dlq = segments | "RunInference" >> RunInference(handler).with_exception_handling()
        dead = (
            dlq.failed_inferences
            | "FailedItems" >> beam.FlatMap(_encode_failures)
            | "OnePerItem" >> beam.CombinePerKey(lambda letters: next(iter(letters)))
            | "Values" >> beam.Values()
        )
        return rows, dead
