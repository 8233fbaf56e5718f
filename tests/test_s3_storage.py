"""The storage API on s3://, against moto's standalone server on 127.0.0.1 (and a fault
proxy in front of it). Fixtures come from tests/s3_server.py."""

from __future__ import annotations

import os

import boto3
import pytest

from tests.s3_server import apply_s3_env, free_port, new_bucket_name, start_moto
from xmodal_index.sinks import storage
from xmodal_index.sinks.errors import ObjectNotFoundError, StorageError
from xmodal_index.sinks.storage import s3

MiB = 1024 * 1024


def _put(uri: str, data: bytes) -> None:
    bucket, key = s3.split_uri(uri)
    boto3.client("s3").put_object(Bucket=bucket, Key=key, Body=data)


def _payload(n: int) -> bytes:
    return (bytes(range(256)) * (n // 256 + 1))[:n]


# --------------------------------------------------------------------------- reads, writes, listing


def test_write_then_read_back(s3_bucket):
    uri = storage.join(s3_bucket, "runs/r1/summary.json")
    storage.write_bytes(uri, b'{"ok": true}')
    assert storage.read_bytes(uri) == b'{"ok": true}'


def test_write_replaces_an_object_as_a_whole(s3_bucket):
    uri = storage.join(s3_bucket, "indexes/demo/LATEST")
    storage.write_bytes(uri, b"v000001")
    storage.write_bytes(uri, b"v000002")
    assert storage.read_bytes(uri) == b"v000002"


def test_listing_yields_uris_sizes_mtimes_and_plain_etags(s3_bucket):
    _put(f"{s3_bucket}/media/a.mp4", b"12345")
    (info,) = storage.list_objects(f"{s3_bucket}/media")
    head = boto3.client("s3").head_object(Bucket=s3_bucket[5:], Key="media/a.mp4")
    assert info.uri == f"{s3_bucket}/media/a.mp4"
    assert info.size == 5
    assert info.mtime == head["LastModified"].timestamp()
    assert info.etag == head["ETag"].strip('"') and '"' not in info.etag


def test_listing_is_sorted_and_globs_match_the_key_below_the_prefix(s3_bucket):
    for key in ["media/b.wav", "media/a.mp4", "media/clips/c.mp4", "media/clips/raw/d.mp4", "other/e.mp4"]:
        _put(f"{s3_bucket}/{key}", b"x")
    infos = storage.list_objects(f"{s3_bucket}/media/", include=("*.mp4",), exclude=("clips/raw/*",))
    assert [i.uri for i in infos] == [f"{s3_bucket}/media/a.mp4", f"{s3_bucket}/media/clips/c.mp4"]


def test_listing_a_prefix_does_not_match_sibling_names(s3_bucket):
    _put(f"{s3_bucket}/media/a.mp4", b"x")
    _put(f"{s3_bucket}/media-old/b.mp4", b"x")
    assert [i.uri for i in storage.list_objects(f"{s3_bucket}/media")] == [f"{s3_bucket}/media/a.mp4"]


def test_listing_skips_folder_markers(s3_bucket):
    _put(f"{s3_bucket}/media/", b"")
    _put(f"{s3_bucket}/media/a.mp4", b"x")
    assert [i.uri for i in storage.list_objects(s3_bucket)] == [f"{s3_bucket}/media/a.mp4"]


def test_listing_follows_pagination(s3_bucket, fault_proxy):
    for i in range(7):
        _put(f"{s3_bucket}/p/{i:02d}.jpg", b"x")
    storage.configure_s3(storage.S3Config(list_page_size=3))
    uris = [i.uri for i in storage.list_objects(f"{s3_bucket}/p")]
    assert uris == [f"{s3_bucket}/p/{i:02d}.jpg" for i in range(7)]
    assert sum(1 for m, path, _ in fault_proxy.requests if m == "GET" and "list-type=2" in path) == 3


def test_listing_an_empty_prefix_raises_not_found(s3_bucket):
    with pytest.raises(ObjectNotFoundError, match="nothing under"):
        list(storage.list_objects(f"{s3_bucket}/empty"))


def test_exists_for_objects_prefixes_and_missing_keys(s3_bucket):
    _put(f"{s3_bucket}/indexes/demo/v000001/manifest.json", b"{}")
    assert storage.exists(f"{s3_bucket}/indexes/demo/v000001/manifest.json")
    assert storage.exists(f"{s3_bucket}/indexes/demo")
    assert not storage.exists(f"{s3_bucket}/indexes/demo/LATEST")
    assert storage.exists(s3_bucket)


def test_delete_removes_and_tolerates_missing_keys(s3_bucket):
    uri = f"{s3_bucket}/tmp/x"
    storage.write_bytes(uri, b"x")
    storage.delete(uri)
    assert not storage.exists(uri)
    storage.delete(uri)


def test_stat_gives_size_and_etag(s3_bucket):
    storage.write_bytes(f"{s3_bucket}/k", b"abc")
    info = storage.stat(f"{s3_bucket}/k")
    assert (info.uri, info.size) == (f"{s3_bucket}/k", 3)
    assert info.etag == next(iter(storage.list_objects(s3_bucket))).etag


def test_open_read_streams_with_seek_and_partial_reads(s3_bucket):
    data = _payload(3 * MiB + 17)
    uri = f"{s3_bucket}/big.bin"
    _put(uri, data)
    with storage.open_read(uri) as f:
        assert f.read(10) == data[:10]
        f.seek(2 * MiB)
        assert f.read(100) == data[2 * MiB : 2 * MiB + 100]
        f.seek(-7, os.SEEK_END)
        assert f.read() == data[-7:]


def test_parquet_reads_straight_from_the_stream(s3_bucket):
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"segment_id": list(range(1000)), "uri": [f"s3://x/{i}.mp4" for i in range(1000)]})
    sink = pa.BufferOutputStream()
    pq.write_table(table, sink, row_group_size=100)
    uri = f"{s3_bucket}/embeddings/part-00000-of-00001.parquet"
    storage.write_bytes(uri, sink.getvalue().to_pybytes())
    with storage.open_read(uri) as f:
        assert pq.read_table(f, columns=["segment_id"]).column("segment_id").to_pylist() == list(range(1000))


