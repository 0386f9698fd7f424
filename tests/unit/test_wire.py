"""The wire envelope: round trips, the layout other languages rely on, and hostile input.

Every malformed input may raise only ``DecodeError``; where the cause is specific the test also
pins the ``reason`` code (they are part of the protocol, docs/PROTOCOL.md).
"""

from __future__ import annotations

import string
import warnings
from typing import Any

import msgpack
import pytest
import torch
import zstandard
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from helora.shared.errors import DecodeError
from helora.shared.messages import SCHEMA_VERSION, AdapterUpdate, GlobalAdapter
from helora.shared.wire import (
    WIRE_DTYPES,
    WireLimits,
    decode_global,
    decode_message,
    decode_update,
    encode_global,
    encode_update,
    peek_kind,
)

A = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_A.weight"
B = "base_model.model.bert.encoder.layer.0.attention.self.query.lora_B.weight"
H = "base_model.model.classifier.weight"
UPDATE_KEYS = set(
    "schema kind update_id client_id rank base_version num_examples fingerprint created_at "
    "metrics tensors".split()
)
GLOBAL_KEYS = set(
    "schema kind version parent_version method max_rank fingerprint created_at update_ids "
    "slots".split()
)
FUZZ = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])


# ---- helpers ------------------------------------------------------------------------------


def make_update(rank: int = 4, **kw: Any) -> AdapterUpdate:
    g = torch.Generator().manual_seed(rank)
    fields: dict[str, Any] = dict(
        update_id="u-1", client_id="c-1", rank=rank, base_version=3, num_examples=10,
        fingerprint="sha256:abc", created_at=1.5, metrics={"train_loss": 0.25},
        tensors={A: torch.randn(rank, 6, generator=g), B: torch.randn(5, rank, generator=g),
                 H: torch.randn(2, 6, generator=g)},
    )  # fmt: skip
    fields.update(kw)
    return AdapterUpdate(**fields)


def make_global(levels: tuple[int, ...] = (2, 4, 8), **kw: Any) -> GlobalAdapter:
    fields: dict[str, Any] = dict(
        version=7, parent_version=6, method="kd", max_rank=max(levels), fingerprint="sha256:abc",
        slots={r: make_update(r).tensors for r in levels}, update_ids=("u-1", "u-2"),
        created_at=2.0,
    )  # fmt: skip
    fields.update(kw)
    return GlobalAdapter(**fields)


def raw_envelope(data: bytes) -> dict[str, Any]:
    return msgpack.unpackb(zstandard.ZstdDecompressor().decompress(data), raw=False)


def pack(obj: Any) -> bytes:
    """A proper frame (content size in the header) around any msgpack-able object."""
    return zstandard.ZstdCompressor(level=1).compress(msgpack.packb(obj, use_bin_type=True))


def frame_without_content_size(payload: bytes) -> bytes:
    cobj = zstandard.ZstdCompressor(level=1).compressobj()
    return cobj.compress(payload) + cobj.flush()


def reason_of(data: bytes, decode=decode_message, limits: WireLimits = WireLimits()) -> str:
    with pytest.raises(DecodeError) as info:
        decode(data, limits)
    return info.value.reason


def decodes_or_rejects(data: bytes, limits: WireLimits = WireLimits()) -> None:
    """Either a message or a DecodeError: any other exception fails the test."""
    try:
        decode_message(data, limits)
    except DecodeError:
        pass


def bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view(torch.int32)


def assert_same_tensors(got: dict, want: dict, wire_dtype: str = "float32") -> None:
    assert list(got) == list(want)
    for name, w in want.items():
        g = got[name]
        assert g.dtype == torch.float32 and g.shape == w.shape and g.is_contiguous()
        if wire_dtype == "float32":
            assert torch.equal(bits(g), bits(w.float())), name  # bit-exact, NaN included
        else:
            cast = w.to(getattr(torch, wire_dtype)).float()
            assert torch.equal(g, cast), name  # exactly torch's round-to-nearest cast
            tol = {"bfloat16": 2**-8, "float16": 2**-11}[wire_dtype]
            torch.testing.assert_close(g, w.float(), rtol=tol, atol=1e-6)


def assert_same_update(got: AdapterUpdate, want: AdapterUpdate, wire_dtype="float32") -> None:
    for f in ("update_id", "client_id", "rank", "base_version", "num_examples", "fingerprint",
              "created_at", "metrics"):  # fmt: skip
        assert getattr(got, f) == getattr(want, f), f
    assert_same_tensors(got.tensors, want.tensors, wire_dtype)


