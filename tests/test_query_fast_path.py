"""The CLI's fixed costs: `--help` and `query --help` import nothing heavy; commands load lazily."""

import subprocess
import sys

import click
import pytest

HEAVY = ("apache_beam", "torch", "faiss", "av", "decord", "pyarrow", "boto3")
PROBE = (
    "import sys\n"
    "from xmodal_index.jobs.cli import cli\n"
    "try:\n"
    "    cli(args=sys.argv[1:], prog_name='xmodal-index', standalone_mode=False)\n"
    "finally:\n"
    "    print('HEAVY=' + ','.join(m for m in {heavy!r} if m in sys.modules))\n"
)


@pytest.mark.parametrize("args", [["--help"], ["query", "--help"]])
def test_help_imports_nothing_heavy(args):
    out = subprocess.run([sys.executable, "-c", PROBE.format(heavy=HEAVY), *args], capture_output=True, text=True,
                         check=True)
    assert "Usage: xmodal-index" in out.stdout
    assert out.stdout.strip().splitlines()[-1] == "HEAVY="


def test_every_command_is_listed_and_its_summary_is_its_own():
    from xmodal_index.jobs.cli import LAZY_COMMANDS, cli

    ctx = click.Context(cli)
    assert set(LAZY_COMMANDS) <= set(cli.list_commands(ctx))
    for name, (_, _, summary) in LAZY_COMMANDS.items():
        command = cli.get_command(ctx, name)
        if command is None:  # an optional module that is not installed
            continue
        assert command.get_short_help_str(500) == summary, name


def test_unknown_command_is_still_refused_by_name():
    from click.testing import CliRunner

    from xmodal_index.jobs.cli import cli

    result = CliRunner().invoke(cli, ["qurey"])
    assert result.exit_code == 2
    assert "No such command 'qurey'" in result.output


def test_numpy_text_tower_matches_the_torch_encoder():
    import numpy as np

    from xmodal_index.encoders.builtin import bundled_checkpoint_path
    from xmodal_index.encoders.builtin_text import BuiltinTextEncoder
    from xmodal_index.encoders.config import EncoderConfig
    from xmodal_index.encoders.loading import load_encoder

    texts = ["seven", "a voice counting: seven", "the digit zero, written by hand", "x", "Ünïcode 七 ", "  "]
    fast = BuiltinTextEncoder(bundled_checkpoint_path(), 64)
    full = load_encoder(EncoderConfig(bits=64))
    a, b = fast.encode("text", texts), full.encode("text", texts)
    assert fast.model_id == full.model_id and fast.dim == full.dim
    assert np.all((a.embeddings * b.embeddings).sum(axis=1) > 0.999)
    assert (a.codes == b.codes).mean() > 0.95


def test_a_text_query_through_the_api_loads_no_torch(tmp_path_factory):
    from tests.query_fixtures import sample_work

    _, work = sample_work(tmp_path_factory)
    code = ("import sys, xmodal_index\n"
            f"hits = xmodal_index.open({str(work)!r}).search(text='seven', k=3, modalities='video')\n"
            "print(len(hits), 'torch' in sys.modules)\n")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["3", "False"]


def test_the_cli_offers_the_core_fusions_and_default():
    from xmodal_index.jobs import query_cmd
    from xmodal_index.query import fusion

    assert query_cmd.FUSIONS == fusion.FUSIONS
    option = next(p for p in query_cmd.query.params if p.name == "fusion")
    assert option.default == fusion.DEFAULT_FUSION
