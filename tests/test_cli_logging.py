"""Log levels of the CLI: -v/-vv/-q do what `--help` says; warnings show by default;
Beam's own INFO lines stay out unless -vv."""

from __future__ import annotations

import logging

import pytest

from tests.run_helpers import invoke, make_archive, run_args, write_config
from xmodal_index.jobs.cli import setup_logging


@pytest.fixture(autouse=True)
def _restore_logging():
    root = logging.getLogger()
    saved = (list(root.handlers), root.level, {n: logging.getLogger(n).level for n in ("apache_beam", "root")})
    yield
    root.handlers[:] = saved[0]
    root.setLevel(saved[1])
    for name, level in saved[2].items():
        logging.getLogger(name).setLevel(level)


def _emit(capsys, *, verbose: int = 0, quiet: int = 0) -> str:
    setup_logging(verbose, quiet)
    logging.getLogger("xmodal_index.jobs.example").warning("own warning")
    logging.getLogger("xmodal_index.jobs.example").info("own info")
    logging.getLogger("xmodal_index.jobs.example").debug("own debug")
    logging.getLogger("apache_beam.runners.example").info("beam info")
    logging.getLogger("apache_beam.runners.example").warning("beam warning")
    logging.info("root info")  # noqa: LOG015 - a library logging on the root logger is the case under test
    return capsys.readouterr().err


def test_default_shows_warnings_of_the_tool_and_of_beam(capsys):
    err = _emit(capsys)
    assert "own warning" in err and "beam warning" in err
    assert "own info" not in err and "beam info" not in err and "root info" not in err


def test_v_adds_the_tools_info_lines_but_not_beams(capsys):
    err = _emit(capsys, verbose=1)
    assert "own info" in err and "own warning" in err
    assert "own debug" not in err and "beam info" not in err and "root info" not in err


def test_vv_adds_debug_and_beams_info_lines(capsys):
    err = _emit(capsys, verbose=2)
    assert "own debug" in err and "beam info" in err and "root info" in err


def test_q_shows_errors_only(capsys):
    err = _emit(capsys, quiet=1)
    assert err == ""


def test_v_run_shows_info_lines_of_the_tools_own_loggers(tmp_path):
    make_archive(tmp_path / "src")
    result = invoke("-v", *run_args(tmp_path / "src", tmp_path / "work", write_config(tmp_path)))
    assert result.exit_code == 0, result.output
    info = [ln for ln in result.stderr.splitlines() if " INFO " in ln]
    assert any(" INFO xmodal_index." in ln for ln in info), result.stderr
    assert not any(" INFO apache_beam" in ln or " INFO root:" in ln for ln in info), result.stderr
