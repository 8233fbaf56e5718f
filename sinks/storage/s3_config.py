"""Settings, client and error mapping of the s3:// backend (boto3), for AWS S3 and S3-compatible stores.

Settings come from three places, in this order:

1. ``configure_s3(S3Config(...))``, installed process-wide (and exported as
   ``XMODAL_S3_*`` environment variables so that worker processes started afterwards,
   e.g. Beam's multi-process workers, use the same settings);
2. the ``XMODAL_S3_*`` environment variables (``XMODAL_S3_ENDPOINT_URL``,
   ``XMODAL_S3_REGION``, ``XMODAL_S3_PROFILE``, ``XMODAL_S3_MAX_ATTEMPTS``, ... one per
   field of :class:`S3Config`);
3. boto3's own chain for whatever is left unset: ``AWS_ENDPOINT_URL`` /
   ``AWS_ENDPOINT_URL_S3``, ``AWS_REGION`` / ``AWS_DEFAULT_REGION``, ``AWS_PROFILE``
   and the shared config files.

Credentials only ever come from boto3's standard chain (environment, shared
credentials file, profile, instance or container role); they are never logged and
never part of an error message.

One client per process, created lazily under a lock (boto3 clients are thread-safe)
and re-created in a forked child or when the settings change.

The operations on objects are in ``s3.py``, which re-exports these names.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import threading
from collections.abc import Callable
from typing import Any, TypeVar

import botocore.config
import botocore.exceptions
import botocore.session
from boto3.s3.transfer import TransferConfig

from ..errors import ObjectNotFoundError, StorageError

logger = logging.getLogger(__name__)

MiB = 1024 * 1024
_ENV_PREFIX = "XMODAL_S3_"
_RETRY_MODES = ("standard", "adaptive")
_ADDRESSING_STYLES = ("auto", "path", "virtual")


# --------------------------------------------------------------------------- errors


class BucketNotFoundError(ObjectNotFoundError):
    """The bucket named by an s3:// URI does not exist."""


class AccessDeniedError(StorageError):
    """The store refused the request (HTTP 403) for valid credentials."""


class CredentialsError(StorageError):
    """No credentials were found, or the store rejected them (unknown key, bad secret,
    expired token)."""


class EndpointUnreachableError(StorageError):
    """The S3 endpoint could not be reached (connection refused, DNS, timeouts),
    after the configured retries."""


class ObjectChangedError(StorageError):
    """The object was replaced while it was being read."""


class S3ServiceError(StorageError):
    """Any other error answered by the store (after retries for throttling and 5xx)."""


_NOT_FOUND_CODES = {"NoSuchKey", "404", "NotFound"}
_DENIED_CODES = {"AccessDenied", "AllAccessDisabled", "AccountProblem", "Forbidden"}
_CREDENTIAL_CODES = {
    "InvalidAccessKeyId",
    "SignatureDoesNotMatch",
    "ExpiredToken",
    "InvalidToken",
    "TokenRefreshRequired",
    "InvalidSecurity",
}


# --------------------------------------------------------------------------- settings


