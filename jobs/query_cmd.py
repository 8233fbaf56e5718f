"""`xmodal-index query`: encode queries in any modality and search a published index version."""

from __future__ import annotations

import dataclasses
import json
import os
import sys
from typing import Any, Iterator

import click
import numpy as np

from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import SinkError

QUERY_KEYS = ("text", "audio", "image", "video")
EXIT_ERROR = 1


class QueryError(Exception):
    """A query or the index it targets is unusable; the message says which."""


def resolve_index_root(uri: str, index_name: str = "main") -> str:
    """Accept either an index root (holding LATEST) or a workdir (holding indexes/NAME)."""
    if storage.exists(storage.join(uri, "LATEST")):
        return uri
    candidate = storage.join(uri, "indexes", index_name)
    if storage.exists(storage.join(candidate, "LATEST")):
        return candidate
    return uri


def load_query_encoder(version):
    """The encoder a version was built with, from the files published beside its shards."""
    from xmodal_index.encoders.config import EncoderConfig
    from xmodal_index.encoders.loading import load_encoder

    with open(version.file_path("encoder.json")) as f:
        conf = json.load(f)
    expected = conf.pop("model_id", version.manifest.model_id)
    if conf.get("checkpoint") == "model.safetensors":
        conf["checkpoint"] = version.file_path("model.safetensors")
    names = {f.name for f in dataclasses.fields(EncoderConfig)}
    encoder = load_encoder(EncoderConfig(**{k: v for k, v in conf.items() if k in names}))
    if encoder.model_id != expected:
        raise QueryError(f"encoder {encoder.model_id} does not match the index's model_id {expected}")
    return encoder


def decode_query_media(modality: str, path: str) -> Any:
    """Decode a query file into the payload its encoder takes (whole clip, one payload)."""
    from xmodal_index.pipeline.decode import DecodeConfig, decode_item
    from xmodal_index.pipeline.types import MediaItem

    if not os.path.exists(path):
        raise QueryError(f"--{modality} file {path!r} does not exist")
    st = os.stat(path)
    item = MediaItem(uri=os.path.abspath(path), kind=modality, size=st.st_size, mtime=st.st_mtime, etag="query")
    cfg = DecodeConfig(segment_s=3600.0, frame_rate_hz=2.0)
    parts = [s.payload for s in decode_item(item, cfg) if s.modality == modality]
    if not parts:
        raise QueryError(f"--{modality} file {path!r} has no {modality} stream")
    if modality == "audio":
        return np.concatenate(parts).astype(np.float32)
    if modality == "video":
        return np.concatenate(parts, axis=0)
    return parts[0]


