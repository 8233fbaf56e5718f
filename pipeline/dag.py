"""The indexing DAG: work list -> decode -> encode -> Parquet embeddings + dead letters.

``IndexArchive`` composes the transforms; ``WriteEmbeddings`` and
``WriteDeadLetters`` write Parquet part files named part-SSSSS-of-NNNNN.parquet
(Beam writes them under temporary names and renames them when the write commits).
The same DAG runs on the DirectRunner and on distributed runners.
"""

from __future__ import annotations

import dataclasses
import datetime
import json
from typing import Any

import apache_beam as beam
from apache_beam.io.parquetio import WriteToParquet

from xmodal_index.encoders.config import EncoderConfig
from xmodal_index.sinks import storage
from xmodal_index.sinks.schema import DEADLETTER_SCHEMA, embedding_schema
from xmodal_index.sinks.workdir import Workdir

from .decode import DecodeConfig
from .decode_segments import DecodeSegments
from .encode import EncodeSegments
from .types import DeadLetter, ItemOutcome, MediaItem

# The layout is spelled in sinks/workdir.py; these name the folders the DAG writes.


def embeddings_prefix(workdir: str, run_id: str) -> str:
    return Workdir(workdir).embeddings(run_id)


def deadletter_prefix(workdir: str, run_id: str) -> str:
    return Workdir(workdir).deadletter(run_id)


def outcomes_prefix(workdir: str, run_id: str) -> str:
    return Workdir(workdir).outcomes(run_id)


def item_to_json(item: MediaItem) -> str:
    return json.dumps(dataclasses.asdict(item), ensure_ascii=True)


def item_from_json(line: str) -> MediaItem:
    d = json.loads(line)
    d["sidecars"] = tuple(d.get("sidecars", ()))
    return MediaItem(**d)


def _parquet(prefix: str, schema) -> WriteToParquet:
    return WriteToParquet(
        storage.join(prefix, "part"),
        schema,
        codec="zstd",
        shard_name_template="-SSSSS-of-NNNNN",
        file_name_suffix=".parquet",
    )


class WriteEmbeddings(beam.PTransform):
    """Embedding rows (dicts, SPEC 4.3) -> WORKDIR/embeddings/run_id=RUN/part-*.parquet."""

    def __init__(self, workdir: str, run_id: str, dim: int, bits: int):
        super().__init__()
        self._prefix = embeddings_prefix(workdir, run_id)
        self._schema = embedding_schema(dim, bits)

    def expand(self, rows):
        return rows | "Parquet" >> _parquet(self._prefix, self._schema)


class WriteDeadLetters(beam.PTransform):
    """DeadLetters -> WORKDIR/deadletter/run_id=RUN/part-*.parquet."""

    def __init__(self, workdir: str, run_id: str):
        super().__init__()
        self._prefix = deadletter_prefix(workdir, run_id)
        self._run_id = run_id

    def expand(self, letters):
        run_id = self._run_id

        def to_row(d: DeadLetter) -> dict[str, Any]:
            row = dataclasses.asdict(d)
            row["run_id"] = run_id
            row["at"] = datetime.datetime.now(datetime.timezone.utc)
            return row

        return letters | "Rows" >> beam.Map(to_row) | "Parquet" >> _parquet(self._prefix, DEADLETTER_SCHEMA)


class IndexArchive(beam.PTransform):
    """PCollection[MediaItem] -> embeddings, dead letters and item outcomes in WORKDIR."""

    def __init__(self, workdir: str, run_id: str, decode: DecodeConfig, encoder: EncoderConfig, dim: int, bits: int,
                 isolate_decoding: bool = True):
        super().__init__()
        self._workdir, self._run_id = workdir, run_id
        self._decode, self._encoder = decode, encoder
        self._dim, self._bits = dim, bits
        self._isolate = isolate_decoding

    def expand(self, items):
        decoded = items | "DecodeSegments" >> DecodeSegments(self._decode, isolate=self._isolate)
        rows, encode_dead = decoded.segments | "EncodeSegments" >> EncodeSegments(self._encoder, self._run_id,
                                                                                        workdir=self._workdir)
        rows | "WriteEmbeddings" >> WriteEmbeddings(self._workdir, self._run_id, self._dim, self._bits)
        dead = (decoded.deadletter, encode_dead) | "AllDeadLetters" >> beam.Flatten()
        dead | "WriteDeadLetters" >> WriteDeadLetters(self._workdir, self._run_id)
        (
            decoded.outcome
            | "OutcomeJson" >> beam.Map(lambda o: json.dumps(dataclasses.asdict(o)))
            | "WriteOutcomes" >> beam.io.WriteToText(storage.join(outcomes_prefix(self._workdir, self._run_id), "part"),
                                                     file_name_suffix=".jsonl", shard_name_template="-SSSSS-of-NNNNN")
        )
        return rows


def read_worklist(pipeline: beam.Pipeline, worklist_uri: str):
    """The work list written by the job (one MediaItem JSON per line) as a PCollection."""
    return (
        pipeline
        | "ReadWorkList" >> beam.io.ReadFromText(worklist_uri)
        | "ParseItems" >> beam.Map(item_from_json)
        | "Spread" >> beam.Reshuffle()
    )


def outcome_from_json(line: str) -> ItemOutcome:
    return ItemOutcome(**json.loads(line))
