"""Merged multi-modality rankings: mAP with and without calibration (bench/QUERY_RESULTS.md).

    python bench/query_fusion.py --folds 1 --epochs 6 --out bench/query_fusion.json

Held-out protocol of `xmodal-index eval` (encoders/evaluation.py): per fold, the
encoder is trained without the held-out speaker; queries and database are that
speaker's clips, the held-out digit images and the digit words. For each query
modality the database is the union of the two other modalities, and one merged
ranking of it is scored (relevant = same digit, mAP over the full ranking):

- score:  merge by raw cosine (no calibration: the modalities' score ranges differ);
- rrf:    reciprocal-rank fusion of the per-modality rankings (xmodal_index.query.fusion);
- calibrated: scores standardised per (query modality, target modality) pair by that pair's
          score mean/std over a seeded sample of each modality's vectors (here the fold's
          test embeddings, as a version's stored vectors);
- zscore: each modality's scores standardised per query by its top-50 (same module).

The same merge runs through the query core on the bundled sample archive too
(`--sample`): every video/audio/image/text row with a ground-truth digit, queried
with each modality against all other modalities, via ``xmodal_index.open``.
Data paths default to ../shared/data beside the checkout.
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
METHODS = ("score", "calibrated", "rrf", "zscore")


def merged_map(q_emb: dict, db: dict, q_labels: np.ndarray, method: str, stats=None) -> tuple[float, float]:
    """(mAP, mixed@5) of one merged ranking over the database modalities ``db`` = {modality: (emb, labels)};
    mixed@5 = share of queries whose top 5 holds every database modality."""
    from xmodal_index.encoders.evaluation import average_precision
    from xmodal_index.query.fusion import fused_scores

    aps, mixed = [], []
    for i in range(len(q_labels)):
        per_mod, labels = {}, {}
        for m, (emb, lab) in db.items():
            scores = emb @ q_emb[i]
            order = np.argsort(-scores, kind="stable")
            per_mod[m] = scores[order].tolist()
            labels[m] = np.asarray(lab)[order]
        fused = fused_scores(per_mod, method, stats)
        f = np.concatenate([np.asarray(fused[m]) for m in db])
        raw = np.concatenate([np.asarray(per_mod[m]) for m in db])
        lab = np.concatenate([labels[m] for m in db])
        mods = np.concatenate([[m] * len(per_mod[m]) for m in db])
        order = np.lexsort((-raw, -f))  # fused score, then raw score (the core's tie rule)
        ap = average_precision(lab[order] == q_labels[i])
        if not np.isnan(ap):
            aps.append(ap)
        mixed.append(len(set(mods[order[:5]])) == len(db))
    return float(np.mean(aps)), float(np.mean(mixed))


def held_out(args: argparse.Namespace) -> dict:
    import torch

    from xmodal_index.encoders.builtin import BuiltinEncoder
    from xmodal_index.encoders.evaluation import fold_sets, speaker_folds
    from xmodal_index.encoders.training import TrainConfig, train_model
    from xmodal_index.encoders.tri_modal import load_digit_images, load_fsdd
    from xmodal_index.query.fusion import pair_statistics, sample_rows

    torch.set_num_threads(args.threads)
    data = Path(args.data)
    audio = load_fsdd(str(data / "fsdd"))
    images = load_digit_images(str(data / "digits" / "digits.csv.gz"))
    speakers = speaker_folds(audio.speakers)[: args.folds]
    per_fold, mixed_per_fold = {}, {}
    for speaker in speakers:
        train, sets = fold_sets(audio, images, speaker, 0.5, 0)
        t0 = time.perf_counter()
        result = train_model(train, TrainConfig(objective="contrastive", epochs=args.epochs, seed=0))
        encoder = BuiltinEncoder(result.net, f"contrastive-fold-{speaker}@in-memory", bits=64)
        print(f"fold {speaker}: trained in {time.perf_counter() - t0:.0f} s", file=sys.stderr)
        emb = {m: encoder.embed(m, list(s.payloads)) for m, s in sets.items()}
        stats = pair_statistics({m: sample_rows(e) for m, e in emb.items()})
        rows, mixed = {}, {}
        for q in sets:
            db = {m: (emb[m], sets[m].labels) for m in sets if m != q}
            rows[f"{q}->{'+'.join(db)}"] = {meth: merged_map(emb[q], db, sets[q].labels, meth, stats[q])[0]
                                            for meth in METHODS}
            mixed[f"{q}->{'+'.join(db)}"] = {meth: merged_map(emb[q], db, sets[q].labels, meth, stats[q])[1]
                                             for meth in METHODS}
        per_fold[speaker] = rows
        mixed_per_fold[speaker] = mixed
    mean = {d: {m: float(np.mean([per_fold[s][d][m] for s in per_fold])) for m in METHODS}
            for d in next(iter(per_fold.values()))}
    mixed5 = {d: {m: float(np.mean([mixed_per_fold[s][d][m] for s in per_fold])) for m in METHODS}
              for d in next(iter(per_fold.values()))}
    return {"folds": speakers, "epochs": args.epochs, "mean": mean, "mixed_at_5": mixed5, "per_fold": per_fold}


def sample_archive() -> dict:
    """The same merge through the query core on a freshly built, indexed sample archive."""
    from click.testing import CliRunner

    import xmodal_index
    from xmodal_index.encoders.evaluation import average_precision
    from xmodal_index.jobs.cli import cli
    from xmodal_index.pipeline.sample_archive import build_sample_archive

    with tempfile.TemporaryDirectory() as tmp:
        archive, work = Path(tmp) / "sa", Path(tmp) / "sw"
        build_sample_archive(str(archive))
        res = CliRunner().invoke(cli, ["run", "--source", str(archive), "--workdir", str(work), "--config",
                                       str(ROOT / "examples" / "sample.toml")], catch_exceptions=False)
        assert res.exit_code == 0, res.output
        truth = {}
        for line in (archive / "ground_truth.jsonl").read_text().splitlines():
            row = json.loads(line)
            if row.get("digit") is not None:
                truth[(str(archive / row["path"]), row["modality"], float(row["start_s"]))] = row["digit"]
        with xmodal_index.open(str(work)) as index:
            rows = index.to_arrow().to_pylist()
            vecs = {}
            from xmodal_index.query.request import Query
            out: dict = {}
            mixed_all: dict = {}
            for q in ("video", "audio", "image", "text"):
                targets = [m for m in index.modalities if m != q]
                n_db = sum(1 for r in rows if r["modality"] in targets)
                queries = [r for r in rows if r["modality"] == q and (r["uri"], q, r["start_s"]) in truth]
                out_q, mixed_q = {}, {}
                for meth in METHODS:
                    aps, mixed = [], []
                    for r in queries:
                        key = (r["uri"], q, r["start_s"])
                        if key not in vecs:
                            payload = r["text"] if q == "text" else None
                            if q == "text":
                                query = Query("text", payload)
                            elif q in ("audio", "video"):
                                query = Query(q, r["uri"], r["start_s"], r["end_s"])
                            else:
                                query = Query(q, r["uri"])
                            vecs[key] = index.embed(query)[0][0].tolist()
                        hits = index.search(embedding=vecs[key], k=n_db, modalities=targets, fusion=meth)
                        rel = np.array([truth.get((h.uri, h.modality, h.start_s)) == truth[key] for h in hits])
                        ap = average_precision(rel)
                        if not np.isnan(ap):
                            aps.append(ap)
                        mixed.append(len({h.modality for h in hits[:5]}) == len(targets))
                    out_q[meth] = float(np.mean(aps))
                    mixed_q[meth] = float(np.mean(mixed))
                out[f"{q}->{'+'.join(targets)}"] = out_q
                mixed_all[f"{q}->{'+'.join(targets)}"] = mixed_q
    return {"mean": out, "mixed_at_5": mixed_all}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--data", default=str(ROOT.parent / "shared" / "data"))
    parser.add_argument("--folds", type=int, default=1, help="held-out speakers (first N in sorted order)")
    parser.add_argument("--epochs", type=int, default=6, help="training epochs per fold (eval --quick uses 6)")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-held-out", action="store_true")
    parser.add_argument("--out", default=str(ROOT / "bench" / "query_fusion.json"))
    args = parser.parse_args()
    started = time.perf_counter()
    report = {"command": "python bench/query_fusion.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count()}}
    report["sample_archive"] = sample_archive()
    if not args.skip_held_out:
        report["held_out"] = held_out(args)
    report["wall_s"] = round(time.perf_counter() - started, 1)
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for part in ("held_out", "sample_archive"):
        for key, title in (("mean", "merged-ranking mAP"), ("mixed_at_5", "share of queries whose top 5 holds "
                                                                          "every searched modality")):
            table = report.get(part, {}).get(key)
            if not table:
                continue
            print(f"\n{part}: {title}")
            print(f"{'direction':<28}" + "".join(f"{m:>11}" for m in METHODS))
            for d, row in table.items():
                print(f"{d:<28}" + "".join(f"{row[m]:>11.3f}" for m in METHODS))
    print(f"\nwritten {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
