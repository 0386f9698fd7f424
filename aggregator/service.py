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
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from helora.aggregator.checkpoint import Checkpoint, CheckpointStore, write_json_atomic
from helora.aggregator.core import (
    AggregatorCore,
    Applied,
    Buffered,
    CoreState,
    Duplicate,
    PadConfig,
    Rejected,
)
from helora.aggregator.failpoints import Failpoints
from helora.aggregator.guards import NormGuard
from helora.aggregator.intake import Intake
from helora.aggregator.methods import make_core
from helora.aggregator.metrics import AggregatorMetrics
from helora.broker.connection import CONNECTION_LOST, close_connection, connect
from helora.broker.consumer import (
    KIND_HEADER,
    VERSION_HEADER,
    Delivery,
    UpdateConsumer,
    dead_letter,
)
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, declare_topology
from helora.shared.errors import BrokerUnavailable, ConfigError, DecodeError
from helora.shared.messages import Tensors
from helora.shared.settings import Settings
from helora.shared.spec import AdapterSpec
from helora.shared.wire import WireLimits, decode_update, encode_global

log = structlog.get_logger(__name__)


@dataclass
class RunSummary:
    version: int = 0
    outcomes: Counter[str] = field(default_factory=Counter)

    def line(self) -> str:
        parts = " ".join(f"{k}={v}" for k, v in sorted(self.outcomes.items()))
        return f"aggregator stopped at version {self.version}: {parts or 'no updates'}"


def pad_config(settings: Settings) -> PadConfig:
    a = settings.aggregator
    return PadConfig(
        padding=a.padding,
        weighting=a.weighting,
        beta=a.beta,
        staleness=a.staleness,
        staleness_a=a.staleness_a,
        hinge_b=a.hinge_b,
        max_staleness=a.max_staleness,
        buffer_size=a.buffer_size,
        server_lr=a.server_lr,
        allowed_ranks=frozenset(a.allowed_ranks) or None,
    )


