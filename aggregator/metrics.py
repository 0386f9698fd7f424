"""Prometheus metrics for the aggregator, and a tiny HTTP endpoint: /metrics, /healthz, /readyz.

Every metric lives in this object's own ``CollectorRegistry`` (not the process-global one), so
tests, the benchmark and several services in one process never collide. Labels are bounded:
``reason`` takes the stable reason codes, ``rank`` at most R values, ``stage`` the six stages
below; nothing is labelled per client, so memory does not grow with the number of clients.

Exposed names (prefix ``helora_aggregator_``):

    updates_received_total            counter    every delivery, before decoding
    updates_applied_total             counter    updates inside a published version
    updates_rejected_total{reason}    counter    dead-lettered, by reason code
    updates_duplicate_total           counter    already applied or buffered (acked, not applied)
    updates_by_rank_total{rank}       counter    accepted updates by client rank
    update_staleness                  histogram  staleness u of accepted updates, buckets 0..10
    stage_seconds{stage}              histogram  decode, validate, accumulate, apply, checkpoint,
                                                 publish
    buffer_fill                       gauge      updates waiting in the buffer
    global_version                    gauge      the current global version
    ready                             gauge      1 when /readyz answers 200

``/healthz`` answers 200 as long as the process (and this server thread) runs; ``/readyz``
answers 200 after ``set_ready(True)`` (e.g. connected, topology declared, global published) and
503 otherwise. This module never imports pika: the service calls the methods.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram
from prometheus_client.exposition import CONTENT_TYPE_LATEST, generate_latest

NAMESPACE = "helora"
SUBSYSTEM = "aggregator"
STAGES = ("decode", "validate", "accumulate", "apply", "checkpoint", "publish")
STALENESS_BUCKETS = tuple(float(u) for u in range(11))  # 0..10, then +Inf
STAGE_BUCKETS = (
    0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0,
    2.5, 5.0, 10.0, 30.0,
)  # fmt: skip


class AggregatorMetrics:
    """The aggregator's counters, gauges and histograms; ``serve`` exposes them over HTTP."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        kw: dict[str, Any] = {
            "namespace": NAMESPACE,
            "subsystem": SUBSYSTEM,
            "registry": self.registry,
        }
        self._received = Counter("updates_received", "Update deliveries received.", **kw)
        self._applied = Counter("updates_applied", "Updates applied in a global version.", **kw)
        self._rejected = Counter(
            "updates_rejected", "Updates dead-lettered, by reason code.", ["reason"], **kw
        )
        self._duplicate = Counter(
            "updates_duplicate", "Updates already applied or buffered (acked, not applied).", **kw
        )
        self._by_rank = Counter(
            "updates_by_rank", "Accepted updates by client rank.", ["rank"], **kw
        )
        self._staleness = Histogram(
            "update_staleness",
            "Staleness (version - base version) of accepted updates.",
            buckets=STALENESS_BUCKETS,
            **kw,
        )
        self._stage = Histogram(
            "stage_seconds",
            "Seconds spent per stage of the update path.",
            ["stage"],
            buckets=STAGE_BUCKETS,
            **kw,
        )
        for stage in STAGES:  # export every stage from the start, even before it runs
            self._stage.labels(stage=stage)
        self._buffer = Gauge("buffer_fill", "Updates waiting in the buffer.", **kw)
        self._version = Gauge("global_version", "The current global version.", **kw)
        self._ready = Gauge("ready", "1 when the aggregator is ready (/readyz is 200).", **kw)
        self._is_ready = False
        self._server: MetricsServer | None = None

    # ---- recording ----

    def received(self) -> None:
        self._received.inc()

    def applied(self, n: int) -> None:
        self._applied.inc(n)

    def rejected(self, reason: str) -> None:
        self._rejected.labels(reason=reason).inc()

    def duplicate(self) -> None:
        self._duplicate.inc()

    def staleness(self, u: int) -> None:
        self._staleness.observe(u)

    def rank(self, r: int) -> None:
        self._by_rank.labels(rank=str(int(r))).inc()

    def buffer(self, fill: int) -> None:
        self._buffer.set(fill)

    def version(self, v: int) -> None:
        self._version.set(v)

    def observe_stage(self, name: str, seconds: float) -> None:
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; one of {STAGES}")
        self._stage.labels(stage=name).observe(seconds)

    @contextmanager
    def time_stage(self, name: str) -> Iterator[None]:
        """``with metrics.time_stage("decode"): ...`` observes the block's duration (also when it
        raises: a rejected decode costs time too)."""
        if name not in STAGES:
            raise ValueError(f"unknown stage {name!r}; one of {STAGES}")
        start = time.perf_counter()
        try:
            yield
        finally:
            self._stage.labels(stage=name).observe(time.perf_counter() - start)

    def set_ready(self, ready: bool) -> None:
        self._is_ready = bool(ready)
        self._ready.set(1 if ready else 0)

    @property
    def is_ready(self) -> bool:
        return self._is_ready

    # ---- exposition ----

    def exposition(self) -> bytes:
        """The Prometheus text format of every metric (what /metrics serves)."""
        return generate_latest(self.registry)

    def serve(self, port: int, host: str = "127.0.0.1") -> MetricsServer:
        """Start the HTTP endpoint in a daemon thread; port 0 picks a free port (see ``.port``)."""
        if self._server is not None:
            raise RuntimeError(f"already serving on {self._server.url}")
        self._server = MetricsServer(self, host, port)
        return self._server

    def close(self) -> None:
        """Stop the HTTP endpoint if it runs (idempotent)."""
        if self._server is not None:
            self._server.close()
            self._server = None


class MetricsServer:
    """A ThreadingHTTPServer in a daemon thread; ``port`` is the bound port."""

    def __init__(self, metrics: AggregatorMetrics, host: str, port: int) -> None:
        self._httpd = ThreadingHTTPServer((host, port), _handler_class(metrics))
        self._httpd.daemon_threads = True
        self.host = host
        self.port = int(self._httpd.server_address[1])
        self._thread = threading.Thread(
            target=self._httpd.serve_forever,
            kwargs={"poll_interval": 0.2},
            name=f"helora-metrics-{self.port}",
            daemon=True,
        )
        self._thread.start()

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def close(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


def _handler_class(metrics: AggregatorMetrics) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, metrics.exposition(), CONTENT_TYPE_LATEST)
            elif path == "/healthz":
                self._send(200, b"ok\n")
            elif path == "/readyz":
                ok = metrics.is_ready
                self._send(200 if ok else 503, b"ready\n" if ok else b"not ready\n")
            else:
                self._send(404, b"not found: try /metrics, /healthz or /readyz\n")

        def _send(self, status: int, body: bytes, ctype: str = "text/plain; charset=utf-8") -> None:
            self.send_response(status)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # noqa: A002
            """Silence http.server's per-request stderr lines (scrapes come every few seconds)."""

    return Handler
