"""The aggregator service on a real broker, with a small synthetic adapter (no model needed)."""

from __future__ import annotations

import json
import threading
import time
import urllib.request
import uuid

import pytest
import torch

from helora.aggregator.checkpoint import load_checkpoint
from helora.aggregator.service import AggregatorService
from helora.broker.connection import close_connection, connect
from helora.broker.consumer import REASON_HEADER, GlobalSubscriber
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, declare_topology
from helora.shared.messages import AdapterUpdate
from helora.shared.settings import load_settings
from helora.shared.spec import AdapterSpec
from helora.shared.wire import decode_global, encode_update

pytestmark = pytest.mark.integration

A = "base_model.model.layer.0.query.lora_A.weight"
B = "base_model.model.layer.0.query.lora_B.weight"
H = "base_model.model.classifier.weight"
R = 4
DECODE_REASONS = {"bad_compression", "no_content_size", "bad_msgpack", "too_large"}


def initial():
    g = torch.Generator().manual_seed(0)
    return {
        A: torch.randn(R, 6, generator=g),
        B: torch.zeros(5, R),
        H: torch.randn(2, 6, generator=g),
    }


SPEC = AdapterSpec.from_tensors("synthetic", initial(), 8.0)


def update(client, rank, base, uid=None):
    return AdapterUpdate(
        update_id=uid or uuid.uuid4().hex,
        client_id=client,
        rank=rank,
        base_version=base,
        num_examples=10,
        fingerprint=SPEC.fingerprint,
        tensors={
            A: torch.full((rank, 6), 0.1),
            B: torch.full((5, rank), 0.1),
            H: torch.full((2, 6), 0.1),
        },
    )


class Running:
    def __init__(self, settings):
        self.service = AggregatorService(settings, SPEC, {"r": R}, initial)
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.summary = None
        self.thread.start()

    def _run(self):
        self.summary = self.service.run(install_signal_handlers=False)

    def stop(self):
        self.service.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive()


def test_service_applies_rejects_dedups_checkpoints_and_resumes(amqp_url, federation, tmp_path):
    settings = load_settings(
        amqp_url=amqp_url,
        federation=federation,
        aggregator=dict(
            checkpoint_dir=tmp_path / "ckpt", buffer_size=2, buffer_timeout=30, metrics_port=0
        ),
    )
    topo = Topology(federation)
    conn = connect(amqp_url, attempts=3)
    declare_topology(conn.channel(), topo)
    sub = GlobalSubscriber(conn, topo, offset="first")
    running = Running(settings)
    try:
        got = sub.wait_newer(-1, timeout=20)
        assert got is not None and got[0] == 0  # version 0 published at start
        pub = ConfirmedPublisher(conn)
        first, second = update("c1", 2, 0, uid="dup-me"), update("c2", 4, 0)
        for u in (first, second):
            pub.publish(topo.updates_exchange, u.client_id, encode_update(u))
        got = sub.wait_newer(0, timeout=20)
        assert got is not None and got[0] == 1
        g1 = decode_global(got[1])
        assert sorted(g1.update_ids) == sorted(["dup-me", second.update_id])
        assert not torch.equal(g1.slots[R][H], initial()[H])
        # garbage, a wrong rank and a duplicate: dead-lettered / acked, the global unchanged
        pub.publish(topo.updates_exchange, "c3", b"\x00not an envelope")
        pub.publish(topo.updates_exchange, "c3", encode_update(update("c3", R + 1, 1)))
        pub.publish(topo.updates_exchange, "c1", encode_update(first))
        spoof = update("c9", 2, 1)
        pub.publish(topo.updates_exchange, "c1", encode_update(spoof))  # payload says c9
        reasons = _dead_reasons(conn, topo, 3)
        assert len(reasons) == 3, reasons
        assert reasons[1:] == ["bad_rank", "client_id_mismatch"], reasons
        assert reasons[0] in DECODE_REASONS, reasons
        assert sub.wait_newer(1, timeout=1) is None
        url = running.service.metrics_server.url
        text = urllib.request.urlopen(f"{url}/metrics", timeout=5).read().decode()
        assert "helora_aggregator_updates_applied_total 2.0" in text
        assert 'helora_aggregator_updates_rejected_total{reason="bad_rank"} 1.0' in text
        assert urllib.request.urlopen(f"{url}/readyz", timeout=5).status == 200
    finally:
        running.stop()
    ckpt = load_checkpoint(settings.aggregator.checkpoint_dir / "v00000001")
    assert ckpt.version == 1 and set(ckpt.ledger) == set(g1.update_ids)
    assert running.summary.outcomes["duplicate"] == 1
    # a restart resumes version 1 and republishes it
    running = Running(settings)
    try:
        got = sub.wait_newer(0, timeout=20)
        assert got is not None and got[0] == 1
        assert running.service.core.state.applied == ckpt.ledger
    finally:
        running.stop()
        sub.close()
        close_connection(conn)