def test_empty_objects_read_as_empty(s3_bucket):
    uri = f"{s3_bucket}/media/empty.mp4"
    storage.write_bytes(uri, b"")
    assert storage.read_bytes(uri) == b""
    with storage.local_path(uri) as path:
        assert os.path.getsize(path) == 0


def test_object_replaced_during_a_read_fails_instead_of_mixing_versions(s3_bucket):
    uri = f"{s3_bucket}/changing.bin"
    _put(uri, _payload(3 * MiB))
    with storage.open_read(uri) as f:
        f.read(10)
        _put(uri, b"new version")
        f.seek(2 * MiB)
        with pytest.raises(storage.ObjectChangedError, match="changing.bin"):
            f.read(10)


def test_local_path_downloads_to_a_temp_file_removed_afterwards(s3_bucket):
    uri = f"{s3_bucket}/media/clip.mp4"
    _put(uri, b"mp4 bytes")
    with storage.local_path(uri) as path:
        assert path.endswith(".mp4") and "clip" not in os.path.basename(path)  # named by extension only
        with open(path, "rb") as f:
            assert f.read() == b"mp4 bytes"
    assert not os.path.exists(path)


def test_local_path_removes_the_temp_file_when_the_block_fails(s3_bucket):
    uri = f"{s3_bucket}/media/clip.mp4"
    _put(uri, b"mp4 bytes")
    with pytest.raises(RuntimeError):
        with storage.local_path(uri) as path:
            raise RuntimeError("decoder crashed")
    assert not os.path.exists(path)


def test_put_file_above_the_threshold_goes_multipart(s3_bucket, tmp_path):
    storage.configure_s3(storage.S3Config(multipart_threshold_bytes=5 * MiB, multipart_chunk_bytes=5 * MiB))
    src = tmp_path / "shard.faiss"
    data = _payload(11 * MiB)
    src.write_bytes(data)
    uri = f"{s3_bucket}/indexes/demo/v000001/shard.faiss"
    storage.put_file(str(src), uri)
    assert storage.stat(uri).etag.endswith("-3")  # three parts
    with storage.local_path(uri) as path:  # ranged, parallel download
        with open(path, "rb") as f:
            assert f.read() == data


def test_write_bytes_above_the_threshold_goes_multipart(s3_bucket):
    storage.configure_s3(storage.S3Config(multipart_threshold_bytes=5 * MiB, multipart_chunk_bytes=5 * MiB))
    data = _payload(6 * MiB)
    uri = f"{s3_bucket}/part-00000-of-00001.parquet"
    storage.write_bytes(uri, data)
    assert storage.stat(uri).etag.endswith("-2")
    assert storage.read_bytes(uri) == data


