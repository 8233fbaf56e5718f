"""EncodeSegments: batched encoding of decoded segments with Beam's RunInference.

The model handler loads the encoder once per worker process (RunInference shares
it across the bundles and threads of a process) and encodes each batch grouped by
modality. A batch that fails to encode goes to the dead-letter output, one row per
item, and the run goes on.
"""

from __future__ import annotations

import logging
from collections import defaultdict
from typing import Any, Iterable, Iterator, Optional, Sequence

import apache_beam as beam
import numpy as np
from apache_beam.ml.inference.base import ModelHandler, RunInference

from xmodal_index.encoders.base import CrossModalEncoder
from xmodal_index.encoders.config import EncoderConfig
from xmodal_index.encoders.loading import load_encoder
from xmodal_index.pipeline.types import DeadLetter, Segment
from xmodal_index.sinks.schema import segment_id

logger = logging.getLogger(__name__)

METRICS_NAMESPACE = "xmodal_index"


def encode_segments(model: CrossModalEncoder, segments: Sequence[Segment], run_id: str) -> list[dict[str, Any]]:
    """Encode segments of any modalities with ``model``; rows in input order (SPEC 4.3 fields)."""
    by_modality: dict[str, list[int]] = defaultdict(list)
    for i, seg in enumerate(segments):
        by_modality[seg.modality].append(i)
    rows: list[Optional[dict[str, Any]]] = [None] * len(segments)
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


class SegmentModelHandler(ModelHandler[Segment, dict, CrossModalEncoder]):
    """RunInference model handler for any CrossModalEncoder named by an EncoderConfig."""

    def __init__(self, config: EncoderConfig, run_id: str):
        super().__init__()
        self._config = config
        self._run_id = run_id

    def load_model(self) -> CrossModalEncoder:
        model = load_encoder(self._config)
        logger.info("loaded encoder %s", model.model_id)
        return model

    def run_inference(
        self, batch: Sequence[Segment], model: CrossModalEncoder, inference_args: Optional[dict] = None
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

    def __init__(self, config: EncoderConfig, run_id: str):
        super().__init__()
        self._config = config
        self._run_id = run_id

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
