"""The long-lived aggregator: broker + core + checkpoint store.

Per delivery: decode (limits first) -> identity and norm checks -> core.offer -> by decision:
  Buffered  -> keep the delivery unacked
  Applied   -> checkpoint (atomic) -> publish the new global (confirmed) -> ack the buffer
  Rejected  -> dead-letter with the reason (confirmed) -> ack
  Duplicate -> ack (counted, not applied)
A timer applies a partial buffer after ``buffer_timeout`` seconds. On start the service resumes
from its last checkpoint (or checkpoints version 0) and publishes the current global, so a crash
between checkpoint and publish is repaired by the restart. SIGTERM/SIGINT stop it cleanly:
unacked deliveries return to the queue, nothing is lost.

If the broker connection is lost (broker restart, network), the service reconnects with backoff.
The updates buffered but not yet applied are dropped from the core: their deliveries died with
the connection and the broker redelivers them. (Acking a redelivered copy as a "duplicate" of a
buffered-but-unapplied update would lose it if the process then crashed before the checkpoint.)
"""

from __future__ import annotations

import signal
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

import structlog

from helora.aggregator.checkpoint import CheckpointStore
from helora.aggregator.chunks import ChunkGate
from helora.aggregator.core import (
    AggregatorCore,
    Applied,
    Buffered,
    CoreState,
    Duplicate,
    Rejected,
)
from helora.aggregator.failpoints import Failpoints
from helora.aggregator.guards import NormGuard
from helora.aggregator.intake import Intake
from helora.aggregator.kd import Distiller
from helora.aggregator.methods import make_core, pad_config
from helora.aggregator.metrics import AggregatorMetrics
from helora.aggregator.persistence import Persistence
from helora.broker.connection import close_connection, connect, retryable, service_until
from helora.broker.consumer import (
    KIND_HEADER,
    VERSION_HEADER,
    Delivery,
    UpdateConsumer,
    dead_letter,
)
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, declare_topology
from helora.shared.chunking import Reassembler
from helora.shared.errors import BrokerUnavailable, DecodeError
from helora.shared.messages import Tensors
from helora.shared.settings import Settings
from helora.shared.spec import AdapterSpec
from helora.shared.wire import WireLimits, decode_update, encode_global

log = structlog.get_logger(__name__)
T = TypeVar("T")


@dataclass
class RunSummary:
    version: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        parts = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        return f"aggregator stopped at version {self.version}: {parts or 'no updates'}"


