"""Every exchange and queue of a federation, named from the federation, declared in one place.

    worker --(topic, key = client id)--> helora.<fed>.updates  --> queue helora.<fed>.updates
                                                                   (quorum, single active consumer,
                                                                    dead-letters to .dead)
    aggregator --(fanout)--> helora.<fed>.global --> stream helora.<fed>.global.stream
                                                     (late join: read from offset "last")
    aggregator --(rejects, with reason headers)--> helora.<fed>.dead --> queue helora.<fed>.dead

Late join uses a stream bound to the global fanout (RABBITMQ_NOTES.md option i): a client that
attaches at offset "last" gets the current global at once, even on its first connection and
while the aggregator is down; it then receives every newer version on the same consumer. See
docs/PROTOCOL.md for why this beats per-client mailboxes and an RPC.

Queue arguments are pinned explicitly (3.x and 4.x defaults differ); redeclaring with other
arguments fails with 406, so only this module declares them.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

STREAM_MAX_BYTES = 512 * 2**20  # retention of the global stream (whole segments are dropped)
STREAM_SEGMENT_BYTES = 16 * 2**20
DELIVERY_LIMIT = 20  # a message that crashes the aggregator this often is dead-lettered


@dataclass(frozen=True)
class Topology:
    federation: str

    @property
    def prefix(self) -> str:
        return f"helora.{self.federation}"

    @property
    def updates_exchange(self) -> str:
        return f"{self.prefix}.updates"

    @property
    def updates_queue(self) -> str:
        return f"{self.prefix}.updates"

    @property
    def dead_exchange(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def dead_queue(self) -> str:
        return f"{self.prefix}.dead"

    @property
    def global_exchange(self) -> str:
        return f"{self.prefix}.global"

    @property
    def global_stream(self) -> str:
        return f"{self.prefix}.global.stream"

    def queue_arguments(self) -> dict[str, dict[str, Any]]:
        return {
            self.updates_queue: {
                "x-queue-type": "quorum",
                "x-single-active-consumer": True,
                "x-dead-letter-exchange": self.dead_exchange,
                "x-delivery-limit": DELIVERY_LIMIT,
            },
            self.dead_queue: {"x-queue-type": "classic"},
            self.global_stream: {
                "x-queue-type": "stream",
                "x-max-length-bytes": STREAM_MAX_BYTES,
                "x-stream-max-segment-size-bytes": STREAM_SEGMENT_BYTES,
            },
        }


def declare_topology(channel: Any, topo: Topology) -> None:
    """Declare every exchange, queue and binding; idempotent (same arguments every time)."""
    args = topo.queue_arguments()
    channel.exchange_declare(topo.updates_exchange, exchange_type="topic", durable=True)
    channel.exchange_declare(topo.dead_exchange, exchange_type="fanout", durable=True)
    channel.exchange_declare(topo.global_exchange, exchange_type="fanout", durable=True)
    for queue, arguments in args.items():
        channel.queue_declare(queue, durable=True, arguments=arguments)
    channel.queue_bind(topo.updates_queue, topo.updates_exchange, routing_key="#")
    channel.queue_bind(topo.dead_queue, topo.dead_exchange)
    channel.queue_bind(topo.global_stream, topo.global_exchange)


def delete_topology(channel: Any, topo: Topology) -> None:
    """Delete what ``declare_topology`` declared (tests and `helora broker delete`)."""
    for queue in topo.queue_arguments():
        channel.queue_delete(queue)
    for exchange in (topo.updates_exchange, topo.dead_exchange, topo.global_exchange):
        channel.exchange_delete(exchange)


def topology_ready(connection: Any, topo: Topology) -> bool:
    """True if the exchanges and the stream a client needs exist (passive declares only, so a
    client with no configure permission can check). Each check uses a throwaway channel: a
    passive declare of a missing object closes its channel with 404."""
    import pika.exceptions as pex

    for kind, name in (("exchange", topo.updates_exchange), ("queue", topo.global_stream)):
        channel = connection.channel()
        try:
            if kind == "exchange":
                channel.exchange_declare(name, passive=True)
            else:
                channel.queue_declare(name, passive=True)
        except pex.ChannelClosedByBroker:
            return False
        channel.close()
    return True
