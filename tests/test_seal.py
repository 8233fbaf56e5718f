"""LATEST and SEAL records: format, strict parsing, bounded reads, HMAC signing."""

from __future__ import annotations

import os

import pytest

from xmodal_index.sinks.errors import IndexVersionError
from xmodal_index.sinks.index import seal

DIGEST = "ab" * 32


def test_latest_round_trip_with_and_without_signature():
    sig = seal.sign("v000007", DIGEST, b"key")
    text = seal.format_latest("v000007", DIGEST, sig)
    assert text == f"v000007 sha256:{DIGEST} hmac-sha256:{sig}\n"
    assert seal.parse_latest(text) == seal.LatestRecord("v000007", DIGEST, sig)
    assert seal.parse_latest(seal.format_latest("v000007", DIGEST, None)) == seal.LatestRecord("v000007", DIGEST, None)


def test_sign_is_hmac_sha256_over_version_and_digest():
    import hashlib
    import hmac

    want = hmac.new(b"k", f"v000001 sha256:{DIGEST}".encode(), hashlib.sha256).hexdigest()
    assert seal.sign("v000001", DIGEST, b"k") == want
    assert seal.sign("v000001", DIGEST, None) is None
    assert seal.verify_signature("v000001", DIGEST, want, b"k")
    assert not seal.verify_signature("v000002", DIGEST, want, b"k")
    assert not seal.verify_signature("v000001", DIGEST, want, b"other")
    assert not seal.verify_signature("v000001", DIGEST, None, b"k")


def test_legacy_bare_version_parses_without_digest():
    assert seal.parse_latest("v000003\n") == seal.LatestRecord("v000003", None, None)


@pytest.mark.parametrize("text", [
    "", "\n", "v12345\n", "v0000001234567\n", "latest\n", "v000001 \n", " v000001\n", "v000001\n\n",
    f"v000001 sha256:{DIGEST.upper()}\n", f"v000001 sha256:{DIGEST[:-1]}\n", f"v000001 md5:{DIGEST}\n",
    f"v000001 sha256:{DIGEST} hmac-sha256:xyz\n", "../../etc/passwd", "v000001\x00", "v000001\r\n",
    "root:x:0:0:root:/root:/bin/bash\n" * 20,
])
def test_parse_latest_refuses_anything_else(text):
    with pytest.raises(IndexVersionError) as info:
        seal.parse_latest(text)
    message = str(info.value)
    assert "\n" not in message and len(message) < 200
    assert "root:x:0:0:root:/root:/bin/bash" not in message


def test_parse_latest_refuses_bytes_that_are_not_ascii():
    with pytest.raises(IndexVersionError, match="not ASCII"):
        seal.parse_latest("v00000\u0661\n".encode())


def test_read_latest_record_absent_is_none(tmp_path):
    assert seal.read_latest_record(str(tmp_path)) is None


def test_read_latest_record_refuses_a_symlink(tmp_path):
    secret = tmp_path / "secret.txt"
    secret.write_text("v000001\n")  # even a valid-looking target is refused: LATEST must be a plain file
    (tmp_path / "idx").mkdir()
    os.symlink(secret, tmp_path / "idx" / "LATEST")
    with pytest.raises(IndexVersionError, match="symlink"):
        seal.read_latest_record(str(tmp_path / "idx"))


def test_read_latest_record_refuses_a_large_file_without_echoing_it(tmp_path):
    (tmp_path / "LATEST").write_text("v000001\n" + "SECRET-LINE\n" * 10_000)
    with pytest.raises(IndexVersionError, match="more than 256 bytes") as info:
        seal.read_latest_record(str(tmp_path))
    assert "SECRET" not in str(info.value)


def test_read_latest_record_refuses_a_directory(tmp_path):
    (tmp_path / "LATEST").mkdir()
    with pytest.raises(IndexVersionError, match="not a regular file"):
        seal.read_latest_record(str(tmp_path))


def test_seal_round_trip(tmp_path):
    root = str(tmp_path)
    seal.write_seal(root, "v000002", DIGEST, None)
    assert (tmp_path / "v000002" / "SEAL").read_text() == f"sha256:{DIGEST}\n"
    assert seal.read_seal(root, "v000002") == (DIGEST, None)
    sig = seal.sign("v000002", DIGEST, b"k")
    seal.write_seal(root, "v000002", DIGEST, sig)
    assert seal.read_seal(root, "v000002") == (DIGEST, sig)


def test_read_seal_missing_tells_to_republish(tmp_path):
    with pytest.raises(IndexVersionError, match="promote"):
        seal.read_seal(str(tmp_path), "v000002")


def test_read_seal_refuses_garbage(tmp_path):
    (tmp_path / "v000002").mkdir()
    (tmp_path / "v000002" / "SEAL").write_text("sha256:nothex\n")
    with pytest.raises(IndexVersionError, match="SEAL"):
        seal.read_seal(str(tmp_path), "v000002")


def test_signing_key_from_env():
    assert seal.signing_key_from_env({}) is None
    assert seal.signing_key_from_env({seal.SIGNING_KEY_ENV: "s3cret"}) == b"s3cret"
    with pytest.raises(IndexVersionError, match="empty"):
        seal.signing_key_from_env({seal.SIGNING_KEY_ENV: " "})


def test_latest_and_seal_on_s3(s3_bucket):
    from xmodal_index.sinks import storage

    root = f"{s3_bucket}/indexes/main"
    assert seal.read_latest_record(root) is None
    sig = seal.sign("v000004", DIGEST, b"k")
    storage.write_bytes(f"{root}/LATEST", seal.format_latest("v000004", DIGEST, sig).encode())
    assert seal.read_latest_record(root) == seal.LatestRecord("v000004", DIGEST, sig)
    seal.write_seal(root, "v000004", DIGEST, sig)
    assert seal.read_seal(root, "v000004") == (DIGEST, sig)
    storage.write_bytes(f"{root}/LATEST", b"v000004\n" + b"SECRET\n" * 200_000)
    with pytest.raises(IndexVersionError, match="more than 256 bytes") as info:
        seal.read_latest_record(root)
    assert "SECRET" not in str(info.value)
