"""Client isolation: what a per-client broker user may do, and that the broker refuses the rest.

Against the shared broker (created with rabbitmqctl; users ``helora-test-<random>.a``/``.b``,
deleted in teardown) on a federation of this module's own. Client ids contain a dot on purpose:
the topic permission must escape it (``^helora-test-x\\.a$``), or ``helora-test-xZa`` would pass.
Every refused action runs on its own connection, so a channel or connection the broker closes
cannot leak into the next test. The management-API backend is tested on a throwaway node with
the management plugin (skipped where no throwaway node can start).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from urllib.parse import quote, urlsplit

import pika
import pika.exceptions as pex
import pytest

from helora.broker.admin import (
    BrokerAdminError,
    ManagementBackend,
    RabbitmqctlBackend,
    add_aggregator,
    add_client,
    aggregator_grants,
    client_grants,
    grants_of,
    list_clients,
    remove_client,
)
from helora.broker.connection import close_connection, connect, connection_parameters
from helora.broker.consumer import VERSION_HEADER, Delivery, GlobalSubscriber, UpdateConsumer
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, declare_topology, delete_topology
from helora.shared.errors import ConfigError
from tests.integration.broker_node import BrokerNode, BrokerNodeError

pytestmark = pytest.mark.integration

ACCESS_REFUSED = 403
PRECONDITION_FAILED = 406


@dataclass
class Fed:
    name: str
    topo: Topology
    url: str  # the admin (guest) URL
    tag: str
    clients: dict[str, str] = field(default_factory=dict)  # client id -> password

    def client_url(self, client_id: str, password: str | None = None) -> str:
        parts = urlsplit(self.url)
        pw = self.clients[client_id] if password is None else password
        netloc = f"{quote(client_id, safe='')}:{quote(pw, safe='')}@{parts.hostname}"
        return f"amqp://{netloc}:{parts.port or 5672}{parts.path or '/%2F'}"

    @property
    def a(self) -> str:
        return f"helora-test-{self.tag}.a"

    @property
    def b(self) -> str:
        return f"helora-test-{self.tag}.b"


def _publish_global(url: str, topo: Topology, version: int, body: bytes) -> None:
    conn = connect(url, attempts=3, name="helora-test-admin")
    try:
        ConfirmedPublisher(conn).publish(
            topo.global_exchange,
            "",
            body,
            headers={VERSION_HEADER: version, "x-helora-kind": "global"},
        )
    finally:
        close_connection(conn)


@pytest.fixture(scope="module")
def admin(amqp_url: str) -> RabbitmqctlBackend:
    if shutil.which("rabbitmqctl") is None:
        pytest.skip("rabbitmqctl is not on PATH: cannot create broker users here")
    backend = RabbitmqctlBackend(os.environ.get("HELORA_TEST_RABBITMQ_NODE"))
    try:
        backend.user_exists("guest")
    except (BrokerAdminError, ConfigError) as exc:
        pytest.skip(f"rabbitmqctl cannot manage the broker here: {exc}")
    return backend


@pytest.fixture(scope="module")
def fed(amqp_url: str, admin: RabbitmqctlBackend) -> Iterator[Fed]:
    """A federation of this module (topology + global v1) and clients A and B."""
    tag = uuid.uuid4().hex[:10]
    f = Fed(name=f"test-{tag}", topo=Topology(f"test-{tag}"), url=amqp_url, tag=tag)
    conn = connect(amqp_url, attempts=3, name="helora-test-admin")
    try:
        declare_topology(conn.channel(), f.topo)
        exchanges = admin.run("list_exchanges", "name")
        if f.topo.updates_exchange not in exchanges:
            pytest.skip("rabbitmqctl manages another broker than HELORA_AMQP_URL")
        _publish_global(amqp_url, f.topo, 1, b"global-v1")
        for cid in (f.a, f.b):
            f.clients[cid] = add_client(admin, f.name, cid).password
        yield f
    finally:
        for cid in list(f.clients):
            try:
                admin.delete_user(cid)
            except BrokerAdminError:
                pass
        try:
            delete_topology(conn.channel(), f.topo)
        finally:
            close_connection(conn)


@pytest.fixture
def client_a(fed: Fed) -> Iterator[pika.BlockingConnection]:
    """A fresh connection as client A for each test."""
    conn = pika.BlockingConnection(connection_parameters(fed.client_url(fed.a), name="client-a"))
    yield conn
    close_connection(conn)


def _props(user_id: str | None, **kw: object) -> pika.BasicProperties:
    return pika.BasicProperties(delivery_mode=2, user_id=user_id, **kw)


def _refused(exc: pex.ChannelClosedByBroker, code: int) -> None:
    assert exc.reply_code == code, (exc.reply_code, exc.reply_text)
    text = "ACCESS_REFUSED" if code == ACCESS_REFUSED else "PRECONDITION_FAILED"
    assert exc.reply_text.startswith(text), exc.reply_text


def _publish(conn: pika.BlockingConnection, exchange: str, rk: str, user_id: str | None) -> None:
    ch = conn.channel()
    ch.confirm_delivery()  # the refusal surfaces on this publish, not on a later call
    ch.basic_publish(exchange, rk, b"update", _props(user_id), mandatory=True)


def _drain_updates(fed: Fed, want: int, timeout: float = 10.0) -> list[Delivery]:
    """As the admin: take ``want`` deliveries off the updates queue (ack them)."""
    conn = connect(fed.url, attempts=3, name="helora-test-admin")
    got: list[Delivery] = []
    try:
        consumer = UpdateConsumer(conn, fed.topo, prefetch=16)
        consumer.start(got.append)
        deadline = time.monotonic() + timeout
        while len(got) < want and time.monotonic() < deadline:
            consumer.poll(0.1)
        for d in got:
            consumer.ack(d.tag)
        consumer.poll(0.1)
    finally:
        close_connection(conn)
    return got


# ---- allowed ----


def test_grants_are_exactly_the_client_permissions(fed: Fed, admin: RabbitmqctlBackend):
    found = grants_of(admin, fed.a, "/", fed.topo.updates_exchange)
    assert found == client_grants(fed.name, fed.a)
    assert found is not None and found.topic_write == f"^helora-test-{fed.tag}\\.a$"
    assert found.write == f"^helora\\.test-{fed.tag}\\.updates$"
    listed = {c.user: ok for c, ok in list_clients(admin, fed.name)}
    assert listed == {fed.a: True, fed.b: True}


def test_client_publishes_to_updates_with_its_routing_key_and_user_id(client_a, fed: Fed):
    _publish(client_a, fed.topo.updates_exchange, fed.a, user_id=fed.a)
    [d] = _drain_updates(fed, 1)
    assert (d.routing_key, d.user_id, d.body) == (fed.a, fed.a, b"update")


def test_broker_accepts_a_publish_without_user_id(client_a, fed: Fed):
    """user_id is optional in AMQP: the broker only checks it when present. The aggregator
    must therefore rely on the routing key (bound to the user by the topic permission) or
    require user_id; see docs/SECURITY.md."""
    _publish(client_a, fed.topo.updates_exchange, fed.a, user_id=None)
    [d] = _drain_updates(fed, 1)
    assert (d.routing_key, d.user_id) == (fed.a, None)


def test_client_reads_the_current_global_from_the_stream(client_a, fed: Fed):
    sub = GlobalSubscriber(client_a, fed.topo, offset="last", prefetch=4)  # qos + manual ack
    got = sub.wait_newer(-1, timeout=10)
    sub.close()
    assert got is not None and got[0] >= 1 and got[1].startswith(b"global-v")


def test_client_may_passive_declare_what_it_uses(client_a, fed: Fed):
    ch = client_a.channel()
    ch.exchange_declare(fed.topo.updates_exchange, passive=True)
    ok = ch.queue_declare(fed.topo.global_stream, passive=True)
    assert ok.method.queue == fed.topo.global_stream


# ---- refused: publishing ----


@pytest.mark.parametrize(
    "routing_key",
    [
        pytest.param(lambda f: f.b, id="other-client"),
        pytest.param(lambda f: f"helora-test-{f.tag}Xa", id="dot-is-escaped"),
        pytest.param(lambda f: f"{f.a}.extra", id="anchored-end"),
        pytest.param(lambda f: f"helora-test-{f.tag}", id="prefix-only"),
        pytest.param(lambda f: "", id="empty"),
    ],
)
def test_publish_with_another_routing_key_is_refused(client_a, fed: Fed, routing_key):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        _publish(client_a, fed.topo.updates_exchange, routing_key(fed), user_id=fed.a)
    _refused(info.value, ACCESS_REFUSED)
    assert client_a.is_open  # only the channel is closed


def test_publish_with_another_user_id_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        _publish(client_a, fed.topo.updates_exchange, fed.a, user_id=fed.b)
    _refused(info.value, PRECONDITION_FAILED)
    assert "user_id" in info.value.reply_text


def test_publish_to_the_global_fanout_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        _publish(client_a, fed.topo.global_exchange, "", user_id=fed.a)
    _refused(info.value, ACCESS_REFUSED)


def test_publish_to_the_default_exchange_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        _publish(client_a, "", fed.topo.updates_queue, user_id=fed.a)  # straight into the queue
    _refused(info.value, ACCESS_REFUSED)


def test_publish_to_the_dead_letter_exchange_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        _publish(client_a, fed.topo.dead_exchange, fed.a, user_id=fed.a)
    _refused(info.value, ACCESS_REFUSED)


# ---- refused: reading ----


def _consume(conn: pika.BlockingConnection, queue: str) -> None:
    ch = conn.channel()
    ch.basic_qos(prefetch_count=1)
    ch.basic_consume(queue, lambda *a: None, auto_ack=False)


def test_consuming_the_updates_queue_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        _consume(client_a, fed.topo.updates_queue)
    _refused(info.value, ACCESS_REFUSED)


def test_consuming_the_dead_letter_queue_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        _consume(client_a, fed.topo.dead_queue)
    _refused(info.value, ACCESS_REFUSED)


def test_basic_get_on_the_updates_queue_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        client_a.channel().basic_get(fed.topo.updates_queue)
    _refused(info.value, ACCESS_REFUSED)


def test_purging_the_updates_queue_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        client_a.channel().queue_purge(fed.topo.updates_queue)
    _refused(info.value, ACCESS_REFUSED)


# ---- refused: configuring ----


@pytest.mark.parametrize(
    "declare",
    [
        pytest.param(lambda ch, f: ch.queue_declare(f"helora-test-{f.tag}-q"), id="new-queue"),
        pytest.param(lambda ch, f: ch.queue_declare("", exclusive=True), id="server-named-queue"),
        pytest.param(
            lambda ch, f: ch.exchange_declare(f"helora-test-{f.tag}-x", "fanout"), id="exchange"
        ),
        pytest.param(
            lambda ch, f: ch.exchange_declare(f.topo.updates_exchange, "topic", durable=True),
            id="redeclare-updates-exchange",
        ),
        pytest.param(lambda ch, f: declare_topology(ch, f.topo), id="declare-topology"),
    ],
)
def test_non_passive_declare_is_refused(client_a, fed: Fed, declare):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        declare(client_a.channel(), fed)
    _refused(info.value, ACCESS_REFUSED)


@pytest.mark.parametrize("queue", ["updates_queue", "global_stream", "dead_queue"])
def test_deleting_a_queue_is_refused(client_a, fed: Fed, queue):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        client_a.channel().queue_delete(getattr(fed.topo, queue))
    _refused(info.value, ACCESS_REFUSED)


def test_deleting_an_exchange_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        client_a.channel().exchange_delete(fed.topo.updates_exchange)
    _refused(info.value, ACCESS_REFUSED)


def test_unbinding_the_updates_queue_is_refused(client_a, fed: Fed):
    # The updates queue has the same name as the updates exchange, so the client's write
    # regex matches the queue too; unbinding also needs read on the exchange, which it lacks.
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        client_a.channel().queue_unbind(
            fed.topo.updates_queue, fed.topo.updates_exchange, routing_key="#"
        )
    _refused(info.value, ACCESS_REFUSED)


def test_binding_the_global_stream_to_the_updates_exchange_is_refused(client_a, fed: Fed):
    with pytest.raises(pex.ChannelClosedByBroker) as info:
        client_a.channel().queue_bind(fed.topo.global_stream, fed.topo.updates_exchange, "#")
    _refused(info.value, ACCESS_REFUSED)


# ---- refused: authentication and lifecycle ----


def test_wrong_password_is_an_authentication_error(fed: Fed):
    params = connection_parameters(fed.client_url(fed.a, password="wrong-password-123"))
    with pytest.raises(pex.ProbableAuthenticationError):
        pika.BlockingConnection(params)
    with pytest.raises(ConfigError, match="refused the credentials"):
        connect(fed.client_url(fed.a, password="wrong-password-123"), attempts=1)


def test_add_client_never_overwrites_an_existing_user(admin: RabbitmqctlBackend, fed: Fed):
    with pytest.raises(ConfigError, match="exists already"):
        add_client(admin, fed.name, "guest")
    with pytest.raises(ConfigError, match="exists already"):
        add_client(admin, fed.name, fed.a)
    with pytest.raises(ConfigError, match="not a client"):
        remove_client(admin, fed.name, "guest")
    with pytest.raises(ConfigError):
        add_client(admin, fed.name, "bad id/with slash")


def test_remove_client_revokes_at_once(admin: RabbitmqctlBackend, fed: Fed):
    cid = f"helora-test-{fed.tag}.c"
    fed.clients[cid] = add_client(admin, fed.name, cid, password="given-password-42").password
    conn = pika.BlockingConnection(connection_parameters(fed.client_url(cid)))
    remove_client(admin, fed.name, cid)
    fed.clients.pop(cid)
    with pytest.raises(pex.ConnectionClosedByBroker) as info:
        for _ in range(50):
            conn.process_data_events(time_limit=0.1)
    assert info.value.reply_code == 320  # CONNECTION_FORCED: user deleted
    assert not admin.user_exists(cid)
    with pytest.raises(pex.ProbableAuthenticationError):
        pika.BlockingConnection(connection_parameters(fed.client_url(cid, "given-password-42")))


# ---- the aggregator's own user ----


def test_aggregator_user_runs_the_federation_and_nothing_else(admin: RabbitmqctlBackend, fed: Fed):
    """With aggregator_grants the aggregator declares and deletes its topology, consumes
    updates, publishes globals and dead-letters; another federation's names are refused."""
    user = f"helora-test-{fed.tag}-agg"
    other = Topology(f"test-{fed.tag}-agg")  # a second federation, declared by this user
    new = add_aggregator(admin, other.federation, user)
    fed.clients[user] = new.password
    assert grants_of(admin, user, "/") == aggregator_grants(other.federation, user)
    conn = pika.BlockingConnection(connection_parameters(fed.client_url(user)))
    try:
        declare_topology(conn.channel(), other)
        pub = ConfirmedPublisher(conn)
        pub.publish(other.global_exchange, "", b"g", headers={VERSION_HEADER: 1})
        pub.publish(other.dead_exchange, "x", b"dead")
        pub.publish(other.updates_exchange, "client-1", b"u")
        consumer = UpdateConsumer(conn, other, prefetch=4)
        got: list[Delivery] = []
        consumer.start(got.append)
        deadline = time.monotonic() + 10
        while not got and time.monotonic() < deadline:
            consumer.poll(0.1)
        assert got and got[0].body == b"u"
        consumer.ack(got[0].tag)
        consumer.channel.close()
        with pytest.raises(pex.ChannelClosedByBroker) as info:  # the module's federation
            _consume(conn, fed.topo.updates_queue)
        _refused(info.value, ACCESS_REFUSED)
        with pytest.raises(pex.ChannelClosedByBroker) as info:  # anything outside helora.<fed>
            conn.channel().queue_declare(f"helora-test-{fed.tag}-agg-q")
        _refused(info.value, ACCESS_REFUSED)
        delete_topology(conn.channel(), other)
    finally:
        close_connection(conn)
        admin.delete_user(user)
        fed.clients.pop(user)


