"""Verification records: a CLI query re-hashes no unchanged file, and any change is still refused."""

import os
import shutil

import pytest

from tests.query_fixtures import sample_work
from xmodal_index.sinks.errors import ChecksumMismatchError
from xmodal_index.sinks.index import manifest as mf
from xmodal_index.sinks.serving import verified
from xmodal_index.sinks.serving.loader import IndexVersion


@pytest.fixture
def index_root(tmp_path_factory, tmp_path, monkeypatch):
    _, work = sample_work(tmp_path_factory)
    root = tmp_path / "indexes" / "main"
    shutil.copytree(work / "indexes" / "main", root)
    monkeypatch.setenv(verified.RECORDS_ENV, str(tmp_path / "records"))
    # the files were just copied: act as if verification happens well after (not racily clean)
    now = verified.time.time()
    monkeypatch.setattr(verified.time, "time", lambda: now + 60)
    verified.forget()
    yield root
    verified.forget()


@pytest.fixture
def hashed(monkeypatch):
    calls = []
    real = mf.sha256_file

    def counting(path, *args, **kwargs):
        calls.append(os.path.basename(path))
        return real(path, *args, **kwargs)

    monkeypatch.setattr(mf, "sha256_file", counting)
    return calls


def _open(root):
    IndexVersion.open(str(root)).close()


def test_a_new_process_reuses_the_records_and_hashes_nothing(index_root, hashed):
    _open(index_root)
    files = len(mf.read_manifest(str(index_root), "v000001").all_files())
    assert len(hashed) == files
    verified.forget()  # a new process: only the records on disk remain
    _open(index_root)
    assert len(hashed) == files


def test_a_changed_file_is_hashed_again_and_refused(index_root, hashed):
    _open(index_root)
    ids = next((index_root / "v000001").glob("*.ids.parquet"))
    st = ids.stat()
    data = bytearray(ids.read_bytes())
    data[len(data) // 2] ^= 0xFF
    ids.write_bytes(bytes(data))
    os.utime(ids, ns=(st.st_atime_ns, st.st_mtime_ns))  # same size, same mtime: the ctime still moves
    verified.forget()
    with pytest.raises(ChecksumMismatchError) as err:
        _open(index_root)
    assert ids.name in str(err.value)


def test_a_replaced_file_with_the_same_bytes_is_hashed_again(index_root, hashed):
    _open(index_root)
    shard = next((index_root / "v000001").glob("*.float.faiss"))
    copy = shard.with_name("copy.tmp")
    shutil.copy2(shard, copy)
    os.replace(copy, shard)  # a new inode
    verified.forget()
    before = len(hashed)
    _open(index_root)
    assert hashed[before:] == [shard.name]


def test_records_can_be_switched_off(index_root, hashed, monkeypatch):
    monkeypatch.setenv(verified.RECORDS_ENV, "off")
    _open(index_root)
    verified.forget()
    first = len(hashed)
    _open(index_root)
    assert len(hashed) == 2 * first
