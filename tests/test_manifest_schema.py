"""The strict manifest schema, and byte flips of a real published manifest."""

from __future__ import annotations

import copy
import json
import os
import random
import shutil

import numpy as np
import pytest

from tests.sealed_index import DIM, build_small, seal_latest
from xmodal_index.sinks.errors import IndexVersionError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.index import seal
from xmodal_index.sinks.serving.loader import IndexVersion, check_sealed_manifest, sealed_manifest


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """A real version (one id map, a float and a binary shard), built once."""
    root = tmp_path_factory.mktemp("built") / "idx"
    build_small(str(root), 40, seed=1)
    return root


@pytest.fixture
def published(built, tmp_path, monkeypatch):
    monkeypatch.delenv(seal.SIGNING_KEY_ENV, raising=False)
    root = tmp_path / "idx"
    shutil.copytree(built, root)
    seal_latest(str(root), "v000001")
    return root


@pytest.fixture(scope="module")
def data(built) -> dict:
    return json.loads((built / "v000001" / "manifest.json").read_bytes())


def check(data: dict) -> None:
    mf.Manifest.from_json(json.dumps(data))


# ---------------------------------------------------------------- what the build writes is accepted


def test_the_built_manifest_is_accepted_and_stored_canonical(built):
    raw = (built / "v000001" / "manifest.json").read_bytes()
    manifest = mf.Manifest.from_json(raw)
    assert manifest.to_json().encode() == raw
    assert raw == (json.dumps(json.loads(raw), sort_keys=True, separators=(",", ":")) + "\n").encode()


def test_known_optional_keys_are_accepted(data):
    d = copy.deepcopy(data)
    d.update(fencing_token=7, rows_fingerprint="sha256:abc", written_by_a_newer_release={"x": 1})
    d["metrics"].update(fencing_token=3, rows_fingerprint="ab" * 32, ledger_snapshot="ledger-r1.parquet", run_id="r1")
    manifest = mf.Manifest.from_json(json.dumps(d))
    assert manifest.extra["fencing_token"] == 7 and manifest.extra["rows_fingerprint"] == "sha256:abc"
    assert manifest.metrics["fencing_token"] == 3


# ---------------------------------------------------------------- what is refused


def _shard(d, kind="float", n=0):
    return [s for s in d["shards"] if s["kind"] == kind][n]


