"""Two-stage search (Hamming prefilter + exact re-rank) with learned hash codes, on the
held-out protocol of `xmodal-index eval`, through the product's own index build and loader.

    python bench/two_stage_learned.py                      # all speaker folds, 64-bit codes
    python bench/two_stage_learned.py --folds george --epochs 8   # one quick fold

Per fold, the built-in encoder is trained on the other speakers and the train split of the
images (exactly as `xmodal-index eval` does), the fold's out-of-sample database (held-out
speaker's clips and the test images) is written as embedding rows and indexed with
`build_version` (exact float shards, so "float" is the exact cosine ranking), and each
query is answered by `IndexVersion.search`:

- float: the full float ranking of the database;
- two-stage C: the shard's Hamming top-C for the query's learned code, re-ranked exactly
  with the stored float16 vectors, followed by the rest of the database in Hamming order
  (the full ranking a two-stage system produces).

mAP over the full ranking (relevant = same digit), per direction, mean over folds; the
per-query latency of each mode and the bytes per vector each mode keeps resident are
recorded beside it. Results: bench/two_stage_learned.json and the table in bench/RESULTS.md.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DIRECTIONS = (("audio", "image"), ("image", "audio"), ("text", "audio"), ("text", "image"))


def _ranking_map(order_ids: list[np.ndarray], q_labels: np.ndarray, label_of: dict[int, int]) -> float:
    from xmodal_index.encoders.evaluation import average_precision

    aps = [average_precision(np.array([label_of[int(i)] == q for i in ids])) for ids, q in zip(order_ids, q_labels)]
    return float(np.mean(aps))


def _full_order(first: list[int], hamming_order: list[int]) -> np.ndarray:
    seen = set(first)
    return np.array(first + [i for i in hamming_order if i not in seen], dtype=np.int64)


def run_fold(speaker: str, audio, images, args) -> dict:
    from xmodal_index.encoders.builtin import BuiltinEncoder
    from xmodal_index.encoders.evaluation import fold_sets
    from xmodal_index.encoders.training import TrainConfig, train_model
    from xmodal_index.sinks.embeddings_io import rows_batch
    from xmodal_index.sinks.index.build import IndexBuildConfig, build_version
    from xmodal_index.sinks.serving.loader import IndexVersion

    train, sets = fold_sets(audio, images, speaker, 0.5, 0)
    t0 = time.perf_counter()
    result = train_model(train, TrainConfig(objective="contrastive", epochs=args.epochs, seed=0, device="cpu"))
    encoder = BuiltinEncoder(result.net, f"contrastive-fold-{speaker}@in-memory", bits=args.bits, device="cpu")
    train_s = time.perf_counter() - t0
    emb = {m: encoder.embed(m, list(s.payloads)) for m, s in sets.items()}
    codes = {m: encoder.codes(emb[m], args.bits) for m in sets}
    # one version holding every modality of the fold's database, ids = position + modality offset
    offsets, label_of, batches = {}, {}, []
    base = 0
    for m, s in sets.items():
        offsets[m] = base
        n = len(s.labels)
        ids = np.arange(base, base + n, dtype=np.int64)
        label_of.update({int(i): int(lab) for i, lab in zip(ids, s.labels)})
        batches.append(rows_batch(ids, [f"{m}/{i}" for i in range(n)], ["e"] * n, [m] * n, np.zeros(n), np.zeros(n),
                                  emb[m], codes[m], model_id=encoder.model_id, run_id="bench"))
        base += n
    fold: dict = {"train_s": round(train_s, 1), "directions": {}}
    with tempfile.TemporaryDirectory() as tmp:
        root = os.path.join(tmp, "index")
        config = IndexBuildConfig(float_factory="Flat", binary_factory="BFlat", recall_sample=0, store_vectors=True)
        manifest = build_version(lambda: iter(batches), root, model_id=encoder.model_id, dim=emb["audio"].shape[1],
                                 bits=args.bits, config=config, publish=False)
        version = IndexVersion.open(root, manifest.version)
        for q, d in DIRECTIONS:
            n_db = len(sets[d].labels)
            qe, qc, ql = emb[q], codes[q], np.asarray(sets[q].labels)
            row: dict = {"database": n_db, "queries": len(ql)}
            t = time.perf_counter()
            version.search(qe, 10, [d])
            row["float_top10_ms"] = 1000 * (time.perf_counter() - t) / len(ql)
            exact = version.search(qe, n_db, [d])
            row["float"] = _ranking_map([np.array([h.segment_id for h in hs]) for hs in exact], ql, label_of)
            hamming = version.search_codes(qc, n_db, [d])
            row["hamming"] = _ranking_map([np.array([h.segment_id for h in hs]) for hs in hamming], ql, label_of)
            for c in args.candidates:
                t = time.perf_counter()
                version.search(qe, 10, [d], mode="two_stage", codes=qc, candidates=c)
                row[f"two_stage_{c}_top10_ms"] = 1000 * (time.perf_counter() - t) / len(ql)
                two = version.search(qe, min(c, n_db), [d], mode="two_stage", codes=qc, candidates=c)
                orders = [_full_order([h.segment_id for h in hs], [h.segment_id for h in hm])
                          for hs, hm in zip(two, hamming)]
                row[f"two_stage_{c}"] = _ranking_map(orders, ql, label_of)
            fold["directions"][f"{q}->{d}"] = row
            print(f"fold {speaker} {q}->{d}: "
                  + " ".join(f"{k}={v:.3f}" for k, v in row.items() if isinstance(v, float) and not k.endswith("_ms")),
                  flush=True)
    return fold


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"), help="folder with fsdd/ and digits/")
    parser.add_argument("--folds", default="all", help="held-out speakers, comma-separated, or 'all'")
    parser.add_argument("--epochs", type=int, default=16, help="training epochs per fold (eval's default: 16)")
    parser.add_argument("--bits", type=int, default=64, help="hash code length")
    parser.add_argument("--candidates", default="25,100,1000,10000", help="Hamming candidates per shard")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(ROOT / "bench" / "two_stage_learned.json"))
    args = parser.parse_args(argv)
    args.candidates = [int(c) for c in args.candidates.split(",")]

    import torch

    from xmodal_index.encoders.evaluation import speaker_folds
    from xmodal_index.encoders.tri_modal import load_digit_images, load_fsdd

    torch.set_num_threads(args.threads)
    audio = load_fsdd(Path(args.data) / "fsdd")
    images = load_digit_images(Path(args.data) / "digits" / "digits.csv.gz")
    speakers = speaker_folds(audio.speakers) if args.folds == "all" else args.folds.split(",")
    started = time.perf_counter()
    folds = {s: run_fold(s, audio, images, args) for s in speakers}
    keys = [k for k in next(iter(folds.values()))["directions"]["audio->image"] if k not in ("database", "queries")]
    mean = {d: {k: float(np.mean([f["directions"][d][k] for f in folds.values()])) for k in keys}
            for d in next(iter(folds.values()))["directions"]}
    report = {
        "protocol": "eval's held-out protocol (leave-one-speaker-out, 50% seeded image split, out-of-sample "
                    "database); mAP over the full ranking; two-stage ranking = re-ranked Hamming top-C, then "
                    "the rest in Hamming order; contrastive built-in encoder trained per fold.",
        "bits": args.bits,
        "resident_bytes_per_vector": {"float": 4 * 256, "two_stage": args.bits // 8,
                                      "two_stage_stored_float16_on_disk": 2 * 256},
        "mean": mean,
        "folds": folds,
        "command": " ".join([sys.executable.rsplit("/", 1)[-1], *sys.argv]),
        "machine": {"platform": platform.platform(), "processor": platform.processor(), "cpus": os.cpu_count()},
        "wall_s": round(time.perf_counter() - started, 1),
    }
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for d, row in mean.items():
        print(d, " ".join(f"{k}={v:.3f}" for k, v in row.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
