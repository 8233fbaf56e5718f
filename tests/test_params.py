"""Option parsers shared by commands: `train --bits` and `eval --bits` read code lengths the same way."""

import click
import pytest
from click.testing import CliRunner

from xmodal_index.jobs.cli import cli
from xmodal_index.jobs.params import parse_bits


def test_bits_are_sorted_and_deduplicated():
    assert parse_bits("64,16,64, 32") == (16, 32, 64)


@pytest.mark.parametrize("value, message", [("", "each code length"), ("16,x", "comma-separated"),
                                            ("16,24", "each code length")])
def test_bad_bits_name_the_value(value, message):
    with pytest.raises(click.BadParameter, match=message):
        parse_bits(value)


@pytest.mark.parametrize("command", ["train", "eval"])
def test_train_and_eval_refuse_the_same_bad_code_length(command, tmp_path):
    result = CliRunner().invoke(cli, [command, "--fsdd", str(tmp_path), "--bits", "16,24"])
    assert result.exit_code == 2
    assert "each code length must be one of 16, 32, 64, 128" in result.output
