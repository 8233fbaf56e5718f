"""Conditional writes (create-if-absent, replace/delete-if-match) on local disks and S3."""

import os
import threading

import pytest

from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import ObjectNotFoundError, PreconditionFailedError, StorageError


@pytest.fixture(params=["local", "s3"])
def uri(request, tmp_path):
    if request.param == "local":
        return str(tmp_path / "dir" / "LATEST")
    return request.getfixturevalue("s3_bucket") + "/dir/LATEST"


def test_reading_a_missing_object_names_it(uri):
    with pytest.raises(ObjectNotFoundError, match="LATEST"):
        storage.read_versioned(uri)


def test_create_writes_once_and_refuses_a_second_create(uri):
    version = storage.create_if_absent(uri, b"v1")
    assert storage.read_versioned(uri) == (b"v1", version)
    with pytest.raises(PreconditionFailedError, match="exists"):
        storage.create_if_absent(uri, b"v2")
    assert storage.read_bytes(uri) == b"v1"


def test_replace_succeeds_only_at_the_expected_version(uri):
    first = storage.create_if_absent(uri, b"v1")
    second = storage.replace_if_match(uri, b"v2", first)
    assert second != first
    assert storage.read_versioned(uri) == (b"v2", second)
    with pytest.raises(PreconditionFailedError):
        storage.replace_if_match(uri, b"v3", first)  # stale version
    assert storage.read_bytes(uri) == b"v2"


def test_the_version_changes_with_the_content_even_at_the_same_size(uri):
    first = storage.create_if_absent(uri, b"aaaa")
    storage.write_bytes(uri, b"bbbb")  # an unconditional writer changed it
    assert storage.read_versioned(uri)[1] != first
    with pytest.raises(PreconditionFailedError):
        storage.replace_if_match(uri, b"cccc", first)
    assert storage.read_bytes(uri) == b"bbbb"


def test_replacing_or_deleting_a_missing_object_fails_its_precondition(uri):
    with pytest.raises(PreconditionFailedError):
        storage.replace_if_match(uri, b"v1", "0" * 32)
    with pytest.raises(PreconditionFailedError):
        storage.delete_if_match(uri, "0" * 32)
    assert not storage.exists(uri)


def test_delete_removes_only_the_expected_version(uri):
    first = storage.create_if_absent(uri, b"v1")
    second = storage.replace_if_match(uri, b"v2", first)
    with pytest.raises(PreconditionFailedError):
        storage.delete_if_match(uri, first)
    assert storage.read_bytes(uri) == b"v2"
    storage.delete_if_match(uri, second)
    assert not storage.exists(uri)
    storage.create_if_absent(uri, b"v3")  # free again


def _race(n, attempt):
    barrier = threading.Barrier(n)
    won, lost, errors = [], [], []

    def run(i):
        barrier.wait()
        try:
            won.append((i, attempt(i)))
        except PreconditionFailedError:
            lost.append(i)
        except Exception as err:  # noqa: BLE001 - reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    return won, lost


def test_of_racing_creators_exactly_one_wins(uri):
    won, lost = _race(6, lambda i: storage.create_if_absent(uri, f"writer {i}".encode()))
    assert len(won) == 1 and len(lost) == 5
    (winner, version), = won
    assert storage.read_versioned(uri) == (f"writer {winner}".encode(), version)


def test_of_racing_writers_on_one_version_exactly_one_wins(uri):
    base = storage.create_if_absent(uri, b"base")
    won, lost = _race(6, lambda i: storage.replace_if_match(uri, f"writer {i}".encode(), base))
    assert len(won) == 1 and len(lost) == 5
    (winner, version), = won
    assert storage.read_versioned(uri) == (f"writer {winner}".encode(), version)


def test_local_writers_lock_a_hidden_sidecar_next_to_the_object(tmp_path):
    uri = "file://" + str(tmp_path / "LATEST")
    storage.create_if_absent(uri, b"v1")
    assert sorted(os.listdir(tmp_path)) == [".LATEST.lock", "LATEST"]  # no temporary file left
    assert storage.read_versioned(str(tmp_path / "LATEST"))[0] == b"v1"


def test_an_unsupported_scheme_is_refused():
    with pytest.raises(StorageError, match="unsupported URI scheme"):
        storage.create_if_absent("gs://bucket/LATEST", b"v1")


def test_a_store_without_conditional_deletes_still_deletes_only_the_expected_version(s3_bucket, fault_proxy):
    uri = s3_bucket + "/dir/LATEST"
    first = storage.create_if_absent(uri, b"v1")
    second = storage.replace_if_match(uri, b"v2", first)
    fault_proxy.fail_next(1, status=501, code="NotImplemented", methods=("DELETE",))
    with pytest.raises(PreconditionFailedError):
        storage.delete_if_match(uri, first)  # answered NotImplemented: compared by a HEAD instead
    assert storage.read_bytes(uri) == b"v2"
    fault_proxy.fail_next(1, status=501, code="NotImplemented", methods=("DELETE",))
    storage.delete_if_match(uri, second)
    assert not storage.exists(uri)
    assert fault_proxy.count("DELETE", 501) == 2
