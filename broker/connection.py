"""Connections with retry and backoff, and a session that keeps heartbeats serviced.

Connection errors are retried with exponential backoff; authentication and permission errors
are not (retrying cannot fix them). Channel errors and broker-initiated closes surface.
"""

from __future__ import annotations

import ssl
import time
from collections.abc import Callable
from typing import Any

import pika
import pika.exceptions as pex
import structlog

from helora.broker.tls import ssl_options, tls_options_for
from helora.shared.errors import BrokerUnavailable, ConfigError

log = structlog.get_logger(__name__)

# "The connection is gone; reconnect": broker restarts and closes (320 CONNECTION_FORCED), lost
# sockets, missed heartbeats. Channel errors are not in here: they mean we misused the broker
# and must surface.
CONNECTION_LOST = (pex.AMQPConnectionError, pex.ConnectionWrongStateError)


def retryable(exc: BaseException) -> bool:
    """Reconnect-and-retry errors: a lost connection, or the 404 RabbitMQ answers for a durable
    queue whose home node is "down or inaccessible" while it recovers after a restart. Every
    other channel error is a real error (ours) and must surface."""
    if isinstance(exc, CONNECTION_LOST):
        return True
    return (
        isinstance(exc, pex.ChannelClosedByBroker)
        and exc.reply_code == 404
        and "down or inaccessible" in str(exc.reply_text)
    )


def connection_parameters(
    url: str,
    *,
    heartbeat: int = 30,
    name: str = "helora",
    tls_ca: str | None = None,
    tls_cert: str | None = None,
    tls_key: str | None = None,
    tls_verify: bool = True,
    tls_server_name: str | None = None,
) -> pika.URLParameters:
    """pika parameters for ``url``. amqps:// URLs use TLS: the broker's certificate and host
    name are verified (against ``tls_ca``, else the system CAs) unless ``tls_verify=False``;
    ``tls_cert``/``tls_key`` present a client certificate. The same settings may come from the
    URL's query (cacertfile, certfile, keyfile, verify, server_name_indication); keyword
    arguments win. See helora.broker.tls."""
    try:
        pika_url, tls = tls_options_for(
            url,
            ca=tls_ca,
            cert=tls_cert,
            key=tls_key,
            verify=tls_verify,
            server_name=tls_server_name,
        )
        params = pika.URLParameters(pika_url)
    except (ValueError, TypeError, SyntaxError, OSError) as exc:  # pika ssl_options query
        raise ConfigError(f"invalid AMQP URL: {exc}") from exc
    if tls is not None:
        params.ssl_options = ssl_options(tls)
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
    tls: dict[str, Any] | None = None,
) -> pika.BlockingConnection:
    """A BlockingConnection, retrying refused/lost connections up to ``attempts`` times.

    ``tls``: keyword arguments of ``connection_parameters`` (tls_ca, tls_cert, tls_key,
    tls_verify, tls_server_name). A certificate that fails verification is a ConfigError at once
    (retrying cannot fix it)."""
    params = connection_parameters(url, heartbeat=heartbeat, name=name, **(tls or {}))
    delay = backoff
    for attempt in range(1, attempts + 1):
        try:
            return pika.BlockingConnection(params)
        except (pex.ProbableAuthenticationError, pex.ProbableAccessDeniedError) as exc:
            raise ConfigError(f"broker refused the credentials or vhost: {exc!r}") from exc
        except ssl.SSLCertVerificationError as exc:
            raise ConfigError(f"TLS: the broker's certificate failed verification: {exc}") from exc
        except pex.AMQPConnectionError as exc:
            if attempt == attempts:
                hint = (
                    " With TLS, also check the client certificate and key: a broker that "
                    "requires one drops connections without it."
                    if params.ssl_options
                    else ""
                )
                raise BrokerUnavailable(
                    f"no RabbitMQ broker answered at {params.host}:{params.port} after "
                    f"{attempts} attempts ({exc!r}). Start one (`make broker`) or set "
                    f"HELORA_AMQP_URL.{hint}"
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
    except (pex.AMQPError, ssl.SSLError, OSError):
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