# ---- the CLI ----


def _cli(*args: str) -> subprocess.CompletedProcess[str]:
    """The commands in a process of their own, as `helora broker ...` runs them (they
    configure logging for the process, which must not leak into this test session)."""
    code = "from helora.cli_admin import admin_app; admin_app(prog_name='helora broker')"
    return subprocess.run(
        [sys.executable, "-c", code, *args], capture_output=True, text=True, timeout=120
    )


def test_cli_add_list_remove(fed: Fed):
    cid = f"helora-test-{fed.tag}.cli"
    added = _cli("add-client", cid, "--federation", fed.name)
    assert added.returncode == 0, added.stderr
    password = added.stdout.strip()  # the password alone on stdout
    fed.clients[cid] = password
    assert len(password) == 32 and password.isalnum()
    assert password not in added.stderr  # not logged
    close_connection(pika.BlockingConnection(connection_parameters(fed.client_url(cid))))
    listed = _cli("list-clients", "--federation", fed.name)
    assert listed.returncode == 0 and f"{cid}\tok" in listed.stdout, listed.stderr
    removed = _cli("remove-client", cid, "--federation", fed.name)
    assert removed.returncode == 0, removed.stderr
    fed.clients.pop(cid)
    refused = _cli("remove-client", cid, "--federation", fed.name)
    assert refused.returncode == 2 and "not a client" in refused.stderr


