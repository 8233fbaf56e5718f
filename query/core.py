"""``QueryIndex``: one opened index version and its query encoder, searched by any query.

    import xmodal_index
    with xmodal_index.open("sample-work") as index:
        for hit in index.search(text="seven", k=5):
            print(hit.score, hit.modality, hit.uri, hit.start_s, hit.end_s)

Opening verifies the version (the loader refuses a tampered one); the encoder the
version was built with is loaded on the first query that needs it (an embedding
query needs none). Several target modalities are merged fairly (``fusion``), or
returned grouped, ``per_modality`` hits each.
"""

from __future__ import annotations

import dataclasses
import threading
from collections.abc import Sequence
from typing import Any

import numpy as np

from . import fusion as fu
from .errors import BadQueryError, QueryError
from .hits import Hit
from .media import QuerySegmenting, decode_query_media, decode_query_segments
from .request import Query, check_embedding, check_k, parse_modalities
from .resolve import resolve_index_root, run_decode_config

_UNSET = object()


@dataclasses.dataclass(frozen=True)
class SegmentHits:
    """The hits of one segment [start_s, end_s) of a query file."""

    start_s: float
    end_s: float
    hits: list[Hit]


class QueryIndex:
    """A loaded, verified index version with its query encoder. Use ``QueryIndex.open``
    (or ``xmodal_index.open``); wrap an already loaded ``IndexVersion`` with the constructor."""

    def __init__(self, version: Any, encoder: Any = None, *, owns_version: bool = False,
                 segmenting: QuerySegmenting | None = None) -> None:
        self._version = version
        self._encoder = encoder
        self._owns_version = owns_version
        self._segmenting = segmenting
        self._pair_stats: dict[str, dict[str, tuple[float, float]]] | None = None
        self._text_encoder: Any = _UNSET
        self._lock = threading.RLock()

    @classmethod
    def open(cls, uri: str, index: str = "main", version: str | None = None,
             cache_dir: str | None = None) -> QueryIndex:
        """Open ``version`` (default: the one LATEST names) of a workdir's index ``index``
        or of an index root, after verifying every file of it."""
        from xmodal_index.sinks.errors import SinkError
        from xmodal_index.sinks.serving.loader import IndexVersion

        root = resolve_index_root(uri, index)
        try:
            loaded = IndexVersion.open(root, version=version, cache_dir=cache_dir)
        except SinkError as err:
            raise QueryError(str(err)) from err
        return cls(loaded, owns_version=True)

    # ------------------------------------------------------------ what is open

    @property
    def version(self) -> str:
        return self._version.version

    @property
    def manifest(self) -> Any:
        return self._version.manifest

    @property
    def index_root(self) -> str:
        return self._version.index_root

    @property
    def modalities(self) -> tuple[str, ...]:
        return tuple(self._version.modalities)

    @property
    def index_version(self) -> Any:
        """The loader's ``IndexVersion`` (low-level vector search)."""
        return self._version

    @property
    def encoder(self) -> Any:
        """The version's own query encoder, loaded once on first use."""
        with self._lock:
            if self._encoder is None:
                from .encoder import load_query_encoder

                self._encoder = load_query_encoder(self._version)
            return self._encoder

    @property
    def text_encoder(self) -> Any:
        """A torch-free encoder for text queries when the version's encoder has one (the built-in
        encoder's numpy text tower), else None (text queries then use ``encoder``)."""
        with self._lock:
            if self._text_encoder is _UNSET:
                if self._encoder is not None:
                    self._text_encoder = None  # the full encoder is loaded anyway
                else:
                    from .encoder import load_text_query_encoder

                    self._text_encoder = load_text_query_encoder(self._version)
            return self._text_encoder

    @property
    def segmenting(self) -> QuerySegmenting:
        """How query media is segmented: the decode settings of the run that built the version."""
        if self._segmenting is None:
            run_id = (self.manifest.metrics or {}).get("run_id")
            self._segmenting = QuerySegmenting.from_run(run_decode_config(self.index_root, run_id))
        return self._segmenting

    # ------------------------------------------------------------ rows

    def to_arrow(self) -> Any:
        """The live rows of this version (one per indexed segment and modality), from its id maps:
        segment_id, uri, modality, start_s, end_s, text, etag."""
        import pyarrow as pa
        import pyarrow.parquet as pq

        tables = []
        for entry in self.manifest.id_maps:
            table = pq.read_table(self._version.listed_path(entry.file))
            table = table.filter(pa.array(~self._version.tombstoned(table.column("segment_id").to_numpy())))
            tables.append(table.drop_columns([c for c in table.column_names if c == "vector_row"]))
        if not tables:
            return pa.table({})
        table = pa.concat_tables(tables, promote_options="default").replace_schema_metadata(None)
        return table.sort_by([("segment_id", "ascending")])

    def to_pandas(self) -> Any:
        """``to_arrow()`` as a pandas DataFrame (needs pandas installed)."""
        try:
            import pandas  # noqa: F401 - checked here for a clear message
        except ImportError as err:
            raise QueryError("to_pandas() needs pandas: pip install pandas (or use to_arrow())") from err
        return self.to_arrow().to_pandas()

    # ------------------------------------------------------------ search

    def embed(self, query: Query, segmenting: QuerySegmenting | None = None) -> tuple[np.ndarray, Any]:
        """(1, dim) float32 query vector and its packed hash code (None for embedding queries)."""
        if query.modality == "embedding":
            return check_embedding(query.value, int(self.manifest.dim)), None
        encoder = self.text_encoder if query.modality == "text" else None
        encoder = encoder or self.encoder
        if query.modality not in encoder.modalities:
            raise BadQueryError(f"the encoder of {self.version} cannot embed {query.modality} queries "
                                f"(it takes {', '.join(encoder.modalities)})")
        if query.modality == "text":
            payload = query.value
        else:
            payload = decode_query_media(query.modality, query.value, segmenting or self.segmenting,
                                         start_s=query.start_s, end_s=query.end_s)
        encoded = encoder.encode(query.modality, [payload])
        return np.ascontiguousarray(encoded.embeddings, dtype=np.float32), encoded.codes

    def search(self, text: str | None = None, *, audio: str | None = None, image: str | None = None,
               video: str | None = None, embedding: Any = None, k: int = 10,
               modalities: str | Sequence[str] | None = None, start_s: float | None = None,
               end_s: float | None = None, per_modality: int | None = None, fusion: str = fu.DEFAULT_FUSION,
               two_stage: bool = False, candidates: int | None = None) -> list[Hit]:
        """The best ``k`` moments for one query, best first.

        Exactly one of text, audio, image, video (file paths) or embedding (``dim`` numbers).
        ``start_s``/``end_s`` cut an audio or video query to that range (seconds).
        ``modalities`` limits the searched streams (default: all). Several streams are merged
        by ``fusion`` (rrf, calibrated, zscore or score); ``per_modality=K`` returns instead the best K of
        each stream, grouped by stream in the order of ``modalities``.
        """
        query = Query.of(text=text, audio=audio, image=image, video=video, embedding=embedding,
                         start_s=start_s, end_s=end_s)
        return self.run(query, k=k, modalities=modalities, per_modality=per_modality, fusion=fusion,
                        two_stage=two_stage, candidates=candidates)

    def run(self, query: Query, *, k: int = 10, modalities: str | Sequence[str] | None = None,
            per_modality: int | None = None, fusion: str = fu.DEFAULT_FUSION, two_stage: bool = False,
            candidates: int | None = None) -> list[Hit]:
        """``search`` for a prepared ``Query``."""
        k, targets, per_modality = self._check_options(k, modalities, per_modality, fusion)
        if two_stage and query.modality == "embedding":
            raise BadQueryError("two-stage search needs the query's hash code: give a text or media query")
        vec, codes = self.embed(query)
        return self._search_vectors(vec, codes if two_stage else None, k, targets, per_modality, fusion,
                                    candidates, query.modality)[0]

    def search_segments(self, *, audio: str | None = None, video: str | None = None, k: int = 10,
                        modalities: str | Sequence[str] | None = None, start_s: float | None = None,
                        end_s: float | None = None, fusion: str = fu.DEFAULT_FUSION,
                        fused: bool = False) -> list[SegmentHits]:
        """A long audio or video query cut into segments as ``run`` cuts files: the best ``k``
        moments of each query segment, in time order; with ``fused``, one entry spanning the
        query whose hits are the best ``k`` moments over all its segments (each indexed moment
        at its best score over the query segments, then the streams merged by ``fusion``)."""
        query = Query.of(audio=audio, video=video, start_s=start_s, end_s=end_s)
        return self.run_segments(query, k=k, modalities=modalities, fusion=fusion, fused=fused)

    def run_segments(self, query: Query, *, k: int = 10, modalities: str | Sequence[str] | None = None,
                     fusion: str = fu.DEFAULT_FUSION, fused: bool = False) -> list[SegmentHits]:
        k, targets, _ = self._check_options(k, modalities, None, fusion)
        if query.modality not in ("audio", "video"):
            raise BadQueryError(f"segments apply to audio and video queries, not {query.modality}")
        encoder = self.encoder
        if query.modality not in encoder.modalities:
            raise BadQueryError(f"the encoder of {self.version} cannot embed {query.modality} queries")
        parts = decode_query_segments(query.modality, query.value, self.segmenting,
                                      start_s=query.start_s, end_s=query.end_s)
        vecs = np.ascontiguousarray(encoder.encode(query.modality, [p.payload for p in parts]).embeddings,
                                    dtype=np.float32)
        if not fused:
            results = self._search_vectors(vecs, None, k, targets, None, fusion, None, query.modality)
            return [SegmentHits(p.start_s, p.end_s, hits) for p, hits in zip(parts, results)]
        if not targets:
            return [SegmentHits(parts[0].start_s, parts[-1].end_s, [])]
        groups = self._ranked(vecs, None, self._depth(k, len(targets), fusion), targets, None, fusion, None)
        best: dict[str, list[Hit]] = {}
        for m, per_query in groups.items():
            top: dict[int, Hit] = {}
            for hits in per_query:
                for h in hits:
                    if h.segment_id not in top or h.score > top[h.segment_id].score:
                        top[h.segment_id] = h
            best[m] = sorted(top.values(), key=lambda h: (-h.score, h.segment_id))
        return [SegmentHits(parts[0].start_s, parts[-1].end_s, self._fuse(best, k, fusion, query.modality))]

    def _check_options(self, k: Any, modalities: Any, per_modality: Any, fusion: str
                       ) -> tuple[int, tuple[str, ...], int | None]:
        k = check_k(k)
        if per_modality is not None:
            per_modality = check_k(per_modality, "per_modality")
        try:
            fu.check_fusion(fusion)
        except ValueError as err:
            raise BadQueryError(str(err)) from err
        wanted = parse_modalities(modalities)
        targets = tuple(m for m in (wanted or self.modalities) if m in self.modalities)
        return k, targets, per_modality

    @staticmethod
    def _depth(k: int, n_targets: int, fusion: str) -> int:
        return max(k, fu.ZSCORE_DEPTH) if fusion == "zscore" and n_targets > 1 else k

    def _fuse(self, ranked: dict[str, list[Hit]], k: int, fusion: str, query_modality: str) -> list[Hit]:
        stats = None
        if fusion == "calibrated" and len(ranked) > 1:
            stats = self.pair_statistics().get("" if query_modality == "embedding" else query_modality)
        return fu.fuse(ranked, k, fusion, score=lambda h: h.score, tie=lambda h: h.segment_id,
                       rescore=lambda h, s: dataclasses.replace(h, score=s), pair_stats=stats)

    def pair_statistics(self) -> dict[str, dict[str, tuple[float, float]]]:
        """{query modality: {target modality: (mean, std)}} of scores between the version's stored
        vectors (a seeded sample per modality), computed once; {} when the version keeps none."""
        with self._lock:
            if self._pair_stats is None:
                self._pair_stats = fu.pair_statistics(self._vector_samples())
            return self._pair_stats

    def _vector_samples(self) -> dict[str, np.ndarray]:
        from xmodal_index.sinks.errors import SinkError

        by_modality: dict[str, list[np.ndarray]] = {}
        for shard in self.manifest.shards:
            if shard.kind != "float" or not shard.vectors:
                continue
            try:
                vectors = np.load(self._version.listed_path(shard.vectors), mmap_mode="r",
                                  allow_pickle=False)
            except (OSError, ValueError, SinkError):
                return {}
            if vectors.ndim != 2 or vectors.shape[1] != self.manifest.dim:
                return {}
            by_modality.setdefault(shard.modality, []).append(fu.sample_rows(vectors))
        if set(by_modality) != set(self.modalities):
            return {}
        return {m: fu.sample_rows(np.concatenate(parts)) for m, parts in by_modality.items()}

    def _ranked(self, vecs: np.ndarray, codes: Any, depth: int, targets: tuple[str, ...],
                per_modality: int | None, fusion: str, candidates: int | None) -> dict[str, list[list[Hit]]]:
        """Raw-score rankings per target stream (one list per query); "all" for a raw-score merge."""
        if fusion == "score" and per_modality is None:
            groups = {"all": self._search_one(vecs, codes, depth, list(targets), candidates)}
        else:
            groups = {m: self._search_one(vecs, codes, depth, [m], candidates) for m in targets}
        return {m: [[Hit.of(h) for h in hits] for hits in per_query] for m, per_query in groups.items()}

    def _search_vectors(self, vecs: np.ndarray, codes: Any, k: int, targets: tuple[str, ...],
                        per_modality: int | None, fusion: str, candidates: int | None,
                        query_modality: str) -> list[list[Hit]]:
        nq = len(vecs)
        if not targets:
            return [[] for _ in range(nq)]
        depth = per_modality or self._depth(k, len(targets), fusion)
        groups = self._ranked(vecs, codes, depth, targets, per_modality, fusion, candidates)
        out = []
        for q in range(nq):
            ranked = {m: per_query[q] for m, per_query in groups.items()}
            if per_modality is not None:
                out.append([h for m in targets for h in ranked[m]])
            else:
                out.append(self._fuse(ranked, k, fusion, query_modality))
        return out

    def _search_one(self, vecs: np.ndarray, codes: Any, k: int, modalities: list[str],
                    candidates: int | None) -> list[list[Any]]:
        from xmodal_index.sinks.errors import SinkError

        try:
            if codes is not None:
                return self._version.search(vecs, k, modalities=modalities, mode="two_stage", codes=codes,
                                            candidates=candidates)
            return self._version.search(vecs, k, modalities=modalities)
        except SinkError as err:
            raise QueryError(str(err)) from err
        except ValueError as err:
            raise BadQueryError(str(err)) from err

    # ------------------------------------------------------------ lifetime

    def close(self) -> None:
        if self._owns_version:
            self._version.close()

    def __enter__(self) -> QueryIndex:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"QueryIndex({self.index_root!r}, version={self.version!r}, ntotal={self.manifest.ntotal})"
