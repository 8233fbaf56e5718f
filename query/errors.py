"""Errors of the query core: one base class, one subclass for input the caller must fix."""

from __future__ import annotations


class QueryError(Exception):
    """A query or the index it targets is unusable; the message says which."""


class BadQueryError(QueryError, ValueError):
    """The query itself is malformed (empty text, wrong embedding dim, bad range, ...)."""
