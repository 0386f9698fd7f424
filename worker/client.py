"""The worker's client loop: get the current global, train at its own rank, publish the delta.

    loop: wait for a global newer than the one last trained from (the first wait returns the
          current global at once: the stream is read from offset "last")
          -> take the slot of its rank, cut to rank r, load into the model
          -> train E local steps in a thread while the main thread services the connection
             (heartbeats), then idle (slowness - 1) x the training time, also servicing it
          -> delta = trained - received -> encode -> outbox file -> publish (confirmed) -> delete

Every update is written to the outbox before it is published and removed only after the broker
confirms it. If the connection is lost (broker restart, network), the worker finishes the
training it is doing, reconnects with backoff, resends its outbox and carries on; an outbox left
by a crash is resent at start-up. Duplicates are harmless: the aggregator de-duplicates by id.

The worker needs no configure permission: it only checks (passively) that the federation's
topology exists, waiting for `helora broker init` or the aggregator to declare it.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import structlog

from helora.broker.connection import (
    CONNECTION_LOST,
    close_connection,
    connect,
    retryable,
    service_until,
)
from helora.broker.consumer import GlobalSubscriber
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, topology_ready
from helora.shared.chunking import split
from helora.shared.errors import BrokerUnavailable, ConfigError, DecodeError
from helora.shared.lora_ops import cut_to_rank, subtract
from helora.shared.messages import AdapterUpdate, GlobalAdapter, Tensors
from helora.shared.settings import Settings
from helora.shared.spec import AdapterSpec
from helora.shared.wire import decode_global, encode_update
from helora.worker.data import TextDataset
from helora.worker.model import LoraClassifier
from helora.worker.train import TrainConfig, train_local

log = structlog.get_logger(__name__)


@dataclass
class WorkerSummary:
    updates_sent: int = 0
    last_version: int = -1
    train_seconds: float = 0.0
    reconnects: int = 0
    losses: list[float] = field(default_factory=list)


class Outbox:
    """Encoded updates on local disk until the broker has confirmed them."""

    def __init__(self, directory: Path) -> None:
        self.dir = Path(directory)
        self.dir.mkdir(parents=True, exist_ok=True)

    def put(self, update_id: str, body: bytes) -> Path:
        path = self.dir / f"{update_id}.msg"
        tmp = path.with_suffix(".tmp")
        tmp.write_bytes(body)
        tmp.replace(path)
        return path

    def pending(self) -> list[Path]:
        return sorted(self.dir.glob("*.msg"), key=lambda p: p.stat().st_mtime)


def broker_user(url: str) -> str | None:
    """The user name in an AMQP URL (None if absent)."""
    user = urlparse(url).username
    return unquote(user) if user else None


class WorkerClient:
    def __init__(
        self, settings: Settings, clf: LoraClassifier, data: TextDataset, spec: AdapterSpec
    ) -> None:
        self.settings = settings
        self.w = settings.worker
        self.clf = clf
        self.data = data
        self.spec = spec
        self.topo = Topology(settings.federation)
        self.outbox = Outbox(self.w.outbox_dir / self.w.client_id)
        # With per-client credentials (user name == client id) every publish carries user_id,
        # which the broker validates, so the aggregator can trust who sent it.
        user = broker_user(settings.amqp_url.get_secret_value())
        self.user_id = user if user == self.w.client_id else None
        self._stop = threading.Event()
        self._base = -1  # the version last trained from; survives reconnects
        self._round = 0
        self.summary = WorkerSummary()

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self._stop.set()

    def _done(self) -> bool:
        limit = self.w.max_updates
        return self._stop.is_set() or bool(limit and self.summary.updates_sent >= limit)

    # ---- connection lifetime ----

    def run(self, *, install_signal_handlers: bool = True) -> WorkerSummary:
        if install_signal_handlers:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        connected_once, delay = False, 0.5
        while not self._done():
            self._connected = False
            try:
                self._session()
            except BrokerUnavailable:
                if not connected_once:
                    raise
            except Exception as exc:  # the top of the client loop: reconnect or surface
                if not retryable(exc):
                    raise
                self.summary.reconnects += 1
                log.warning("broker_connection_lost", client=self.w.client_id, error=repr(exc))
            connected_once = connected_once or self._connected
            if self._done():
                break
            self._stop.wait(delay)
            delay = min(delay * 2, 10.0)
        log.info("worker_stopped", client=self.w.client_id, updates=self.summary.updates_sent)
        return self.summary

    def _session(self) -> None:
        s = self.settings
        self.connection = connect(
            s.amqp_url.get_secret_value(),
            heartbeat=s.heartbeat,
            attempts=s.connect_attempts,
            tls=s.tls.connect_kwargs(),
            name=f"helora-worker-{self.w.client_id}",
        )
        self._connected = True
        try:
            self._wait_for_topology()
            self.publisher = ConfirmedPublisher(self.connection)
            self._resend_outbox()
            self.subscriber = GlobalSubscriber(self.connection, self.topo, offset="last")
            try:
                self._loop()
            finally:
                self.subscriber.close()
        finally:
            close_connection(self.connection)

    def _wait_for_topology(self) -> None:
        warned = False
        while not self._stop.is_set() and not topology_ready(self.connection, self.topo):
            if not warned:
                log.warning(
                    "waiting_for_topology",
                    federation=self.settings.federation,
                    hint="run `helora broker init` or start the aggregator",
                )
                warned = True
            service_until(self.connection, self._stop.is_set, timeout=2.0)

    # ---- the federated loop ----

    def _loop(self) -> None:
        while not self._done():
            g = self._wait_global(newer_than=self._base)
            if g is None:
                return
            self._base = g.version
            self.summary.last_version = g.version
            _, slot = g.slot_for_rank(self.clf.rank)
            received = cut_to_rank(slot, self.clf.rank)
            self.clf.load_adapter_state(received)
            metrics, lost = self._train(self._round)
            if self._stop.is_set():
                return
            self._round += 1
            delta = subtract(self.clf.adapter_state(), received)
            path = self._to_outbox(delta, g.version, metrics)
            if lost is not None:
                raise lost  # reconnect; the outbox resend publishes this update
            self._send(path)

    def _wait_global(self, newer_than: int) -> GlobalAdapter | None:
        while not self._stop.is_set():
            got = self.subscriber.wait_newer(newer_than, timeout=1.0)
            if got is None:
                continue
            version, body = got
            try:
                g = decode_global(body)
            except DecodeError as exc:
                log.error("global_undecodable", version=version, reason=exc.reason)
                newer_than = version
                continue
            if g.fingerprint != self.spec.fingerprint:
                raise ConfigError(
                    f"the federation's global adapter has fingerprint {g.fingerprint} but this "
                    f"worker's model gives {self.spec.fingerprint}: check --model, --max-rank, "
                    "--lora-alpha and the dataset's label count"
                )
            log.info("global_received", version=g.version, client=self.w.client_id)
            return g
        return None

    def _train(self, round_: int) -> tuple[dict[str, float], BaseException | None]:
        """Train in a thread while servicing the connection; returns (metrics, the connection
        error if the connection was lost meanwhile: training is finished regardless)."""
        cfg = TrainConfig(
            steps=self.w.steps, batch_size=self.w.batch_size, lr=self.w.lr, seed=self.w.data_seed
        )
        result: dict[str, Any] = {}

        def work() -> None:
            try:
                result["metrics"] = train_local(
                    self.clf,
                    self.data.texts,
                    self.data.labels,
                    cfg,
                    step=round_,
                    should_stop=self._stop.is_set,
                )
            except BaseException as exc:  # re-raised in the main thread below
                result["error"] = exc

        start = time.monotonic()
        thread = threading.Thread(target=work, name="train", daemon=True)
        thread.start()
        lost: BaseException | None = None
        try:
            service_until(self.connection, lambda: not thread.is_alive())
        except CONNECTION_LOST as exc:
            lost = exc  # finish training anyway: the update goes out after the reconnect
            thread.join()
        elapsed = time.monotonic() - start
        if "error" in result:
            raise result["error"]
        self.summary.train_seconds += elapsed
        idle = (self.w.slowness - 1.0) * elapsed
        if idle > 0 and lost is None:
            try:
                service_until(self.connection, self._stop.is_set, timeout=idle)
            except CONNECTION_LOST as exc:
                lost = exc
        return dict(result["metrics"]), lost

    def _to_outbox(self, delta: Tensors, base: int, metrics: dict[str, float]) -> Path:
        update = AdapterUpdate(
            update_id=uuid.uuid4().hex,
            client_id=self.w.client_id,
            rank=self.clf.rank,
            base_version=base,
            num_examples=len(self.data),
            fingerprint=self.spec.fingerprint,
            tensors=delta,
            created_at=time.time(),
            metrics=metrics,
        )
        body = encode_update(update, wire_dtype=self.w.wire_dtype)
        path = self.outbox.put(update.update_id, body)  # before anything can fail
        loss = float(metrics.get("train_loss", float("nan")))
        self.summary.losses.append(loss)
        log.info(
            "update_ready",
            update_id=update.update_id,
            client=self.w.client_id,
            rank=self.clf.rank,
            base_version=base,
            bytes=len(body),
            train_loss=round(loss, 4),
        )
        return path

    def _send(self, path: Path) -> None:
        """Publish one outbox file with confirms (in chunks if it is large), then delete it."""
        parts = split(path.read_bytes(), path.stem, int(self.w.chunk_mb * 2**20))
        for i, (headers, part) in enumerate(parts):
            self.publisher.publish(
                self.topo.updates_exchange,
                self.w.client_id,
                part,
                headers={"x-helora-kind": "update", **headers},
                message_id=path.stem if len(parts) == 1 else f"{path.stem}.{i}",
                user_id=self.user_id,
            )
        path.unlink()
        self.summary.updates_sent += 1
        log.info("update_published", update_id=path.stem, client=self.w.client_id)

    def _resend_outbox(self) -> None:
        for path in self.outbox.pending():
            log.info("outbox_resend", update_id=path.stem, client=self.w.client_id)
            self._send(path)
