"""A run over an archive with corrupt mp4s prints no native decoder line on the
console; the cut file's dead letter says what the decoder said."""

from __future__ import annotations

import re

import pyarrow.parquet as pq

from tests import media_factory as mf
from tests.run_helpers import invoke_subprocess, make_archive

# isolated decoding (the default), small and quick otherwise
CONFIG = """
[decode]
segment_s = 1.0
frame_rate_hz = 2.0
[encoder]
checkpoint = ""
batch_size = 16
[run]
max_error_fraction = 0.5
"""

DECODER_LINE = re.compile(r"@ 0x[0-9a-f]+\]|threaded_decoder\.cc|partial file|Invalid NAL|\[(h264|aac|mov,mp4)")


def test_decoder_messages_stay_off_the_console_and_name_the_item(tmp_path):
    src = tmp_path / "src"
    make_archive(src)
    whole = mf.make_video(tmp_path / "whole.mp4", duration_s=6.0, faststart=True).read_bytes()
    (src / "videos" / "cut.mp4").write_bytes(whole[: len(whole) // 2])
    damaged = bytearray(mf.make_video(tmp_path / "damaged.mp4", duration_s=4.0).read_bytes())
    damaged[len(damaged) // 2: len(damaged) // 2 + 512] = bytes(512)
    (src / "videos" / "damaged.mp4").write_bytes(bytes(damaged))
    (tmp_path / "job.toml").write_text(CONFIG)

    result = invoke_subprocess(["run", "--source", src, "--workdir", tmp_path / "work", "--config",
                                tmp_path / "job.toml"], timeout_s=300)
    assert result.returncode == 0, result.stderr
    assert not DECODER_LINE.search(result.stderr), result.stderr

    rows = [row for part in sorted((tmp_path / "work" / "deadletter").rglob("part-*.parquet"))
            for row in pq.read_table(part).to_pylist()]
    (cut,) = [row for row in rows if row["uri"].endswith("cut.mp4")]
    assert "truncated file" in cut["message"] and "decoder said:" in cut["message"]
    assert "partial file" in cut["message"]
