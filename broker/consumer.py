"""Consuming: the aggregator's update queue, dead-lettering with reasons, and the global stream.

Acks are explicit and individual: the aggregator acks an update only after the checkpoint that
includes it, so deliveries of one buffer stay unacked while later ones are acked or rejected.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import pika
import pika.exceptions as pex
import structlog

from helora.broker.connection import service_until
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology

log = structlog.get_logger(__name__)

REASON_HEADER = "x-helora-reason"
DETAIL_HEADER = "x-helora-detail"
VERSION_HEADER = "x-helora-version"
KIND_HEADER = "x-helora-kind"


@dataclass(frozen=True)
class Delivery:
    tag: int
    body: bytes
    routing_key: str
    redelivered: bool
    message_id: str | None = None
    user_id: str | None = None  # validated by the broker when set (see docs/PROTOCOL.md)
    headers: dict[str, Any] = field(default_factory=dict)


class UpdateConsumer:
    """Consumes the federation's update queue on its own channel with a bounded prefetch."""

    def __init__(self, connection: pika.BlockingConnection, topo: Topology, *, prefetch: int):
        self.connection = connection
        self.topo = topo
        self.channel = connection.channel()
        self.channel.basic_qos(prefetch_count=prefetch)

    def start(self, handler: Callable[[Delivery], None]) -> None:
        def on_message(_ch: Any, method: Any, props: Any, body: bytes) -> None:
            handler(
                Delivery(
                    tag=method.delivery_tag,
                    body=body,
                    routing_key=method.routing_key,
                    redelivered=bool(method.redelivered),
                    message_id=props.message_id,
                    user_id=props.user_id,
                    headers=dict(props.headers or {}),
                )
            )

        self.channel.basic_consume(self.topo.updates_queue, on_message, auto_ack=False)

    def ack(self, tag: int) -> None:
        self.channel.basic_ack(tag)

    def poll(self, seconds: float) -> None:
        """Process I/O and deliver messages to the handler for up to ``seconds``."""
        self.connection.process_data_events(time_limit=seconds)

    def queue_depth(self) -> int:
        ok = self.channel.queue_declare(self.topo.updates_queue, passive=True)
        return int(ok.method.message_count)


def dead_letter(
    publisher: ConfirmedPublisher, topo: Topology, delivery: Delivery, reason: str, detail: str = ""
) -> None:
    """Publish the original body to the dead-letter exchange with a machine-readable reason.

    The caller acks the original delivery afterwards: the confirm comes first, so a crash in
    between means a redelivery (and a second dead-letter copy), never a loss.
    """
    headers = dict(delivery.headers)
    headers.update(
        {
            REASON_HEADER: reason,
            DETAIL_HEADER: detail[:500],
            "x-helora-routing-key": delivery.routing_key,
            "x-helora-user-id": delivery.user_id or "",
        }
    )
    publisher.publish(
        topo.dead_exchange,
        delivery.routing_key,
        delivery.body,
        headers=headers,
        message_id=delivery.message_id,
    )


class GlobalSubscriber:
    """Reads the global stream from ``offset`` and keeps only the newest version's body.

    The first read at offset "last" delivers the current global at once (late join). A stream
    chunk may hold several versions and requeues can repeat one, so versions are compared via
    the x-helora-version header and only a higher one replaces the kept body.
    """

    def __init__(
        self,
        connection: pika.BlockingConnection,
        topo: Topology,
        *,
        offset: str | int = "last",
        prefetch: int = 4,
    ):
        self.connection = connection
        self.channel = connection.channel()
        self.channel.basic_qos(prefetch_count=prefetch)  # streams require a prefetch
        self.latest_version = -1
        self.latest_body: bytes | None = None
        self.channel.basic_consume(
            topo.global_stream,
            self._on_message,
            auto_ack=False,
            arguments={"x-stream-offset": offset},
        )

    def _on_message(self, ch: Any, method: Any, props: Any, body: bytes) -> None:
        try:
            version = int((props.headers or {}).get(VERSION_HEADER, -1))
        except (TypeError, ValueError):
            version = -1
        if version > self.latest_version:
            self.latest_version, self.latest_body = version, body
        ch.basic_ack(method.delivery_tag)  # stored: ack at once (credit flow, consumer timeout)

    def close(self) -> None:
        """Stop reading the stream. pika rejects deliveries still in flight when a consumer is
        cancelled, and streams answer a reject with 540 (closing the connection), so dispatch
        (and ack) what has arrived first, and treat a broker close during teardown as done."""
        if not (self.connection.is_open and self.channel.is_open):
            return  # the connection is already gone (e.g. a broker restart): nothing to close
        try:
            self.connection.process_data_events(time_limit=0)
            self.channel.close()
        except pex.AMQPError as exc:
            log.debug("stream_subscriber_closed_by_broker", error=repr(exc))

    def wait_newer(
        self, than: int, *, timeout: float | None = None, settle: float = 0.2
    ) -> tuple[int, bytes] | None:
        """The newest (version, body) with version > ``than``, or None on timeout."""
        if not service_until(self.connection, lambda: self.latest_version > than, timeout=timeout):
            return None
        self.connection.process_data_events(time_limit=settle)  # drain a burst of versions
        assert self.latest_body is not None
        return self.latest_version, self.latest_body
