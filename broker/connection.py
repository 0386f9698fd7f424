"""Connections with retry and backoff, and a session that keeps heartbeats serviced.

Connection errors are retried with exponential backoff; authentication and permission errors
are not (retrying cannot fix them). Channel errors and broker-initiated closes surface.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pika
import pika.exceptions as pex
import structlog

from helora.shared.errors import BrokerUnavailable, ConfigError

log = structlog.get_logger(__name__)

# "The connection is gone; reconnect": broker restarts and closes (320 CONNECTION_FORCED), lost
# sockets, missed heartbeats. Channel errors are not in here: they mean we misused the broker
# and must surface.
CONNECTION_LOST = (pex.AMQPConnectionError, pex.ConnectionWrongStateError)


def connection_parameters(
    url: str, *, heartbeat: int = 30, name: str = "helora"
) -> pika.URLParameters:
    try:
        params = pika.URLParameters(url)
    except (ValueError, TypeError) as exc:
        raise ConfigError(f"invalid AMQP URL: {exc}") from exc
    params.heartbeat = heartbeat
    params.blocked_connection_timeout = 300
    params.connection_attempts = 1
    params.socket_timeout = 10
    params.client_properties = {"connection_name": name}
    return params


def connect(
    url: str,
    *,
    heartbeat: int = 30,
    attempts: int = 10,
    backoff: float = 0.5,
    max_backoff: float = 10.0,
    name: str = "helora",
) -> pika.BlockingConnection:
    """A BlockingConnection, retrying refused/lost connections up to ``attempts`` times."""
    params = connection_parameters(url, heartbeat=heartbeat, name=name)
    delay = backoff
    for attempt in range(1, attempts + 1):
        try:
            return pika.BlockingConnection(params)
        except (pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError) as exc:
            raise ConfigError(f"broker refused the credentials or vhost: {exc!r}") from exc
        except pex.AMQPConnectionError as exc:
            if attempt == attempts:
                raise BrokerUnavailable(
                    f"no RabbitMQ broker answered at {params.host}:{params.port} after "
                    f"{attempts} attempts ({exc!r}). Start one (`make broker`) or set "
                    "HELORA_AMQP_URL."
                ) from exc
            log.warning(
                "broker_connect_retry",
                attempt=attempt,
                delay=round(delay, 2),
                host=params.host,
                port=params.port,
            )
            time.sleep(delay)
            delay = min(delay * 2, max_backoff)
    raise AssertionError("unreachable")  # pragma: no cover


def broker_answers(url: str, timeout: float = 2.0) -> bool:
    """True if an AMQP broker accepts a connection at ``url`` right now (one attempt)."""
    params = connection_parameters(url, heartbeat=0, name="helora-probe")
    params.socket_timeout = timeout
    try:
        pika.BlockingConnection(params).close()
    except pex.AMQPError:
        return False
    return True


def close_connection(connection: pika.BlockingConnection) -> None:
    """Close if still open; a connection the broker already closed is simply done."""
    if connection.is_open:
        try:
            connection.close()
        except pex.AMQPError as exc:
            log.debug("connection_close_error", error=repr(exc))


def service_until(
    connection: pika.BlockingConnection,
    done: Callable[[], bool],
    *,
    timeout: float | None = None,
    tick: float = 0.2,
) -> bool:
    """Process broker I/O (heartbeats, deliveries) until ``done()`` or the timeout.

    Returns done()."""
    deadline = None if timeout is None else time.monotonic() + timeout
    while not done():
        if deadline is not None and time.monotonic() >= deadline:
            return False
        connection.process_data_events(time_limit=tick)
    return True