def assert_same_global(got: GlobalAdapter, want: GlobalAdapter, wire_dtype="float32") -> None:
    for f in ("version", "parent_version", "method", "max_rank", "fingerprint", "created_at",
              "update_ids"):  # fmt: skip
        assert getattr(got, f) == getattr(want, f), f
    assert list(got.slots) == list(want.slots)
    for r in want.slots:
        assert_same_tensors(got.slots[r], want.slots[r], wire_dtype)


# ---- strategies ---------------------------------------------------------------------------

ids = st.text(min_size=1, max_size=40)
names = st.text(string.ascii_letters + string.digits + "._", min_size=1, max_size=60)
shapes = st.lists(st.integers(0, 5), max_size=4)


@st.composite
def tensors(draw, floats=st.floats(width=32)):
    shape = draw(shapes)
    n = 1
    for d in shape:
        n *= d
    values = draw(st.lists(floats, min_size=n, max_size=n))
    return torch.tensor(values, dtype=torch.float32).reshape(shape)


def tensor_maps(floats=st.floats(width=32)):
    return st.dictionaries(names, tensors(floats), max_size=5)


def updates(floats=st.floats(width=32)):
    return st.builds(
        AdapterUpdate, update_id=ids, client_id=ids, rank=st.integers(1, 2**63 - 1),
        base_version=st.integers(0, 2**63 - 1), num_examples=st.integers(-(2**63), 2**63 - 1),
        fingerprint=ids, tensors=tensor_maps(floats), created_at=st.floats(allow_nan=False),
        metrics=st.dictionaries(ids, st.floats(allow_nan=False), max_size=4),
    )  # fmt: skip


def global_adapters(floats=st.floats(width=32)):
    return st.builds(
        GlobalAdapter, version=st.integers(0, 2**63 - 1), parent_version=st.integers(-1, 10),
        method=st.sampled_from(["pad", "kd", "zero_pad"]), max_rank=st.integers(1, 64),
        fingerprint=ids, slots=st.dictionaries(st.integers(1, 64), tensor_maps(floats),
                                               min_size=1, max_size=4),
        update_ids=st.lists(ids, max_size=5).map(tuple), created_at=st.floats(allow_nan=False),
    )  # fmt: skip


msgpack_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**64 - 1) | st.floats() | st.text()
    | st.binary(max_size=16),
    lambda children: st.lists(children, max_size=4)
    | st.dictionaries(st.text(max_size=8), children, max_size=4),
    max_leaves=20,
)  # fmt: skip
weird_values = st.one_of(
    st.none(), st.booleans(), st.integers(-(2**63), 2**64 - 1), st.floats(), st.text(max_size=4),
    st.binary(max_size=8), st.lists(st.integers(-2, 3), max_size=5),
    st.dictionaries(st.text(max_size=3), st.integers(-5, 5), max_size=2),
)  # fmt: skip


# ---- round trips --------------------------------------------------------------------------


@FUZZ
@given(updates())
def test_update_round_trip_float32_is_bit_exact(update):
    assert_same_update(decode_update(encode_update(update)), update)


@FUZZ
@given(global_adapters())
def test_global_round_trip_float32_is_bit_exact(adapter):
    assert_same_global(decode_global(encode_global(adapter)), adapter)


@FUZZ
@given(
    updates(st.floats(-1e4, 1e4, width=32)),
    global_adapters(st.floats(-1e4, 1e4, width=32)),
    st.sampled_from(["bfloat16", "float16"]),
)
def test_half_wire_dtypes_round_trip_within_tolerance(update, adapter, wire_dtype):
    got = decode_update(encode_update(update, wire_dtype=wire_dtype))
    assert_same_update(got, update, wire_dtype)
    got_global = decode_global(encode_global(adapter, wire_dtype=wire_dtype))
    assert_same_global(got_global, adapter, wire_dtype)


@pytest.mark.parametrize("rank", [1, 2, 8, 16, 64])
@pytest.mark.parametrize("wire_dtype", WIRE_DTYPES)
def test_update_round_trip_at_several_ranks(rank, wire_dtype):
    update = make_update(rank, metrics={})
    got = decode_update(encode_update(update, wire_dtype=wire_dtype))
    assert got.metrics == {} and got.rank == rank
    assert got.tensors[A].shape == (rank, 6) and got.tensors[B].shape == (5, rank)
    assert_same_update(got, update, wire_dtype)


