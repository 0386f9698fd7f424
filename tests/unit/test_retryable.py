"""Which broker errors mean "reconnect and retry" and which must surface."""

import pika.exceptions as pex
import pytest

from helora.broker.connection import retryable


@pytest.mark.parametrize(
    "exc,expected",
    [
        (pex.StreamLostError("lost"), True),
        (pex.ConnectionClosedByBroker(320, "CONNECTION_FORCED - shutdown"), True),
        (pex.AMQPConnectionError("refused"), True),
        (
            pex.ChannelClosedByBroker(
                404,
                "NOT_FOUND - home node 'x@y' of durable queue 'q' in "
                "vhost '/' is down or inaccessible",
            ),
            True,
        ),
        (pex.ChannelClosedByBroker(404, "NOT_FOUND - no queue 'q' in vhost '/'"), False),
        (pex.ChannelClosedByBroker(406, "PRECONDITION_FAILED - inequivalent arg"), False),
        (pex.ChannelClosedByBroker(403, "ACCESS_REFUSED"), False),
        (ValueError("ours"), False),
    ],
)
def test_retryable(exc, expected):
    assert retryable(exc) is expected