def _dead_reasons(conn, topo, n, timeout=20.0):
    ch = conn.channel()
    reasons = []
    deadline = time.monotonic() + timeout
    while len(reasons) < n and time.monotonic() < deadline:
        method, props, _ = ch.basic_get(topo.dead_queue, auto_ack=True)
        if method is None:
            conn.process_data_events(time_limit=0.2)
            continue
        reasons.append(props.headers[REASON_HEADER])
    return reasons


def test_two_aggregators_never_aggregate_at_once_and_the_standby_takes_over(
    amqp_url, federation, tmp_path
):
    settings = load_settings(
        amqp_url=amqp_url,
        federation=federation,
        aggregator=dict(checkpoint_dir=tmp_path / "shared-ckpt", buffer_size=1, buffer_timeout=30),
    )
    topo = Topology(federation)
    conn = connect(amqp_url, attempts=3)
    declare_topology(conn.channel(), topo)
    sub = GlobalSubscriber(conn, topo, offset="last")
    pub = ConfirmedPublisher(conn)
    first = Running(settings)
    assert sub.wait_newer(-1, timeout=20) is not None
    second = Running(settings)  # standby: the queue has a single active consumer
    time.sleep(1.0)
    try:
        for v in range(3):
            u = update("c1", 2, v)
            pub.publish(topo.updates_exchange, "c1", encode_update(u))
            got = sub.wait_newer(v, timeout=20)
            assert got is not None and got[0] == v + 1
        assert first.service.session["applied"] == 3
        assert second.service.session["applied"] == 0  # never consumed while the first lived
        first.stop()  # the active one dies: the standby takes over from the shared checkpoint
        for v in range(3, 6):
            u = update("c1", 2, v)
            pub.publish(topo.updates_exchange, "c1", encode_update(u))
            got = sub.wait_newer(v, timeout=20)
            assert got is not None and got[0] == v + 1, got
        assert second.service.session["applied"] == 3
        assert second.service.core.version == 6
        assert len(second.service.core.state.applied) == 6
    finally:
        second.stop()
        if first.thread.is_alive():
            first.stop()
        sub.close()
        close_connection(conn)
    ckpt = load_checkpoint(settings.aggregator.checkpoint_dir / "v00000006")
    assert ckpt.parent_version == 5 and len(ckpt.ledger) == 6


def test_chunked_updates_are_reassembled_and_bad_chunk_sets_dead_lettered(
    amqp_url, federation, tmp_path
):
    from helora.shared.chunking import split

    settings = load_settings(
        amqp_url=amqp_url,
        federation=federation,
        aggregator=dict(
            checkpoint_dir=tmp_path / "ckpt", buffer_size=1, buffer_timeout=30, chunk_timeout=1.0
        ),
    )
    topo = Topology(federation)
    conn = connect(amqp_url, attempts=3)
    declare_topology(conn.channel(), topo)
    sub = GlobalSubscriber(conn, topo, offset="last")
    pub = ConfirmedPublisher(conn)
    running = Running(settings)
    try:
        assert sub.wait_newer(-1, timeout=20) is not None
        good = update("c1", 4, 0)
        parts = split(encode_update(good), good.update_id, 100)
        assert len(parts) > 3
        for headers, part in reversed(parts):  # any order
            pub.publish(topo.updates_exchange, "c1", part, headers=headers)
        got = sub.wait_newer(0, timeout=20)
        assert got is not None and decode_global(got[1]).update_ids == (good.update_id,)

        corrupt = update("c1", 4, 1)
        parts = split(encode_update(corrupt), corrupt.update_id, 100)
        for i, (headers, part) in enumerate(parts):
            pub.publish(
                topo.updates_exchange, "c1", part if i != 2 else part[::-1], headers=headers
            )
        incomplete = update("c1", 4, 1)
        for headers, part in split(encode_update(incomplete), incomplete.update_id, 100)[:-1]:
            pub.publish(topo.updates_exchange, "c1", part, headers=headers)
        n_corrupt = len(parts)
        n_incomplete = len(split(encode_update(incomplete), incomplete.update_id, 100)) - 1
        reasons = _dead_reasons(conn, topo, n_corrupt + n_incomplete)
        assert reasons.count("corrupt_chunks") == n_corrupt, reasons
        assert reasons.count("incomplete_chunks") == n_incomplete, reasons
        assert sub.wait_newer(1, timeout=1) is None  # neither was applied
        assert running.service.chunks.reassembler.open_sets() == 0
    finally:
        running.stop()
        sub.close()
        close_connection(conn)


