"""`xmodal-index run` publishes honestly: a paused run never moves LATEST back, a run
that changes nothing publishes nothing, and a mass deletion waits for --force."""

from __future__ import annotations

import json

from tests.media_factory import make_png
from tests.run_helpers import invoke, invoke_subprocess, make_archive, run_args, summaries
from xmodal_index.sinks import storage
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index import publish
from xmodal_index.sinks.storage.lease import lease_uri


def _expire_lease(workdir) -> None:
    """What a run paused past its lease TTL (SIGSTOP, a long GC, a stalled disk) finds
    when it wakes: its lease has expired and may be taken over."""
    uri = lease_uri(str(workdir))
    data, token = storage.read_versioned(uri)
    lease = json.loads(data)
    lease["expires_at"] = 0.0
    storage.replace_if_match(uri, json.dumps(lease).encode(), token)


def test_a_run_paused_past_its_lease_fails_and_leaves_the_newer_run_served(config, tmp_path, monkeypatch):
    src, work = tmp_path / "archive", tmp_path / "work"
    make_archive(src)
    assert invoke(*run_args(src, work, config)).exit_code == 0
    root = str(work / "indexes" / "main")
    make_png(src / "images" / "new-a.png", color=(200, 10, 10))  # run A's change
    original = publish.verify_version
    run_b = []

    def pause_before_publishing(index_root, version, **kwargs):
        if not run_b:  # run A has built v000002 and is about to publish it: it stops here
            _expire_lease(work)
            make_png(src / "images" / "new-b.png", color=(10, 200, 10))
            run_b.append(invoke_subprocess(run_args(src, work, config)))  # run B takes the lease and publishes
        return original(index_root, version, **kwargs)

    monkeypatch.setattr(publish, "verify_version", pause_before_publishing)
    run_a = invoke(*run_args(src, work, config))
    assert run_b[0].returncode == 0, run_b[0].stderr[-3000:]
    assert run_a.exit_code == 1
    (line,) = [ln for ln in run_a.output.splitlines() if ln.startswith("xmodal-index run:")]
    assert "lost the workdir lease" in line
    assert mf.read_latest(root) == "v000003"  # run B's version, holding both new images
    a, b = summaries(str(work))[-2:]
    assert b["index_published"] and b["index_version"] == "v000003"
    assert not a["index_published"] and "LeaseLostError" in a["error"]


def test_a_run_that_changes_nothing_publishes_nothing(config, tmp_path):
    src, work = tmp_path / "archive", tmp_path / "work"
    make_archive(src)
    assert invoke(*run_args(src, work, config)).exit_code == 0
    again = invoke(*run_args(src, work, config, "--full"))  # every input re-embedded: the same rows
    assert again.exit_code == 0, again.output
    assert mf.list_versions(str(work / "indexes" / "main")) == ["v000001"]
    last = summaries(str(work))[-1]
    assert last["indexed"] == 8 and not last["index_published"]
    assert last["index_note"] == "nothing changed: LATEST v000001 already holds these rows"


def test_a_half_missing_source_is_not_published_until_forced(config, tmp_path):
    src, work = tmp_path / "archive", tmp_path / "work"
    make_archive(src)
    assert invoke(*run_args(src, work, config)).exit_code == 0
    root = str(work / "indexes" / "main")
    for gone in ("images/img0.png", "images/img1.png", "audio/tone0.wav"):  # 3 of 8 items: 37.5%
        (src / gone).unlink()
    refused = invoke(*run_args(src, work, config))
    assert refused.exit_code == 5
    (line,) = [ln for ln in refused.output.splitlines() if ln.startswith("xmodal-index run:")]
    assert "deleted 3 of 8 live items (37.5%), over max_deleted_fraction 0.2" in line
    gate = summaries(str(work))[-1]["gate"]
    assert "max_deleted_fraction" in gate and "max_ntotal_drop_fraction" in gate
    assert mf.read_latest(root) == "v000001"
    # the next nightly refuses the same version again instead of publishing or rebuilding it
    assert invoke(*run_args(src, work, config)).exit_code == 5
    assert mf.read_latest(root) == "v000001" and mf.list_versions(root) == ["v000001", "v000002"]
    forced = invoke(*run_args(src, work, config, "--force"))
    assert forced.exit_code == 0, forced.output
    assert mf.read_latest(root) == "v000002" and mf.list_versions(root) == ["v000001", "v000002"]
    assert summaries(str(work))[-1]["index_note"] == "published v000002 ({} vectors) (forced)".format(
        mf.read_manifest(root, "v000002").ntotal)


def test_a_deletion_limit_in_the_config_lets_a_run_through(config, tmp_path):
    src, work = tmp_path / "archive", tmp_path / "work"
    make_archive(src)
    assert invoke(*run_args(src, work, config)).exit_code == 0
    for gone in ("images/img0.png", "images/img1.png", "audio/tone0.wav"):
        (src / gone).unlink()
    lenient = tmp_path / "lenient.toml"
    lenient.write_text(config.read_text() + "[gate]\nmax_deleted_fraction = 0.5\nmax_ntotal_drop_fraction = 0.9\n")
    result = invoke(*run_args(src, work, lenient))
    assert result.exit_code == 0, result.output
    assert mf.read_latest(str(work / "indexes" / "main")) == "v000002"
    assert "deleted 3 of 8 live items (37.5%), within max_deleted_fraction 0.5" in summaries(str(work))[-1]["gate"]


def test_after_gc_frees_the_newest_number_the_next_run_takes_a_new_one(config, tmp_path):
    src, work = tmp_path / "archive", tmp_path / "work"
    make_archive(src)
    root = str(work / "indexes" / "main")
    assert invoke(*run_args(src, work, config)).exit_code == 0
    make_png(src / "images" / "new-a.png", color=(200, 10, 10))
    assert invoke(*run_args(src, work, config)).exit_code == 0
    assert invoke("promote", "v000001", "--index", root).exit_code == 0  # a rollback
    assert invoke("gc", "--index", root, "--keep", "0").exit_code == 0
    assert mf.list_versions(root) == ["v000001"]
    make_png(src / "images" / "new-b.png", color=(10, 200, 10))
    result = invoke(*run_args(src, work, config))
    assert result.exit_code == 0, result.output
    assert mf.read_latest(root) == "v000003"  # v000002 named other content once: never again
