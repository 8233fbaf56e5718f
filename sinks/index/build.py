"""Sharded FAISS index versions built from embedding rows (SPEC 4.2, 4.4).

``build_version`` reads the rows in a few streaming passes (pyarrow RecordBatches,
never all vectors at once). Besides 10 bytes per row (segment id, modality) it
holds the training and recall samples and the shards of one group in memory:

1. scan: segment ids and modalities of every row (to dedupe and plan shards), and
   a seeded bottom-k sample per modality: held-out recall queries and training rows;
2. choose the float and binary index per modality under ``memory_budget_bytes``
   and the recall target (``index_choice``), and train one template of each on the
   sample: every shard of the modality clones it (trained once);
3. per group of shards (as many as the budget holds at once; one group when the
   chooser sized the version), one pass adding vectors with their segment ids to
   all shards of the group in parallel threads (faiss releases the GIL; a bounded
   chunk per shard is buffered), writing each shard's float16 vectors to disk and
   computing exact top-10 neighbours of the recall queries chunk by chunk; then
   tune nprobe / efSearch / nflip / rerank, measure recall@10 and write the files;
4. upload every file through ``storage``, then ``manifest.json``, then (when
   publishing) LATEST.

Shards: one float and one binary index per modality, split into contiguous
segment-id ranges when a modality holds more than ``max_shard_vectors`` rows. Each
shard's float16 vectors (``*.vectors.npy``, rows located through the id map's
``vector_row`` column) serve product-quantized re-ranking and two-stage search.
Index ids are segment ids; a segment id seen twice is indexed once (its first row).
The same rows in the same order give the same shard files (the seed fixes the samples).

Modules of the build: config (IndexBuildConfig, errors), scan (step 1), choice and
train (step 2), plan, shard and recall (step 3); this module runs the passes and
uploads (step 4).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import os
import resource
import shutil
import sys
import tempfile
import time
import types
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import numpy as np
import pyarrow as pa

from .. import storage
from ..embeddings_io import embedding_matrix, hash_matrix
from . import manifest as mf
from .choice import choose_factories
from .config import EmptyIndexError, IndexBuildConfig, IndexBuildError
from .plan import ShardPlan, group_shards, plan_shards
from .progress import Progress, ProgressFn
from .publish import publish_unfenced, reserve_version
from .recall import modality_exact, shares, version_metrics
from .scan import Scan, release_arrow_memory, scan_rows
from .shard import ShardBuilder, ShardResult, id_map_table
from .train import Templates, train_templates

logger = logging.getLogger(__name__)

ADD_CHUNK_ROWS = 16_384  # rows buffered per pass before they go to the shards' add threads
MIN_CHUNK_ROWS = 4_096
_RESERVED_NAMES = (mf.MANIFEST_NAME, mf.LATEST_NAME)
_NO_FILES: Mapping[str, str] = types.MappingProxyType({})
_NO_METRICS: Mapping[str, Any] = types.MappingProxyType({})


def _add_and_write(batches: Callable[[], Iterator[pa.RecordBatch]], scan: Scan, plans: list[ShardPlan],
                   shard_of: np.ndarray, templates: dict[str, Templates],
                   queries: dict[str, tuple[np.ndarray, np.ndarray]], out_dir: str, config: IndexBuildConfig,
                   progress: Progress) -> tuple[list[ShardResult], int]:
    """Fill and write every shard, one group per pass; returns the results and the pass count."""
    taken = np.zeros(len(scan.unique_ids), bool)  # dedupe: the first row of each segment_id wins
    results: list[ShardResult] = []
    added = 0
    cores = os.cpu_count() or 1
    groups = group_shards(plans, {m: t.choice for m, t in templates.items()}, config)
    extra_passes = 0
    for group in groups:
        in_group = np.zeros(len(plans), bool)
        in_group[group] = True
        workers = max(1, min(len(group), config.add_threads or cores))
        chunk_rows = max(MIN_CHUNK_ROWS, ADD_CHUNK_ROWS // len(group))
        omp_threads = max(1, cores // workers)
        with concurrent.futures.ThreadPoolExecutor(workers, thread_name_prefix="shard-add") as pool:
            builders = {i: ShardBuilder(plans[i], templates[plans[i].modality], queries[plans[i].modality],
                                         out_dir, chunk_rows, omp_threads, config.store_vectors, pool) for i in group}
            try:
                if any(b.ivf is not None for b in builders.values()):
                    assigning = [b for b in builders.values() if b.ivf is not None]
                    for builder in assigning:
                        builder.start_assigning()
                    _fill(batches, scan, shard_of, in_group, taken.copy(), builders, 0, progress, "assign",
                          only={id(b) for b in assigning})
                    _drain(builders.values())
                    for builder in assigning:
                        builder.reserve()
                    extra_passes += 1
                added = _fill(batches, scan, shard_of, in_group, taken, builders, added, progress)
                _drain(builders.values())
                wanted = _wanted_by_shard(plans, group, builders)
                futures = [pool.submit(builders[i].finish, config, wanted.get(i)) for i in group]
                for future in futures:
                    results.append(future.result())
                    progress("write", len(results), len(plans))
            except BaseException:
                for builder in builders.values():
                    builder.abort()
                raise
    return results, len(groups) + extra_passes


def _wanted_by_shard(plans: list[ShardPlan], group: list[int], builders: dict[int, ShardBuilder]
                     ) -> dict[int, list[np.ndarray]]:
    """For modalities whose shards all fill in this group: what each shard must find of
    the modality's exact top-10 (the merged search needs no more than that)."""
    out: dict[int, list[np.ndarray]] = {}
    for modality in {plans[i].modality for i in group}:
        members = [i for i in group if plans[i].modality == modality]
        if len(members) < 2 or len(members) != plans[members[0]].of or builders[members[0]].exact is None:
            continue
        merged = modality_exact([builders[i] for i in members])
        for i in members:
            out[i] = shares(merged, builders[i].exact_top()[1])
    return out