def read_queries(path: str) -> Iterator[dict]:
    with open(path, encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                q = json.loads(line)
            except ValueError as err:
                raise QueryError(f"{path}:{n}: not a JSON object: {err}") from err
            keys = [k for k in QUERY_KEYS if k in q] if isinstance(q, dict) else []
            if len(keys) != 1:
                raise QueryError(f"{path}:{n}: needs exactly one of {', '.join(QUERY_KEYS)}, got {line.strip()[:80]}")
            search = q.get("modality")
            if search is not None:
                search = _parse_modalities(str(search), f"{path}:{n}: modality")
            yield {"id": q.get("id", n), "modality": keys[0], "value": q[keys[0]], "search": search}


def _parse_modalities(value: str, where: str) -> list[str]:
    mods = [m.strip() for m in value.split(",") if m.strip()]
    bad = [m for m in mods if m not in QUERY_KEYS]
    if bad or not mods:
        raise QueryError(f"{where} {value!r}: each must be one of {', '.join(QUERY_KEYS)}")
    return mods


def hit_json(h) -> dict:
    return {"uri": h.uri, "modality": h.modality, "start_s": h.start_s, "end_s": h.end_s,
            "score": round(float(h.score), 6), "segment_id": int(h.segment_id), "text": h.text}


@click.command(context_settings={"show_default": True})
@click.option("--index", "index_uri", required=True, help="Index root (WORKDIR/indexes/NAME) or a workdir (then indexes/main).")
@click.option("--version", default=None, help="Index version to load, e.g. v000003 (default: the one named by LATEST).")
@click.option("--text", default=None, help="Text query.")
@click.option("--audio", type=click.Path(dir_okay=False), default=None, help="Audio file query (any format PyAV decodes).")
@click.option("--image", type=click.Path(dir_okay=False), default=None, help="Image file query.")
@click.option("--video", type=click.Path(dir_okay=False), default=None, help="Video file query (frames sampled at 2 per second).")
@click.option("--queries", type=click.Path(dir_okay=False), default=None,
              help="JSONL file: one object per line with exactly one of text/audio/image/video (a string or file path), "
                   "an optional id and an optional modality (streams to search, like --modality).")
@click.option("-k", "k", type=click.IntRange(1, 10000), default=10, help="Hits per query.")
@click.option("--modality", default=None, help="Search only these streams, comma-separated from video,audio,image,text (default: all).")
@click.option("--json", "as_json", is_flag=True, help="One JSON object per query on stdout: {id, hits: [...]}.")
@click.option("--two-stage", is_flag=True,
              help="Hamming prefilter on the hash codes, then exact float re-rank (default: float ANN search).")
@click.option("--candidates", type=click.IntRange(1, 1_000_000), default=None,
              help="With --two-stage: Hamming candidates per shard to re-rank (default: max(k, the loader's default)).")
def query(index_uri, version, text, audio, image, video, queries, k, modality, as_json, two_stage, candidates):
    """Find the moments matching a query in every modality of a published index."""
    given = {m: v for m, v in (("text", text), ("audio", audio), ("image", image), ("video", video)) if v is not None}
    if len(given) + (queries is not None) != 1:
        raise click.UsageError("give exactly one of --text, --audio, --image, --video, --queries")
    modalities = None
    if modality:
        try:
            modalities = _parse_modalities(modality, "--modality")
        except QueryError as err:
            raise click.BadParameter(str(err), param_hint="--modality") from err
    try:
        from xmodal_index.sinks.serving.loader import IndexVersion

        version_obj = IndexVersion.open(resolve_index_root(index_uri), version=version)
        encoder = load_query_encoder(version_obj)
        if queries is not None:
            todo = list(read_queries(queries))
        else:
            (m, v), = given.items()
            todo = [{"id": 1, "modality": m, "value": v, "search": None}]
        for q in todo:
            payload = q["value"] if q["modality"] == "text" else decode_query_media(q["modality"], q["value"])
            encoded = encoder.encode(q["modality"], [payload])
            vec = np.ascontiguousarray(encoded.embeddings, dtype=np.float32)
            if two_stage:
                hits = version_obj.search(vec, k, modalities=q["search"] or modalities, mode="two_stage",
                                          codes=encoded.codes, candidates=candidates)[0]
            else:
                hits = version_obj.search(vec, k, modalities=q["search"] or modalities)[0]
            if as_json:
                click.echo(json.dumps({"id": q["id"], "hits": [hit_json(h) for h in hits]}))
            else:
                where = ",".join(q["search"] or modalities or ["all streams"])
                click.echo(f"query {q['id']} ({q['modality']}: {str(q['value'])[:60]}) in {where} of "
                           f"{version_obj.manifest.version}")
                for rank, h in enumerate(hits, 1):
                    extra = f"  \"{h.text}\"" if h.text else ""
                    click.echo(f"  {rank:>3}. {h.score:.3f}  {h.modality:<5} {h.start_s:7.2f}-{h.end_s:<7.2f} {h.uri}{extra}")
    except (QueryError, SinkError) as err:
        click.echo(f"xmodal-index query: error: {err}", err=True)
        sys.exit(EXIT_ERROR)
    except Exception as err:  # noqa: BLE001 - decoder / encoder errors end in one line
        click.echo(f"xmodal-index query: error: {type(err).__name__}: {err}", err=True)
        sys.exit(EXIT_ERROR)
