"""Aggregator ingest throughput through a real broker, against raw pika on the same messages.

Method (one federation ``bench-<hex>`` of its own, deleted afterwards; the real topology, so the
updates queue is the quorum queue the service consumes):

1. Encode N updates once (distinct update ids, base_version = i // K so that every update is
   fresh when it arrives in order) and split each body as the worker does
   (``shared.chunking.split`` at ``chunk_mb``; 0 = one message per update).
2. The N updates go through in batches of B (a multiple of K). For each batch, twice:
   RAW  - publish the batch's messages with confirms (a separate connection, *before* the timed
          drain), then time a consumer (prefetch P, manual ack) that only acks each delivery;
   OURS - publish the same messages again, then time the aggregator's path on the same queue
          with the same prefetch, as in ``AggregatorService._on_delivery``: ``UpdateConsumer``
          -> ``ChunkGate`` (reassembly + sha256) -> ``decode_update`` -> ``Intake.admit``
          (client id, norm guard, ``AggregatorCore.offer``: validate, pad, accumulate, apply every
          K) -> metrics -> ack every delivery of a buffer once it is applied.
   Only the drains are timed. Batching keeps the broker's backlog small (a 1 GB backlog spills
   the quorum queue's write-ahead log to disk and slows the broker, not the consumer), and
   interleaving raw and ours batch by batch exposes both to the same broker state.
3. Checkpointing and publishing the global are NOT in this number; their cost per version is in
   the stage table (``helora.bench_stages``).

ratio = ours updates/s / raw updates/s, where raw updates/s = raw messages/s / chunks per update:
the same bytes, prefetch and ack mode.

Variants of OURS (``variant``): ``current`` is the code as it is; ``patched`` swaps in
``bench_fastpath.FastCore`` (proposed core changes, identical decisions); ``+thread`` runs
the whole per-delivery path in one worker thread so that receiving and processing overlap
(proposed service loop). The writer's zstd level (``level``) is a separate knob.
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from typing import Any

from helora import bench_fastpath
from helora.aggregator.chunks import ChunkGate
from helora.aggregator.core import AggregatorCore, Applied, CoreState, PadConfig, Rejected
from helora.aggregator.guards import NormGuard
from helora.aggregator.intake import Intake
from helora.aggregator.metrics import AggregatorMetrics
from helora.bench_synth import AdapterShape, initial_global, spec_for, synthetic_tensors
from helora.broker.connection import close_connection, connect
from helora.broker.consumer import Delivery, UpdateConsumer
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, declare_topology, delete_topology
from helora.shared import wire
from helora.shared.chunking import Reassembler, split
from helora.shared.messages import AdapterUpdate
from helora.shared.spec import AdapterSpec

# patched: helora.bench_fastpath.FastCore; +thread: the delivery path off the connection thread
VARIANTS = ("current", "patched", "current+thread", "patched+thread")
Message = tuple[str, dict[str, Any], bytes, str]  # routing key, headers, body, message id


@dataclass(frozen=True)
class IngestResult:
    adapter: str
    wire_dtype: str
    zstd_level: int | str
    variant: str
    chunk_mb: float
    messages: int  # updates
    chunks_per_update: int
    batch: int
    body_bytes: int  # mean encoded size of one update
    prefetch: int
    buffer_size: int
    publish_msgs_per_s: float  # the confirmed pre-publish (not part of the ratio)
    raw_msgs_per_s: float  # AMQP messages (chunks)
    raw_updates_per_s: float  # the same bytes, counted in updates
    raw_mb_per_s: float
    ours_updates_per_s: float
    ours_mb_per_s: float
    ratio: float
    versions_applied: int
    stage_ms_mean: dict[str, float]  # from the AggregatorMetrics histograms of the ours run

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)


def encoded_updates(
    shape: AdapterShape, n: int, k: int, wire_dtype: str, level: int | str = "auto"
) -> tuple[list[tuple[str, str, bytes]], AdapterSpec]:
    """N (client id, update id, body) of rank-R updates sharing one set of values, and the spec."""
    spec = spec_for(shape)
    tensors = synthetic_tensors(shape, shape.rank, seed=1, scale=0.1)
    out = []
    for i in range(n):
        client = f"client-{i % 64}"
        u = AdapterUpdate(
            update_id=uuid.uuid4().hex,
            client_id=client,
            rank=shape.rank,
            base_version=i // k,
            num_examples=100,
            fingerprint=spec.fingerprint,
            tensors=tensors,
        )
        out.append((client, u.update_id, wire.encode_update(u, wire_dtype=wire_dtype, level=level)))
    return out, spec


def as_messages(updates: list[tuple[str, str, bytes]], chunk_mb: float) -> list[list[Message]]:
    """Per update, the AMQP messages the worker publishes (``WorkerClient._send``)."""
    size = int(chunk_mb * 2**20) if chunk_mb > 0 else 1 << 62
    out = []
    for client, uid, body in updates:
        parts = split(body, uid, size)
        out.append(
            [
                (
                    client,
                    {"x-helora-kind": "update", **h},
                    part,
                    uid if len(parts) == 1 else f"{uid}.{i}",
                )
                for i, (h, part) in enumerate(parts)
            ]
        )
    return out


def measure_ingest(
    url: str,
    shape: AdapterShape,
    *,
    messages: int,
    batch: int,
    wire_dtype: str = "float32",
    level: int | str = "auto",
    variant: str = "current",
    chunk_mb: float = 8.0,
    prefetch: int = 64,
    buffer_size: int = 8,
    progress: Callable[[str], None] = lambda _msg: None,
) -> IngestResult:
    if variant not in VARIANTS:
        raise ValueError(f"variant {variant!r} is not one of {VARIANTS}")
    k = buffer_size
    batch = max(k, batch - batch % k)  # whole buffers per batch: every update gets applied
    n = max(batch, messages - messages % batch)
    progress(f"{shape.name} {wire_dtype}: encoding {n} updates")
    updates, spec = encoded_updates(shape, n, k, wire_dtype, level)
    mean_bytes = sum(len(b) for _, _, b in updates) // n
    per_update = as_messages(updates, chunk_mb)
    del updates
    chunks = len(per_update[0])
    if prefetch < k * chunks:
        raise ValueError(f"prefetch {prefetch} < K x chunks per update = {k * chunks}: deadlock")
    topo = Topology(f"bench-{uuid.uuid4().hex[:10]}")
    pub_conn = connect(url, attempts=3, name="helora-bench-publisher")
    conn = connect(url, attempts=3, name="helora-bench-consumer")
    ours = OursDrain(conn, topo, shape, spec, prefetch, k, variant)
    raw_s = ours_s = pub_s = 0.0
    try:
        declare_topology(pub_conn.channel(), topo)
        publisher = ConfirmedPublisher(pub_conn)
        for start in range(0, n, batch):
            msgs = [m for group in per_update[start : start + batch] for m in group]
            progress(
                f"{shape.name} {wire_dtype}: batch {start // batch + 1}/{n // batch} "
                f"({batch} x {mean_bytes / 1e6:.2f} MB in {len(msgs)} messages)"
            )
            pub_s += publish_all(publisher, topo, msgs)
            raw_s += drain_raw(conn, topo, len(msgs), prefetch)
            publish_all(publisher, topo, msgs)
            ours_s += ours.drain(batch)
    finally:
        ours.close()
        close_connection(conn)
        try:
            delete_topology(pub_conn.channel(), topo)
        finally:
            close_connection(pub_conn)
    mb = n * mean_bytes / 1e6
    return IngestResult(
        adapter=shape.name,
        wire_dtype=wire_dtype,
        zstd_level=level,
        variant=variant,
        chunk_mb=chunk_mb,
        messages=n,
        chunks_per_update=chunks,
        batch=batch,
        body_bytes=mean_bytes,
        prefetch=prefetch,
        buffer_size=k,
        publish_msgs_per_s=n * chunks / pub_s,
        raw_msgs_per_s=n * chunks / raw_s,
        raw_updates_per_s=n / raw_s,
        raw_mb_per_s=mb / raw_s,
        ours_updates_per_s=n / ours_s,
        ours_mb_per_s=mb / ours_s,
        ratio=raw_s / ours_s,
        versions_applied=ours.core.version,
        stage_ms_mean=ours.stage_ms_mean(),
    )


def publish_all(publisher: ConfirmedPublisher, topo: Topology, msgs: list[Message]) -> float:
    """Publish every message with a confirm each; returns the seconds it took."""
    start = time.perf_counter()
    for client, headers, body, message_id in msgs:
        publisher.publish(
            topo.updates_exchange, client, body, headers=headers, message_id=message_id
        )
    return time.perf_counter() - start


def drain_raw(conn: Any, topo: Topology, n: int, prefetch: int) -> float:
    """Seconds to receive and ack ``n`` deliveries, doing nothing else."""
    ch = conn.channel()
    ch.basic_qos(prefetch_count=prefetch)
    got = [0]

    def on_message(channel: Any, method: Any, _props: Any, _body: bytes) -> None:
        channel.basic_ack(method.delivery_tag)
        got[0] += 1

    start = time.perf_counter()
    ch.basic_consume(topo.updates_queue, on_message, auto_ack=False)
    while got[0] < n:
        conn.process_data_events(time_limit=1.0)
    elapsed = time.perf_counter() - start
    ch.close()
    return elapsed


class OursDrain:
    """The aggregator's consume path (``AggregatorService._on_delivery`` without checkpoint and
    publish; no dead-lettering either: every bench update is valid)."""

    def __init__(
        self,
        conn: Any,
        topo: Topology,
        shape: AdapterShape,
        spec: AdapterSpec,
        prefetch: int,
        buffer_size: int,
        variant: str,
    ) -> None:
        core_name, _, mode = variant.partition("+")
        core_class = bench_fastpath.FastCore if core_name == "patched" else AggregatorCore
        self.core = core_class(
            spec,
            PadConfig(buffer_size=buffer_size, max_staleness=1_000_000),
            CoreState(version=0, adapter=initial_global(shape)),
        )
        self.conn, self.topo, self.prefetch = conn, topo, prefetch
        self.metrics = AggregatorMetrics()
        self.limits = wire.WireLimits()
        self.intake = Intake(NormGuard())
        self.gate = ChunkGate(Reassembler(), ack=self._ack, reject=self._refuse)
        self._ack_fn: Callable[[int], None] = lambda _tag: None
        self._pending: list[int] = []
        self._done = 0
        self._error: BaseException | None = None
        self._worker = (
            ThreadPoolExecutor(max_workers=1, thread_name_prefix="helora-bench-ingest")
            if mode == "thread"
            else None
        )

    def drain(self, n: int) -> float:
        consumer = UpdateConsumer(self.conn, self.topo, prefetch=self.prefetch)
        if self._worker is None:
            self._ack_fn = consumer.ack
        else:
            self._ack_fn = lambda tag: self.conn.add_callback_threadsafe(lambda: consumer.ack(tag))
        target = self._done + n
        start = time.perf_counter()
        consumer.start(self._on_delivery)
        while self._done < target and self._error is None:
            consumer.poll(1.0 if self._worker is None else 0.02)
        elapsed = time.perf_counter() - start
        if self._error is not None:
            raise self._error
        self.conn.process_data_events(time_limit=0)  # send the acks queued by the worker
        consumer.channel.close()
        return elapsed

    def close(self) -> None:
        if self._worker is not None:
            self._worker.shutdown(wait=True)

    def _ack(self, tag: int) -> None:
        self._ack_fn(tag)

    def _refuse(self, d: Delivery, reason: str, detail: str) -> None:
        raise AssertionError(f"bench chunks rejected: {reason} {detail}")

    def _on_delivery(self, d: Delivery) -> None:
        if self._worker is None:
            self._handle(d)
            return

        def work() -> None:
            try:
                self._handle(d)
            except BaseException as exc:  # surfaced by drain() on the connection thread
                self._error = exc

        self._worker.submit(work)

    def _handle(self, chunk: Delivery) -> None:
        whole = self.gate.offer(chunk, time.monotonic())
        if whole is None:
            return
        d, m = whole.delivery, self.metrics
        m.received()
        with m.time_stage("decode"):
            update = wire.decode_update(d.body, self.limits)
        with m.time_stage("accumulate"):  # norm guard + validate, pad, accumulate (+ apply)
            decision, _norm = self.intake.admit(self.core, update, d.routing_key, d.user_id)
        if isinstance(decision, Rejected):
            raise AssertionError(f"bench update rejected: {decision}")
        m.staleness(decision.staleness[-1] if isinstance(decision, Applied) else decision.staleness)
        m.rank(update.rank)
        self._pending.extend(whole.tags)
        if isinstance(decision, Applied):
            for tag in self._pending:
                self._ack(tag)
            self._pending.clear()
            self.intake.committed()
            m.applied(len(decision.update_ids))
            m.version(decision.version)
        m.buffer(self.core.buffer_fill)
        self._done += 1

    def stage_ms_mean(self) -> dict[str, float]:
        out = {}
        for stage in ("decode", "accumulate"):
            labels = {"stage": stage}
            total = self.metrics.registry.get_sample_value(
                "helora_aggregator_stage_seconds_sum", labels
            )
            count = self.metrics.registry.get_sample_value(
                "helora_aggregator_stage_seconds_count", labels
            )
            out[stage] = 1000 * total / count if count else 0.0
        return out