CASES = {
    "version not a name": (lambda d: d.update(version="../v1"), "version"),
    "parent not a name": (lambda d: d.update(parent_version=7), "parent_version"),
    "created_at garbage": (lambda d: d.update(created_at="yesterday"), "created_at"),
    "dim zero": (lambda d: d.update(dim=0), "dim"),
    "dim a string": (lambda d: d.update(dim="16"), "dim"),
    "dim a float": (lambda d: d.update(dim=16.0), "dim"),
    "dim a bool": (lambda d: d.update(dim=True), "dim"),
    "bits not a multiple of 8": (lambda d: d.update(bits=33), "bits"),
    "unknown metric": (lambda d: d.update(metric="l2"), "metric"),
    "format from another release": (lambda d: d.update(format=2), "format"),
    "ntotal off by one": (lambda d: d.update(ntotal=d["ntotal"] + 1), "ntotal"),
    "ntotal negative": (lambda d: d.update(ntotal=-1), "ntotal"),
    "shard ntotal changed": (lambda d: _shard(d).update(ntotal=_shard(d)["ntotal"] - 1), "ntotal|disagrees"),
    "shard id map not listed": (lambda d: _shard(d).update(id_map="other.parquet"), "not listed in id_maps"),
    "id map listed twice": (lambda d: d["id_maps"].append(dict(d["id_maps"][0])), "listed twice"),
    "id map unused": (lambda d: d["id_maps"].append({"file": "spare.parquet", "sha256": "0" * 64, "bytes": 1}),
                      "no shard uses it"),
    "vectors not listed": (lambda d: _shard(d).update(vectors="nope.f16"), "not listed in vectors|disagrees"),
    "two float shards on one id map": (lambda d: _shard(d, "binary").update(kind="float"), "disagrees|ntotal"),
    "unknown kind": (lambda d: _shard(d).update(kind="sparse"), "kind"),
    "unknown modality": (lambda d: _shard(d).update(modality="smell"), "modality"),
    "shard sha256 uppercase": (lambda d: _shard(d).update(sha256=_shard(d)["sha256"].upper()), "sha256"),
    "shard bytes negative": (lambda d: _shard(d).update(bytes=-1), "bytes"),
    "shard unknown key": (lambda d: _shard(d).update(fetch_from="http://x"), "unknown keys"),
    "recall above one": (lambda d: _shard(d).update(recall_at_10=1.5), "recall_at_10"),
    "search param a string": (lambda d: _shard(d).update(search_params={"nprobe": "8"}), "nprobe"),
    "no shards": (lambda d: d.update(shards=[]), "shards"),
    "shards not a list": (lambda d: d.update(shards={}), "shards"),
    "missing ntotal": (lambda d: d.pop("ntotal"), "ntotal"),
    "index_factory lacks binary": (lambda d: d["index_factory"].pop("binary"), "index_factory"),
    "metrics not an object": (lambda d: d.update(metrics=[]), "metrics"),
    "fencing token negative": (lambda d: d.update(fencing_token=-1), "fencing_token"),
    "fencing token a string": (lambda d: d.update(fencing_token="3"), "fencing_token"),
    "rows fingerprint a number": (lambda d: d.update(rows_fingerprint=5), "rows_fingerprint"),
    "metrics fencing token a float": (lambda d: d["metrics"].update(fencing_token=1.5), "metrics.fencing_token"),
    "metrics ledger snapshot a path": (lambda d: d["metrics"].update(ledger_snapshot="../../etc/x.parquet"),
                                       "metrics.ledger_snapshot"),
    "file name reserved": (lambda d: d["files"].append({"file": "SEAL", "sha256": "0" * 64, "bytes": 1}), "SEAL"),
    "file name with a slash": (lambda d: d["files"].append({"file": "a/b", "sha256": "0" * 64, "bytes": 1}),
                               "plain file name"),
    "file name over 128 characters": (
        lambda d: d["files"].append({"file": "x" * 129, "sha256": "0" * 64, "bytes": 1}), "plain file name"),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_a_malformed_manifest_is_refused_naming_the_key(data, case):
    change, key = CASES[case]
    d = copy.deepcopy(data)
    change(d)
    with pytest.raises(IndexVersionError, match=key) as info:
        check(d)
    assert "\n" not in str(info.value) and len(str(info.value)) < 400


@pytest.mark.parametrize("text, why", [
    ('{"a": 1, "a": 2}', "twice"),
    ('{"dim": NaN}', "NaN"),
    ('{"dim": Infinity}', "Infinity"),
    ("[" * 5000 + "]" * 5000, "deeper"),
    ("[1, 2]", "not a JSON object"),
    (b"\xff\xfe{}", "not valid JSON"),
])
def test_json_that_is_not_plain_is_refused(text, why):
    with pytest.raises(IndexVersionError, match=why):
        mf.Manifest.from_json(text)


def test_a_manifest_over_the_size_limit_is_refused_unread(published, monkeypatch):
    monkeypatch.setattr(mf, "MAX_MANIFEST_BYTES", 64)
    with pytest.raises(IndexVersionError, match="larger than 64 bytes"):
        mf.read_manifest_data(str(published), "v000001")


def test_the_build_refuses_to_write_a_manifest_readers_would_refuse(tmp_path, data):
    manifest = mf.Manifest.from_json(json.dumps(data))
    import dataclasses

    bad = dataclasses.replace(manifest, ntotal=manifest.ntotal + 1)
    with pytest.raises(IndexVersionError, match="ntotal"):
        mf.write_manifest(str(tmp_path), bad)
    assert not os.path.exists(tmp_path / "v000001" / "manifest.json")


def test_index_files_disagreeing_with_a_resealed_manifest_are_refused_at_open(published):
    """dim and ntotal consistent in the manifest but not with the FAISS files."""
    def change(d):
        d["dim"] = DIM * 2

    raw = json.loads((published / "v000001" / "manifest.json").read_bytes())
    change(raw)
    (published / "v000001" / "manifest.json").write_text(json.dumps(raw))
    seal_latest(str(published), "v000001")
    with pytest.raises(IndexVersionError, match="dimension"):
        IndexVersion.open(str(published))


# ---------------------------------------------------------------- byte flips of a published manifest


def _flips(raw: bytes, positions) -> list[tuple[int, int]]:
    rng = random.Random(1234)
    return [(pos, rng.randrange(1, 256)) for pos in positions]


def _sweep(root, raw: bytes, flips) -> list[str]:
    """The flips of the published manifest that the query node's manifest layer accepts,
    checked against what LATEST and the version's SEAL record (as the loader does after
    reading manifest.json)."""
    latest = seal.read_latest_record(str(root))
    sealed = seal.read_seal(str(root), "v000001")
    records = [("LATEST", latest.digest, latest.signature), ("v000001/SEAL", *sealed)]
    check_sealed_manifest(raw, str(root), "v000001", latest.digest, latest.signature, "LATEST")  # unflipped: ok
    accepted = []
    for pos, mask in flips:
        flipped = bytearray(raw)
        flipped[pos] ^= mask
        for where, digest, signature in records:
            try:
                check_sealed_manifest(bytes(flipped), str(root), "v000001", digest, signature, where)
            except IndexVersionError:
                continue
            accepted.append(f"byte {pos} ^ {mask:#04x} via {where}")
    return accepted


def test_a_seeded_sample_of_byte_flips_is_all_refused(published):
    raw = (published / "v000001" / "manifest.json").read_bytes()
    rng = random.Random(20260101)
    positions = [rng.randrange(len(raw)) for _ in range(2_000)]
    assert _sweep(published, raw, _flips(raw, positions)) == []
    sealed_manifest(str(published))  # the untouched manifest still opens


def test_byte_flips_are_refused_through_the_full_open_path(published):
    raw = (published / "v000001" / "manifest.json").read_bytes()
    path = published / "v000001" / "manifest.json"
    rng = random.Random(7)
    for pos in [rng.randrange(len(raw)) for _ in range(4)] + [raw.index(b'"ntotal"') + 9]:
        flipped = bytearray(raw)
        flipped[pos] ^= 0x01
        path.write_bytes(bytes(flipped))
        with pytest.raises(IndexVersionError):
            IndexVersion.open(str(published))
    path.write_bytes(raw)
    with IndexVersion.open(str(published)) as index:
        q = np.ones((1, DIM), np.float32) / np.sqrt(DIM)
        assert len(index.search(q, 3)[0]) == 3


def test_every_byte_flip_of_a_published_manifest_is_refused(published):
    """The full sweep (three masks per byte): cheap at the manifest layer, so not marked slow."""
    raw = (published / "v000001" / "manifest.json").read_bytes()
    flips = [(pos, mask) for pos in range(len(raw)) for mask in (0x01, 0x20, 0xFF)]
    assert _sweep(published, raw, flips) == []


@pytest.mark.slow
def test_resealed_byte_flips_either_are_refused_or_still_answer_queries(published):
    """An attacker who can also rewrite LATEST and SEAL (no signing key on the node):
    whatever the schema and the loader accept must still serve searches."""
    raw = (published / "v000001" / "manifest.json").read_bytes()
    path = published / "v000001" / "manifest.json"
    q = np.ones((1, DIM), np.float32) / np.sqrt(DIM)
    failures = []
    for pos in range(len(raw)):
        flipped = bytearray(raw)
        flipped[pos] ^= 0x01
        path.write_bytes(bytes(flipped))
        seal_latest(str(published), "v000001")
        try:
            index = IndexVersion.open(str(published))
        except IndexVersionError:
            continue
        try:
            for modalities in (None, ["video"]):
                index.search(q, 5, modalities)
        except Exception as err:  # noqa: BLE001 - collected: an accepted manifest must not break searches
            failures.append(f"byte {pos}: {type(err).__name__}: {err}")
        finally:
            index.close()
    assert failures == []
