"""One error tree for helora.

Two families, kept apart on purpose (h11's local/remote split):
- ``RemoteError``: a peer sent something we cannot accept. The message is rejected with a
  machine-readable ``reason`` (dead-lettered, counted) and the service keeps running.
- Everything else deriving from ``HeloraError`` is our own misuse or an environment failure and
  is raised to the caller.
"""

from __future__ import annotations


class HeloraError(Exception):
    """Base of every error helora raises on purpose."""


class RemoteError(HeloraError):
    """The peer sent input we reject. ``reason`` is a stable snake_case code."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(f"{reason}: {detail}" if detail else reason)
        self.reason = reason
        self.detail = detail


class DecodeError(RemoteError):
    """Bytes that are not a valid helora envelope (any malformed input, whatever the cause)."""


class ValidationError(RemoteError):
    """A well-formed message whose content does not fit the federation (shape, rank, values...)."""


class ConfigError(HeloraError):
    """A setting or argument that cannot work; raised before anything starts."""


class BrokerUnavailable(HeloraError):
    """No RabbitMQ broker answered after the configured retries."""


class PublishError(HeloraError):
    """The broker did not confirm a publish (nack, unroutable, or channel closed)."""


class CheckpointError(HeloraError):
    """A checkpoint directory is missing, incomplete or inconsistent."""
