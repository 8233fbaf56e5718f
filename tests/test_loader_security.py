"""A query node trusts no manifest: hostile file names, unverified fetches, digests,
signatures and the cache's size, on local and S3 index stores."""

from __future__ import annotations

import hashlib
import os
import shutil

import pytest

from tests.sealed_index import build_small, rewrite_manifest, seal_latest, tree
from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import ChecksumMismatchError, IndexVersionError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index import seal
from xmodal_index.sinks.serving.loader import IndexVersion

KEEP_ENV = "XMODAL_INDEX_CACHE_KEEP"
PAYLOAD = b"written by a hostile manifest\n"
SHA_OK = hashlib.sha256(PAYLOAD).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One real version (v000001), built once; tests copy it."""
    root = tmp_path_factory.mktemp("built") / "idx"
    build_small(str(root))
    return root


@pytest.fixture
def local_root(built, tmp_path):
    root = tmp_path / "store" / "idx"
    shutil.copytree(built, root)
    seal_latest(str(root), "v000001")
    return str(root)


@pytest.fixture
def s3_root(built, s3_bucket):
    root = f"{s3_bucket}/indexes/main"
    for base, _, files in os.walk(built):
        for name in files:
            path = os.path.join(base, name)
            storage.put_file(path, storage.join(root, os.path.relpath(path, built)))
    seal_latest(root, "v000001")
    return root


@pytest.fixture
def node(tmp_path, monkeypatch):
    """The query node's own directory; its cache is node/cache."""
    node = tmp_path / "node"
    (node / "cache").mkdir(parents=True)
    monkeypatch.delenv(seal.SIGNING_KEY_ENV, raising=False)
    monkeypatch.delenv(KEEP_ENV, raising=False)
    return node


def _hostile_names(node) -> list[str]:
    return [
        str(node / "abs-target" / "pwned"),  # absolute
        "../../../escaped-pwned",  # cache/<key>/v000001/../../../ = node/
        "../../../abs-target/../escaped-twice",
        "..",
        ".",
        "",
        "%2e%2e%2f%2e%2e%2f%2e%2e%2fescaped-encoded",
        "..\\..\\..\\escaped-backslash",
        "ids\x00.parquet",
        "\u2024\u2024/\u2024\u2024/\u2024\u2024/escaped-onedot",
        "\uff0e\uff0e\uff0f\uff0e\uff0e\uff0fescaped-fullwidth",
        "a" * 129,
        ".hidden",
        "manifest.json",
        "SEAL",
        "dir/file.bin",
    ]


def _add_hostile_file(root: str, name: str, sha256: str) -> None:
    """List ``name`` as an extra file of v000001 (re-sealed), with its bytes on the store
    where a naive loader would look for them (locally: only where that stays in the test's
    directory)."""
    source = storage.join(root, "v000001", name)
    inside = storage.is_s3(root) or os.path.normpath(source).startswith(os.path.dirname(os.path.dirname(root)))
    if inside and name not in (mf.MANIFEST_NAME, seal.SEAL_NAME):
        try:
            storage.write_bytes(source, PAYLOAD)
        except Exception:  # noqa: BLE001 - some names cannot be stored at all (NUL, empty)
            pass
    rewrite_manifest(root, "v000001",
                     lambda m: m["files"].append({"file": name, "sha256": sha256, "bytes": len(PAYLOAD)}))


def _assert_refused_writing_nothing(root: str, node, cache_dir: str, version: str | None) -> None:
    before = tree(str(node))
    with pytest.raises(Exception) as info:  # IndexVersionError, checked below after what was written
        IndexVersion.open(root, version=version, cache_dir=cache_dir)
    after = tree(str(node))
    assert after == before, f"written on the query node: {sorted(after - before)}"
    assert isinstance(info.value, IndexVersionError), repr(info.value)
    message = str(info.value)
    assert "not a plain file name" in message
    assert "\n" not in message and "\x00" not in message