@dataclasses.dataclass(frozen=True)
class S3Config:
    """Settings of the s3:// backend. ``None`` means: let boto3's chain decide."""

    endpoint_url: str | None = None  # e.g. http://minio:9000 for S3-compatible stores
    region: str | None = None
    profile: str | None = None  # a profile of the shared AWS config files
    max_attempts: int = 8  # total attempts per request, first one included
    retry_mode: str = "standard"  # botocore retry mode: "standard" or "adaptive"
    multipart_threshold_bytes: int = 64 * MiB  # uploads/downloads above it go in parts
    multipart_chunk_bytes: int = 16 * MiB  # part size of multipart transfers
    transfer_threads: int = 8  # concurrent part transfers per upload or download
    connect_timeout_s: float = 10.0
    read_timeout_s: float = 60.0
    addressing_style: str = "auto"  # "path" for stores without virtual-host buckets
    ca_bundle: str | None = None  # CA certificates file for self-signed TLS endpoints
    list_page_size: int = 1000  # keys per ListObjectsV2 request (S3 caps it at 1000)

    def __post_init__(self) -> None:
        if self.endpoint_url is not None and not self.endpoint_url.startswith(("http://", "https://")):
            raise ValueError(f"{self.endpoint_url = } must start with http:// or https://")
        if self.max_attempts < 1:
            raise ValueError(f"{self.max_attempts = } must be >= 1")
        if self.retry_mode not in _RETRY_MODES:
            raise ValueError(f"{self.retry_mode = } must be one of {_RETRY_MODES}")
        if self.multipart_threshold_bytes <= 0:
            raise ValueError(f"{self.multipart_threshold_bytes = } must be > 0")
        if self.multipart_chunk_bytes < 5 * MiB:
            raise ValueError(f"{self.multipart_chunk_bytes = } must be >= 5 MiB ({5 * MiB}): S3 rejects smaller parts")
        if self.transfer_threads < 1:
            raise ValueError(f"{self.transfer_threads = } must be >= 1")
        if self.connect_timeout_s <= 0:
            raise ValueError(f"{self.connect_timeout_s = } must be > 0")
        if self.read_timeout_s <= 0:
            raise ValueError(f"{self.read_timeout_s = } must be > 0")
        if self.addressing_style not in _ADDRESSING_STYLES:
            raise ValueError(f"{self.addressing_style = } must be one of {_ADDRESSING_STYLES}")
        if not 1 <= self.list_page_size <= 1000:
            raise ValueError(f"{self.list_page_size = } must be in [1, 1000]")

    @classmethod
    def from_env(cls, environ: dict[str, str] | None = None) -> S3Config:
        """Read ``XMODAL_S3_<FIELD>`` variables; unset or empty ones keep the default."""
        env = os.environ if environ is None else environ
        values: dict[str, Any] = {}
        for field in dataclasses.fields(cls):
            name = _ENV_PREFIX + field.name.upper()
            raw = env.get(name, "").strip()
            if not raw:
                continue
            kind = type(field.default)
            try:
                values[field.name] = kind(raw) if kind in (int, float) else raw
            except ValueError as err:
                raise ValueError(f"{name}={raw!r} is not a valid {kind.__name__}") from err
        return cls(**values)

    def to_env(self) -> dict[str, str]:
        """The ``XMODAL_S3_*`` variables that make :meth:`from_env` return this config."""
        return {
            _ENV_PREFIX + f.name.upper(): str(getattr(self, f.name))
            for f in dataclasses.fields(self)
            if getattr(self, f.name) is not None
        }


_installed: S3Config | None = None
_lock = threading.Lock()
_client_state: tuple[tuple, Any] | None = None  # (settings key, client)


def configure_s3(config: S3Config | None, *, export_env: bool = True) -> None:
    """Install ``config`` for this process (``None``: back to the environment).

    With ``export_env`` the settings are also written to ``XMODAL_S3_*`` environment
    variables (and stale ones removed), so child processes started later inherit them.
    """
    global _installed, _client_state
    with _lock:
        _installed = config
        _client_state = None
    if config is not None and export_env:
        wanted = config.to_env()
        for name in [n for n in os.environ if n.startswith(_ENV_PREFIX) and n not in wanted]:
            del os.environ[name]
        os.environ.update(wanted)


def active_config() -> S3Config:
    """The settings in effect: the installed config, else the environment's."""
    return _installed if _installed is not None else S3Config.from_env()


def _reset_after_fork() -> None:
    global _lock, _client_state
    _lock = threading.Lock()
    _client_state = None


os.register_at_fork(after_in_child=_reset_after_fork)

# boto3 reads these itself; a change in them (tests, a job switching stores) means a new client.
_AWS_ENV = (
    "AWS_ENDPOINT_URL",
    "AWS_ENDPOINT_URL_S3",
    "AWS_PROFILE",
    "AWS_REGION",
    "AWS_DEFAULT_REGION",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SESSION_TOKEN",
    "AWS_CONFIG_FILE",
    "AWS_SHARED_CREDENTIALS_FILE",
    "AWS_CA_BUNDLE",
)


_loader: Any = None  # botocore's parsed service models, shared by every client of this process


