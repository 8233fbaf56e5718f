"""The one publish step: LATEST records the manifest digest, moves only by compare-and-swap
under a held lease, and version numbers are never reused."""

from __future__ import annotations

import hashlib
import json
import pathlib
import re
import time

import pytest
from click.testing import CliRunner

from tests.test_loader import Archive
from xmodal_index.jobs.cli import cli
from xmodal_index.sinks.errors import ChecksumMismatchError, IndexVersionError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index import publish, seal
from xmodal_index.sinks.index.build import IndexBuildConfig
from xmodal_index.sinks.storage.lease import Lease, LeaseLostError, lease_uri

CONFIG = IndexBuildConfig(recall_sample=10)
PACKAGE = pathlib.Path(publish.__file__).resolve().parents[2]


@pytest.fixture()
def root(tmp_path):
    """WORKDIR/indexes/main with v000001 published and v000002, v000003 uploaded, unpublished."""
    path = tmp_path / "work" / "indexes" / "main"
    Archive({"text": 40}, seed=0).build(path, CONFIG)
    for seed in (1, 2):
        Archive({"text": 40 + seed}, seed=seed).build(path, CONFIG, publish=False)
    return path


def _future_lease(workdir, name: str) -> Lease:
    """A lease whose clock runs an hour ahead: every lease taken now looks expired to it
    (what a writer paused past its TTL finds when it wakes)."""
    return Lease(lease_uri(str(workdir)), name, clock=lambda: time.time() + 3600)


# ---------------------------------------------------------------- what LATEST says


def test_latest_names_the_version_and_the_sha256_of_its_manifest_bytes(root):
    text = (root / "LATEST").read_text()
    assert re.fullmatch(r"v000001 sha256:[0-9a-f]{64}\n", text)
    digest = hashlib.sha256((root / "v000001" / "manifest.json").read_bytes()).hexdigest()
    assert text.split()[1] == f"sha256:{digest}"
    assert (root / "v000001" / "SEAL").read_text().split()[0] == f"sha256:{digest}"


def test_with_a_signing_key_latest_carries_an_hmac_that_verifies(root, monkeypatch):
    monkeypatch.setenv(seal.SIGNING_KEY_ENV, "k3y")
    publish.publish(str(root), "v000002", expected=publish.read_state(str(root)))
    record = seal.read_latest_record(str(root))
    assert record.version == "v000002" and record.signature is not None
    assert seal.verify_signature("v000002", record.digest, record.signature, b"k3y")
    assert not seal.verify_signature("v000002", record.digest, record.signature, b"other")


def test_a_manifest_changed_after_it_was_sealed_is_never_published(root):
    path = root / "v000002" / "manifest.json"
    data = json.loads(path.read_bytes())
    data["created_at"] = "2020-01-01T00:00:00Z"  # still a valid manifest: only the seal tells
    path.write_text(mf.canonical_json(data))
    with pytest.raises(IndexVersionError, match="SEAL"):
        publish.publish(str(root), "v000002", expected=publish.read_state(str(root)))
    assert mf.read_latest(str(root)) == "v000001"


def test_a_version_with_a_corrupted_file_is_refused_when_verified_in_full(root):
    manifest = mf.read_manifest(str(root), "v000002")
    shard = root / "v000002" / manifest.shards[0].file
    data = bytearray(shard.read_bytes())
    data[-1] ^= 0xFF  # same size: only the sha256 tells
    shard.write_bytes(bytes(data))
    with pytest.raises(ChecksumMismatchError, match=manifest.shards[0].file):
        publish.publish(str(root), "v000002", expected=publish.read_state(str(root)), verify_sha256=True)
    assert mf.read_latest(str(root)) == "v000001"


def test_only_the_publish_module_writes_latest():
    """Every write of LATEST goes through sinks/index/publish.py (a grep of the package)."""
    writers = []
    for path in PACKAGE.rglob("*.py"):
        if any(part in (".venv", "tests", "build") for part in path.relative_to(PACKAGE).parts):
            continue
        text = path.read_text()
        if re.search(r"def write_latest|\bwrite_latest\(", text) or re.search(
                r"(write_bytes|replace_if_match|create_if_absent)\([^)]*LATEST", text):
            writers.append(str(path.relative_to(PACKAGE)))
    assert writers == []
    assert "replace_if_match" in pathlib.Path(publish.__file__).read_text()


