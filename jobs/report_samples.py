"""Sample hits for the run report: fixed probe queries against the run's index version.

The probes are the first few distinct text rows of the version (captions, notes,
in segment_id order: the same probes for the same version), each searched in each
of the version's other modalities (the best hits of each). Each hit carries a
small JPEG thumbnail (the video frame in the middle of the hit's segment, or the
image) and, for audio hits, a WAV excerpt, both as data URIs. Embedding the
probes needs the version's encoder (torch): when it cannot load, the report says
why and shows no samples. A hit whose media cannot be read (or, on S3, is over
MAX_FETCH_BYTES) shows no preview; nothing here fails the report.
"""

from __future__ import annotations

import base64
import dataclasses
import io
import logging
import wave
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from xmodal_index.sinks import storage
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.workdir import Workdir

logger = logging.getLogger(__name__)

PROBES = 3
HITS_PER_PROBE = 2  # per searched modality
THUMB_PX = 160
AUDIO_EXCERPT_S = 4.0
AUDIO_RATE_HZ = 16000
MAX_FETCH_BYTES = 256 << 20  # objects on S3 are fetched whole for a preview: larger ones get none
MAX_SEEK_FRAMES = 600  # frames decoded after a seek while looking for the hit's time


@dataclasses.dataclass
class SampleHit:
    uri: str
    modality: str
    start_s: float
    end_s: float
    score: float
    text: str | None
    thumbnail: str | None = None  # data:image/jpeg;base64,...
    audio: str | None = None  # data:audio/wav;base64,...


@dataclasses.dataclass
class ProbeResult:
    query: str
    searched: tuple[str, ...]
    hits: list[SampleHit]


def probe_texts(index_root: str, manifest: mf.Manifest, n: int = PROBES) -> list[str]:
    """The first ``n`` distinct non-empty texts of the version's text rows, by segment_id."""
    rows: list[tuple[int, str]] = []
    for shard in manifest.shards:
        if shard.modality != "text" or shard.kind != "float":
            continue
        with storage.open_read(storage.join(index_root, manifest.version, shard.id_map)) as f:
            table = pq.read_table(f, columns=["segment_id", "text"])
        rows += [
            (sid, t)
            for sid, t in zip(table.column("segment_id").to_pylist(), table.column("text").to_pylist())
            if t and t.strip()
        ]
    out: list[str] = []
    for _, text in sorted(rows):
        text = " ".join(text.split())[:200]
        if text not in out:
            out.append(text)
        if len(out) == n:
            break
    return out


def run_probes(index_root: str, version: str, n: int = PROBES, k: int = HITS_PER_PROBE) -> list[ProbeResult]:
    """Embed the probes with the version's encoder and search the version (needs torch)."""
    from xmodal_index.query.encoder import load_query_encoder
    from xmodal_index.sinks.serving.loader import IndexVersion

    with IndexVersion.open(index_root, version=version) as index:
        texts = probe_texts(index_root, index.manifest, n)
        if not texts:
            return []
        encoder = load_query_encoder(index)
        others = tuple(m for m in index.manifest.modalities if m != "text") or ("text",)
        vecs = np.ascontiguousarray(encoder.encode("text", texts).embeddings, dtype=np.float32)
        found = [index.search(vecs, k, modalities=[m]) for m in others]  # the best of each modality
    return [
        ProbeResult(
            text,
            others,
            [
                SampleHit(h.uri, h.modality, float(h.start_s), float(h.end_s), float(h.score), h.text)
                for per_modality in found
                for h in per_modality[q]
            ],
        )
        for q, text in enumerate(texts)
    ]


def add_media(result: ProbeResult) -> None:
    """Thumbnails and audio excerpts for the hits of one probe (best effort, per hit)."""
    for hit in result.hits:
        if hit.modality not in ("video", "image", "audio"):
            continue
        try:
            if storage.is_s3(hit.uri) and storage.stat(hit.uri).size > MAX_FETCH_BYTES:
                logger.info("report: no preview of %r: over %d bytes to fetch", hit.uri, MAX_FETCH_BYTES)
                continue
            with storage.local_path(hit.uri) as path:
                if hit.modality == "image":
                    hit.thumbnail = _jpeg(_open_image(path))
                elif hit.modality == "video":
                    hit.thumbnail = _jpeg(video_frame(path, hit.start_s + 0.5 * max(hit.end_s - hit.start_s, 0.0)))
                else:
                    hit.audio = _wav(audio_excerpt(path, hit.start_s, min(hit.end_s, hit.start_s + AUDIO_EXCERPT_S)))
                    if _has_video(path):
                        hit.thumbnail = _jpeg(video_frame(path, hit.start_s))
        except Exception as err:  # noqa: BLE001 - one unreadable hit costs its thumbnail only
            logger.warning("report: no preview of %r at %.2f s: %s", hit.uri, hit.start_s, err)