@pytest.mark.parametrize("by", ["version", "latest"])
@pytest.mark.parametrize("right_sha", [True, False], ids=["sha-right", "sha-wrong"])
@pytest.mark.parametrize("which", range(16))
def test_hostile_file_name_on_a_local_store_refuses_the_version_writing_nothing(local_root, node, which, right_sha,
                                                                                by):
    name = _hostile_names(node)[which]
    _add_hostile_file(local_root, name, SHA_OK if right_sha else "0" * 64)
    _assert_refused_writing_nothing(local_root, node, str(node / "cache"), "v000001" if by == "version" else None)


@pytest.mark.parametrize("right_sha", [True, False], ids=["sha-right", "sha-wrong"])
@pytest.mark.parametrize("which", [0, 1, 2, 6, 7, 9, 10, 15])
def test_hostile_file_name_on_s3_refuses_the_version_writing_nothing(s3_root, node, which, right_sha):
    name = _hostile_names(node)[which]
    _add_hostile_file(s3_root, name, SHA_OK if right_sha else "0" * 64)
    _assert_refused_writing_nothing(s3_root, node, str(node / "cache"), "v000001")


def test_hostile_shard_and_id_map_names_are_refused_before_any_fetch(local_root, node):
    def change(m):
        m["id_maps"][0]["file"] = "../../../escaped.parquet"
        for shard in m["shards"]:
            shard["id_map"] = "../../../escaped.parquet"

    rewrite_manifest(local_root, "v000001", change)
    _assert_refused_writing_nothing(local_root, node, str(node / "cache"), "v000001")


@pytest.mark.parametrize("store", ["local", "s3"])
def test_a_file_with_a_wrong_sha256_never_appears_in_the_cache(request, store, node):
    root = request.getfixturevalue(f"{store}_root")
    storage.write_bytes(storage.join(root, "v000001", "extra.bin"), PAYLOAD)
    rewrite_manifest(root, "v000001",
                     lambda m: m["files"].append({"file": "extra.bin", "sha256": "0" * 64, "bytes": len(PAYLOAD)}))
    with pytest.raises(ChecksumMismatchError, match="extra.bin"):
        IndexVersion.open(root, version="v000001", cache_dir=str(node / "cache"))
    cached = {os.path.basename(p) for p in tree(str(node / "cache"))}
    assert "extra.bin" not in cached
    assert not any(name.startswith(".fetch-") for name in cached)


def test_a_file_larger_than_listed_is_refused_and_not_cached(local_root, node):
    storage.write_bytes(storage.join(local_root, "v000001", "extra.bin"), PAYLOAD * 1000)
    rewrite_manifest(local_root, "v000001",
                     lambda m: m["files"].append({"file": "extra.bin", "sha256": SHA_OK, "bytes": len(PAYLOAD)}))
    with pytest.raises(ChecksumMismatchError, match="larger than"):
        IndexVersion.open(local_root, version="v000001", cache_dir=str(node / "cache"))
    assert "extra.bin" not in {os.path.basename(p) for p in tree(str(node / "cache"))}


def test_a_name_that_leaves_the_directory_never_becomes_a_cache_path(tmp_path):
    from xmodal_index.sinks.serving.cache import file_path

    assert file_path(str(tmp_path), "shard.faiss") == str(tmp_path / "shard.faiss")
    for name in ("../x", "/etc/passwd", "a/b", "..", ""):
        with pytest.raises(IndexVersionError):
            file_path(str(tmp_path), name)


def test_a_symlink_planted_in_the_cache_is_replaced_not_followed(local_root, node):
    with IndexVersion.open(local_root, version="v000001", cache_dir=str(node / "cache")) as index:
        victim_name = index.manifest.id_maps[0].file
        cached = os.path.join(index.local_dir, victim_name)
    victim = node / "victim.txt"
    victim.write_text("untouched")
    os.unlink(cached)
    os.symlink(victim, cached)
    with IndexVersion.open(local_root, version="v000001", cache_dir=str(node / "cache")):
        pass
    assert victim.read_text() == "untouched"
    assert not os.path.islink(cached) and os.path.isfile(cached)


