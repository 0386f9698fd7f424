"""AggregatorMetrics: counters move, the exposition names every metric, and the HTTP endpoint
answers /metrics, /healthz and /readyz (real HTTP on a free loopback port)."""

from __future__ import annotations

import urllib.error
import urllib.request

import pytest
from prometheus_client import CollectorRegistry

from helora.aggregator.metrics import STAGES, AggregatorMetrics

P = "helora_aggregator_"


def value(m: AggregatorMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(P + name, labels or None)


def get(url: str) -> tuple[int, str, str]:
    try:
        with urllib.request.urlopen(url, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read().decode()


def test_counters_gauges_and_histograms_move():
    m = AggregatorMetrics()
    m.received()
    m.received()
    m.applied(3)
    m.rejected("bad_rank")
    m.rejected("bad_rank")
    m.rejected("non_finite")
    m.duplicate()
    m.rank(4)
    m.rank(4)
    m.rank(8)
    m.staleness(0)
    m.staleness(2)
    m.staleness(25)  # beyond the last bucket: counted in +Inf only
    m.buffer(3)
    m.version(7)
    assert value(m, "updates_received_total") == 2
    assert value(m, "updates_applied_total") == 3
    assert value(m, "updates_rejected_total", reason="bad_rank") == 2
    assert value(m, "updates_rejected_total", reason="non_finite") == 1
    assert value(m, "updates_duplicate_total") == 1
    assert value(m, "updates_by_rank_total", rank="4") == 2
    assert value(m, "updates_by_rank_total", rank="8") == 1
    assert value(m, "update_staleness_count") == 3
    assert value(m, "update_staleness_sum") == 27
    assert value(m, "update_staleness_bucket", le="0.0") == 1
    assert value(m, "update_staleness_bucket", le="2.0") == 2
    assert value(m, "update_staleness_bucket", le="10.0") == 2
    assert value(m, "update_staleness_bucket", le="+Inf") == 3
    assert value(m, "buffer_fill") == 3
    assert value(m, "global_version") == 7


def test_time_stage_observes_even_when_the_block_raises():
    m = AggregatorMetrics()
    with m.time_stage("decode"):
        pass
    with pytest.raises(KeyError), m.time_stage("decode"):
        raise KeyError("boom")
    m.observe_stage("publish", 0.5)
    assert value(m, "stage_seconds_count", stage="decode") == 2
    assert value(m, "stage_seconds_sum", stage="publish") == 0.5
    with pytest.raises(ValueError), m.time_stage("nap"):
        pass


def test_exposition_names_every_metric_and_every_stage():
    m = AggregatorMetrics()
    m.rejected("too_stale")
    m.rank(2)
    text = m.exposition().decode()
    for name in (
        "updates_received_total",
        "updates_applied_total",
        "updates_rejected_total",
        "updates_duplicate_total",
        "updates_by_rank_total",
        "update_staleness_bucket",
        "stage_seconds_bucket",
        "buffer_fill",
        "global_version",
        "ready",
    ):
        assert P + name in text, name
    for stage in STAGES:  # pre-created, so dashboards see every stage from the start
        assert f'stage="{stage}"' in text, stage
    assert 'reason="too_stale"' in text and 'rank="2"' in text


def test_own_registries_do_not_collide():
    a, b = AggregatorMetrics(), AggregatorMetrics()
    a.received()
    assert value(a, "updates_received_total") == 1
    assert value(b, "updates_received_total") == 0
    shared = CollectorRegistry()
    AggregatorMetrics(shared)
    with pytest.raises(ValueError):  # the same names twice in one registry
        AggregatorMetrics(shared)


def test_http_endpoint_on_a_free_port():
    m = AggregatorMetrics()
    server = m.serve(0)
    try:
        assert server.port > 0 and server.url == f"http://127.0.0.1:{server.port}"
        m.received()
        status, ctype, body = get(server.url + "/metrics")
        assert status == 200 and ctype.startswith("text/plain")
        assert P + "updates_received_total 1.0" in body
        assert get(server.url + "/healthz")[0] == 200
        assert get(server.url + "/readyz")[0] == 503  # not ready until told so
        m.set_ready(True)
        assert get(server.url + "/readyz")[0] == 200
        assert value(m, "ready") == 1
        m.set_ready(False)
        assert get(server.url + "/readyz")[0] == 503
        assert get(server.url + "/nope")[0] == 404
        with pytest.raises(RuntimeError):
            m.serve(0)
    finally:
        m.close()
    m.close()  # idempotent
    with pytest.raises(OSError):
        urllib.request.urlopen(server.url + "/healthz", timeout=2)