class AggregatorService:
    def __init__(
        self,
        settings: Settings,
        spec: AdapterSpec,
        adapter_config: dict[str, Any],
        initial_adapter: Callable[[], Tensors],
        distiller: Distiller | None = None,
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.distiller = distiller
        self.topo = Topology(settings.federation)
        a = settings.aggregator
        store = CheckpointStore(
            a.checkpoint_dir, adapter_config=adapter_config, keep=a.keep_checkpoints
        )
        self.persistence = Persistence(store, spec, a.method)
        self.core = self._make_core(self.persistence.resume(initial_adapter))
        self.limits = WireLimits(max_message_bytes=int(a.max_message_mb * 2**20))
        guard = NormGuard(
            ratio=a.max_norm_ratio,
            window=a.norm_window,
            min_history=a.min_norm_history,
            max_norm=a.max_update_norm,
        )
        self.intake = Intake(guard, require_user_id=a.require_user_id)
        reassembler = Reassembler(
            timeout=a.chunk_timeout, max_bytes=int(a.reassembly_max_mb * 2**20)
        )
        self.chunks = ChunkGate(
            reassembler,
            ack=lambda tag: self.consumer.ack(tag),
            reject=lambda d, reason, detail: self._reject(d, reason, detail, client=d.routing_key),
        )
        self.metrics = AggregatorMetrics()
        self.metrics.version(self.core.version)
        self._pending: list[int] = []  # delivery tags of the buffered updates
        self._inbox: deque[Delivery] = deque()  # deliveries not yet handled (<= prefetch)
        self._buffer_started: float | None = None
        self._stop = False
        self._connected = False
        self.session = Counter[str]()
        self.failpoints = Failpoints(a.failpoint)

    def _make_core(self, state: CoreState) -> AggregatorCore:
        a = self.settings.aggregator
        if a.method != "kd":
            return make_core(a.method, self.spec, pad_config(self.settings), state)
        distiller = self.distiller
        if distiller is not None:  # minutes of CPU: keep the broker connection serviced meanwhile
            real = distiller
            distiller = lambda slots, weights: self.run_pumped(lambda: real(slots, weights))  # noqa: E731
        return make_core(
            "kd",
            self.spec,
            pad_config(self.settings),
            state,
            rank_levels=a.rank_levels or None,
            distiller=distiller,
        )

    # ---- main loop ----

    def run(self, *, install_signal_handlers: bool = True) -> RunSummary:
        if install_signal_handlers:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        connected_once = False
        delay = 0.5
        a = self.settings.aggregator
        if a.metrics_port is not None:
            self.metrics_server = self.metrics.serve(a.metrics_port, a.metrics_host)
            log.info("metrics_serving", url=self.metrics_server.url)
        try:
            while not self._stop:
                try:
                    self._session()
                    break
                except BrokerUnavailable:
                    if not connected_once:
                        raise  # a wrong URL or no broker at all: tell the user now
                    self._lost("broker unavailable")
                except Exception as exc:  # the top of the service loop (DESIGN.md section 4)
                    if not retryable(exc):
                        raise
                    self._lost(repr(exc))
                connected_once = connected_once or self._connected
                self._sleep(delay)
                delay = min(delay * 2, 10.0)
        finally:
            self.metrics.set_ready(False)
            self.metrics.close()
            if self.core.buffer_fill:
                self.session["requeued"] += self.core.buffer_fill
            self.persistence.write_status(self.core.state, self.session, self.core.buffer_fill)
        log.info("aggregator_stopped", version=self.core.version, **dict(self.session))
        return RunSummary(self.core.version, self.session)

    def _session(self) -> None:
        """One broker connection's lifetime: returns on stop, raises on connection loss."""
        s = self.settings
        self._connected = False
        self.connection = connect(
            s.amqp_url.get_secret_value(),
            heartbeat=s.heartbeat,
            attempts=s.connect_attempts,
            tls=s.tls.connect_kwargs(),
            name="helora-aggregator",
        )
        self._connected = True
        try:
            declare_topology(self.connection.channel(), self.topo)
            self.publisher = ConfirmedPublisher(self.connection)
            self._publish_global(update_ids=self.persistence.update_ids)
            prefetch = max(s.aggregator.prefetch, 2 * s.aggregator.buffer_size)
            self.consumer = UpdateConsumer(self.connection, self.topo, prefetch=prefetch)
            self._inbox.clear()
            self.consumer.start(self._inbox.append)  # callbacks only enqueue (see run_pumped)
            self.metrics.set_ready(True)
            log.info(
                "aggregator_ready",
                federation=s.federation,
                version=self.core.version,
                buffer_size=s.aggregator.buffer_size,
                queue=self.topo.updates_queue,
            )
            while not self._stop:
                self.consumer.poll(0 if self._inbox else 0.5)
                while self._inbox and not self._stop:
                    self._on_delivery(self._inbox.popleft())
                self._flush_if_due()
        finally:
            close_connection(self.connection)  # unacked deliveries return to the queue

    def _lost(self, error: str) -> None:
        dropped = self.core.buffer_fill
        self.core = self._make_core(self.core.state)  # drop the unapplied buffer (module doc)
        self._pending.clear()
        self.intake.dropped()
        self.chunks.clear()
        self._buffer_started = None
        self.session["reconnects"] += 1
        self.metrics.set_ready(False)
        self.metrics.buffer(0)
        log.warning(
            "broker_connection_lost",
            error=error[:300],
            dropped_buffered=dropped,
            version=self.core.version,
        )

    def _sleep(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while not self._stop and time.monotonic() < deadline:
            time.sleep(0.1)

    def stop(self) -> None:
        self._stop = True

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self._stop = True

    def run_pumped(self, fn: Callable[[], T]) -> T:
        """Run ``fn`` (e.g. KD distillation, seconds to minutes) in a thread while this thread
        keeps the broker connection serviced: heartbeats go out, and deliveries that arrive
        meanwhile only join the inbox (callbacks never handle them), so nothing re-enters."""
        box: dict[str, Any] = {}

        def work() -> None:
            try:
                box["value"] = fn()
            except BaseException as exc:  # re-raised below, in this thread
                box["error"] = exc

        thread = threading.Thread(target=work, name="aggregator-work", daemon=True)
        thread.start()
        service_until(self.connection, lambda: not thread.is_alive())
        if "error" in box:
            raise box["error"]
        return box["value"]

    def _on_delivery(self, chunk: Delivery) -> None:
        whole = self.chunks.offer(chunk, time.monotonic())
        if whole is not None:
            self._handle(whole.delivery, whole.tags)

    def _handle(self, d: Delivery, tags: tuple[int, ...]) -> None:
        m = self.metrics
        m.received()
        try:
            with m.time_stage("decode"):
                update = decode_update(d.body, self.limits)
        except DecodeError as exc:
            self._reject(d, exc.reason, exc.detail, client=d.routing_key, tags=tags)
            return
        self.failpoints.reached("after_decode")
        if self.core.buffer_fill == 0:  # a standby that took over continues from the store
            newer = self.persistence.newer_than(self.core.version)
            if newer is not None:
                self.core = self._make_core(newer)
                m.version(newer.version)
        with m.time_stage("accumulate"):
            decision, norm = self.intake.admit(self.core, update, d.routing_key, d.user_id)
        if isinstance(decision, Rejected):
            self._reject(
                d,
                decision.reason,
                decision.detail,
                client=update.client_id,
                update_id=update.update_id,
                tags=tags,
                counted=True,
            )
        elif isinstance(decision, Duplicate):
            for tag in tags:
                self.consumer.ack(tag)
            self.session["duplicate"] += 1
            m.duplicate()
            log.info("update_duplicate", update_id=update.update_id, client=update.client_id)
        else:
            self._pending.extend(tags)
            if self._buffer_started is None:
                self._buffer_started = time.monotonic()
            staleness = (
                decision.staleness if isinstance(decision, Buffered) else decision.staleness[-1]
            )
            m.staleness(staleness)
            m.rank(update.rank)
            m.buffer(self.core.buffer_fill)
            log.info(
                "update_accepted",
                update_id=update.update_id,
                client=update.client_id,
                rank=update.rank,
                base_version=update.base_version,
                staleness=staleness,
                examples=update.num_examples,
                norm=round(norm, 4),
            )
            self.failpoints.reached("after_buffer")
            if isinstance(decision, Applied):
                self._commit(decision)

    def _reject(
        self,
        d: Delivery,
        reason: str,
        detail: str,
        *,
        client: str,
        update_id: str | None = None,
        tags: tuple[int, ...] | None = None,
        counted: bool = False,
    ) -> None:
        """Dead-letter ``d`` with the reason (confirmed), then ack every tag it stands for."""
        dead_letter(self.publisher, self.topo, d, reason, detail)
        for tag in tags or (d.tag,):
            self.consumer.ack(tag)
        if not counted:  # the core and the intake count their own rejections
            self.core.state.counters[f"rejected:{reason}"] += 1
        self.session[f"rejected:{reason}"] += 1
        self.metrics.rejected(reason)
        log.warning(
            "update_rejected",
            reason=reason,
            detail=detail[:200],
            client=client,
            update_id=update_id,
        )

    def _flush_if_due(self) -> None:
        self.chunks.expire(time.monotonic())
        if self._buffer_started is None:
            return
        if time.monotonic() - self._buffer_started >= self.settings.aggregator.buffer_timeout:
            applied = self.core.flush()
            if applied is not None:
                self._commit(applied)

    def _commit(self, applied: Applied) -> None:
        """Checkpoint, publish, then ack: in this order, so a crash never loses an update."""
        m = self.metrics
        with m.time_stage("checkpoint"):
            self.persistence.save(self.core.state, applied.parent_version, applied.update_ids)
        self.failpoints.reached("after_checkpoint")
        with m.time_stage("publish"):
            self._publish_global(update_ids=applied.update_ids)
        self.failpoints.reached("after_publish")
        for tag in self._pending:
            self.consumer.ack(tag)
        self.intake.committed()
        self._pending.clear()
        self._buffer_started = None
        self.session["applied"] += len(applied.update_ids)
        self.session["versions"] += 1
        m.applied(len(applied.update_ids))
        m.version(applied.version)
        m.buffer(0)
        log.info(
            "version_published",
            version=applied.version,
            updates=len(applied.update_ids),
            staleness=list(applied.staleness),
        )

    def _publish_global(self, update_ids: tuple[str, ...]) -> None:
        g = self.core.global_adapter(update_ids=update_ids, created_at=time.time())
        body = encode_global(g, wire_dtype=self.settings.aggregator.wire_dtype)
        self.publisher.publish(
            self.topo.global_exchange,
            "",
            body,
            headers={
                KIND_HEADER: "global",
                VERSION_HEADER: g.version,
            },
            message_id=f"global-{g.version}",
        )
