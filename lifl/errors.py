"""Errors that carry a gRPC status code name, so lower floors stay free of grpc."""
from __future__ import annotations


class LiflError(Exception):
    """A request LIFL refuses. ``code`` is a grpc.StatusCode name such as ``"INVALID_ARGUMENT"``."""

    def __init__(self, code: str, message: str, retry_after_s: float | None = None):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.retry_after_s = code, message, retry_after_s

    @property
    def reason(self) -> str:
        """Short label for metrics."""
        return self.code.lower()


def quote(value, limit: int = 64) -> str:
    """``repr`` of a client-supplied value, cut to ``limit`` characters.

    Error messages travel back in gRPC trailers, which clients cap at 8–16 KiB: a message
    echoing a megabyte-long job name would be dropped by the client's own gRPC as
    RESOURCE_EXHAUSTED (and look retryable). Whatever a client sent is quoted bounded."""
    text = repr(value)
    if len(text) <= limit:
        return text
    return f"{text[:limit]}…({len(text)} chars)"
