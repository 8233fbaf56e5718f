"""IndexHandle: follows LATEST, verifies before swapping, keeps old versions alive for their readers."""

from __future__ import annotations

import json
import logging
import shutil
import threading
import time

import numpy as np
import pytest

from tests.latest_file import write_latest_unchecked
from xmodal_index.sinks.embeddings_io import rows_batch
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index.build import IndexBuildConfig, build_version
from xmodal_index.sinks.schema import segment_id
from xmodal_index.sinks.serving.hot_swap import HotSwapConfig, IndexHandle, NoServableVersionError
from xmodal_index.sinks.serving.loader import IndexVersion

DIM, BITS = 16, 32
BUILD = IndexBuildConfig(recall_sample=20)


def publish(root, n: int, *, seed: int, model_id: str = "tiny@feedbeef", publish: bool = True,
            version: str | None = None) -> str:
    """Build a small version of ``n`` video rows under ``root``; returns its name."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((n, DIM)).astype(np.float32)
    x /= np.linalg.norm(x, axis=1, keepdims=True)
    codes = np.packbits((x @ rng.standard_normal((DIM, BITS)) > 0).astype(np.uint8), axis=1)
    uris = [f"s3://archive/v{seed}/{i:04d}.mp4" for i in range(n)]
    ids = [segment_id(u, "e1", "video", 0.0) for u in uris]

    def batches():
        yield rows_batch(ids, uris, ["e1"] * n, ["video"] * n, [0.0] * n, [1.0] * n, x, codes,
                         model_id=model_id, run_id=f"r{seed}")

    return build_version(batches, str(root), model_id=model_id, dim=DIM, bits=BITS, config=BUILD,
                         publish=publish, version=version).version


def tamper(root, version: str) -> None:
    """Flip one byte of the version's first float shard (its manifest still lists the old sha256)."""
    shard = next(s for s in mf.read_manifest(str(root), version).shards if s.kind == "float")
    path = root / version / shard.file
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def copy_version(root, src: str, dst: str) -> None:
    """A byte-identical copy of ``src`` published as ``dst`` (what a promote of the same data does)."""
    shutil.copytree(root / src, root / dst)
    manifest = json.loads((root / dst / "manifest.json").read_text())
    manifest.update(version=dst, parent_version=src)
    (root / dst / "manifest.json").write_text(json.dumps(manifest))


def query(dim: int = DIM) -> np.ndarray:
    q = np.ones((1, dim), np.float32)
    return q / np.linalg.norm(q)


@pytest.fixture()
def root(tmp_path):
    root = tmp_path / "idx"
    publish(root, 40, seed=1)
    return root


def test_handle_serves_the_version_latest_names(root):
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        with handle.acquire() as served:
            assert served.version == "v000001"
            assert len(served.index.search(query(), 5)[0]) == 5
        status = handle.status()
    assert (status.version, status.ntotal, status.model_id) == ("v000001", 40, "tiny@feedbeef")


def test_refresh_swaps_to_a_newly_published_version(root):
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        publish(root, 50, seed=2)
        assert handle.refresh() is True
        with handle.acquire() as served:
            assert (served.version, served.manifest.ntotal) == ("v000002", 50)


def test_background_poll_picks_up_a_new_version(root):
    with IndexHandle(str(root), HotSwapConfig(poll_s=0.05)) as handle:
        publish(root, 50, seed=2)
        deadline = time.monotonic() + 10
        while handle.status().version != "v000002" and time.monotonic() < deadline:
            time.sleep(0.05)
        assert handle.status().version == "v000002"


def test_a_swapped_out_version_stays_usable_until_its_reader_is_done(root):
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        with handle.acquire() as old:
            publish(root, 50, seed=2)
            assert handle.refresh() is True
            assert handle.status().version == "v000002"
            assert not old.closed
            assert len(old.index.search(query(), 5)[0]) == 5  # still searchable mid-swap
        assert old.closed


def test_a_version_nobody_reads_is_closed_at_the_swap(root):
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        first = handle.current
        publish(root, 50, seed=2)
        handle.refresh()
        assert first.closed and not handle.current.closed


def test_a_tampered_version_is_refused_and_the_old_one_kept(root, caplog):
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        bad = publish(root, 50, seed=2, publish=False)
        tamper(root, bad)
        write_latest_unchecked(str(root), bad)
        with caplog.at_level(logging.ERROR, logger="xmodal_index.sinks.serving.hot_swap"):
            assert handle.refresh() is False
        status = handle.status()
        with handle.acquire() as served:
            assert len(served.index.search(query(), 5)[0]) == 5
    assert status.version == "v000001"
    assert "sha256" in status.refused[bad]
    assert any(bad in r.getMessage() and "still serving v000001" in r.getMessage() for r in caplog.records)


def test_a_refused_version_is_not_loaded_again_but_a_later_good_one_is(root, monkeypatch):
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        bad = publish(root, 50, seed=2, publish=False)
        tamper(root, bad)
        write_latest_unchecked(str(root), bad)
        handle.refresh()
        opened = []
        real_open = IndexVersion.open
        monkeypatch.setattr(IndexVersion, "open",
                            lambda *a, **kw: opened.append(kw["latest"].version) or real_open(*a, **kw))
        assert handle.refresh() is False
        assert opened == []
        publish(root, 60, seed=3)
        assert handle.refresh() is True
    assert opened == ["v000003"]