def test_kd_global_with_one_slot_per_rank_level_round_trips():
    adapter = make_global((2, 4, 8, 16))
    got = decode_message(encode_global(adapter))
    assert isinstance(got, GlobalAdapter)
    assert_same_global(got, adapter)
    assert got.slot_for_rank(4)[0] == 4 and got.slot_for_rank(5)[0] == 16


def test_version_zero_global_and_non_contiguous_inputs():
    t = torch.arange(12.0).reshape(3, 4)
    adapter = make_global((4,), version=0, parent_version=-1, update_ids=(),
                          slots={4: {A: t.T, B: t[:, ::2]}})  # fmt: skip
    got = decode_global(encode_global(adapter))
    assert got.parent_version == -1 and got.update_ids == ()
    assert torch.equal(got.slots[4][A], t.T) and torch.equal(got.slots[4][B], t[:, ::2])


def test_decode_message_dispatches_on_kind_and_peek_kind_agrees():
    u, g = encode_update(make_update()), encode_global(make_global())
    assert isinstance(decode_message(u), AdapterUpdate) and peek_kind(u) == "update"
    assert isinstance(decode_message(g), GlobalAdapter) and peek_kind(g) == "global"
    assert reason_of(u, decode_global) == "wrong_kind"
    assert reason_of(g, decode_update) == "wrong_kind"


def test_bytes_like_inputs_are_accepted():
    data = encode_update(make_update())
    for view in (bytearray(data), memoryview(data)):
        assert_same_update(decode_update(view), make_update())


def test_decoded_tensors_are_fresh_writable_float32_copies():
    data = encode_update(make_update(), wire_dtype="float32")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # e.g. torch's non-writable buffer warning
        first, second = decode_update(data), decode_update(data)
    for t in first.tensors.values():
        assert t.dtype == torch.float32 and t.device.type == "cpu" and t.is_contiguous()
        t.add_(1.0)  # writable, in place
    assert_same_tensors(second.tensors, make_update().tensors)
    assert_same_tensors(decode_update(data).tensors, make_update().tensors)


# ---- the layout another implementation relies on --------------------------------------------


def test_update_envelope_layout():
    update = make_update(2, tensors={A: torch.tensor([[1.0, -2.0]]), B: torch.ones(3, 1)})
    data = encode_update(update)
    assert data[:4] == b"\x28\xb5\x2f\xfd"
    env = raw_envelope(data)
    assert zstandard.get_frame_parameters(data).content_size == len(msgpack.packb(env))
    assert set(env) == UPDATE_KEYS
    assert env["schema"] == SCHEMA_VERSION == 1 and env["kind"] == "update"
    assert env["tensors"][A] == {
        "dtype": "float32", "shape": [1, 2], "data": b"\x00\x00\x80\x3f\x00\x00\x00\xc0"
    }  # fmt: skip


def test_global_envelope_layout_and_half_precision_bytes():
    adapter = make_global((1, 2), slots={2: {A: torch.tensor([1.0, -2.0])}, 1: {A: torch.ones(1)}})
    env = raw_envelope(encode_global(adapter, wire_dtype="bfloat16"))
    assert set(env) == GLOBAL_KEYS
    assert env["update_ids"] == ["u-1", "u-2"] and list(env["slots"]) == ["2", "1"]
    assert env["slots"]["2"][A] == {"dtype": "bfloat16", "shape": [2], "data": b"\x80\x3f\x00\xc0"}
    env16 = raw_envelope(encode_global(adapter, wire_dtype="float16"))
    assert env16["slots"]["2"][A]["data"] == b"\x00\x3c\x00\xc0"


def test_unknown_keys_are_ignored_and_ints_accepted_as_floats():
    env = raw_envelope(encode_update(make_update()))
    env["added_in_a_later_minor"] = {"x": [1, 2]}
    env["tensors"][A]["added_too"] = True
    env["created_at"], env["metrics"] = 3, {"steps": 12}
    got = decode_update(pack(env))
    assert got.created_at == 3.0 and got.metrics == {"steps": 12.0}


def test_encoding_misuse_raises_value_error():
    with pytest.raises(ValueError):
        encode_update(make_update(), wire_dtype="float64")
    with pytest.raises(ValueError):
        encode_update(make_update(tensors={H: torch.zeros(2, 3, dtype=torch.int32)}))


