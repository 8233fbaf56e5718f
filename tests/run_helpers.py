"""Helpers for tests of whole `xmodal-index run` jobs: a tiny archive, the CLI in
process or in a subprocess, and what a published index version holds."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import faiss
import numpy as np
import pyarrow.parquet as pq
from click.testing import CliRunner

from tests.media_factory import make_png, make_video, make_vtt, make_wav
from xmodal_index.jobs.cli import cli
from xmodal_index.sinks import storage
from xmodal_index.sinks.index import manifest as mf

# untrained seeded encoder (no checkpoint file), decoding in the Beam worker itself: fast and deterministic
CONFIG_TOML = """
[decode]
segment_s = 1.0
frame_rate_hz = 2.0
[encoder]
checkpoint = ""
batch_size = 16
[run]
isolate_decoding = false
max_error_fraction = 0.5
"""


def write_config(directory: Path) -> Path:
    path = Path(directory) / "job.toml"
    path.write_text(CONFIG_TOML)
    return path


def make_archive(root: Path) -> list[str]:
    """8 items: a 2 s video with a caption sidecar, 3 images, 2 audio clips, 2 texts.
    Returns the archive's paths relative to ``root``."""
    root = Path(root)
    for sub in ("videos", "images", "audio", "texts"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    make_video(root / "videos" / "clip.mp4", duration_s=2.0, fps=4)
    make_vtt(root / "videos" / "clip.vtt", [(0.0, 1.0, "one"), (1.0, 2.0, "two")])
    for k in range(3):
        make_png(root / "images" / f"img{k}.png", color=(40 + 70 * k, 30, 60))
    for k in range(2):
        make_wav(root / "audio" / f"tone{k}.wav", freq_hz=300.0 + 200.0 * k)
    for k in range(2):
        (root / "texts" / f"note{k}.txt").write_text(f"note number {k}")
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def upload_tree(local_root: Path, uri: str) -> None:
    for path in sorted(Path(local_root).rglob("*")):
        if path.is_file():
            storage.put_file(str(path), storage.join(uri, str(path.relative_to(local_root))))


def invoke(*args: str):
    """The CLI in this process (click's CliRunner); returns the result."""
    return CliRunner().invoke(cli, [str(a) for a in args], catch_exceptions=False)


def run_args(source, workdir, config, *extra: str) -> list[str]:
    return ["run", "--source", str(source), "--workdir", str(workdir), "--config", str(config), *extra]


def invoke_subprocess(args: list[str], env: dict[str, str] | None = None,
                      timeout_s: float = 120) -> subprocess.CompletedProcess:
    """The CLI in a child process (``python -m xmodal_index``), e.g. to kill it midway."""
    return subprocess.run([sys.executable, "-m", "xmodal_index", *map(str, args)], env={**os.environ, **(env or {})},
                          capture_output=True, text=True, timeout=timeout_s)


def summaries(workdir: str) -> list[dict]:
    """summary.json of every finished run, oldest first (run ids sort by start time)."""
    out = []
    for obj in storage.list_objects(storage.join(workdir, "runs"), include=("*/summary.json",)):
        out.append(json.loads(storage.read_bytes(obj.uri)))
    return sorted(out, key=lambda s: s["run_id"])


def index_contents(index_root: str, version: str | None = None) -> dict[int, tuple]:
    """segment_id -> (uri, etag, modality, start_s, end_s, float vector) of a version
    (LATEST by default), read from its id maps and float shards (files of older versions
    where an entry names its origin; tombstoned rows left out)."""
    version = version or mf.read_latest(index_root)
    manifest = mf.read_manifest(index_root, version)
    dead: set[int] = set()
    if manifest.tombstones is not None:
        with storage.local_path(mf.entry_uri(index_root, manifest, manifest.tombstones)) as path:
            dead = set(np.load(path).tolist())
    maps = {e.file: e for e in manifest.id_maps}
    rows: dict[int, tuple] = {}
    for shard in manifest.shards:
        if shard.kind != "float":
            continue
        with storage.local_path(mf.entry_uri(index_root, manifest, maps[shard.id_map])) as path:
            ids = pq.read_table(path).to_pylist()
        with storage.local_path(mf.entry_uri(index_root, manifest, shard)) as path:
            index = faiss.read_index(path)
        id_map = faiss.downcast_index(index)
        ids_in_index = faiss.vector_to_array(id_map.id_map)
        vectors = faiss.downcast_index(id_map.index).reconstruct_n(0, index.ntotal)
        by_id = {r["segment_id"]: r for r in ids}
        for sid, vec in zip(ids_in_index.tolist(), vectors):
            if sid in dead:
                continue
            r = by_id[sid]
            rows[sid] = (r["uri"], r["etag"], r["modality"], r["start_s"], r["end_s"], np.asarray(vec))
    return rows


def assert_same_index(got: dict[int, tuple], want: dict[int, tuple]) -> None:
    assert sorted(got) == sorted(want)
    for sid, row in want.items():
        assert got[sid][:5] == row[:5], sid
        np.testing.assert_allclose(got[sid][5], row[5], rtol=1e-5, atol=1e-6)