# ---------------------------------------------------------------- the manifest digest and signature


def test_a_manifest_changed_after_publishing_is_refused_via_latest(local_root, node):
    rewrite_manifest(local_root, "v000001", lambda m: m.update(created_at="2020-01-01T00:00:00Z"), reseal=False)
    with pytest.raises(ChecksumMismatchError, match="LATEST says"):
        IndexVersion.open(local_root)


def test_a_manifest_changed_after_sealing_is_refused_by_version(local_root, node):
    rewrite_manifest(local_root, "v000001", lambda m: m.update(model_id="other@1"), reseal=False)
    with pytest.raises(ChecksumMismatchError, match="SEAL says"):
        IndexVersion.open(local_root, version="v000001")


def test_a_version_without_seal_is_refused_telling_to_republish(local_root, node):
    os.unlink(os.path.join(local_root, "v000001", seal.SEAL_NAME))
    with pytest.raises(IndexVersionError, match="xmodal-index promote v000001"):
        IndexVersion.open(local_root, version="v000001")


def test_a_latest_without_digest_is_refused_telling_to_republish(local_root, node):
    with open(os.path.join(local_root, "LATEST"), "w") as f:
        f.write("v000001\n")
    with pytest.raises(IndexVersionError, match="without a manifest digest.*xmodal-index promote v000001") as info:
        IndexVersion.open(local_root)
    assert "\n" not in str(info.value)


def test_the_opened_version_carries_its_manifest_digest(local_root, node):
    digest = hashlib.sha256(storage.read_bytes(mf.manifest_uri(local_root, "v000001"))).hexdigest()
    with IndexVersion.open(local_root) as index:
        assert index.digest == digest


@pytest.mark.parametrize("by", ["latest", "version"])
def test_with_a_signing_key_a_version_signed_with_it_is_served(local_root, node, monkeypatch, by):
    seal_latest(local_root, "v000001", key=b"builder-key")
    monkeypatch.setenv(seal.SIGNING_KEY_ENV, "builder-key")
    with IndexVersion.open(local_root, version=None if by == "latest" else "v000001") as index:
        assert index.version == "v000001"


@pytest.mark.parametrize("by", ["latest", "version"])
@pytest.mark.parametrize("signed_with, reason", [(None, "no hmac"), (b"another-key", "a wrong hmac")])
def test_with_a_signing_key_unsigned_or_wrongly_signed_versions_are_refused(local_root, node, monkeypatch, by,
                                                                            signed_with, reason):
    seal_latest(local_root, "v000001", key=signed_with)
    monkeypatch.setenv(seal.SIGNING_KEY_ENV, "builder-key")
    with pytest.raises(IndexVersionError, match=f"carries {reason}-sha256 signature"):
        IndexVersion.open(local_root, version=None if by == "latest" else "v000001")


def test_a_signature_for_another_version_is_refused(local_root, node, monkeypatch):
    digest = seal.manifest_digest(storage.read_bytes(mf.manifest_uri(local_root, "v000001")))
    seal_latest(local_root, "v000001", signature=seal.sign("v000002", digest, b"builder-key"))
    monkeypatch.setenv(seal.SIGNING_KEY_ENV, "builder-key")
    with pytest.raises(IndexVersionError, match="wrong hmac"):
        IndexVersion.open(local_root)


def test_without_a_signing_key_unsigned_versions_are_served(local_root, node):
    assert seal.read_latest_record(local_root).signature is None
    with IndexVersion.open(local_root) as index:
        assert index.version == "v000001"


