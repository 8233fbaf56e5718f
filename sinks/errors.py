"""Errors raised by the sinks package. Messages name the URI, shard or key."""


class SinkError(Exception):
    """Base error of the sinks package."""


class StorageError(SinkError):
    """An object store or filesystem operation failed."""


class ObjectNotFoundError(StorageError):
    """The URI names nothing (missing key, file or bucket)."""


class IndexVersionError(SinkError):
    """An index version is missing, incomplete, or fails verification."""


class ChecksumMismatchError(IndexVersionError):
    """A file of an index version does not match the sha256 in its manifest."""


class PreconditionFailedError(StorageError):
    """A conditional write or delete found the object absent, present or at another
    version than the caller expected (someone else changed it first)."""