# --------------------------------------------------------------------------- errors


def test_missing_bucket_is_named_in_one_line(s3_env):
    name = new_bucket_name()
    with pytest.raises(storage.BucketNotFoundError) as err:
        list(storage.list_objects(f"s3://{name}/prefix"))
    assert str(err.value) == f"bucket '{name}' does not exist (s3://{name}/prefix)"


@pytest.mark.parametrize("op", ["read_bytes", "local_path", "stat", "exists", "write_bytes"])
def test_missing_bucket_is_reported_by_every_operation(s3_env, op):
    name = new_bucket_name()
    uri = f"s3://{name}/some/key"
    with pytest.raises(storage.BucketNotFoundError, match=f"bucket '{name}' does not exist"):
        if op == "local_path":
            with storage.local_path(uri):
                pass
        elif op == "write_bytes":
            storage.write_bytes(uri, b"x")
        else:
            getattr(storage, op)(uri)


@pytest.mark.parametrize("op", ["read_bytes", "open_read", "local_path", "stat"])
def test_missing_key_raises_not_found_naming_the_uri(s3_bucket, op):
    uri = f"{s3_bucket}/no/such/key.mp4"
    with pytest.raises(ObjectNotFoundError) as err:
        if op in ("open_read", "local_path"):
            with getattr(storage, op)(uri):
                pass
        else:
            getattr(storage, op)(uri)
    assert not isinstance(err.value, storage.BucketNotFoundError)
    assert uri in str(err.value)


def test_uri_without_bucket_is_rejected():
    with pytest.raises(StorageError, match="no bucket"):
        storage.read_bytes("s3:///key")


def test_unreachable_endpoint_fails_after_retries_naming_the_endpoint(s3_env, monkeypatch):
    closed = f"http://127.0.0.1:{free_port()}"
    storage.configure_s3(storage.S3Config(endpoint_url=closed, max_attempts=2, connect_timeout_s=1))
    with pytest.raises(storage.EndpointUnreachableError) as err:
        storage.read_bytes("s3://bucket/key")
    message = str(err.value)
    assert closed in message and "s3://bucket/key" in message and "\n" not in message


def test_missing_credentials_give_a_clear_error(s3_env, monkeypatch):
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    with pytest.raises(storage.CredentialsError, match="no usable AWS credentials"):
        storage.read_bytes("s3://bucket/key")


@pytest.fixture(scope="module")
def auth_server():
    """A second moto server that checks credentials and IAM policies after the setup
    requests: one user with a valid key and no permissions, and one bucket."""
    server = start_moto({"INITIAL_NO_AUTH_ACTION_COUNT": "3"})
    try:
        kwargs = dict(endpoint_url=server.endpoint_url, region_name="us-east-1",
                      aws_access_key_id="setup", aws_secret_access_key="setup")
        iam = boto3.client("iam", **kwargs)
        iam.create_user(UserName="reader")
        key = iam.create_access_key(UserName="reader")["AccessKey"]
        bucket = new_bucket_name()
        boto3.client("s3", **kwargs).create_bucket(Bucket=bucket)
        yield server, key["AccessKeyId"], key["SecretAccessKey"], bucket
    finally:
        server.stop()


@pytest.fixture
def use_auth_server(auth_server, monkeypatch, tmp_path):
    """Point the storage layer at the checking server with the given key pair."""

    def use(key_id: str, secret: str) -> None:
        env = dict(auth_server[0].env, AWS_ACCESS_KEY_ID=key_id, AWS_SECRET_ACCESS_KEY=secret)
        apply_s3_env(monkeypatch, env, str(tmp_path))

    yield use
    storage.configure_s3(None)


def test_unknown_access_key_is_reported_as_a_credentials_error(auth_server, use_auth_server):
    use_auth_server("AKIAUNKNOWNKEY000000", "whatever")
    with pytest.raises(storage.CredentialsError, match="InvalidAccessKeyId") as err:
        list(storage.list_objects(f"s3://{auth_server[3]}/media"))
    assert "whatever" not in str(err.value)


def test_wrong_secret_is_reported_as_a_credentials_error(auth_server, use_auth_server):
    use_auth_server(auth_server[1], "wrong-secret")
    with pytest.raises(storage.CredentialsError, match="SignatureDoesNotMatch") as err:
        storage.write_bytes(f"s3://{auth_server[3]}/k", b"x")
    assert "wrong-secret" not in str(err.value)


