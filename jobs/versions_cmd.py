"""`xmodal-index versions | promote | gc`: list, move LATEST between, and prune index versions."""

from __future__ import annotations

import json
import logging
import secrets
import sys
from typing import Any

import click

from xmodal_index.sinks import workdir as workdir_layout
from xmodal_index.sinks.errors import SinkError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index import publish
from xmodal_index.sinks.index.publish_gate import map_figures, recall_figures
from xmodal_index.sinks.storage.lease import Lease

logger = logging.getLogger(__name__)

EXIT_ERROR = 1

_INDEX_HELP = "Index root (WORKDIR/indexes/NAME), or a workdir (then WORKDIR/indexes/NAME with --index-name)."
_NAME_HELP = "Index name under a workdir's indexes/ (ignored when --index is an index root)."


resolve_index_root = workdir_layout.resolve_index_root  # the one resolver (sinks/workdir.py)


def _workdir_lease(index_root: str, command: str) -> Lease:
    """The workdir's lease (the one `run` holds), so that promote and gc never move
    LATEST or delete files under a run that is building or publishing a version."""
    workdir = workdir_layout.Workdir.of_index_root(index_root) or workdir_layout.Workdir(index_root)
    return Lease(workdir.lease, f"{command}-{secrets.token_hex(4)}", holder=f"xmodal-index {command}")


def _fail(command: str, err: BaseException) -> None:
    click.echo(f"xmodal-index {command}: error: {err}", err=True)
    sys.exit(EXIT_ERROR)


def version_row(manifest: mf.Manifest, latest: str | None) -> dict[str, Any]:
    """The key figures of one version, as `versions --json` prints them."""
    maps = map_figures(manifest.metrics)
    return {
        "version": manifest.version,
        "latest": manifest.version == latest,
        "created_at": manifest.created_at,
        "parent_version": manifest.parent_version,
        "model_id": manifest.model_id,
        "ntotal": manifest.ntotal,
        "shards": sum(1 for s in manifest.shards if s.kind == "float"),
        "index_factory": dict(manifest.index_factory),
        "recall_at_10": {k.split("/", 1)[1]: v for k, v in recall_figures(manifest.metrics).items()},
        "map": maps,
        "bytes": sum(f.bytes for f in manifest.all_files()),
    }


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.3f}"


@click.command(context_settings={"show_default": True})
@click.option("--index", "index_uri", required=True, help=_INDEX_HELP)
@click.option("--index-name", default="main", help=_NAME_HELP)
@click.option("--json", "as_json", is_flag=True, help="One JSON object per version on stdout, oldest first.")
def versions(index_uri: str, index_name: str, as_json: bool) -> None:
    """List the index versions with their key metrics (LATEST marked with *).

    Columns: recall@10 of the float and binary indexes against exact search on
    held-out rows, the mean of the cross-modal mAP figures (when labels existed),
    vectors, shards, size in MiB, parent version, index factories, creation time.
    Interrupted builds (no manifest) are listed last as incomplete.
    """
    try:
        root = resolve_index_root(index_uri, index_name)
        latest = mf.read_latest(root)
        names = mf.list_versions(root)
        rows = []
        for name in names:
            try:
                rows.append(version_row(mf.read_manifest(root, name), latest))
            except SinkError as err:
                rows.append({"version": name, "latest": name == latest, "error": str(err)})
        incomplete = mf.incomplete_versions(root)
    except SinkError as err:
        _fail("versions", err)
        return
    if as_json:
        for row in rows:
            click.echo(json.dumps(row))
        for name in incomplete:
            click.echo(json.dumps({"version": name, "latest": False, "incomplete": True}))
        return
    if not rows and not incomplete:
        click.echo(f"no index versions under {root}")
        return
    click.echo(f"{root}  (LATEST: {latest or 'none'})")
    click.echo(f"  {'version':<9} {'recall@10':>15} {'mAP':>6} {'vectors':>9} {'shards':>6} {'MiB':>8}  "
               f"{'parent':<8} {'factories':<24} created")
    for row in rows:
        mark = "*" if row["latest"] else " "
        if "error" in row:
            click.echo(f"{mark} {row['version']:<9} unreadable: {row['error']}")
            continue
        recall = f"{_fmt(row['recall_at_10']['float'])}/{_fmt(row['recall_at_10']['binary'])}"
        maps = list(row["map"].values())
        map_mean = _fmt(sum(maps) / len(maps)) if maps else "-"
        factories = f"{row['index_factory'].get('float', '?')} {row['index_factory'].get('binary', '?')}"
        click.echo(f"{mark} {row['version']:<9} {recall:>15} {map_mean:>6} {row['ntotal']:>9} {row['shards']:>6} "
                   f"{row['bytes'] / 2**20:>8.1f}  {row['parent_version'] or '-':<8} {factories:<24} "
                   f"{row['created_at']}")
    for name in incomplete:
        click.echo(f"  {name:<9} incomplete (no manifest: an interrupted or running build)")