# ---- hostile bytes: only DecodeError --------------------------------------------------------


@FUZZ
@given(st.binary(max_size=512))
def test_random_bytes_only_raise_decode_error(data):
    with pytest.raises(DecodeError):
        decode_message(data)


@FUZZ
@given(st.binary(max_size=512))
def test_random_compressed_bytes_only_raise_decode_error(payload):
    with pytest.raises(DecodeError):
        decode_message(zstandard.ZstdCompressor(level=1).compress(payload))


@FUZZ
@given(msgpack_values)
def test_random_msgpack_objects_only_raise_decode_error(obj):
    with pytest.raises(DecodeError):
        decode_message(pack(obj))


@FUZZ
@given(
    st.sampled_from(["update", "global"]),
    st.dictionaries(st.text(max_size=12), msgpack_values, max_size=6),
)
def test_random_maps_with_a_valid_header_only_raise_decode_error(kind, extra):
    with pytest.raises(DecodeError):
        decode_message(pack({**extra, "schema": 1, "kind": kind}))


def _paths(env: dict[str, Any]) -> list[tuple[str, ...]]:
    paths = [(k,) for k in env]
    if "tensors" in env:
        paths += [("tensors", n, f) for n in env["tensors"] for f in ("dtype", "shape", "data")]
    for r, m in env.get("slots", {}).items():
        paths += [("slots", r)] + [("slots", r, n, "shape") for n in m]
    return paths


@FUZZ
@given(st.data(), st.sampled_from(["update", "global"]), st.booleans())
def test_valid_envelopes_with_one_field_retyped_or_removed(data, kind, remove):
    message = encode_update(make_update()) if kind == "update" else encode_global(make_global())
    env = raw_envelope(message)
    path = data.draw(st.sampled_from(_paths(env)))
    parent = env
    for key in path[:-1]:
        parent = parent[key]
    if remove:
        del parent[path[-1]]
        if len(path) == 2:  # removing a whole slot can leave a valid message
            decodes_or_rejects(pack(env))
        else:
            assert reason_of(pack(env)) == ("missing_field" if len(path) == 1 else "bad_tensor")
        return
    parent[path[-1]] = data.draw(weird_values)
    decodes_or_rejects(pack(env))


def test_every_truncation_and_trailing_garbage_is_rejected():
    data = encode_update(make_update(2))
    for end in range(len(data)):
        with pytest.raises(DecodeError):
            decode_message(data[:end])
    assert reason_of(data + b"\x00") == "bad_compression"
    assert reason_of(data + data) == "bad_compression"  # exactly one frame


@FUZZ
@given(st.data())
def test_flipped_bytes_only_raise_decode_error(data):
    message = bytearray(encode_global(make_global((2,))))
    i = data.draw(st.integers(0, len(message) - 1))
    message[i] ^= data.draw(st.integers(1, 255))
    decodes_or_rejects(bytes(message))


# ---- limits and specific reasons ------------------------------------------------------------


def test_decompression_bomb_is_rejected_from_the_header():
    cobj = zstandard.ZstdCompressor(level=1).compressobj(size=2**30)
    zeros = bytes(2**20)
    bomb = b"".join([cobj.compress(zeros) for _ in range(1024)] + [cobj.flush()])
    assert len(bomb) < 64 * 2**10 and zstandard.get_frame_parameters(bomb).content_size == 2**30
    assert reason_of(bomb) == "decompression_bomb"


def test_valid_message_over_the_decompressed_limit_is_a_bomb():
    data = encode_update(make_update(tensors={H: torch.zeros(2**20)}))  # 4 MiB, ~1 KB on wire
    assert reason_of(data, limits=WireLimits(max_decompressed_bytes=2**20)) == "decompression_bomb"


def test_frame_without_content_size_is_rejected():
    payload = msgpack.packb(raw_envelope(encode_update(make_update())))
    assert reason_of(frame_without_content_size(payload)) == "no_content_size"


def test_frame_declaring_the_wrong_content_size_is_rejected():
    frame = bytearray(zstandard.ZstdCompressor(level=1).compress(b"\x80" + bytes(100_000)))
    assert frame[4] == 0xA0  # 4-byte frame content size at bytes 5..8
    for size in (100_000, 100_002):
        frame[5:9] = size.to_bytes(4, "little")
        assert reason_of(bytes(frame)) == "bad_compression"