def test_valid_key_without_permission_is_access_denied(auth_server, use_auth_server):
    use_auth_server(auth_server[1], auth_server[2])
    uri = f"s3://{auth_server[3]}/media/a.mp4"
    with pytest.raises(storage.AccessDeniedError) as err:
        storage.read_bytes(uri)
    assert uri in str(err.value) and "\n" not in str(err.value)


# --------------------------------------------------------------------------- transient faults


def test_writes_survive_throttling(s3_bucket, fault_proxy):
    fault_proxy.fail_next(2, status=503, code="SlowDown", methods=("PUT",))
    storage.write_bytes(f"{s3_bucket}/k", b"payload")
    assert fault_proxy.count("PUT", 503) == 2
    assert storage.read_bytes(f"{s3_bucket}/k") == b"payload"


def test_reads_survive_server_errors(s3_bucket, fault_proxy):
    _put(f"{s3_bucket}/k", b"payload")
    fault_proxy.fail_next(2, status=500, code="InternalError", methods=("GET",))
    assert storage.read_bytes(f"{s3_bucket}/k") == b"payload"
    assert fault_proxy.count("GET", 500) == 2


def test_listing_survives_throttling(s3_bucket, fault_proxy):
    _put(f"{s3_bucket}/m/a.mp4", b"x")
    fault_proxy.fail_next(2, status=503, code="SlowDown", methods=("GET",))
    assert [i.uri for i in storage.list_objects(f"{s3_bucket}/m")] == [f"{s3_bucket}/m/a.mp4"]


def test_stream_broken_midway_resumes_where_it_stopped(s3_bucket, fault_proxy):
    data = _payload(512 * 1024)
    _put(f"{s3_bucket}/audio.wav", data)
    fault_proxy.truncate_next(2)
    assert storage.read_bytes(f"{s3_bucket}/audio.wav") == data
    ranged = fault_proxy.count("GET")
    assert ranged >= 3  # the first GET and two resumptions


def test_download_broken_midway_is_retried(s3_bucket, fault_proxy):
    data = _payload(256 * 1024)
    _put(f"{s3_bucket}/clip.mp4", data)
    fault_proxy.truncate_next(1)
    with storage.local_path(f"{s3_bucket}/clip.mp4") as path:
        with open(path, "rb") as f:
            assert f.read() == data


def test_stream_that_keeps_breaking_fails_naming_the_object(s3_bucket, fault_proxy):
    storage.configure_s3(storage.S3Config(max_attempts=2))
    _put(f"{s3_bucket}/audio.wav", _payload(64 * 1024))
    fault_proxy.truncate_next(100, keep_fraction=0.0)
    with pytest.raises(StorageError, match="audio.wav"):
        storage.read_bytes(f"{s3_bucket}/audio.wav")
    with pytest.raises(StorageError, match="audio.wav"):
        with storage.local_path(f"{s3_bucket}/audio.wav"):
            pass


def test_upload_survives_failed_parts(s3_bucket, fault_proxy, tmp_path):
    storage.configure_s3(storage.S3Config(multipart_threshold_bytes=5 * MiB, multipart_chunk_bytes=5 * MiB))
    src = tmp_path / "big.bin"
    src.write_bytes(_payload(11 * MiB))
    fault_proxy.fail_next(2, status=503, code="SlowDown", methods=("PUT",))
    storage.put_file(str(src), f"{s3_bucket}/big.bin")
    assert storage.stat(f"{s3_bucket}/big.bin").size == 11 * MiB


def test_permanent_access_denied_fails_cleanly_in_one_line(s3_bucket, fault_proxy):
    _put(f"{s3_bucket}/k", b"x")
    fault_proxy.fail_always(status=403, code="AccessDenied")
    with pytest.raises(storage.AccessDeniedError) as err:
        storage.read_bytes(f"{s3_bucket}/k")
    assert f"{s3_bucket}/k" in str(err.value) and "\n" not in str(err.value)
    assert fault_proxy.count(status=403) == 1  # not retried


def test_persistent_server_errors_give_up_after_max_attempts(s3_bucket, fault_proxy):
    storage.configure_s3(storage.S3Config(max_attempts=2))
    fault_proxy.fail_always(status=503, code="SlowDown")
    with pytest.raises(storage.S3ServiceError, match="SlowDown .* after 2 attempts") as err:
        storage.write_bytes(f"{s3_bucket}/k", b"x")
    assert f"{s3_bucket}/k" in str(err.value)
    assert fault_proxy.count(status=503) == 2, fault_proxy.requests


# --------------------------------------------------------------------------- settings