# ---- the management HTTP API backend, on a throwaway node ----


@pytest.fixture(scope="module")
def mgmt_node() -> Iterator[BrokerNode]:
    reason = BrokerNode.unavailable_reason()
    if reason:
        pytest.skip(f"cannot start a throwaway RabbitMQ node here: {reason}")
    node = BrokerNode()
    try:
        node.start(management=True)
    except BrokerNodeError as exc:
        node.close()
        pytest.skip(f"the throwaway RabbitMQ node did not start: {exc}")
    try:
        yield node
    finally:
        node.close()


def test_management_api_backend(mgmt_node: BrokerNode):
    api = ManagementBackend(mgmt_node.management_url)
    ctl = RabbitmqctlBackend(mgmt_node.node_name, env=mgmt_node.ctl_env())  # -n NODE path
    fed_name, cid = "mgmt-fed", "client.7"
    conn = connect(mgmt_node.url, attempts=3)
    declare_topology(conn.channel(), Topology(fed_name))
    close_connection(conn)

    new = add_client(api, fed_name, cid)
    assert new.generated and len(new.password) == 32 and new.password not in repr(new)
    expected = client_grants(fed_name, cid)
    # what the HTTP API set, read back through rabbitmqctl, and the other way round
    assert grants_of(ctl, cid, "/", expected.exchange) == expected
    assert list_clients(api, fed_name) == [(expected, True)]
    with pytest.raises(ConfigError, match="exists already"):
        add_client(api, fed_name, "guest")

    url = f"amqp://{cid}:{new.password}@127.0.0.1:{mgmt_node.port}/%2F"
    client = pika.BlockingConnection(connection_parameters(url))
    try:
        _publish(client, expected.exchange, cid, user_id=cid)
        with pytest.raises(pex.ChannelClosedByBroker) as info:
            _publish(client, expected.exchange, "client-8", user_id=cid)
        _refused(info.value, ACCESS_REFUSED)
    finally:
        close_connection(client)

    remove_client(api, fed_name, cid)
    assert not api.user_exists(cid) and not ctl.user_exists(cid)
    with pytest.raises(BrokerAdminError, match="401"):
        ManagementBackend(f"http://guest:wrong@127.0.0.1:{mgmt_node.management_port}").user_exists(
            "guest"
        )


def test_rabbitmqctl_backend_with_node_option(mgmt_node: BrokerNode):
    ctl = RabbitmqctlBackend(mgmt_node.node_name, env=mgmt_node.ctl_env())
    new = add_client(ctl, "node-fed", "client-9", password="a-given-password")
    assert not new.generated
    assert [c.user for c, ok in list_clients(ctl, "node-fed") if ok] == ["client-9"]
    remove_client(ctl, "node-fed", "client-9")
    assert list_clients(ctl, "node-fed") == []
