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
