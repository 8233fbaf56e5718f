"""The bundled sample archive indexed once per test session, for the query tests (as `make demo` does)."""

from __future__ import annotations

import json
import pathlib

from click.testing import CliRunner

ROOT = pathlib.Path(__file__).resolve().parents[1]
SAMPLE_CONFIG = ROOT / "examples" / "sample.toml"


def sample_work(tmp_path_factory) -> tuple[pathlib.Path, pathlib.Path]:
    """(archive, workdir) of the default sample archive indexed with examples/sample.toml; built on
    first use in the session's base temp folder and reused by every test module after that."""
    from xmodal_index.jobs.cli import cli
    from xmodal_index.pipeline.sample_archive import build_sample_archive

    base = tmp_path_factory.getbasetemp() / "query-sample"
    archive, work = base / "sample-archive", base / "sample-work"
    if not (work / "indexes" / "main" / "LATEST").exists():
        build_sample_archive(str(archive), overwrite=True)
        result = CliRunner().invoke(cli, ["run", "--source", str(archive), "--workdir", str(work),
                                          "--config", str(SAMPLE_CONFIG)], catch_exceptions=False)
        assert result.exit_code == 0, result.output
    return archive, work


def ground_truth(archive: pathlib.Path) -> dict[tuple[str, str, float], int]:
    """(absolute uri, modality, start_s) -> digit, from the archive's ground_truth.jsonl."""
    out = {}
    for line in (archive / "ground_truth.jsonl").read_text().splitlines():
        row = json.loads(line)
        if "digit" in row:
            out[(str(archive / row["path"]), row["modality"], float(row["start_s"]))] = row["digit"]
    return out