def _session(config: S3Config) -> botocore.session.Session:
    global _loader
    session = botocore.session.Session(profile=config.profile)
    if _loader is None:
        _loader = session.get_component("data_loader")
    else:  # reuse parsed models: a new client costs milliseconds instead of ~0.3 s
        session.register_component("data_loader", _loader)
    return session


def _profile_error(config: S3Config, err: Exception) -> CredentialsError:
    return CredentialsError(f"AWS profile {config.profile!r} not found in the shared config files ({err})")


def get_client() -> Any:
    """This process's S3 client (created on first use)."""
    global _client_state
    config = active_config()
    key = (os.getpid(), config, tuple(os.environ.get(n) for n in _AWS_ENV))
    state = _client_state
    if state is not None and state[0] == key:
        return state[1]
    with _lock:
        if _client_state is not None and _client_state[0] == key:
            return _client_state[1]
        try:
            client = _session(config).create_client(
                "s3",
                region_name=config.region,
                endpoint_url=config.endpoint_url,
                verify=config.ca_bundle,
                config=botocore.config.Config(
                    retries={"total_max_attempts": config.max_attempts, "mode": config.retry_mode},
                    connect_timeout=config.connect_timeout_s,
                    read_timeout=config.read_timeout_s,
                    max_pool_connections=max(10, config.transfer_threads + 2),
                    s3={"addressing_style": config.addressing_style},
                ),
            )
        except botocore.exceptions.ProfileNotFound as err:
            raise _profile_error(config, err) from err
        logger.debug("S3 client for endpoint %s, region %s", client.meta.endpoint_url, client.meta.region_name)
        _client_state = (key, client)
        return client


def _transfer_config(config: S3Config) -> TransferConfig:
    return TransferConfig(
        multipart_threshold=config.multipart_threshold_bytes,
        multipart_chunksize=config.multipart_chunk_bytes,
        max_concurrency=config.transfer_threads,
        num_download_attempts=config.max_attempts,
        preferred_transfer_client="classic",
    )


def beam_s3_options() -> dict[str, str]:
    """Beam ``S3Options`` (``s3_endpoint_url``, ``s3_region_name``, ...) matching these settings.

    Turn it into pipeline options with ``PipelineOptions.from_dictionary``. Credentials
    are included only when a profile is configured explicitly (Beam's S3 client takes
    no profile name); otherwise Beam's workers use boto3's standard chain, like this
    module. Retry settings cannot be passed this way: Beam's client reads
    ``AWS_MAX_ATTEMPTS`` / ``AWS_RETRY_MODE`` from the workers' environment.
    """
    config = active_config()
    out: dict[str, str] = {}
    endpoint = config.endpoint_url or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    if endpoint:
        out["s3_endpoint_url"] = endpoint
    session = _session(config)
    try:
        region = config.region or session.get_config_variable("region")
        credentials = session.get_credentials() if config.profile else None
    except botocore.exceptions.ProfileNotFound as err:
        raise _profile_error(config, err) from err
    if region:
        out["s3_region_name"] = region
    if config.ca_bundle:
        out["s3_verify"] = config.ca_bundle
    if config.profile:
        if credentials is None:
            raise CredentialsError(f"AWS profile {config.profile!r} holds no credentials")
        frozen = credentials.get_frozen_credentials()
        out["s3_access_key_id"] = frozen.access_key
        out["s3_secret_access_key"] = frozen.secret_key
        if frozen.token:
            out["s3_session_token"] = frozen.token
    return out


# --------------------------------------------------------------------------- URIs and errors


