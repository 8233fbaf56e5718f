"""The query path's fixed costs: `xmodal-index --help` and one CLI text query, before/after.

    python bench/query_speed.py --workdir sample-work --repeat 5

"before" runs the same code the way it ran before lazy commands and verification
records: every command module imported up front (as the CLI's old registration
did: Beam, torch, faiss, PyAV, decord) and every file of the version re-hashed
(records off). "after" is the CLI as shipped: commands load on first use, and an
unchanged, already verified file is not hashed again (sinks/serving/verified.py).
Each variant runs ``--repeat`` times in fresh processes, interleaved; the table
gives the median wall time and peak RSS, and after/before ratios.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
EAGER = ("xmodal_index.jobs.run_cmd", "xmodal_index.jobs.query_cmd", "xmodal_index.jobs.sample_cmd",
         "xmodal_index.jobs.train_cmd", "xmodal_index.jobs.eval_cmd", "xmodal_index.jobs.versions_cmd",
         "xmodal_index.jobs.deadletter_cmd", "xmodal_index.jobs.serve_cmd", "xmodal_index.jobs.report_cmd")
EAGER_MAIN = ("import importlib, sys\n"
              f"for m in {EAGER!r}:\n"
              "    importlib.import_module(m)\n"
              "from xmodal_index.jobs.cli import main\n"
              "sys.argv[0] = 'xmodal-index'\n"
              "main()\n")


def run_once(argv: list[str], env: dict) -> tuple[float, int]:
    """Wall seconds and peak RSS (bytes) of one child process."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"{' '.join(argv)} failed: {proc.stderr.read().decode()[-500:]}")
    return wall, usage.ru_maxrss * 1024


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--workdir", required=True, help="an indexed workdir (e.g. make demo's sample-work)")
    parser.add_argument("--text", default="seven")
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--out", default=str(ROOT / "bench" / "query_speed.json"))
    args = parser.parse_args()
    py = sys.executable
    records = tempfile.mkdtemp(prefix="xmodal-verified-")
    base_env = {**os.environ, "XMODAL_INDEX_VERIFIED": records}
    before_env = {**os.environ, "XMODAL_INDEX_VERIFIED": "off"}
    query = ["query", "--index", args.workdir, "--text", args.text, "-k", "5"]
    variants = {
        "help before": ([py, "-c", EAGER_MAIN, "--help"], before_env),
        "help after": ([py, "-m", "xmodal_index", "--help"], base_env),
        "text query before": ([py, "-c", EAGER_MAIN, *query], before_env),
        "text query after": ([py, "-m", "xmodal_index", *query], base_env),
    }
    run_once(*variants["text query after"])  # warm: writes the verification records once
    samples: dict[str, list[tuple[float, int]]] = {name: [] for name in variants}
    for _ in range(args.repeat):
        for name, (argv, env) in variants.items():
            samples[name].append(run_once(argv, env))
    rows = {name: {"median_wall_s": round(statistics.median(w for w, _ in s), 3),
                   "median_peak_rss_mb": round(statistics.median(r for _, r in s) / 2**20, 1),
                   "wall_s": [round(w, 3) for w, _ in s]} for name, s in samples.items()}
    for what in ("help", "text query"):
        b, a = rows[f"{what} before"], rows[f"{what} after"]
        rows[f"{what} after/before"] = {"wall": round(a["median_wall_s"] / b["median_wall_s"], 3),
                                        "rss": round(a["median_peak_rss_mb"] / b["median_peak_rss_mb"], 3)}
    report = {"command": "python bench/query_speed.py " + " ".join(sys.argv[1:]),
              "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                          "load_avg_1m_at_end": round(os.getloadavg()[0], 2)},
              "results": rows}
    Path(args.out).write_text(json.dumps(report, indent=2) + "\n")
    print(f"{'variant':<22}{'median wall s':>15}{'peak RSS MB':>13}")
    for name, row in rows.items():
        if "wall" in row:
            print(f"{name:<22}{row['wall']:>14.3f}x{row['rss']:>12.3f}x")
        else:
            print(f"{name:<22}{row['median_wall_s']:>15.3f}{row['median_peak_rss_mb']:>13.1f}")
    print(f"load average at the end: {report['machine']['load_avg_1m_at_end']}; written {args.out}")


if __name__ == "__main__":
    main()