def _drain(builders: Iterable[ShardBuilder]) -> None:
    builders = list(builders)
    for builder in builders:
        builder.flush()
    for builder in builders:
        builder.wait()


def _fill(batches: Callable[[], Iterator[pa.RecordBatch]], scan: Scan, shard_of: np.ndarray, in_group: np.ndarray,
          taken: np.ndarray, builders: dict[int, ShardBuilder], added: int, progress: Progress,
          stage: str = "add", only: set[int] | None = None) -> int:
    """One pass over the rows: each row of a shard in this group goes to its builder
    (in the assignment pass only to the builders in ``only``, vectors alone)."""
    for batch in batches():
        if not batch.num_rows:
            continue
        ids = batch.column("segment_id").to_numpy()
        pos = np.minimum(np.searchsorted(scan.unique_ids, ids), len(scan.unique_ids) - 1)
        unseen = scan.unique_ids[pos] != ids
        if unseen.any():
            raise IndexBuildError(f"segment_id {int(ids[unseen][0])} was not in the scan pass: "
                                  "the input changed between passes")
        shard = shard_of[pos]
        rows = np.nonzero(in_group[shard] & ~taken[pos])[0]
        if not len(rows):
            continue
        _, first = np.unique(pos[rows], return_index=True)
        rows = rows[np.sort(first)]
        taken[pos[rows]] = True
        sub = batch if len(rows) == batch.num_rows else batch.take(pa.array(rows))
        x = embedding_matrix(sub.column("embedding"))
        sub_ids, sub_shard = ids[rows], shard[rows]
        assigning = stage == "assign"
        codes = None if assigning else hash_matrix(sub.column("hash_code"))
        id_map = None if assigning else id_map_table(sub)
        shards_here = np.unique(sub_shard)
        for s in shards_here:
            builder = builders[int(s)]
            if assigning and only is not None and id(builder) not in only:
                continue
            if len(shards_here) == 1:  # the usual case: the whole batch, no copies
                builder.add(sub_ids, x, codes, id_map)
                continue
            sel = np.nonzero(sub_shard == s)[0]
            builder.add(sub_ids[sel], x[sel], None if codes is None else codes[sel],
                        None if id_map is None else id_map.take(pa.array(sel)))
        added += len(rows)
        progress(stage, added, len(scan.unique_ids))
    release_arrow_memory()
    return added


