"""Thousands of hostile updates through the real service on the real broker.

Every malformed or unacceptable message must be dead-lettered with a reason from the expected
set, counted, and leave the global unchanged; duplicates are acked, not dead-lettered; the
service keeps running and its memory stays bounded.
"""

from __future__ import annotations

import math
import threading
import time
import uuid
from collections import Counter

import msgpack
import psutil
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helora.aggregator.service import AggregatorService
from helora.broker.connection import close_connection, connect
from helora.broker.consumer import REASON_HEADER, GlobalSubscriber
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, declare_topology
from helora.shared.messages import AdapterUpdate
from helora.shared.settings import load_settings
from helora.shared.spec import AdapterSpec
from helora.shared.wire import encode_update

pytestmark = [pytest.mark.integration, pytest.mark.slow]

A = "base_model.model.layer.0.query.lora_A.weight"
B = "base_model.model.layer.0.query.lora_B.weight"
H = "base_model.model.classifier.weight"
R = 4
INITIAL = {
    A: torch.randn(R, 16, generator=torch.Generator().manual_seed(0)),
    B: torch.zeros(12, R),
    H: torch.zeros(2, 16),
}
SPEC = AdapterSpec.from_tensors("synthetic", INITIAL, 8.0)
MAX_MESSAGE_BYTES = 64 * 1024
DECODE = {
    "too_large",
    "bad_compression",
    "no_content_size",
    "decompression_bomb",
    "bad_msgpack",
    "bad_shape",
    "unknown_schema",
    "unknown_kind",
    "wrong_kind",
    "missing_field",
    "bad_field",
    "bad_tensor",
}


def valid(client="c1", rank=2, base=1, n=10, scale=0.01, uid=None, **tensors) -> AdapterUpdate:
    t = {
        A: torch.full((rank, 16), scale),
        B: torch.full((12, rank), scale),
        H: torch.full((2, 16), scale),
    }
    t.update(tensors)
    return AdapterUpdate(
        update_id=uid or uuid.uuid4().hex,
        client_id=client,
        rank=rank,
        base_version=base,
        num_examples=n,
        fingerprint=SPEC.fingerprint,
        tensors=t,
    )


def unpack(body: bytes) -> dict:
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(body), raw=False)


def pack(env) -> bytes:
    return zstandard.ZstdCompressor(level=1).compress(msgpack.packb(env, use_bin_type=True))


def mutated(fn) -> bytes:
    env = unpack(encode_update(valid()))
    fn(env)
    return pack(env)


# ---- hostile messages: (body, expected reasons, routing key) -------------------------------

random_bytes = st.binary(min_size=0, max_size=2048).map(lambda b: (b, DECODE, "c1"))
truncated = st.integers(1, 400).map(lambda n: (encode_update(valid())[:-n], DECODE, "c1"))
corrupt = st.tuples(st.integers(0, 300), st.integers(1, 255)).map(
    lambda p: (
        _flip(encode_update(valid()), *p),
        DECODE | {"non_finite", "norm_too_large", "bad_tensor_shape"},
        "c1",
    )
)
bomb = st.integers(2**20, 2**31).map(
    lambda n: (zstandard.ZstdCompressor().compress(b"\0" * 1)[:4] + _bomb_frame(n), DECODE, "c1")
)
wrong_shape_msgpack = st.one_of(
    st.integers(-(2**63), 2**63 - 1),
    st.text(max_size=20),
    st.lists(st.integers(-(2**63), 2**63 - 1), max_size=5),
).map(lambda obj: (pack(obj), {"bad_shape", "bad_msgpack"}, "c1"))
unknown_schema = st.integers(2, 10**6).map(
    lambda v: (mutated(lambda e: e.__setitem__("schema", v)), {"unknown_schema"}, "c1")
)
missing_field = st.sampled_from(
    [
        "update_id",
        "client_id",
        "rank",
        "base_version",
        "num_examples",
        "fingerprint",
        "tensors",
        "metrics",
        "created_at",
    ]
).map(lambda k: (mutated(lambda e: e.pop(k)), {"missing_field"}, "c1"))
wrong_dtype = st.sampled_from(["int8", "float64", "uint8", "", "bool"]).map(
    lambda d: (mutated(lambda e: e["tensors"][H].__setitem__("dtype", d)), {"bad_tensor"}, "c1")
)
bad_rank = st.integers(R + 1, 64).map(lambda r: (encode_update(valid(rank=r)), {"bad_rank"}, "c1"))
shape_vs_rank = st.integers(1, R).map(
    lambda r: (
        encode_update(valid(rank=r, **{A: torch.zeros(r % R + 1, 16)}))
        if r % R + 1 != r
        else encode_update(valid(rank=r, **{H: torch.zeros(3, 16)})),
        {"bad_tensor_shape"},
        "c1",
    )
)
wrong_model = st.integers(1, 8).map(
    lambda k: (
        encode_update(valid(**{"base_model.model.other.weight": torch.zeros(k)})),
        {"bad_tensor_names"},
        "c1",
    )
)
non_finite = st.sampled_from([math.nan, math.inf, -math.inf]).map(
    lambda v: (encode_update(valid(**{H: torch.full((2, 16), v)})), {"non_finite"}, "c1")
)
absurd_norm = st.floats(1e6, 1e30).map(
    lambda v: (encode_update(valid(scale=v)), {"norm_too_large"}, "c1")
)
bad_count = st.integers(-(10**6), 0).map(
    lambda n: (encode_update(valid(n=n)), {"bad_example_count"}, "c1")
)
future_base = st.integers(2, 10**6).map(
    lambda b: (encode_update(valid(base=b)), {"future_base_version"}, "c1")
)
spoofed = st.sampled_from(["c2", "admin", "x.y"]).map(
    lambda rk: (encode_update(valid(client="c1")), {"client_id_mismatch"}, rk)
)
wrong_fingerprint = st.text("abcdef0123456789", min_size=1, max_size=40).map(
    lambda f: (
        mutated(lambda e: e.__setitem__("fingerprint", "sha256:" + f)),
        {"fingerprint_mismatch"},
        "c1",
    )
)
oversized = st.integers(MAX_MESSAGE_BYTES + 1, 3 * MAX_MESSAGE_BYTES).map(
    lambda n: (b"\x28\xb5\x2f\xfd" + bytes(n - 4), {"too_large"}, "c1")
)