# ---------------------------------------------------------------- compare-and-swap and lease


def test_a_publish_against_a_stale_latest_moves_nothing(root):
    stale = publish.read_state(str(root))  # read when "run A" started building
    publish.publish(str(root), "v000003", expected=publish.read_state(str(root)))  # "run B" publishes
    with pytest.raises(publish.LatestMovedError, match="another writer published"):
        publish.publish(str(root), "v000002", expected=stale)
    assert mf.read_latest(str(root)) == "v000003"


def test_the_first_publish_is_a_create_that_a_second_writer_cannot_repeat(tmp_path):
    path = tmp_path / "idx"
    for seed in (0, 1):
        Archive({"text": 30 + seed}, seed=seed).build(path, CONFIG, publish=False)
    nothing = publish.read_state(str(path))
    assert nothing.record is None
    publish.publish(str(path), "v000002", expected=nothing)
    with pytest.raises(publish.LatestMovedError):
        publish.publish(str(path), "v000001", expected=nothing)
    assert mf.read_latest(str(path)) == "v000002"


def test_a_writer_whose_lease_was_taken_over_moves_nothing(root):
    workdir = root.parent.parent
    paused = Lease(lease_uri(str(workdir)), "run-a")
    paused.acquire()
    try:
        expected = publish.read_state(str(root))
        with _future_lease(workdir, "run-b") as newer:  # run A's lease expired while it was paused
            assert newer.generation == paused.generation + 1
            publish.publish(str(root), "v000003", expected=publish.read_state(str(root)), lease=newer)
        with pytest.raises(LeaseLostError):
            publish.publish(str(root), "v000002", expected=expected, lease=paused)
    finally:
        paused.release()
    assert mf.read_latest(str(root)) == "v000003"


def test_a_version_built_under_a_newer_lease_is_not_published_by_an_older_holder(root):
    path = root / "v000003" / "manifest.json"
    data = json.loads(path.read_bytes())
    data["metrics"]["fencing_token"] = 99
    path.write_text(mf.canonical_json(data))
    (root / "v000003" / "SEAL").unlink()  # resealed by the publish step
    with Lease(lease_uri(str(root.parent.parent)), "old-holder") as lease, \
            pytest.raises(publish.LatestMovedError, match="generation 99"):
        publish.publish(str(root), "v000003", expected=publish.read_state(str(root)), lease=lease)


# ---------------------------------------------------------------- promote and gc under a lost lease


def invoke(*args: str):
    return CliRunner().invoke(cli, list(args))


def test_a_promote_paused_past_its_lease_fails_and_leaves_the_newer_version(root, monkeypatch):
    original = publish.verify_version
    paused: list[str] = []

    def pause_then_verify(index_root, version, **kwargs):
        if not paused:  # promote holds the lease and has read LATEST; its lease expires, a run publishes v000003
            paused.append(version)
            with _future_lease(root.parent.parent, "run-b") as newer:
                publish.publish(str(root), "v000003", expected=publish.read_state(str(root)), lease=newer)
        return original(index_root, version, **kwargs)

    monkeypatch.setattr(publish, "verify_version", pause_then_verify)
    result = invoke("promote", "v000002", "--index", str(root))
    assert result.exit_code == 1
    (line,) = [ln for ln in result.output.splitlines() if ln.startswith("xmodal-index promote")]
    assert "lost the workdir lease" in line
    assert mf.read_latest(str(root)) == "v000003"


def test_promote_records_the_promoted_manifest_digest(root):
    result = invoke("promote", "v000002", "--index", str(root))
    assert result.exit_code == 0, result.output
    digest = hashlib.sha256((root / "v000002" / "manifest.json").read_bytes()).hexdigest()
    assert (root / "LATEST").read_text() == f"v000002 sha256:{digest}\n"
    assert digest in result.output