def _open_image(path: str):
    from PIL import Image

    with Image.open(path) as img:
        img.draft("RGB", (THUMB_PX * 2, THUMB_PX * 2))
        return img.convert("RGB")


def _jpeg(image) -> str:
    image = image.copy()
    image.thumbnail((THUMB_PX, THUMB_PX))
    buf = io.BytesIO()
    image.save(buf, format="JPEG", quality=80)
    return "data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def _has_video(path: str) -> bool:
    import av

    with av.open(path) as container:
        return any(not (s.disposition & av.stream.Disposition.attached_pic) for s in container.streams.video)


def video_frame(path: str, at_s: float):
    """The first frame at or after ``at_s`` (the last one before it at the end of the stream), as a PIL image."""
    import av

    with av.open(path) as container:
        stream = container.streams.video[0]
        if stream.time_base:
            container.seek(max(int(at_s / stream.time_base), 0), stream=stream, backward=True, any_frame=False)
        last = None
        for n, frame in enumerate(container.decode(stream)):
            last = frame
            if frame.time is None or frame.time + 1e-3 >= at_s or n >= MAX_SEEK_FRAMES:
                break
        if last is None:
            raise ValueError("no video frame decoded")
        return last.to_image()


def audio_excerpt(path: str, start_s: float, end_s: float) -> np.ndarray:
    """Mono int16 samples at AUDIO_RATE_HZ of [start_s, end_s) of the first audio stream."""
    import av

    with av.open(path) as container:
        stream = container.streams.audio[0]
        resampler = av.AudioResampler(format="s16", layout="mono", rate=AUDIO_RATE_HZ)
        if start_s > 0 and stream.time_base:
            container.seek(int(start_s / stream.time_base), stream=stream, backward=True)
        chunks: list[np.ndarray] = []
        first_t: float | None = None
        for frame in container.decode(stream):
            if first_t is None:
                first_t = frame.time if frame.time is not None else 0.0
            for out in resampler.resample(frame):
                chunks.append(out.to_ndarray().reshape(-1))
            if frame.time is not None and frame.time >= end_s:
                break
    samples = np.concatenate(chunks) if chunks else np.zeros(0, np.int16)
    offset = max(round((start_s - (first_t or 0.0)) * AUDIO_RATE_HZ), 0)
    return samples[offset : offset + max(round((end_s - start_s) * AUDIO_RATE_HZ), 1)]


def _wav(samples: np.ndarray) -> str:
    if samples.size == 0:
        raise ValueError("no audio samples in the hit's time range")
    buf = io.BytesIO()
    with wave.open(buf, "wb") as w:
        w.setnchannels(1)
        w.setsampwidth(2)
        w.setframerate(AUDIO_RATE_HZ)
        w.writeframes(samples.astype("<i2").tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


def add_samples(data: Any, n: int = PROBES, k: int = HITS_PER_PROBE) -> None:
    """Fill ``data.samples`` (report.ReportData) with probe results for the run's version,
    or say in ``data.samples_note`` why there are none."""
    if data.version is None:
        data.samples_note = "no index version: no sample queries"
        return
    index_root = Workdir(data.workdir).index_root(data.summary.get("index_name", "main"))
    try:
        results = run_probes(index_root, data.version.version, n, k)
    except Exception as err:  # noqa: BLE001 - the encoder (torch) or the index may be unavailable here
        data.samples_note = f"sample queries skipped: {type(err).__name__}: {' '.join(str(err).split())[:300]}"
        logger.warning("report: %s", data.samples_note)
        return
    if not results:
        data.samples_note = f"{data.version.version} has no text rows to use as probe queries"
    for result in results:
        add_media(result)
    data.samples = results
