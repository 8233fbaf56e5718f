"""`xmodal-index query`: a thin click front end over the query core (``xmodal_index.query``).

Parsing options, printing hits and turning errors into exit codes happen here;
opening, embedding, searching and fusing happen in the core, as for the Python
API and `serve`. Heavy modules (faiss, torch, decoders) load only when a query runs.
"""

from __future__ import annotations

import json
import sys
from typing import Any

import click

QUERY_KEYS = ("text", "audio", "image", "video")
EXIT_ERROR = 1
FUSIONS = ("rrf", "calibrated", "zscore", "score")  # = xmodal_index.query.fusion.FUSIONS (--help imports nothing heavy)
DEFAULT_CANDIDATES = 100  # = sinks.serving.loader.DEFAULT_CANDIDATES (kept here: --help imports nothing heavy)
SEGMENT_MODES = ("per-segment", "fused")
ON_ERROR = ("skip", "stop")


def resolve_index_root(uri: str, index_name: str = "main") -> str:
    """Re-exported from the core (``xmodal_index.query.resolve``)."""
    from xmodal_index.query.resolve import resolve_index_root as resolve

    return resolve(uri, index_name)


def __getattr__(name: str) -> Any:
    # Old import paths of names that moved into the core.
    moved = {"QueryError": "xmodal_index.query.errors", "load_query_encoder": "xmodal_index.query.encoder",
             "decode_query_media": "xmodal_index.query.media", "hit_json": "xmodal_index.query.hits"}
    if name in moved:
        import importlib

        return getattr(importlib.import_module(moved[name]), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def _print_hits(qid: Any, label: str, where: str, version: str, hits: list, as_json: bool,
                extra: dict | None = None, grouped: bool = False) -> None:
    if as_json:
        click.echo(json.dumps({"id": qid, **(extra or {}), "hits": [h.to_json() for h in hits]}))
        return
    click.echo(f"query {qid} ({label}) in {where} of {version}")
    rank = 0
    last = None
    for h in hits:
        if grouped and h.modality != last:
            click.echo(f"  {h.modality}:")
            last, rank = h.modality, 0
        rank += 1
        text = f"  \"{h.text}\"" if h.text else ""
        score = f"{h.score:.3f}" if abs(h.score) >= 0.1 else f"{h.score:.5f}"  # fused rrf scores are ~0.016
        click.echo(f"  {rank:>3}. {score:>7}  {h.modality:<5} {h.start_s:7.2f}-{h.end_s:<7.2f} {h.uri}{text}")


def _label(query: Any) -> str:
    if query.modality == "embedding":
        return "embedding"
    clip = ""
    if query.start_s is not None or query.end_s is not None:
        clip = f" [{query.start_s or 0:g}, {'end' if query.end_s is None else f'{query.end_s:g}'}) s"
    return f"{query.modality}: {str(query.value)[:60]}{clip}"


def _fail(message: str) -> None:
    click.echo(f"xmodal-index query: error: {message}", err=True)


@click.command(context_settings={"show_default": True})
@click.option("--index", "index_uri", required=True, help="Index root (WORKDIR/indexes/NAME) or a workdir.")
@click.option("--index-name", default="main", help="With a workdir: which of its indexes to query.")
@click.option("--version", default=None, help="Index version to load, e.g. v000003 (default: the one named by LATEST).")
@click.option("--text", default=None, help="Text query (must not be empty).")
@click.option("--audio", type=click.Path(dir_okay=False), default=None,
              help="Audio file query (any format PyAV decodes).")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="Image file query.")
@click.option("--video", type=click.Path(dir_okay=False), default=None,
              help="Video file query (frames sampled as the index's run sampled them).")
@click.option("--embedding", default=None,
              help="Raw query vector: a JSON list of the index's dim finite numbers (L2-normalised before search).")
@click.option("--queries", type=click.Path(dir_okay=False), default=None,
              help="JSONL file: one object per line with exactly one of text/audio/image/video/embedding, an "
                   "optional id, modality (streams to search) and start_s/end_s; relative paths are relative to "
                   "the JSONL file's folder.")
@click.option("--start", "start_s", type=float, default=None,
              help="Audio/video queries: start of the clip range, seconds (default: 0).")
@click.option("--end", "end_s", type=float, default=None,
              help="Audio/video queries: end of the clip range, seconds (default: end of file).")
@click.option("--segments", type=click.Choice(SEGMENT_MODES), default=None,
              help="Audio/video query: cut it into segments as `run` does; per-segment: the hits of each query "
                   "segment; fused: one list, each moment at its best score over the segments (default: the "
                   "file is one query).")
@click.option("-k", "k", type=click.IntRange(1, 10000), default=10, help="Hits per query.")
@click.option("--modality", default=None,
              help="Search only these streams, comma-separated from video,audio,image,text (default: all).")
