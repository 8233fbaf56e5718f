"""The run report in a real headless browser (Debian's chromium): the page paints
something and logs nothing to the console (no script error, no blocked load).

`make test` installs chromium when it runs as root with apt-get; elsewhere these
tests are skipped with the reason."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from tests.run_helpers import invoke, make_archive, run_args, summaries, write_config

CHROMIUM = Path("/usr/bin/chromium")
FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
    "--enable-logging=stderr",
    "--v=0",
    "--window-size=1200,2000",
)
# chromium logs each console message (console.*, uncaught errors, CSP violations) as one line:
#   [pid:tid:time:INFO:CONSOLE:1] "Uncaught Error: boom", source: file:///... (1)
CONSOLE_LINE = re.compile(r":CONSOLE(?:\(\d+\)|:\d+)?\] (.*)")
MIN_PIXEL_STD = 10.0  # grey levels; a blank page is 0

pytestmark = pytest.mark.skipif(
    not CHROMIUM.exists(),
    reason=f"{CHROMIUM} is missing: install Debian's chromium "
    "package (`make test` does, as root with apt-get) to run the browser checks",
)


def screenshot(page: Path, tmp_path: Path) -> tuple[Path, list[str]]:
    """Load ``page`` in headless chromium; returns the screenshot and the console messages."""
    png = tmp_path / (page.stem + ".png")
    proc = subprocess.run(
        [
            str(CHROMIUM),
            *FLAGS,
            f"--user-data-dir={tmp_path / 'profile'}",
            f"--screenshot={png}",
            page.resolve().as_uri(),
        ],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert png.exists(), f"chromium wrote no screenshot (exit {proc.returncode}): {proc.stderr[-2000:]}"
    return png, [m.group(1) for m in map(CONSOLE_LINE.search, proc.stderr.splitlines()) if m]


def pixel_std(png: Path) -> float:
    with Image.open(png) as img:
        return float(np.asarray(img.convert("L"), dtype=np.float64).std())


@pytest.fixture(scope="module")
def report_page(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("browser")
    make_archive(root / "archive")
    (root / "archive" / "videos" / "broken.mp4").write_bytes(b"\x00\x00\x00\x18ftypmp42" + b"x" * 300)
    result = invoke(*run_args(root / "archive", root / "work", write_config(root)))
    assert result.exit_code == 0, result.output
    (summary,) = summaries(str(root / "work"))
    return root / "work" / "runs" / summary["run_id"] / "report.html"


def test_report_renders_with_no_console_messages(report_page, tmp_path):
    png, console = screenshot(report_page, tmp_path)
    assert console == []
    assert pixel_std(png) > MIN_PIXEL_STD


def test_the_check_catches_a_script_error(tmp_path):
    page = tmp_path / "broken.html"
    page.write_text("<!DOCTYPE html><html><body><h1>report</h1><script>throw new Error('boom')</script></body></html>")
    _, console = screenshot(page, tmp_path)
    assert any("Uncaught Error: boom" in line for line in console)


def test_the_check_catches_a_blocked_network_load(report_page, tmp_path):
    page = tmp_path / "fetches.html"
    page.write_text(report_page.read_text().replace("</main>", '<img src="https://example.com/x.png"></main>'))
    _, console = screenshot(page, tmp_path)
    assert any("Content Security Policy" in line and "example.com" in line for line in console)


def test_the_check_catches_a_blank_page(tmp_path):
    page = tmp_path / "blank.html"
    page.write_text("<!DOCTYPE html><html><body></body></html>")
    png, console = screenshot(page, tmp_path)
    assert console == [] and pixel_std(png) < MIN_PIXEL_STD