def test_an_id_map_not_listed_is_refused_before_fetching(local_root, node):
    def change(m):
        m["shards"][0]["id_map"] = "not-listed.parquet"

    rewrite_manifest(local_root, "v000001", change)
    with pytest.raises(IndexVersionError, match="not listed in id_maps"):
        IndexVersion.open(local_root, cache_dir=str(node / "cache"))
    assert not any(os.path.isfile(os.path.join(node, "cache", p)) for p in tree(str(node / "cache")))


# ---------------------------------------------------------------- the cache is pruned


@pytest.fixture(scope="module")
def four_versions(tmp_path_factory):
    root = tmp_path_factory.mktemp("four") / "idx"
    for seed in range(1, 5):
        build_small(str(root), 30, seed=seed)
    return root


def _cached(cache_dir) -> list[str]:
    base = os.path.join(cache_dir, os.listdir(cache_dir)[0])
    return sorted(n for n in os.listdir(base) if n.startswith("v"))


def test_the_cache_keeps_the_current_and_previous_version(four_versions, node):
    cache_dir = str(node / "cache")
    for v in ("v000001", "v000002", "v000003", "v000004"):
        IndexVersion.open(str(four_versions), version=v, cache_dir=cache_dir).close()
    assert _cached(cache_dir) == ["v000003", "v000004"]


def test_the_cache_never_removes_a_version_being_served(four_versions, node):
    cache_dir = str(node / "cache")
    served = IndexVersion.open(str(four_versions), version="v000001", cache_dir=cache_dir)
    try:
        for v in ("v000002", "v000003", "v000004"):
            IndexVersion.open(str(four_versions), version=v, cache_dir=cache_dir).close()
        assert _cached(cache_dir) == ["v000001", "v000003", "v000004"]
        assert len(served.search(served_query(), 3)[0]) == 3
    finally:
        served.close()


def test_the_number_of_cached_versions_is_configurable(four_versions, node, monkeypatch):
    cache_dir = str(node / "cache")
    monkeypatch.setenv(KEEP_ENV, "1")
    for v in ("v000001", "v000002", "v000003"):
        IndexVersion.open(str(four_versions), version=v, cache_dir=cache_dir).close()
    assert _cached(cache_dir) == ["v000003"]
    for v in ("v000001", "v000002", "v000003", "v000004"):
        IndexVersion.open(str(four_versions), version=v, cache_dir=cache_dir, keep_versions=3).close()
    assert _cached(cache_dir) == ["v000002", "v000003", "v000004"]


@pytest.mark.parametrize("value", ["0", "-1", "two"])
def test_a_bad_keep_setting_is_refused_naming_it(four_versions, node, monkeypatch, value):
    monkeypatch.setenv(KEEP_ENV, value)
    with pytest.raises(ValueError, match=KEEP_ENV):
        IndexVersion.open(str(four_versions), version="v000001", cache_dir=str(node / "cache"))


def served_query():
    import numpy as np

    q = np.ones((1, 16), np.float32)
    return q / np.linalg.norm(q)


def test_a_refused_version_leaves_nothing_the_cache_keeps(four_versions, node, tmp_path):
    root = tmp_path / "four"
    shutil.copytree(four_versions, root)
    storage.write_bytes(storage.join(str(root), "v000002", "extra.bin"), PAYLOAD)
    rewrite_manifest(str(root), "v000002",
                     lambda m: m["files"].append({"file": "extra.bin", "sha256": "0" * 64, "bytes": len(PAYLOAD)}),
                     reseal=False)
    seal_latest(str(root), "v000002")
    cache_dir = str(node / "cache")
    with pytest.raises(ChecksumMismatchError):
        IndexVersion.open(str(root), version="v000002", cache_dir=cache_dir)
    for v in ("v000003", "v000004"):
        IndexVersion.open(str(root), version=v, cache_dir=cache_dir).close()
    assert _cached(cache_dir) == ["v000003", "v000004"]
