"""Shared fixtures. The broker fixture order (DESIGN.md section 7):
HELORA_AMQP_URL if set; a broker answering on 127.0.0.1:5672; testcontainers' RabbitMQ when a
Docker engine answers; otherwise skip locally and FAIL when CI is set."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from helora.broker.connection import broker_answers, connect
from helora.broker.topology import Topology, delete_topology

LOCAL_URL = "amqp://guest:guest@127.0.0.1:5672/%2F"
REPO = Path(__file__).resolve().parents[1]


# The smallest real simulated federation (2 clients, 2 versions): seconds on a CPU.
TINY_SIMULATION = dict(
    num_clients=2,
    ranks=(2, 4),
    local_steps=2,
    batch_size=8,
    buffer_size=1,
    max_versions=2,
    max_train=100,
    eval_size=32,
    public_size=16,
    min_client_size=8,
    max_length=32,
)


def data_dir() -> Path:
    """The datasets: HELORA_DATA_DIR, else ../shared/data beside the checkout."""
    return Path(os.environ.get("HELORA_DATA_DIR", REPO.parent / "shared" / "data"))


def _container_url() -> tuple[str, object] | None:
    try:
        from testcontainers.rabbitmq import RabbitMqContainer
    except ImportError:
        return None
    try:
        container = RabbitMqContainer("rabbitmq:3.13-management").start()
    except Exception:  # docker.errors.DockerException and friends: no engine here
        return None
    params = container.get_connection_params()
    url = f"amqp://guest:guest@{params.host}:{params.port}/%2F"
    return url, container


@pytest.fixture(scope="session")
def amqp_url() -> Iterator[str]:
    env = os.environ.get("HELORA_AMQP_URL")
    if env:
        if not broker_answers(env):
            pytest.fail(f"HELORA_AMQP_URL={env} does not answer")
        yield env
        return
    if broker_answers(LOCAL_URL):
        yield LOCAL_URL
        return
    found = _container_url()
    if found is not None:
        url, container = found
        yield url
        container.stop()
        return
    message = "no RabbitMQ broker: set HELORA_AMQP_URL, run `make broker`, or start Docker"
    if os.environ.get("CI"):
        pytest.fail(message)
    pytest.skip(message)


@pytest.fixture
def federation(amqp_url: str) -> Iterator[str]:
    """A federation name of this test's own; everything declared under it is deleted after."""
    name = f"test-{uuid.uuid4().hex[:10]}"
    yield name
    conn = connect(amqp_url, attempts=3, name="helora-test-cleanup")
    try:
        delete_topology(conn.channel(), Topology(name))
    finally:
        conn.close()