def test_a_version_whose_prepare_fails_is_refused(root):
    def prepare(index, current):
        if index.version == "v000002":
            raise RuntimeError("encoder checkpoint unreadable")
        return f"encoder of {index.version}"

    with IndexHandle(str(root), HotSwapConfig(poll_s=60), prepare=prepare) as handle:
        publish(root, 50, seed=2)
        assert handle.refresh() is False
        with handle.acquire() as served:
            assert (served.version, served.extra) == ("v000001", "encoder of v000001")
        assert "encoder checkpoint unreadable" in handle.status().refused["v000002"]


def test_prepare_sees_the_version_being_replaced(root):
    calls = []

    def prepare(index, current):
        calls.append((index.version, current.version if current else None))
        return current.extra if current else object()

    with IndexHandle(str(root), HotSwapConfig(poll_s=60), prepare=prepare) as handle:
        first_extra = handle.current.extra
        publish(root, 50, seed=2)
        handle.refresh()
        assert handle.current.extra is first_extra
    assert calls == [("v000001", None), ("v000002", "v000001")]


def test_nothing_published_raises_until_a_version_appears(tmp_path):
    root = tmp_path / "idx"
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        with pytest.raises(NoServableVersionError, match="no LATEST"):
            with handle.acquire():
                pass
        assert handle.status().version is None
        publish(root, 40, seed=1)
        assert handle.refresh() is True
        assert handle.status().version == "v000001"


def test_rollback_of_latest_to_an_older_version_is_followed(root):
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        publish(root, 50, seed=2)
        handle.refresh()
        write_latest_unchecked(str(root), "v000001")
        assert handle.refresh() is True
        assert handle.status().version == "v000001"


def test_a_pinned_version_ignores_latest(root):
    publish(root, 50, seed=2)
    with IndexHandle(str(root), HotSwapConfig(poll_s=0.05, version="v000001")) as handle:
        time.sleep(0.2)
        assert handle.refresh() is False
        status = handle.status()
    assert (status.version, status.pinned) == ("v000001", True)


def test_a_pinned_version_that_fails_verification_raises_at_start(root):
    tamper(root, "v000001")
    with pytest.raises(Exception, match="sha256"):
        IndexHandle(str(root), HotSwapConfig(version="v000001")).start()


def test_readers_never_fail_while_versions_swap_back_and_forth(root):
    copy_version(root, "v000001", "v000002")
    errors, searches = [], [0]
    stop = threading.Event()

    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        def reader():
            while not stop.is_set():
                try:
                    with handle.acquire() as served:
                        assert len(served.index.search(query(), 3)[0]) == 3
                    searches[0] += 1
                except Exception as err:  # noqa: BLE001 - collected and asserted below
                    errors.append(err)

        threads = [threading.Thread(target=reader) for _ in range(3)]
        for t in threads:
            t.start()
        for i in range(20):
            write_latest_unchecked(str(root), "v000002" if i % 2 == 0 else "v000001")
            assert handle.refresh() is True
        stop.set()
        for t in threads:
            t.join()
    assert errors == [] and searches[0] > 0


@pytest.mark.parametrize("kwargs, message", [
    ({"poll_s": 0}, "poll_s"),
    ({"poll_s": float("nan")}, "poll_s"),
    ({"version": "latest"}, "version"),
])
def test_config_rejects_bad_values_naming_them(kwargs, message):
    with pytest.raises(ValueError, match=message):
        HotSwapConfig(**kwargs)


def test_a_version_number_published_again_with_another_manifest_is_examined_again(root):
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        bad = publish(root, 50, seed=2, publish=False)
        tamper(root, bad)
        write_latest_unchecked(str(root), bad)
        assert handle.refresh() is False and bad in handle.status().refused
        # The same number published again, now with a manifest that matches its files.
        shutil.rmtree(root / bad)
        assert publish(root, 50, seed=3, publish=False, version=bad) == bad
        write_latest_unchecked(str(root), bad)
        assert handle.refresh() is True
        assert handle.status().version == bad


@pytest.mark.parametrize("content", ["symlink", "large", "garbage"])
def test_status_never_echoes_what_latest_holds(root, tmp_path, content):
    secret = "root:x:0:0:root:/root:/bin/bash\nadmin:SECRET-CONTENT\n"  # at most a short prefix may show
    latest = root / "LATEST"
    with IndexHandle(str(root), HotSwapConfig(poll_s=60)) as handle:
        latest.unlink()
        if content == "symlink":
            target = tmp_path / "passwd"
            target.write_text(f"v000001\n{secret}\n")
            latest.symlink_to(target)
        elif content == "large":
            latest.write_text("v000001\n" + secret * 1000)
        else:
            latest.write_text(secret + "\n")
        assert handle.refresh() is False
        status = handle.status()
    assert status.version == "v000001"  # still serving what it had
    assert "SECRET" not in (status.last_error or "") and "SECRET" not in repr(status.refused)
    assert "\n" not in status.last_error and len(status.last_error) <= 300
