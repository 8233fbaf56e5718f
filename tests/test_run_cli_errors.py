"""`run` refuses a bad config or Beam flag before doing anything: one line naming it,
exit 2 (the contract of `run --help`, README and docs/NIGHTLY.md)."""

from __future__ import annotations

import pytest

from tests.run_helpers import invoke

BAD_CONFIGS = {
    "unknown key": ("[run]\nmax_err = 0.2\n", "max_err"),
    "bad value": ("[run]\nmax_error_fraction = 1.5\n", "max_error_fraction = 1.5 must be within [0, 1]"),
    "broken TOML": ("[run\nmax_error_fraction = 0.2\n", "not valid TOML"),
    "bad encoder value": ("[encoder]\nbatch_size = 0\n", "batch_size = 0"),
    "bad index value": ("[index]\nmax_shard_vectors = 0\n", "max_shard_vectors = 0"),
    "bad gate value": ("[gate]\ntolerance_recall = 3.0\n", "tolerance_recall = 3.0"),
}


def _run(tmp_path, *extra: str, config: str | None = None):
    args = ["run", "--source", str(tmp_path / "src"), "--workdir", str(tmp_path / "work")]
    if config is not None:
        (tmp_path / "job.toml").write_text(config)
        args += ["--config", str(tmp_path / "job.toml")]
    return invoke(*args, *extra)


def _one_error_line(result) -> str:
    lines = [ln for ln in result.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1, result.stderr
    assert "Usage:" not in result.stderr and "self." not in result.stderr
    return lines[0]


@pytest.mark.parametrize("case", sorted(BAD_CONFIGS))
def test_a_bad_config_is_one_line_naming_it_and_exit_2(tmp_path, case):
    text, named = BAD_CONFIGS[case]
    result = _run(tmp_path, config=text)
    assert result.exit_code == 2
    assert named in _one_error_line(result)
    assert not (tmp_path / "work").exists()


def test_a_bad_override_option_is_one_line_without_internal_names(tmp_path):
    result = _run(tmp_path, "--max-error-fraction", "1.5")
    assert result.exit_code == 2
    assert "max_error_fraction = 1.5 must be within [0, 1]" in _one_error_line(result)


def test_an_unknown_beam_flag_is_refused_naming_it(tmp_path):
    result = _run(tmp_path, "--", "--bogus_flag=3", "--direct_num_workers=2")
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "--bogus_flag" in line and "--direct_num_workers" not in line
    assert not (tmp_path / "work").exists()


def test_a_bad_value_of_a_known_beam_flag_is_one_line(tmp_path):
    result = _run(tmp_path, "--", "--direct_running_mode=sideways")
    assert result.exit_code == 2
    line = _one_error_line(result)
    assert "--direct_running_mode" in line and "sideways" in line


@pytest.mark.parametrize("args", [["--prefix", "../up"], ["--s3-endpoint-url", "minio:9000"]])
def test_bad_option_values_name_the_option_without_internal_names(tmp_path, args):
    result = _run(tmp_path, *args)
    assert result.exit_code == 2
    assert "self." not in result.stderr and args[1] in result.stderr