def test_oversize_message_is_rejected_before_anything_else():
    assert reason_of(b"\x00" * 101, limits=WireLimits(max_message_bytes=100)) == "too_large"
    assert reason_of(bytes(64 * 2**20 + 1)) == "too_large"
    data = encode_update(make_update())
    assert reason_of(data, limits=WireLimits(max_message_bytes=len(data) - 1)) == "too_large"
    decode_update(data, WireLimits(max_message_bytes=len(data)))


def test_not_zstd_and_skippable_frames_are_bad_compression():
    skippable = b"\x50\x2a\x4d\x18" + (4).to_bytes(4, "little") + b"abcd"
    assert reason_of(skippable) == "bad_compression"
    assert reason_of(msgpack.packb({"schema": 1})) == "bad_compression"
    assert reason_of(b"") == "bad_compression"


@pytest.mark.parametrize(
    "payload",
    [
        b"\xc1",  # never-used msgpack byte
        b"\x81\xa1a",  # truncated map
        msgpack.packb({"schema": 1}) + b"\x00",  # trailing data
        b"\x82\xa6schema\x01\xa6schema\x01",  # duplicate key
        b"\x81\x01\x02",  # int map key
        b"\x81\xa2\xff\xfe\x01",  # invalid UTF-8
        msgpack.packb({"schema": 1, "x": msgpack.ExtType(5, b"abc")}),
        msgpack.packb({"schema": 1, "x": msgpack.Timestamp(1, 0)}, datetime=False),
        b"\x91" * 5000 + b"\xc0",  # nesting deeper than the unpacker's stack
        msgpack.packb({"schema": 1, "x": "s" * 600}),  # str over the msgpack limit
    ],
)
def test_bad_msgpack(payload):
    frame = zstandard.ZstdCompressor(level=1).compress(payload)
    assert reason_of(frame) == "bad_msgpack"


def test_object_budget_bounds_small_objects():
    env = raw_envelope(encode_update(make_update()))
    env["junk"] = [[0] * 100_000, [0] * 100_000]  # 200k objects in 200 KB
    assert WireLimits().max_objects < 200_000
    assert reason_of(pack(env)) == "bad_msgpack"


@pytest.mark.parametrize("obj", [[1, 2], 5, "schema", None, b"x"])
def test_envelope_must_be_a_map(obj):
    assert reason_of(pack(obj)) == "bad_shape"


@pytest.mark.parametrize("schema", [2, 0, -1, True, "1", 1.0, None, [1]])
def test_unknown_schema_is_checked_before_kind(schema):
    assert reason_of(pack({"schema": schema, "kind": "nonsense"})) == "unknown_schema"


def test_missing_schema_and_kind():
    assert reason_of(pack({"kind": "update"})) == "missing_field"
    assert reason_of(pack({"schema": 1})) == "missing_field"
    assert reason_of(pack({"schema": 1, "kind": "delta"})) == "unknown_kind"
    assert reason_of(pack({"schema": 1, "kind": 1})) == "unknown_kind"


def mutated(message: bytes, path: tuple, value: Any) -> bytes:
    env = raw_envelope(message)
    parent = env
    for key in path[:-1]:
        parent = parent[key if key != "*" else next(iter(parent))]
    parent[path[-1] if path[-1] != "*" else next(iter(parent))] = value
    return pack(env)


