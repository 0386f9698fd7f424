"""Publishing with publisher confirms: a publish returns only once the broker has the message."""

from __future__ import annotations

from typing import Any

import pika
import pika.exceptions as pex

from helora.shared.errors import PublishError

PERSISTENT = pika.DeliveryMode.Persistent


class ConfirmedPublisher:
    """One channel in confirm mode. Every publish is persistent and mandatory by default."""

    def __init__(
        self, connection: pika.BlockingConnection, *, max_message_bytes: int = 128 * 2**20
    ):
        self.channel = connection.channel()
        self.channel.confirm_delivery()
        self.max_message_bytes = max_message_bytes

    def publish(
        self,
        exchange: str,
        routing_key: str,
        body: bytes,
        *,
        headers: dict[str, Any] | None = None,
        message_id: str | None = None,
        mandatory: bool = True,
        user_id: str | None = None,
    ) -> None:
        """``user_id`` must equal the connection's user name: the broker checks it (406
        otherwise), so the aggregator can trust it as the sender's identity."""
        if len(body) > self.max_message_bytes:  # pika has no client-side check
            raise PublishError(f"message of {len(body)} bytes exceeds {self.max_message_bytes}")
        props = pika.BasicProperties(
            delivery_mode=PERSISTENT,
            content_type="application/x-helora+msgpack+zstd",
            headers=headers or {},
            message_id=message_id,
            user_id=user_id,
        )
        try:
            self.channel.basic_publish(exchange, routing_key, body, props, mandatory=mandatory)
        except pex.UnroutableError as exc:
            raise PublishError(f"unroutable: {exchange!r} key {routing_key!r}") from exc
        except pex.NackError as exc:
            raise PublishError(f"broker nacked the publish to {exchange!r}") from exc
        except pex.ChannelClosed as exc:
            raise PublishError(f"channel closed while publishing to {exchange!r}: {exc}") from exc