@click.command(context_settings={"show_default": True})
@click.argument("version")
@click.option("--index", "index_uri", required=True, help=_INDEX_HELP)
@click.option("--index-name", default="main", help=_NAME_HELP)
def promote(version: str, index_uri: str, index_name: str) -> None:
    """Point LATEST at VERSION (e.g. v000003), newer or older (a rollback).

    No publish gate applies: this is the operator's decision. Under the workdir
    lease, the version's manifest must match its SEAL and every file it lists must
    be present with the listed size and sha256 (read back in full); LATEST then
    records the manifest's sha256 (and its HMAC with XMODAL_INDEX_SIGNING_KEY set),
    written only if nobody moved LATEST meanwhile.
    """
    try:
        root = resolve_index_root(index_uri, index_name)
        with _workdir_lease(root, "promote") as lease:
            state = publish.read_state(root, replace_unreadable=True)  # under the lease: what the swap expects
            result = publish.publish(root, version, expected=state, lease=lease, verify_sha256=True)
    except SinkError as err:
        _fail("promote", err)
        return
    click.echo(f"LATEST of {root}: {result.previous or 'none'} -> {version} (manifest sha256:{result.digest})")


def plan_gc(index_root: str, keep: int) -> tuple[list[str], list[str]]:
    """(versions to delete, versions kept): the ``keep`` newest complete versions, LATEST
    and LATEST's parent stay; interrupted builds older than the newest complete version go."""
    names = mf.list_versions(index_root)
    latest = mf.read_latest(index_root)
    protected = set(names[-keep:]) if keep > 0 else set()
    if latest is not None:
        protected.add(latest)
        try:
            parent = mf.read_manifest(index_root, latest).parent_version
        except SinkError:
            parent = None
        if parent:
            protected.add(parent)
    protected |= referenced_versions(index_root, protected, names)
    newest = mf.version_number(names[-1]) if names else 0
    stale = [v for v in mf.incomplete_versions(index_root) if mf.version_number(v) < newest]
    delete = [v for v in names if v not in protected] + stale
    return sorted(delete, key=mf.version_number), [v for v in names if v in protected]


def referenced_versions(index_root: str, kept: set[str], names: list[str]) -> set[str]:
    """Versions holding files that ``kept`` versions list by ``origin`` (incremental
    versions); every older version when a kept manifest cannot be read."""
    out: set[str] = set()
    for version in kept:
        try:
            manifest = mf.read_manifest(index_root, version)
        except SinkError:
            out.update(v for v in names if mf.version_number(v) < mf.version_number(version))
            continue
        out.update(e.origin for e in manifest.all_files() if e.origin)
    return out


@click.command(context_settings={"show_default": True})
@click.option("--index", "index_uri", required=True, help=_INDEX_HELP)
@click.option("--index-name", default="main", help=_NAME_HELP)
@click.option("--keep", type=click.IntRange(min=0), required=True,
              help="Newest complete versions to keep, besides LATEST and its parent (always kept).")
@click.option("--dry-run", is_flag=True, help="Print what would be deleted, delete nothing.")
def gc(index_uri: str, index_name: str, keep: int, dry_run: bool) -> None:
    """Delete old index versions: all but the KEEP newest, never LATEST or its parent.

    Interrupted builds (version directories without a manifest) older than the
    newest complete version are deleted too; a newer one may be a build in progress
    and is left alone. Each version loses its manifest first, so it stops being
    listed before its shards go. The plan is made under the workdir lease, which is
    checked again before each version is deleted. Version numbers are never
    reused after a gc (indexes/NAME/HIGHWATER keeps the highest one).
    """
    try:
        root = resolve_index_root(index_uri, index_name)
        if dry_run:
            delete, kept = plan_gc(root, keep)
            for version in delete:
                click.echo(f"would delete {version}")
        else:
            with _workdir_lease(root, "gc") as lease:
                delete, kept = plan_gc(root, keep)  # planned under the lease, never before
                for version in delete:
                    lease.check()  # a gc that lost its lease (paused, expired) deletes nothing more
                    count = mf.delete_version(root, version)
                    click.echo(f"deleted {version} ({count} objects)")
    except SinkError as err:
        _fail("gc", err)
        return
    click.echo(f"kept {', '.join(kept) or 'nothing'}" + (" (dry run)" if dry_run else ""))
