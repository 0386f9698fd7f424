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

import os
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
    Decision,
    Duplicate,
    PadConfig,
    Rejected,
)
from helora.aggregator.guards import NormGuard, adapter_norm
from helora.aggregator.methods import make_core
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
        self.guard = NormGuard(
            ratio=a.max_norm_ratio,
            window=a.norm_window,
            min_history=a.min_norm_history,
            max_norm=a.max_update_norm,
        )
        self._pending: list[int] = []  # delivery tags of the buffered updates
        self._pending_norms: list[float] = []
        self._buffer_started: float | None = None
        self._stop = False
        self._connected = False
        self.session = Counter[str]()
        self._failpoint_hits = Counter[str]()

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
        self._pending_norms.clear()
        self._buffer_started = None
        self.session["reconnects"] += 1
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

    def _failpoint(self, name: str) -> None:
        """Testing only: SIGKILL ourselves the Nth time ``name`` is reached (see settings)."""
        spec = self.settings.aggregator.failpoint
        if not spec:
            return
        point, _, nth = spec.partition(":")
        if point != name:
            return
        self._failpoint_hits[name] += 1
        if self._failpoint_hits[name] >= int(nth or 1):
            log.warning("failpoint_kill", point=name)
            os.kill(os.getpid(), signal.SIGKILL)

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
        try:
            update = decode_update(d.body, self.limits)
        except DecodeError as exc:
            self._reject(d, exc.reason, exc.detail, client=d.routing_key)
            return
        self._failpoint("after_decode")
        if update.client_id != d.routing_key:
            detail = f"payload {update.client_id!r} vs routing key {d.routing_key!r}"
            self._reject(d, "client_id_mismatch", detail, client=d.routing_key)
            return
        if d.user_id and d.user_id != update.client_id:
            detail = f"broker-validated user {d.user_id!r} sent as {update.client_id!r}"
            self._reject(d, "identity_mismatch", detail, client=d.user_id)
            return
        norm = adapter_norm(update.tensors)
        if update.update_id not in self.core.state.applied:
            too_large = self.guard.check(norm)
            if too_large:
                self._reject(
                    d,
                    "norm_too_large",
                    too_large,
                    client=update.client_id,
                    update_id=update.update_id,
                )
                return
        decision: Decision = self.core.offer(update)
        if isinstance(decision, Rejected):
            self._reject(
                d,
                decision.reason,
                decision.detail,
                client=update.client_id,
                update_id=update.update_id,
                counted=True,
            )
        elif isinstance(decision, Duplicate):
            self.consumer.ack(d.tag)
            self.session["duplicate"] += 1
            log.info("update_duplicate", update_id=update.update_id, client=update.client_id)
        else:
            self._pending.append(d.tag)
            self._pending_norms.append(norm)
            if self._buffer_started is None:
                self._buffer_started = time.monotonic()
            staleness = (
                decision.staleness if isinstance(decision, Buffered) else decision.staleness[-1]
            )
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
            self._failpoint("after_buffer")
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
        counted: bool = False,
    ) -> None:
        dead_letter(self.publisher, self.topo, d, reason, detail)
        self.consumer.ack(d.tag)
        if not counted:  # the core counts its own rejections
            self.core.state.counters[f"rejected:{reason}"] += 1
        self.session[f"rejected:{reason}"] += 1
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
        self._checkpoint(self.core.state, applied.parent_version, applied.update_ids)
        self._failpoint("after_checkpoint")
        self._publish_global(update_ids=applied.update_ids)
        self._failpoint("after_publish")
        for tag in self._pending:
            self.consumer.ack(tag)
        for norm in self._pending_norms:
            self.guard.accepted(norm)
        self._pending.clear()
        self._pending_norms.clear()
        self._buffer_started = None
        self.session["applied"] += len(applied.update_ids)
        self.session["versions"] += 1
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
