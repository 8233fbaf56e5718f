"""Progress of `run` on stderr: moving in every DirectRunner mode, plain lines when
stderr is not a terminal, no `nan` ETA before the first item finishes."""

from __future__ import annotations

import io
import os
import re
import threading

import pytest

from tests.media_factory import make_video
from tests.run_helpers import invoke_subprocess, make_archive, write_config
from xmodal_index.jobs import progress_display
from xmodal_index.jobs.progress_display import ProgressSettings, Reading, run_progress
from xmodal_index.pipeline import progress

LINE = re.compile(r"progress: items (\d+)/(\d+) \((\d+) failed\)  media ([\d.]+) s \(([\d.]+) media-s/s\)  "
                  r"elapsed (\d+:\d\d:\d\d)  ETA ?(\d+:\d\d:\d\d)?$")


def test_eta_is_blank_until_an_item_finished_then_estimated():
    before = Reading(total=10, done=0, failed=0, media_s=0.0, elapsed_s=5.0)
    assert before.eta_s is None
    assert "nan" not in before.line() and before.line().endswith("ETA")
    after = Reading(total=10, done=1, failed=1, media_s=30.0, elapsed_s=4.0)
    assert after.eta_s == pytest.approx(16.0)
    assert after.line().endswith("ETA 0:00:16") and "media 30.0 s (7.5 media-s/s)" in after.line()


def _count_in_another_process(folder: str) -> None:
    os.environ[progress.ENV_DIR] = folder
    progress.add("items_done")
    progress.add("media_s", 2.5)


def test_counts_from_worker_threads_and_processes_reach_the_run():
    import multiprocessing

    with progress.recording() as recorder:
        workers = [threading.Thread(target=progress.add, args=("items_failed",)) for _ in range(3)]
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        child = multiprocessing.get_context("spawn").Process(target=_count_in_another_process,
                                                               args=(recorder.folder,))
        child.start()
        child.join(60)
        totals = progress.snapshot()
    assert totals["items_failed"] == 3 and totals["items_done"] == 1 and totals["media_s"] == 2.5


def test_plain_lines_when_stderr_is_not_a_terminal():
    out = io.StringIO()
    progress_display.configure(ProgressSettings(every_s=0.05))
    try:
        with run_progress(4, stream=out):
            progress.add("items_done")
            progress.add("media_s", 3.0)
            threading.Event().wait(0.3)
    finally:
        progress_display.configure(ProgressSettings())
    lines = out.getvalue().splitlines()
    assert len(lines) >= 2 and all(LINE.search(ln) for ln in lines), lines
    assert "\r" not in out.getvalue() and "nan" not in out.getvalue()
    assert LINE.search(lines[-1]).group(1, 2) == ("1", "4")


def test_no_progress_shows_nothing():
    out = io.StringIO()
    with run_progress(4, enabled=False, stream=out):
        progress.add("items_done")
    assert out.getvalue() == ""


@pytest.mark.parametrize("mode", ["multi_processing", "multi_threading"])
def test_progress_moves_before_the_end_in_every_runner_mode(tmp_path, mode):
    make_archive(tmp_path / "src")
    for k in range(16):  # enough decoding that items finish over a while
        make_video(tmp_path / "src" / "videos" / f"more{k}.mp4", duration_s=4.0, fps=8)
    total = 8 + 16
    result = invoke_subprocess(["run", "--source", tmp_path / "src", "--workdir", tmp_path / "work",
                                "--config", write_config(tmp_path), "--progress-every-s", "0.1",
                                "--", f"--direct_running_mode={mode}", "--direct_num_workers=2"], timeout_s=300)
    assert result.returncode == 0, result.stderr
    readings = [LINE.search(ln) for ln in result.stderr.splitlines() if "progress: " in ln]
    readings = [m for m in readings if m]
    assert readings, result.stderr
    totals = {int(m.group(2)) for m in readings}
    assert totals == {total}
    finished = [int(m.group(1)) for m in readings]
    assert finished[-1] == total
    assert finished == sorted(finished)
    assert any(0 < n < total for n in finished[:-1]), finished  # seen moving, not only at the end


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_a_bar_with_counts_media_rate_elapsed_and_eta():
    out = _Terminal()
    with run_progress(4, stream=out):
        threading.Event().wait(0.7)  # one refresh before any item finished: ETA blank, no nan
        progress.add("items_done")
        progress.add("items_failed")
        progress.add("media_s", 12.0)
    text = out.getvalue()
    assert "\r" in text and "progress:" not in text and "nan" not in text
    last = text.split("\r")[-1]
    assert "2/4" in last and "1 failed" in last and "12 media-s" in last and "elapsed 0:00:0" in last
    assert "ETA 0:00:0" in last
