"""The worker's client loop: get the current global, train at its own rank, publish the delta.

    loop: wait for a global newer than the one last trained from (the first wait returns the
          current global at once: the stream is read from offset "last")
          -> take the slot of its rank, cut to rank r, load into the model
          -> train E local steps in a thread while the main thread services the connection
             (heartbeats), then idle (slowness - 1) x the training time, also servicing it
          -> delta = trained - received -> encode -> outbox file -> publish (confirmed) -> delete
Every update is written to the outbox before it is published and removed only after the broker
confirms it; the outbox is resent at start-up, so an update survives a crash or a lost broker.
"""

from __future__ import annotations

import signal
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import structlog

from helora.broker.connection import close_connection, connect, service_until
from helora.broker.consumer import GlobalSubscriber
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, declare_topology
from helora.shared.errors import ConfigError, DecodeError
from helora.shared.lora_ops import cut_to_rank, subtract
from helora.shared.messages import AdapterUpdate, GlobalAdapter
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
        self._stop = threading.Event()
        self.summary = WorkerSummary()

    def stop(self) -> None:
        self._stop.set()

    def _on_signal(self, signum: int, _frame: Any) -> None:
        log.info("signal_received", signal=signal.Signals(signum).name)
        self._stop.set()

    def run(self, *, install_signal_handlers: bool = True) -> WorkerSummary:
        if install_signal_handlers:
            signal.signal(signal.SIGTERM, self._on_signal)
            signal.signal(signal.SIGINT, self._on_signal)
        s = self.settings
        self.connection = connect(
            s.amqp_url.get_secret_value(),
            heartbeat=s.heartbeat,
            attempts=s.connect_attempts,
            name=f"helora-worker-{self.w.client_id}",
        )
        try:
            declare_topology(self.connection.channel(), self.topo)
            self.publisher = ConfirmedPublisher(self.connection)
            self._resend_outbox()
            self.subscriber = GlobalSubscriber(self.connection, self.topo, offset="last")
            try:
                self._loop()
            finally:
                self.subscriber.close()
        finally:
            close_connection(self.connection)
        log.info("worker_stopped", client=self.w.client_id, updates=self.summary.updates_sent)
        return self.summary

    def _loop(self) -> None:
        base = -1
        round_ = 0
        while not self._stop.is_set():
            g = self._wait_global(newer_than=base)
            if g is None:
                return
            base = g.version
            self.summary.last_version = base
            _, slot = g.slot_for_rank(self.clf.rank)
            received = cut_to_rank(slot, self.clf.rank)
            self.clf.load_adapter_state(received)
            metrics = self._train(round_)
            if self._stop.is_set():
                return
            delta = subtract(self.clf.adapter_state(), received)
            self._publish(delta, base, metrics)
            round_ += 1
            if self.w.max_updates and self.summary.updates_sent >= self.w.max_updates:
                return

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

    def _train(self, round_: int) -> dict[str, float]:
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
        service_until(self.connection, lambda: not thread.is_alive())
        elapsed = time.monotonic() - start
        if "error" in result:
            raise result["error"]
        idle = (self.w.slowness - 1.0) * elapsed
        if idle > 0:
            service_until(self.connection, self._stop.is_set, timeout=idle)
        self.summary.train_seconds += elapsed
        return dict(result["metrics"])

    def _publish(self, delta: dict, base: int, metrics: dict[str, float]) -> None:
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
        path = self.outbox.put(update.update_id, body)
        self._send(update.update_id, body)
        path.unlink()
        self.summary.updates_sent += 1
        self.summary.losses.append(float(metrics.get("train_loss", float("nan"))))
        log.info(
            "update_published",
            update_id=update.update_id,
            client=self.w.client_id,
            rank=self.clf.rank,
            base_version=base,
            bytes=len(body),
            train_loss=round(float(metrics.get("train_loss", float("nan"))), 4),
        )

    def _send(self, update_id: str, body: bytes) -> None:
        self.publisher.publish(
            self.topo.updates_exchange,
            self.w.client_id,
            body,
            headers={"x-helora-kind": "update"},
            message_id=update_id,
        )

    def _resend_outbox(self) -> None:
        for path in self.outbox.pending():
            self._send(path.stem, path.read_bytes())
            path.unlink()
            log.info("outbox_resent", update_id=path.stem, client=self.w.client_id)