@click.option("--per-modality", "per_modality", type=click.IntRange(1, 10000), default=None,
              help="Return the best K hits of each searched stream, grouped by stream (instead of -k merged hits).")
@click.option("--fusion", type=click.Choice(FUSIONS), default="rrf",
              help="How hits of several streams are merged: rrf (reciprocal-rank fusion: streams interleaved by "
                   "rank), calibrated (scores standardised per query/target modality pair from the version's "
                   "stored vectors), zscore (per-query standardised scores) or score (raw scores; one stream "
                   "tends to swamp the list).")
@click.option("--on-error", type=click.Choice(ON_ERROR), default="skip",
              help="--queries: a bad line is reported and skipped, or stops the batch; the exit code is "
                   "non-zero if any line failed.")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query on stdout: {id, hits: [...]}.")
@click.option("--two-stage", is_flag=True,
              help="Hamming prefilter on the hash codes, then exact float re-rank (default: float ANN search).")
@click.option("--candidates", type=click.IntRange(1, 1_000_000), default=None,
              help=f"With --two-stage: Hamming candidates per shard to re-rank "
                   f"(default: max(k, {DEFAULT_CANDIDATES})).")
def query(index_uri, index_name, version, text, audio, image, video, embedding, queries, start_s, end_s, segments,
          k, modality, per_modality, fusion, on_error, as_json, two_stage, candidates):
    """Find the moments matching a query in every modality of a published index."""
    given = {m: v for m, v in (("text", text), ("audio", audio), ("image", image), ("video", video),
                               ("embedding", embedding)) if v is not None}
    if len(given) + (queries is not None) != 1:
        raise click.UsageError("give exactly one of --text, --audio, --image, --video, --embedding, --queries")
    if queries is not None and (start_s is not None or end_s is not None or segments):
        raise click.UsageError("--start/--end/--segments apply to one --audio or --video query; "
                               "in --queries give start_s/end_s per line")
    if segments and not (audio or video):
        raise click.UsageError("--segments applies to an --audio or --video query")
    if segments and (per_modality or two_stage):
        raise click.UsageError("--segments cannot be combined with --per-modality or --two-stage")

    from xmodal_index.query.batch import LineError, QueryLine, read_queries
    from xmodal_index.query.core import QueryIndex
    from xmodal_index.query.errors import QueryError
    from xmodal_index.query.request import Query, parse_modalities

    try:
        modalities = parse_modalities(modality, "--modality")
    except QueryError as err:
        raise click.BadParameter(str(err), param_hint="--modality") from err
    failed = 0
    try:
        index = QueryIndex.open(index_uri, index=index_name, version=version)
        if queries is None:
            (m, v), = given.items()
            if m == "embedding":
                try:
                    v = json.loads(v)
                except ValueError as err:
                    raise click.BadParameter(f"not a JSON list of numbers: {err}", param_hint="--embedding") from err
            todo = [QueryLine("", 1, Query(m, v, start_s, end_s), None)]
        else:
            todo = read_queries(queries)
        where_all = ",".join(modalities or ["all streams"])
        for line in todo:
            try:
                if isinstance(line, LineError):
                    raise QueryError(line.message)
                search = line.modalities or modalities
                where = ",".join(line.modalities) if line.modalities else where_all
                if segments:
                    parts = index.run_segments(line.query, k=k, modalities=search, fusion=fusion,
                                               fused=segments == "fused")
                    for n, part in enumerate(parts):
                        label = f"{_label(line.query)}, segment {part.start_s:g}-{part.end_s:g} s"
                        if segments == "fused":
                            label = f"{_label(line.query)}, segments fused"
                        _print_hits(line.id, label, where, index.version, part.hits, as_json,
                                    extra={"segment": n, "query_start_s": part.start_s, "query_end_s": part.end_s}
                                    if segments == "per-segment" else None)
                    continue
                hits = index.run(line.query, k=k, modalities=search, per_modality=per_modality, fusion=fusion,
                                 two_stage=two_stage, candidates=candidates)
                _print_hits(line.id, _label(line.query), where, index.version, hits, as_json,
                            grouped=per_modality is not None)
            except (QueryError, ValueError) as err:
                if not line.where:
                    raise
                failed += 1
                _fail(f"{line.where}: {err}")
                if on_error == "stop":
                    break
            except Exception as err:
                if not line.where:
                    raise
                failed += 1
                _fail(f"{line.where}: {type(err).__name__}: {err}")
                if on_error == "stop":
                    break
    except click.ClickException:
        raise
    except (QueryError, ValueError) as err:
        _fail(str(err))
        sys.exit(EXIT_ERROR)
    except Exception as err:  # noqa: BLE001 - decoder / encoder errors end in one line
        _fail(f"{type(err).__name__}: {err}")
        sys.exit(EXIT_ERROR)
    if failed:
        _fail(f"{failed} quer{'y' if failed == 1 else 'ies'} of {queries} failed")
        sys.exit(EXIT_ERROR)