class AggregatorService:
    def __init__(
        self,
        settings: Settings,
        spec: AdapterSpec,
        adapter_config: dict[str, Any],
        initial_adapter: Callable[[], Tensors],
    ) -> None:
        self.settings = settings
        self.spec = spec
        self.topo = Topology(settings.federation)
        a = settings.aggregator
        self.store = CheckpointStore(
            a.checkpoint_dir, adapter_config=adapter_config, keep=a.keep_checkpoints
        )
        self.core = self._make_core(self._resume(initial_adapter))
        self.limits = WireLimits(max_message_bytes=int(a.max_message_mb * 2**20))
        guard = NormGuard(
            ratio=a.max_norm_ratio,
            window=a.norm_window,
            min_history=a.min_norm_history,
            max_norm=a.max_update_norm,
        )
        self.intake = Intake(guard, require_user_id=a.require_user_id)
        self.metrics = AggregatorMetrics()
        self.metrics.version(self.core.version)
        self._pending: list[int] = []  # delivery tags of the buffered updates
        self._buffer_started: float | None = None
        self._stop = False
        self._connected = False
        self.session = Counter[str]()
        self.failpoints = Failpoints(a.failpoint)

    def _make_core(self, state: CoreState) -> AggregatorCore:
        method = self.settings.aggregator.method
        return make_core(method, self.spec, pad_config(self.settings), state)

    # ---- startup and checkpoints ----

    def _resume(self, initial_adapter: Callable[[], Tensors]) -> CoreState:
        ckpt = self.store.load_latest()
        if ckpt is None:
            state = CoreState(version=0, adapter=initial_adapter())
            self._checkpoint(state, parent=-1, update_ids=())
            log.info("initialised_global", version=0, checkpoint=str(self.store.latest_path()))
            return state
        method = self.settings.aggregator.method
        if ckpt.fingerprint != self.spec.fingerprint or ckpt.method != method:
            raise ConfigError(
                f"checkpoint {ckpt.path} is for another model or method ({ckpt.method}, "
                f"{ckpt.fingerprint}; this service: {method}, {self.spec.fingerprint}); "
                "use another --checkpoint-dir"
            )
        self._version_update_ids = ckpt.update_ids
        log.info(
            "resumed", version=ckpt.version, checkpoint=str(ckpt.path), applied=len(ckpt.ledger)
        )
        return CoreState(
            ckpt.version, ckpt.adapter, dict(ckpt.ledger), ckpt.counters, ckpt.staleness_hist
        )

    def _sync_with_store(self) -> None:
        """A standby aggregator (single active consumer) becomes active without any AMQP signal;
        if another aggregator has checkpointed newer versions meanwhile, continue from them."""
        latest = self.store.latest_version()
        if latest is not None and latest > self.core.version:
            ckpt = self.store.load_latest()
            assert ckpt is not None
            self._version_update_ids = ckpt.update_ids
            self.core = self._make_core(
                CoreState(
                    ckpt.version,
                    ckpt.adapter,
                    dict(ckpt.ledger),
                    ckpt.counters,
                    ckpt.staleness_hist,
                )
            )
            self.metrics.version(ckpt.version)
            log.info("took_over", version=ckpt.version, checkpoint=str(ckpt.path))

    def _checkpoint(self, state: CoreState, parent: int, update_ids: tuple[str, ...]) -> None:
        self._version_update_ids = update_ids  # a republished version carries the same ids
        self.store.save(
            Checkpoint(
                version=state.version,
                parent_version=parent,
                method="pad",
                max_rank=self.spec.max_rank,
                fingerprint=self.spec.fingerprint,
                adapter=state.adapter,
                update_ids=update_ids,
                ledger=state.applied,
                counters=state.counters,
                staleness_hist=state.staleness_hist,
                created_at=time.time(),
            )
        )

    # ---- main loop ----

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
                except CONNECTION_LOST as exc:
                    self._lost(repr(exc))
                connected_once = connected_once or self._connected
                self._sleep(delay)
                delay = min(delay * 2, 10.0)
        finally:
            self.metrics.set_ready(False)
            self.metrics.close()
            if self.core.buffer_fill:
                self.session["requeued"] += self.core.buffer_fill
            self._write_status()
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
            name="helora-aggregator",
        )
        self._connected = True
        try:
            declare_topology(self.connection.channel(), self.topo)
            self.publisher = ConfirmedPublisher(self.connection)
            self._publish_global(update_ids=self._version_update_ids)
            prefetch = max(2 * s.aggregator.buffer_size, 16)
            self.consumer = UpdateConsumer(self.connection, self.topo, prefetch=prefetch)
            self.consumer.start(self._on_delivery)
            self.metrics.set_ready(True)
            log.info(
                "aggregator_ready",
                federation=s.federation,
                version=self.core.version,
                buffer_size=s.aggregator.buffer_size,
                queue=self.topo.updates_queue,
            )
            while not self._stop:
                self.consumer.poll(0.5)
                self._flush_if_due()
        finally:
            close_connection(self.connection)  # unacked deliveries return to the queue

    def _lost(self, error: str) -> None:
        dropped = self.core.buffer_fill
        self.core = self._make_core(self.core.state)  # drop the unapplied buffer (module doc)
        self._pending.clear()
        self.intake.dropped()
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

    def _write_status(self) -> None:
        """status.json beside the checkpoints: cumulative counters, including rejections after
        the last checkpoint (read by `helora demo` and by operators)."""
        st = self.core.state
        doc = {
            "version": st.version,
            "checkpoint": str(self.store.latest_path()),
            "counters": dict(st.counters),
            "staleness_hist": {str(k): v for k, v in sorted(st.staleness_hist.items())},
            "session": dict(self.session),
            "buffered_not_applied": self.core.buffer_fill,
        }
        write_json_atomic(self.store.root / "status.json", doc)

    def stop(self) -> None:
        self._stop = True

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self._stop = True

    def _on_delivery(self, d: Delivery) -> None:
        m = self.metrics
        m.received()
        try:
            with m.time_stage("decode"):
                update = decode_update(d.body, self.limits)
        except DecodeError as exc:
            self.core.state.counters[f"rejected:{exc.reason}"] += 1
            self._reject(d, exc.reason, exc.detail, client=d.routing_key)
            return
        self.failpoints.reached("after_decode")
        if self.core.buffer_fill == 0:
            self._sync_with_store()
        with m.time_stage("accumulate"):
            decision, norm = self.intake.admit(self.core, update, d.routing_key, d.user_id)
        if isinstance(decision, Rejected):
            self._reject(
                d,
                decision.reason,
                decision.detail,
                client=update.client_id,
                update_id=update.update_id,
            )
        elif isinstance(decision, Duplicate):
            self.consumer.ack(d.tag)
            self.session["duplicate"] += 1
            m.duplicate()
            log.info("update_duplicate", update_id=update.update_id, client=update.client_id)
        else:
            self._pending.append(d.tag)
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
        self, d: Delivery, reason: str, detail: str, *, client: str, update_id: str | None = None
    ) -> None:
        dead_letter(self.publisher, self.topo, d, reason, detail)
        self.consumer.ack(d.tag)
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
            self._checkpoint(self.core.state, applied.parent_version, applied.update_ids)
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