def test_boto3_reads_the_endpoint_from_the_environment(s3_env):
    assert s3.get_client().meta.endpoint_url == s3_env.endpoint_url


def test_explicit_endpoint_wins_and_is_exported_for_workers(s3_bucket, monkeypatch):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.delenv("AWS_ENDPOINT_URL")
    storage.configure_s3(storage.S3Config(endpoint_url=endpoint, region="us-east-1"))
    storage.write_bytes(f"{s3_bucket}/k", b"x")
    assert os.environ["XMODAL_S3_ENDPOINT_URL"] == endpoint
    assert storage.S3Config.from_env() == storage.S3Config(endpoint_url=endpoint, region="us-east-1")


def test_settings_from_env_vars_are_used(s3_bucket, monkeypatch):
    endpoint = os.environ["AWS_ENDPOINT_URL"]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{free_port()}")  # wrong on purpose
    monkeypatch.setenv("XMODAL_S3_ENDPOINT_URL", endpoint)
    monkeypatch.setenv("XMODAL_S3_MAX_ATTEMPTS", "3")
    assert storage.active_config().max_attempts == 3
    storage.write_bytes(f"{s3_bucket}/k", b"x")
    assert storage.read_bytes(f"{s3_bucket}/k") == b"x"


def test_profile_from_shared_config_files(s3_bucket, monkeypatch, tmp_path):
    creds = tmp_path / "credentials"
    creds.write_text("[archive]\naws_access_key_id = profilekey\naws_secret_access_key = profilesecret\n")
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(creds))
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    storage.configure_s3(storage.S3Config(profile="archive"), export_env=False)
    storage.write_bytes(f"{s3_bucket}/k", b"via profile")
    assert storage.read_bytes(f"{s3_bucket}/k") == b"via profile"
    options = storage.beam_s3_options()
    assert options["s3_access_key_id"] == "profilekey"


def test_unknown_profile_is_a_credentials_error(s3_env):
    storage.configure_s3(storage.S3Config(profile="no-such-profile"), export_env=False)
    with pytest.raises(storage.CredentialsError, match="no-such-profile"):
        storage.read_bytes("s3://bucket/key")


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"max_attempts": 0}, "max_attempts = 0"),
        ({"multipart_chunk_bytes": 1024}, "multipart_chunk_bytes = 1024"),
        ({"retry_mode": "legacy"}, "retry_mode = 'legacy'"),
        ({"endpoint_url": "minio:9000"}, "endpoint_url = 'minio:9000'"),
    ],
)
def test_invalid_settings_name_the_value(kwargs, message):
    with pytest.raises(ValueError, match=message):
        storage.S3Config(**kwargs)


def test_bad_env_setting_names_the_variable(monkeypatch):
    monkeypatch.setenv("XMODAL_S3_MAX_ATTEMPTS", "many")
    with pytest.raises(ValueError, match="XMODAL_S3_MAX_ATTEMPTS"):
        storage.S3Config.from_env()


def test_one_client_per_process_rebuilt_after_fork(s3_bucket):
    parent = s3.get_client()
    assert s3.get_client() is parent
    read_end, write_end = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: a fresh client that still works
        try:
            child = s3.get_client()
            ok = child is not parent and storage.exists(s3_bucket)
            os.write(write_end, b"1" if ok else b"0")
        finally:
            os._exit(0)
    os.close(write_end)
    os.waitpid(pid, 0)
    assert os.read(read_end, 1) == b"1"
    os.close(read_end)


# --------------------------------------------------------------------------- Beam


def test_beam_options_carry_endpoint_and_region_but_no_default_credentials(s3_env):
    options = storage.beam_s3_options()
    assert options == {"s3_endpoint_url": s3_env.endpoint_url, "s3_region_name": "us-east-1"}


def test_beam_filesystems_write_and_read_with_these_options(s3_bucket):
    from apache_beam.io.filesystems import FileSystems
    from apache_beam.options.pipeline_options import PipelineOptions

    previous = FileSystems._pipeline_options
    FileSystems.set_options(PipelineOptions.from_dictionary(storage.beam_s3_options()))
    try:
        uri = f"{s3_bucket}/embeddings/part-00000-of-00001.txt"
        with FileSystems.create(uri) as f:
            f.write(b"written by beam")
        assert storage.read_bytes(uri) == b"written by beam"
        with FileSystems.open(uri) as f:
            assert f.read() == b"written by beam"
    finally:
        FileSystems.set_options(previous)