HOSTILE = st.one_of(
    random_bytes,
    truncated,
    corrupt,
    bomb,
    wrong_shape_msgpack,
    unknown_schema,
    missing_field,
    wrong_dtype,
    bad_rank,
    shape_vs_rank,
    wrong_model,
    non_finite,
    absurd_norm,
    bad_count,
    future_base,
    spoofed,
    wrong_fingerprint,
    oversized,
)


def _flip(body: bytes, pos: int, xor: int) -> bytes:
    b = bytearray(body)
    b[pos % len(b)] ^= xor
    return bytes(b)


def _bomb_frame(declared: int) -> bytes:
    """A tiny zstd frame that declares ``declared`` bytes of content (without the magic)."""
    frame = zstandard.ZstdCompressor(level=1).compress(b"\0" * 4096)
    params_ok = zstandard.get_frame_parameters(frame).content_size == 4096
    assert params_ok
    # rewrite the frame header: single-segment, 8-byte content size field
    return bytes([0xE0]) + declared.to_bytes(8, "little") + frame[6:]


# ---- the running service -------------------------------------------------------------------


@pytest.fixture(scope="module")
def running(amqp_url, tmp_path_factory):
    fed = f"fuzz-{uuid.uuid4().hex[:8]}"
    s = load_settings(
        amqp_url=amqp_url,
        federation=fed,
        aggregator=dict(
            checkpoint_dir=tmp_path_factory.mktemp("ckpt"),
            buffer_size=1,
            buffer_timeout=30,
            max_message_mb=MAX_MESSAGE_BYTES / 2**20,
        ),
    )
    service = AggregatorService(
        s, SPEC, {"r": R}, lambda: {k: v.clone() for k, v in INITIAL.items()}
    )
    thread = threading.Thread(
        target=service.run, kwargs={"install_signal_handlers": False}, daemon=True
    )
    thread.start()
    topo = Topology(fed)
    conn = connect(amqp_url, attempts=3)
    declare_topology(conn.channel(), topo)
    sub = GlobalSubscriber(conn, topo, offset="first")
    assert sub.wait_newer(-1, timeout=20) is not None  # version 0 is out
    pub = ConfirmedPublisher(conn)
    first = valid(base=0, uid="the-one-valid-update")
    pub.publish(topo.updates_exchange, "c1", encode_update(first))
    got = sub.wait_newer(0, timeout=20)
    assert got is not None and got[0] == 1
    dlq = conn.channel()
    yield service, thread, topo, conn, pub, dlq, sub
    service.stop()
    thread.join(timeout=30)
    sub.close()
    from helora.broker.topology import delete_topology

    c2 = connect(amqp_url, attempts=3)
    delete_topology(c2.channel(), topo)
    close_connection(c2)
    close_connection(conn)


def next_dead_reason(conn, dlq, topo, timeout=10.0) -> str | None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        method, props, _ = dlq.basic_get(topo.dead_queue, auto_ack=True)
        if method is not None:
            return props.headers[REASON_HEADER]
        conn.process_data_events(time_limit=0.005)
    return None


SEEN: Counter[str] = Counter()


@settings(
    max_examples=2000,
    deadline=None,
    derandomize=True,
    suppress_health_check=[
        HealthCheck.too_slow,
        HealthCheck.data_too_large,
        HealthCheck.function_scoped_fixture,
    ],
)
@given(message=HOSTILE)
def test_hostile_messages_are_dead_lettered_with_a_reason(running, message):
    service, thread, topo, conn, pub, dlq, _ = running
    body, expected, routing_key = message
    pub.publish(topo.updates_exchange, routing_key, body)
    reason = next_dead_reason(conn, dlq, topo)
    assert reason is not None, f"no dead letter for a message expected as {expected}"
    assert reason in expected, (reason, expected)
    SEEN[reason] += 1
    assert thread.is_alive()


def test_duplicates_are_acked_not_applied(running):
    service, thread, topo, conn, pub, dlq, sub = running
    before = service.session["duplicate"]
    for _ in range(50):
        pub.publish(
            topo.updates_exchange, "c1", encode_update(valid(base=0, uid="the-one-valid-update"))
        )
    deadline = time.monotonic() + 20
    while service.session["duplicate"] < before + 50 and time.monotonic() < deadline:
        conn.process_data_events(time_limit=0.05)
    assert service.session["duplicate"] == before + 50
    assert next_dead_reason(conn, dlq, topo, timeout=0.5) is None


def test_after_the_storm_the_global_is_unchanged_and_memory_bounded(running):
    service, thread, topo, conn, pub, dlq, sub = running
    assert thread.is_alive()
    assert service.core.version == 1  # only the one valid update ever applied
    assert sub.wait_newer(1, timeout=1.0) is None
    assert len(SEEN) >= 12, SEEN  # most rejection paths were exercised
    rejected = sum(v for k, v in service.session.items() if k.startswith("rejected:"))
    assert rejected >= 2000
    rss_mb = psutil.Process().memory_info().rss / 2**20
    assert rss_mb < 1500, rss_mb  # bounded: no per-message growth survives