UPDATE_CASES = [
    (("rank",), 0, "bad_field"),
    (("rank",), True, "bad_field"),
    (("rank",), 2.0, "bad_field"),
    (("rank",), 2**63, "bad_field"),
    (("base_version",), -1, "bad_field"),
    (("update_id",), "", "bad_field"),
    (("update_id",), "x" * 257, "bad_field"),
    (("client_id",), 5, "bad_field"),
    (("fingerprint",), None, "bad_field"),
    (("created_at",), "now", "bad_field"),
    (("created_at",), False, "bad_field"),
    (("metrics",), [], "bad_field"),
    (("metrics",), {"loss": "low"}, "bad_field"),
    (("metrics",), {"loss": True}, "bad_field"),
    (("metrics",), {"": 1.0}, "bad_field"),
    (("tensors",), [], "bad_field"),
    (("tensors", "*", "dtype"), "float64", "bad_tensor"),
    (("tensors", "*", "dtype"), "int8", "bad_tensor"),
    (("tensors", "*", "dtype"), b"float32", "bad_tensor"),
    (("tensors", "*", "shape"), [-1, 6], "bad_tensor"),
    (("tensors", "*", "shape"), [4, 5], "bad_tensor"),  # 20 elements, data has 24
    (("tensors", "*", "shape"), [25], "bad_tensor"),
    (("tensors", "*", "shape"), [1, 1, 4, 6, 1], "bad_tensor"),  # too many dims
    (("tensors", "*", "shape"), [True, 24], "bad_tensor"),
    (("tensors", "*", "shape"), [2**40, 2**40, 0], "bad_tensor"),  # dim beyond any message
    (("tensors", "*", "shape"), "4x6", "bad_tensor"),
    (("tensors", "*", "data"), "abc", "bad_tensor"),
    (("tensors", "*", "data"), b"\x00" * 95, "bad_tensor"),
    (("tensors", "*"), [1, 2], "bad_tensor"),
    (("tensors", ""), {"dtype": "float32", "shape": [], "data": bytes(4)}, "bad_tensor"),
    (("tensors", "n" * 513), {"dtype": "float32", "shape": [], "data": bytes(4)}, "bad_msgpack"),
]


@pytest.mark.parametrize(("path", "value", "reason"), UPDATE_CASES)
def test_update_field_rules(path, value, reason):
    assert reason_of(mutated(encode_update(make_update()), path, value), decode_update) == reason


GLOBAL_CASES = [
    (("version",), -1, "bad_field"),
    (("parent_version",), -2, "bad_field"),
    (("max_rank",), 0, "bad_field"),
    (("method",), "", "bad_field"),
    (("update_ids",), "u-1", "bad_field"),
    (("update_ids",), [1], "bad_field"),
    (("update_ids",), [""], "bad_field"),
    (("slots",), {}, "bad_field"),
    (("slots",), [], "bad_field"),
    (("slots", "0"), {}, "bad_field"),
    (("slots", "02"), {}, "bad_field"),
    (("slots", "-1"), {}, "bad_field"),
    (("slots", "1.5"), {}, "bad_field"),
    (("slots", "\u0663"), {}, "bad_field"),  # ARABIC-INDIC DIGIT THREE: not ASCII decimal
    (("slots", "9" * 19), {}, "bad_field"),
    (("slots", "2"), [], "bad_field"),
    (("slots", "2", "*", "shape"), [2, -6], "bad_tensor"),
]


@pytest.mark.parametrize(("path", "value", "reason"), GLOBAL_CASES)
def test_global_field_rules(path, value, reason):
    assert reason_of(mutated(encode_global(make_global()), path, value), decode_global) == reason


def test_codec_leaves_semantic_checks_to_the_aggregator():
    data = encode_update(make_update(num_examples=0, base_version=10**12, rank=3))
    nan = encode_update(make_update(tensors={H: torch.tensor([float("nan"), float("inf")])}))
    assert decode_update(data).num_examples == 0  # rank 3 with rank-4-shaped tensors: fine here
    assert not torch.isfinite(decode_update(nan).tensors[H]).any()
    zero_sized = mutated(encode_update(make_update()), ("tensors", "*", "shape"), [0, 2**20])
    assert reason_of(zero_sized) == "bad_tensor"  # 0 elements but 96 bytes of data


def test_tensor_count_limits_per_message_including_all_slots():
    limits = WireLimits(max_tensors=5)
    assert reason_of(encode_update(make_update(metrics={})), limits=WireLimits(max_tensors=2)) \
        == "bad_tensor"  # fmt: skip
    decode_update(encode_update(make_update()), limits)
    assert reason_of(encode_global(make_global((2, 4))), limits=limits) == "bad_tensor"  # 6 > 5
    decode_global(encode_global(make_global((2,))), limits)


def test_update_ids_and_name_limits():
    data = encode_global(make_global(update_ids=tuple(f"u{i}" for i in range(11))))
    assert reason_of(data, limits=WireLimits(max_update_ids=10)) == "bad_msgpack"
    too_many = WireLimits(max_update_ids=10, max_dims=11)  # arrays of 11 pass msgpack, not us
    assert reason_of(data, limits=too_many) == "bad_field"
    assert reason_of(encode_update(make_update()), limits=WireLimits(max_name_length=40)) \
        == "bad_tensor"  # fmt: skip