def _check_extra_files(extra_files: Mapping[str, str]) -> None:
    for name, path in extra_files.items():
        if "/" in name or "\\" in name or name.startswith((".", "shard-")) or name in _RESERVED_NAMES or not name:
            raise ValueError(f"extra file name {name!r} must be a plain file name, not starting with "
                             f"'.' or 'shard-', and not one of {_RESERVED_NAMES}")
        if not os.path.isfile(path):
            raise IndexBuildError(f"extra file {name!r}: {path!r} is not a file")


def _peak_rss_bytes() -> int:
    """The process's peak resident memory so far (Linux reports KiB, macOS bytes)."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return int(peak if sys.platform == "darwin" else peak * 1024)


def build_version(
    batches: Callable[[], Iterator[pa.RecordBatch]],
    index_root: str,
    *,
    model_id: str,
    dim: int,
    bits: int,
    config: IndexBuildConfig,
    extra_files: Mapping[str, str] = _NO_FILES,
    metrics_extra: Mapping[str, Any] = _NO_METRICS,
    version: str | None = None,
    publish: bool = True,
    progress: ProgressFn | None = None,
) -> mf.Manifest:
    """Build, upload and (when ``publish``) point LATEST at a new index version.

    batches: called once per pass; each call yields RecordBatches of embedding rows
    (sinks.schema.embedding_schema). index_root: e.g. WORKDIR/indexes/NAME, any
    storage URI. extra_files: name in the version -> local path (e.g. the encoder
    checkpoint). progress(stage, done, total): stages scan, train, add, write, upload.
    version: the name to upload under (reserved with publish.reserve_version);
    by default the next number is reserved here. publish=False uploads the version
    without moving LATEST (then see sinks/index/publish.py, the one writer of LATEST).
    Raises EmptyIndexError on zero rows, IndexBuildError on inconsistent rows,
    IndexChoiceError when no index fits memory_budget_bytes; on any failure LATEST
    keeps naming the previous version.
    """
    if dim <= 0:
        raise ValueError(f"{dim = } must be > 0")
    if bits <= 0 or bits % 8:
        raise ValueError(f"{bits = } must be a positive multiple of 8")
    _check_extra_files(extra_files)
    report = Progress(progress)
    started = time.monotonic()
    scan = scan_rows(batches, dim, bits, model_id, config, report)
    scanned = time.monotonic()
    plans, shard_of = plan_shards(scan, config.max_shard_vectors)
    templates: dict[str, Templates] = {}
    queries: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    train_rows: dict[str, int] = {}
    for i, modality in enumerate(scan.modalities):
        sample = scan.samples.pop(modality)
        nq = min(config.recall_sample, sample.filled)
        sample.arrange(nq)
        largest = max(p.count for p in plans if p.modality == modality)
        templates[modality] = train_templates(modality, largest, sample, nq, dim, bits, config,
                                               len(scan.unique_ids), len(plans))
        queries[modality] = (sample.x[:nq].copy(), sample.codes[:nq].copy())  # copies: the sample is freed next
        train_rows[modality] = sample.filled - nq
        del sample  # the training rows are not needed while shards fill
        report("train", i + 1, len(scan.modalities))
    trained = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="xmodal-index-build-") as tmp:
        results, passes = _add_and_write(batches, scan, plans, shard_of, templates, queries, tmp, config, report)
        added = time.monotonic()
        local: dict[str, str] = {}
        shards: list[mf.ShardEntry] = []
        id_maps: list[mf.FileEntry] = []
        vectors: list[mf.FileEntry] = []
        for r in results:
            id_entry = mf.FileEntry.of_local(r.files["ids"], os.path.basename(r.files["ids"]))
            id_maps.append(id_entry)
            local[id_entry.file] = r.files["ids"]
            vectors_name = ""
            if "vectors" in r.files:
                vec_entry = mf.FileEntry.of_local(r.files["vectors"], os.path.basename(r.files["vectors"]))
                vectors.append(vec_entry)
                local[vec_entry.file] = r.files["vectors"]
                vectors_name = vec_entry.file
            for kind in ("float", "binary"):
                entry = mf.FileEntry.of_local(r.files[kind], os.path.basename(r.files[kind]))
                local[entry.file] = r.files[kind]
                shards.append(mf.ShardEntry(
                    file=entry.file, sha256=entry.sha256, bytes=entry.bytes, ntotal=r.ntotal,
                    modality=r.plan.modality, kind=kind, id_map=id_entry.file, factory=r.factories[kind],
                    search_params=r.search_params[kind], recall_at_10=r.recall[kind], vectors=vectors_name,
                ))
        files: list[mf.FileEntry] = []
        for name, path in sorted(extra_files.items()):
            copy = os.path.join(tmp, name)
            shutil.copyfile(path, copy)
            files.append(mf.FileEntry.of_local(copy, name))
            local[name] = copy
        biggest = max(scan.modalities, key=lambda m: sum(r.ntotal for r in results if r.plan.modality == m))
        search_params: dict[str, int] = {}
        for shard in shards:
            for name, value in shard.search_params.items():
                search_params[name] = max(search_params.get(name, 0), int(value))
        parent = mf.read_latest(index_root)
        version = version or reserve_version(index_root)
        index_bytes = sum(s.bytes for s in shards)
        manifest = mf.Manifest(
            version=version,
            created_at=mf.utc_now_iso(),
            parent_version=parent,
            model_id=model_id,
            dim=dim,
            bits=bits,
            metric=config.metric,
            index_factory={"float": templates[biggest].float_factory, "binary": templates[biggest].binary_factory},
            shards=tuple(shards),
            id_maps=tuple(id_maps),
            files=tuple(files),
            ntotal=len(scan.unique_ids),
            metrics=version_metrics(results, scan, queries, metrics_extra),
            search_params=search_params,
            build_config=dataclasses.asdict(config),
            vectors=tuple(vectors),
            index_choice={m: t.choice.to_dict() for m, t in templates.items()},
            build_stats={
                "scan_s": round(scanned - started, 3),
                "train_s": round(trained - scanned, 3),
                "add_s": round(added - trained, 3),
                "passes": 1 + passes,
                "train_rows": train_rows,
                "index_bytes": index_bytes,
                "vectors_bytes": sum(v.bytes for v in vectors),
                "process_peak_rss_bytes": _peak_rss_bytes(),
            },
        )
        names = sorted(local)
        for i, name in enumerate(names):
            storage.put_file(local[name], storage.join(index_root, version, name))
            report("upload", i + 1, len(names))
        manifest = dataclasses.replace(manifest, build_stats={**manifest.build_stats,
                                                              "wall_s": round(time.monotonic() - started, 3)})
        mf.write_manifest(index_root, manifest)
    if publish:
        publish_unfenced(index_root, version)
    logger.info("index version %s of %s: %d vectors in %d shards, %.1f s%s", version, index_root,
                manifest.ntotal, len(shards), time.monotonic() - started, "" if publish else " (not published)")
    return manifest


def publish_version(index_root: str, version: str) -> mf.Manifest:
    """Point LATEST at an uploaded version (one built with publish=False), without a gate."""
    publish_unfenced(index_root, version)
    return mf.read_manifest(index_root, version)


__all__ = [
    "EmptyIndexError",
    "IndexBuildConfig",
    "IndexBuildError",
    "ProgressFn",
    "build_version",
    "choose_factories",
    "publish_version",
]