def split_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/key`` -> ``("bucket", "some/key")``."""
    if not uri.startswith("s3://"):
        raise StorageError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://"):].partition("/")
    if not bucket:
        raise StorageError(f"no bucket in {uri!r}: expected s3://bucket/key")
    return bucket, key


def _one_line(text: str) -> str:
    return " ".join(str(text).split())


def _endpoint() -> str:
    try:
        return get_client().meta.endpoint_url
    except Exception:  # noqa: BLE001 - only used to word an error message
        return "<unknown endpoint>"


def map_error(err: Exception, uri: str, action: str) -> StorageError:
    """Translate a boto3/botocore exception into a one-line StorageError naming ``uri``."""
    if isinstance(err, StorageError):
        return err
    if isinstance(err, botocore.exceptions.ClientError):
        error = err.response.get("Error", {})
        code = str(error.get("Code", "Unknown"))
        status = err.response.get("ResponseMetadata", {}).get("HTTPStatusCode")
        detail = _one_line(error.get("Message") or "")
        if code == "NoSuchBucket":
            return BucketNotFoundError(f"bucket {split_uri(uri)[0]!r} does not exist ({uri})")
        if code in _NOT_FOUND_CODES:
            return ObjectNotFoundError(f"{uri!r} does not exist")
        if code in _CREDENTIAL_CODES:
            return CredentialsError(
                f"{_endpoint()} rejected the credentials ({code}) while trying to {action} {uri}: "
                "check AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or the profile"
            )
        if code in _DENIED_CODES:
            return AccessDeniedError(
                f"access denied ({code}) while trying to {action} {uri}: "
                "the credentials lack permission on this bucket or key"
            )
        if code == "403":  # HEAD answers carry no error code
            return AccessDeniedError(
                f"access denied (HTTP 403) while trying to {action} {uri}: "
                "the credentials are not valid for this endpoint or lack permission"
            )
        if code in ("PreconditionFailed", "412"):
            return ObjectChangedError(f"{uri} changed while it was being read")
        meta = err.response.get("ResponseMetadata", {})
        tries = f" after {meta.get('RetryAttempts', 0) + 1} attempts" if meta.get("MaxAttemptsReached") else ""
        return S3ServiceError(
            f"{code} (HTTP {status}) from {_endpoint()}{tries} while trying to {action} {uri}: {detail}"
        )
    if isinstance(err, (botocore.exceptions.NoCredentialsError, botocore.exceptions.PartialCredentialsError)):
        return CredentialsError(
            f"no usable AWS credentials to {action} {uri}: set AWS_ACCESS_KEY_ID / "
            "AWS_SECRET_ACCESS_KEY, a profile, or an instance role"
        )
    if isinstance(err, botocore.exceptions.ProfileNotFound):
        return CredentialsError(f"{_one_line(str(err))} (while trying to {action} {uri})")
    if isinstance(
        err,
        (
            botocore.exceptions.EndpointConnectionError,
            botocore.exceptions.ConnectTimeoutError,
            botocore.exceptions.ConnectionClosedError,
            botocore.exceptions.ReadTimeoutError,
        ),
    ):
        attempts = active_config().max_attempts
        return EndpointUnreachableError(
            f"cannot reach the S3 endpoint {_endpoint()} to {action} {uri} "
            f"after {attempts} attempt(s): {type(err).__name__}"
        )
    if isinstance(err, botocore.exceptions.BotoCoreError):
        return StorageError(f"failed to {action} {uri}: {_one_line(str(err))}")
    return StorageError(f"failed to {action} {uri}: {type(err).__name__}: {_one_line(str(err))}")


T = TypeVar("T")


def _call(uri: str, action: str, fn: Callable[[], T]) -> T:
    try:
        return fn()
    except (botocore.exceptions.BotoCoreError, botocore.exceptions.ClientError) as err:
        raise map_error(err, uri, action) from err


def _not_found(bucket: str, uri: str) -> ObjectNotFoundError:
    """A 404 on HEAD cannot tell a missing key from a missing bucket: ask the bucket."""
    try:
        get_client().head_bucket(Bucket=bucket)
    except botocore.exceptions.ClientError as err:
        if err.response.get("Error", {}).get("Code") in ("404", "NoSuchBucket", "NotFound"):
            return BucketNotFoundError(f"bucket {bucket!r} does not exist ({uri})")
    except botocore.exceptions.BotoCoreError:
        pass
    return ObjectNotFoundError(f"{uri!r} does not exist")


def _is_404(err: Exception) -> bool:
    return isinstance(err, botocore.exceptions.ClientError) and err.response.get("Error", {}).get("Code") in (
        "404",
        "NotFound",
        "NoSuchKey",
    )
