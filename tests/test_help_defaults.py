"""`--help` of every command names the default of every option that has one (README:
"`--help` on every command lists every option with its default and unit")."""

from __future__ import annotations

import re

import click

from xmodal_index.jobs.cli import cli


def _commands(group: click.Group, ctx: click.Context):
    for name in sorted(group.list_commands(ctx)):
        cmd = group.get_command(ctx, name)
        sub = click.Context(cmd, info_name=name, parent=ctx, **cmd.context_settings)
        yield name, cmd, sub
        if isinstance(cmd, click.Group):
            yield from _commands(cmd, sub)


def _missing_defaults() -> list[str]:
    root = click.Context(cli, info_name="xmodal-index", **cli.context_settings)
    missing = []
    for name, cmd, ctx in [("xmodal-index", cli, root), *_commands(cli, root)]:
        for param in cmd.params:
            if not isinstance(param, click.Option) or param.required or param.hidden:
                continue
            if param.is_flag and not param.secondary_opts:
                continue  # a plain switch: off unless given
            if param.get_default(ctx, call=False) is None and not param.show_default:
                continue  # no default: the option is simply not used unless given
            if param.name in ("help", "version"):
                continue
            record = param.get_help_record(ctx)
            text = record[1] if record else ""
            if not re.search(r"default", text, re.IGNORECASE):
                missing.append(f"{name} {'/'.join(param.opts)}: {text!r}")
    return missing


def test_every_option_with_a_default_names_it_in_help():
    assert _missing_defaults() == []


def test_no_help_text_points_at_an_unnamed_default():
    root = click.Context(cli, info_name="xmodal-index", **cli.context_settings)
    vague = []
    for name, cmd, ctx in _commands(cli, root):
        for param in cmd.params:
            record = param.get_help_record(ctx) if isinstance(param, click.Option) else None
            if record and re.search(r"(loader|library|faiss|beam)'s default", record[1], re.IGNORECASE):
                vague.append(f"{name} {'/'.join(param.opts)}: {record[1]!r}")
    assert vague == []


def test_query_candidates_help_gives_the_loaders_number():
    from xmodal_index.sinks.serving.loader import DEFAULT_CANDIDATES

    root = click.Context(cli, info_name="xmodal-index", **cli.context_settings)
    query = cli.get_command(root, "query")
    ctx = click.Context(query, info_name="query", parent=root, **query.context_settings)
    (option,) = [p for p in query.params if p.name == "candidates"]
    assert f"max(k, {DEFAULT_CANDIDATES})" in option.get_help_record(ctx)[1]