def test_promote_refuses_a_version_whose_file_was_corrupted(root):
    manifest = mf.read_manifest(str(root), "v000002")
    id_map = root / "v000002" / manifest.id_maps[0].file
    data = bytearray(id_map.read_bytes())
    data[len(data) // 2] ^= 0xFF
    id_map.write_bytes(bytes(data))
    result = invoke("promote", "v000002", "--index", str(root))
    assert result.exit_code == 1 and manifest.id_maps[0].file in result.output
    assert mf.read_latest(str(root)) == "v000001"


def test_promote_reseals_a_version_published_before_seals_existed(root):
    (root / "v000002" / "SEAL").unlink()
    assert invoke("promote", "v000002", "--index", str(root)).exit_code == 0
    digest = hashlib.sha256((root / "v000002" / "manifest.json").read_bytes()).hexdigest()
    assert seal.read_seal(str(root), "v000002") == (digest, None)


def test_a_gc_that_loses_its_lease_deletes_nothing_more(root, monkeypatch):
    publish.publish(str(root), "v000003", expected=publish.read_state(str(root)))
    Archive({"text": 50}, seed=5).build(root, CONFIG)  # v000004, parent v000003
    original = mf.delete_version
    taken: list[Lease] = []

    def delete_then_lose_the_lease(index_root, version):
        count = original(index_root, version)
        if not taken:  # gc is paused past its TTL after its first deletion; another command takes the lease
            taken.append(_future_lease(root.parent.parent, "run-b"))
            taken[0].acquire()
        return count

    monkeypatch.setattr(mf, "delete_version", delete_then_lose_the_lease)
    try:
        result = invoke("gc", "--index", str(root), "--keep", "0")
    finally:
        for lease in taken:
            lease.release()
    assert result.exit_code == 1 and "lost the workdir lease" in result.output
    assert mf.list_versions(str(root)) == ["v000002", "v000003", "v000004"]  # only v000001 went


# ---------------------------------------------------------------- version numbers


def test_version_numbers_freed_by_gc_are_never_reused(root):
    publish.publish(str(root), "v000003", expected=publish.read_state(str(root)))
    assert invoke("promote", "v000001", "--index", str(root)).exit_code == 0  # a rollback
    assert invoke("gc", "--index", str(root), "--keep", "0").exit_code == 0
    assert mf.list_versions(str(root)) == ["v000001"]
    rebuilt = Archive({"text": 60}, seed=6).build(root, CONFIG)
    assert rebuilt.version == "v000004"
    assert (root / publish.HIGHWATER_NAME).read_text() == "v000004\n"


def test_an_interrupted_build_keeps_its_number(root):
    assert publish.reserve_version(str(root)) == "v000004"  # a build that died before uploading anything
    assert publish.reserve_version(str(root)) == "v000005"


def test_a_corrupted_highwater_is_refused_not_reset(root):
    (root / publish.HIGHWATER_NAME).write_text("v00000x\n")
    with pytest.raises(publish.HighWaterError, match="HIGHWATER"):
        publish.reserve_version(str(root))


def test_on_object_storage_a_stale_publish_moves_nothing_and_numbers_only_grow(s3_bucket):
    root = f"{s3_bucket}/work/indexes/main"
    Archive({"text": 30}, seed=0).build(root, CONFIG)
    for seed in (1, 2):
        Archive({"text": 30 + seed}, seed=seed).build(root, CONFIG, publish=False)
    stale = publish.read_state(root)
    publish.publish(root, "v000003", expected=publish.read_state(root))
    with pytest.raises(publish.LatestMovedError):
        publish.publish(root, "v000002", expected=stale)
    assert seal.read_latest_record(root).version == "v000003"
    assert invoke("promote", "v000001", "--index", root).exit_code == 0
    assert invoke("gc", "--index", root, "--keep", "0").exit_code == 0
    assert mf.list_versions(root) == ["v000001"]  # the top numbers are free again
    assert Archive({"text": 40}, seed=4).build(root, CONFIG, publish=False).version == "v000004"


@pytest.mark.parametrize("damage", ["junk", "symlink"])
def test_promote_replaces_an_unreadable_latest(root, tmp_path, damage):
    latest = root / "LATEST"
    latest.unlink()
    if damage == "junk":
        latest.write_bytes(b"\x00not a version" * 100)
    else:
        outside = tmp_path / "outside.txt"
        outside.write_text("keep me\n")
        latest.symlink_to(outside)
    assert invoke("versions", "--index", str(root)).exit_code == 1  # refused, not echoed
    result = invoke("promote", "v000002", "--index", str(root))
    assert result.exit_code == 0, result.output
    assert mf.read_latest(str(root)) == "v000002" and not latest.is_symlink()
    if damage == "symlink":
        assert (tmp_path / "outside.txt").read_text() == "keep me\n"
