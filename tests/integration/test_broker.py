"""The topology, confirmed publishing, dead-lettering and late join against a real RabbitMQ."""

from __future__ import annotations

import pytest

from helora.broker.connection import connect
from helora.broker.consumer import (
    REASON_HEADER,
    VERSION_HEADER,
    Delivery,
    GlobalSubscriber,
    UpdateConsumer,
    dead_letter,
)
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, declare_topology
from helora.shared.errors import PublishError

pytestmark = pytest.mark.integration


@pytest.fixture
def conn(amqp_url):
    c = connect(amqp_url, attempts=3)
    yield c
    if c.is_open:
        c.close()


def test_declare_is_idempotent_and_queues_are_durable(conn, federation):
    topo = Topology(federation)
    declare_topology(conn.channel(), topo)
    declare_topology(conn.channel(), topo)  # same arguments: no 406
    ch = conn.channel()
    for q in (topo.updates_queue, topo.dead_queue, topo.global_stream):
        ok = ch.queue_declare(q, passive=True)
        assert ok.method.queue == q


def test_update_routed_by_client_id_and_dead_lettered_with_reason(conn, federation):
    topo = Topology(federation)
    declare_topology(conn.channel(), topo)
    pub = ConfirmedPublisher(conn)
    pub.publish(topo.updates_exchange, "client-7", b"payload", message_id="u1")
    consumer = UpdateConsumer(conn, topo, prefetch=4)
    got: list[Delivery] = []
    consumer.start(got.append)
    for _ in range(20):
        if got:
            break
        consumer.poll(0.25)
    assert got and got[0].routing_key == "client-7" and got[0].body == b"payload"
    dead_letter(pub, topo, got[0], "bad_msgpack", "not an envelope")
    consumer.ack(got[0].tag)
    ch = conn.channel()
    method, props, body = None, None, None
    for _ in range(20):
        method, props, body = ch.basic_get(topo.dead_queue, auto_ack=True)
        if method:
            break
        conn.process_data_events(time_limit=0.1)
    assert body == b"payload"
    assert props.headers[REASON_HEADER] == "bad_msgpack"
    assert ch.queue_declare(topo.updates_queue, passive=True).method.message_count == 0


def test_unroutable_and_oversized_publishes_raise(conn, federation):
    pub = ConfirmedPublisher(conn, max_message_bytes=10)
    with pytest.raises(PublishError):
        pub.publish("", "no-such-queue-" + federation, b"x")  # mandatory, nothing bound
    pub2 = ConfirmedPublisher(conn, max_message_bytes=10)
    with pytest.raises(PublishError):
        pub2.publish("", "whatever", b"x" * 11)


def test_late_joiner_gets_current_global_at_once_then_newer_ones(conn, amqp_url, federation):
    topo = Topology(federation)
    declare_topology(conn.channel(), topo)
    pub = ConfirmedPublisher(conn)
    for v in range(4):
        pub.publish(topo.global_exchange, "", f"v{v}".encode(), headers={VERSION_HEADER: v})
    late = connect(amqp_url, attempts=3)
    try:
        sub = GlobalSubscriber(late, topo, offset="last")
        got = sub.wait_newer(-1, timeout=5)
        assert got == (3, b"v3")
        pub.publish(topo.global_exchange, "", b"v4", headers={VERSION_HEADER: 4})
        assert sub.wait_newer(3, timeout=5) == (4, b"v4")
        assert sub.wait_newer(4, timeout=0.5) is None
        sub.close()
    finally:
        late.close()


def test_service_until_keeps_heartbeats_alive_while_a_thread_blocks(amqp_url, federation):
    """The worker trains in a thread while the main thread services the connection. With a
    2 s heartbeat, 8 s without servicing kills a connection (RABBITMQ_NOTES); this must not."""
    import threading
    import time

    from helora.broker.connection import service_until

    c = connect(amqp_url, heartbeat=2, attempts=3)
    try:
        busy = threading.Thread(target=time.sleep, args=(8.0,))
        busy.start()
        assert service_until(c, lambda: not busy.is_alive(), timeout=20)
        assert c.is_open
        ch = c.channel()  # still usable: a dead connection would raise here
        declare_topology(ch, Topology(federation))
    finally:
        if c.is_open:
            c.close()