def test_kd_in_the_service_slots_distillation_checkpoint_and_restart(
    amqp_url, federation, tmp_path
):
    """HeLoRA-KD over the broker: each update goes to its rank's slot, the (here fake) distiller
    runs once per version for 8 s with a 2 s heartbeat (so the connection must be serviced
    meanwhile), the global carries every slot, and a restart resumes them from the checkpoint."""
    calls = []

    def slow_distiller(slots, weights):
        calls.append(dict(weights))
        time.sleep(8.0)  # longer than 2 missed heartbeats: the service must keep pumping
        return {r: {n: t + 0.5 for n, t in ts.items()} for r, ts in slots.items()}

    settings = load_settings(
        amqp_url=amqp_url,
        federation=federation,
        heartbeat=2,
        aggregator=dict(
            checkpoint_dir=tmp_path / "ckpt",
            buffer_size=2,
            buffer_timeout=30,
            method="kd",
            rank_levels=(2, 4),
        ),
    )
    topo = Topology(federation)
    conn = connect(amqp_url, attempts=3)
    declare_topology(conn.channel(), topo)
    sub = GlobalSubscriber(conn, topo, offset="last")
    pub = ConfirmedPublisher(conn)

    def start():
        r = Running.__new__(Running)
        r.service = AggregatorService(
            settings, SPEC, {"r": R, "lora_alpha": 8.0}, initial, distiller=slow_distiller
        )
        r.summary = None
        r.thread = threading.Thread(target=r._run, daemon=True)
        r.thread.start()
        return r

    running = start()
    try:
        got = sub.wait_newer(-1, timeout=20)
        assert got is not None and sorted(decode_global(got[1]).slots) == [2, 4]
        for rank in (2, 4):
            pub.publish(topo.updates_exchange, "c1", encode_update(update("c1", rank, 0)))
        got = sub.wait_newer(0, timeout=60)
        assert got is not None and got[0] == 1
        g = decode_global(got[1])
        assert sorted(g.slots) == [2, 4] and g.slots[2][A].shape == (2, 6)
        assert len(calls) == 1 and set(calls[0]) == {2, 4}
        assert running.thread.is_alive() and running.service.session["reconnects"] == 0
        u = update("c1", 3, 1)  # not a rank level
        pub.publish(topo.updates_exchange, "c1", encode_update(u))
        assert _dead_reasons(conn, topo, 1) == ["bad_rank"]
    finally:
        running.stop()
    ckpt_dir = settings.aggregator.checkpoint_dir / "v00000001"
    assert (ckpt_dir / "slot-r2" / "adapter_model.safetensors").exists()
    cfg2 = json.loads((ckpt_dir / "slot-r2" / "adapter_config.json").read_text())
    assert cfg2["r"] == 2 and cfg2["lora_alpha"] == 4.0
    running = start()  # restart: the slots come back from the checkpoint
    try:
        restored = running.service.core.state
        assert restored.version == 1 and restored.slots is not None
        for r in (2, 4):
            for n in g.slots[r]:
                assert torch.equal(restored.slots[r][n], g.slots[r][n]), (r, n)
        assert restored.slot_updates  # the teacher-weight record survived too
    finally:
        running.stop()
        sub.close()
        close_connection(conn)
