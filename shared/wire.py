"""The helora wire envelope: a zstd frame of one msgpack map (docs/PROTOCOL.md, schema 1).

Encoding is our own data and trusts it (misuse raises ValueError). Decoding reads bytes from any
peer and raises exactly one exception type, ``DecodeError(reason, detail)``, for any malformed
input, so that callers can dead-letter with ``reason`` and keep running.
"""

from __future__ import annotations

import sys
from typing import Any

import msgpack
import torch
import zstandard

from helora.shared.errors import DecodeError
from helora.shared.messages import SCHEMA_VERSION, AdapterUpdate, GlobalAdapter, Tensors
from helora.shared.wire_limits import (
    ITEMSIZE,
    WIRE_DTYPES,
    TensorSpec,
    WireLimits,
    check_tensor_count,
    need,
    read_float,
    read_int,
    read_metrics,
    read_slot_maps,
    read_str,
    read_tensor_specs,
    read_update_ids,
    unpack_envelope_map,
)

__all__ = [
    "WIRE_DTYPES",
    "WireLimits",
    "decode_global",
    "decode_message",
    "decode_update",
    "encode_global",
    "encode_update",
    "peek_kind",
]

# Decoding rules, checked in this order; each stage is one small function below and every
# failure is a DecodeError with the reason in brackets. No stage starts before the previous one
# has bounded its work.
#
#  1. len(data) <= max_message_bytes                                              [too_large]
#  2. data starts a zstd frame (magic 28 B5 2F FD; skippable frames are not)  [bad_compression]
#     whose header declares its content size                               [no_content_size]
#     and that size is <= max_decompressed_bytes                       [decompression_bomb]
#  3. decompressing yields exactly the declared size from exactly one frame,
#     no trailing bytes, checksum right if present                          [bad_compression]
#  4. msgpack unpacks exactly one object, no trailing bytes, with per-container limits:
#     str <= max(max_string_length, max_name_length), bin <= max_decompressed_bytes,
#     array <= max(max_update_ids, max_dims), map <= max(max_tensors, 32), no ext types,
#     map keys str (or bin, then ignored), no duplicate keys, and at most
#     WireLimits.max_objects array elements + map entries in total               [bad_msgpack]
#  5. the object is a map                                                          [bad_shape]
#  6. schema: present, an int (bool is not), == SCHEMA_VERSION       [missing_field/unknown_schema]
#  7. kind: present, "update" or "global"                            [missing_field/unknown_kind]
#     and the one the caller asked for                                            [wrong_kind]
#  8. every field present and of its type; ints in range (rank, max_rank >= 1,
#     parent_version >= -1, other versions >= 0, all <= 2**63-1); strings 1..max_string_length;
#     update_ids <= max_update_ids; slots non-empty, keys positive decimal strings
#                                                                   [missing_field/bad_field]
#  9. tensors: at most max_tensors per message (all slots together); names 1..max_name_length;
#     each entry {dtype in WIRE_DTYPES, shape of <= max_dims ints >= 0, data bin} with
#     prod(shape) * itemsize == len(data)                                          [bad_tensor]
# 10. only then are tensor bytes converted: new, writable, contiguous CPU float32 tensors.
#
# Unknown keys are ignored (additions that old readers may skip do not bump the schema).
# Semantic checks (num_examples > 0, finite values, rank vs shapes, names vs the model spec)
# are the aggregator's validation, not the codec's.

_ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
_TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_BIG_ENDIAN_HOST = sys.byteorder == "big"
KINDS = ("update", "global")


# ---- encoding ---------------------------------------------------------------------------------


def encode_update(
    update: AdapterUpdate, *, wire_dtype: str = "float32", level: int | str = "auto"
) -> bytes:
    envelope = {
        "schema": SCHEMA_VERSION,
        "kind": "update",
        "update_id": update.update_id,
        "client_id": update.client_id,
        "rank": int(update.rank),
        "base_version": int(update.base_version),
        "num_examples": int(update.num_examples),
        "fingerprint": update.fingerprint,
        "created_at": float(update.created_at),
        "metrics": {str(k): float(v) for k, v in update.metrics.items()},
        "tensors": tensors_to_wire(update.tensors, wire_dtype),
    }
    return compress_envelope(envelope, level)


def encode_global(
    adapter: GlobalAdapter, *, wire_dtype: str = "float32", level: int | str = "auto"
) -> bytes:
    envelope = {
        "schema": SCHEMA_VERSION,
        "kind": "global",
        "version": int(adapter.version),
        "parent_version": int(adapter.parent_version),
        "method": adapter.method,
        "max_rank": int(adapter.max_rank),
        "fingerprint": adapter.fingerprint,
        "created_at": float(adapter.created_at),
        "update_ids": list(adapter.update_ids),
        "slots": {str(int(r)): tensors_to_wire(t, wire_dtype) for r, t in adapter.slots.items()},
    }
    return compress_envelope(envelope, level)


AUTO_MIN_SAVING = 0.10  # "auto": below this saving, level 1 is not worth its decode cost


def compress_envelope(envelope: dict[str, Any], level: int | str) -> bytes:
    """One zstd frame with the content size (and a checksum) in its header.

    ``level="auto"`` compresses at level 1 and keeps that frame only if it saves at least 10%;
    otherwise it emits a level -1 frame (nearly raw blocks), which the aggregator decompresses
    2-3x faster. Trained float32 deltas save only ~7% at level 1 (helora bench), bfloat16 ~60%:
    so float32 goes nearly raw and bfloat16 stays compressed. Any level gives the same format."""
    packed = msgpack.packb(envelope, use_bin_type=True)
    if level != "auto":
        return _zstd(packed, int(level))
    frame = _zstd(packed, 1)
    if len(frame) <= (1.0 - AUTO_MIN_SAVING) * len(packed):
        return frame
    return _zstd(packed, -1)


def _zstd(packed: bytes, level: int) -> bytes:
    cctx = zstandard.ZstdCompressor(level=level, write_content_size=True, write_checksum=True)
    return cctx.compress(packed)


def tensors_to_wire(tensors: Tensors, wire_dtype: str) -> dict[str, dict[str, Any]]:
    if wire_dtype not in WIRE_DTYPES:
        raise ValueError(f"wire_dtype {wire_dtype!r} is not one of {WIRE_DTYPES}")
    return {name: tensor_to_wire(name, t, wire_dtype) for name, t in tensors.items()}


def tensor_to_wire(name: str, tensor: torch.Tensor, wire_dtype: str) -> dict[str, Any]:
    if not tensor.is_floating_point():
        raise ValueError(f"tensor {name!r} has dtype {tensor.dtype}; only float tensors travel")
    t = tensor.detach().to(device="cpu", dtype=_TORCH_DTYPES[wire_dtype]).contiguous()
    return {"dtype": wire_dtype, "shape": list(t.shape), "data": little_endian_bytes(t)}


def little_endian_bytes(t: torch.Tensor) -> bytes:
    """The raw C-order element bytes, little-endian (bfloat16: its 2-byte pattern)."""
    raw = t.reshape(-1).view(torch.uint8)
    if _BIG_ENDIAN_HOST:
        raw = raw.view(-1, t.element_size()).flip(1).reshape(-1)
    return raw.numpy().tobytes()


# ---- decoding: public API ---------------------------------------------------------------------


def decode_update(data: bytes, limits: WireLimits = WireLimits()) -> AdapterUpdate:
    env = unpacked_envelope(data, limits)
    require_kind(env, "update")
    return update_from_envelope(env, limits)


def decode_global(data: bytes, limits: WireLimits = WireLimits()) -> GlobalAdapter:
    env = unpacked_envelope(data, limits)
    require_kind(env, "global")
    return global_from_envelope(env, limits)


def decode_message(data: bytes, limits: WireLimits = WireLimits()) -> AdapterUpdate | GlobalAdapter:
    """Either message, by its ``kind``."""
    env = unpacked_envelope(data, limits)
    if envelope_kind(env) == "update":
        return update_from_envelope(env, limits)
    return global_from_envelope(env, limits)


def peek_kind(data: bytes, limits: WireLimits = WireLimits()) -> str:
    """The message's kind after checks 1-7; costs the decompression and unpacking."""
    return envelope_kind(unpacked_envelope(data, limits))


# ---- decoding: stages 1-7 ---------------------------------------------------------------------


def unpacked_envelope(data: bytes, limits: WireLimits) -> dict[str, Any]:
    """The envelope map, after the size, compression, msgpack and schema checks."""
    if len(data) > limits.max_message_bytes:
        raise DecodeError("too_large", f"{len(data)} bytes > {limits.max_message_bytes}")
    size = declared_content_size(data, limits)
    env = unpack_envelope_map(decompressed(data, size), limits)
    check_schema(env)
    return env


def declared_content_size(data: bytes, limits: WireLimits) -> int:
    if bytes(data[:4]) != _ZSTD_MAGIC:
        raise DecodeError("bad_compression", "not a zstd frame (bad magic number)")
    try:
        params = zstandard.get_frame_parameters(data)
    except zstandard.ZstdError as exc:
        raise DecodeError("bad_compression", f"frame header: {exc}") from exc
    size = params.content_size
    if size == zstandard.CONTENTSIZE_UNKNOWN:
        raise DecodeError("no_content_size", "the zstd frame header must declare its size")
    if size > limits.max_decompressed_bytes:
        raise DecodeError(
            "decompression_bomb", f"declares {size} bytes > {limits.max_decompressed_bytes}"
        )
    return size


def decompressed(data: bytes, size: int) -> bytes:
    try:
        out = zstandard.ZstdDecompressor().decompress(
            data, max_output_size=size, allow_extra_data=False
        )
    except zstandard.ZstdError as exc:
        raise DecodeError("bad_compression", str(exc)) from exc
    if len(out) != size:
        raise DecodeError("bad_compression", f"decompressed {len(out)} bytes, declared {size}")
    return out


def check_schema(env: dict[str, Any]) -> None:
    schema = need(env, "schema")
    if type(schema) is not int or schema != SCHEMA_VERSION:
        raise DecodeError("unknown_schema", f"schema {schema!r:.40}; this reader knows 1")


def envelope_kind(env: dict[str, Any]) -> str:
    kind = need(env, "kind")
    if type(kind) is not str or kind not in KINDS:
        raise DecodeError("unknown_kind", f"kind {kind!r:.40} is not one of {KINDS}")
    return kind


def require_kind(env: dict[str, Any], expected: str) -> None:
    kind = envelope_kind(env)
    if kind != expected:
        raise DecodeError("wrong_kind", f"expected a {expected!r} message, got {kind!r}")


# ---- decoding: stages 8-10 --------------------------------------------------------------------


def update_from_envelope(env: dict[str, Any], limits: WireLimits) -> AdapterUpdate:
    # Keyword arguments are evaluated in order: every field is checked before any tensor bytes
    # are converted.
    return AdapterUpdate(
        update_id=read_str(env, "update_id", limits),
        client_id=read_str(env, "client_id", limits),
        rank=read_int(env, "rank", minimum=1),
        base_version=read_int(env, "base_version", minimum=0),
        num_examples=read_int(env, "num_examples", minimum=-(2**63)),
        fingerprint=read_str(env, "fingerprint", limits),
        created_at=read_float(env, "created_at"),
        metrics=read_metrics(env, limits),
        tensors=tensors_from_specs(read_tensor_specs(need(env, "tensors"), "tensors", limits)),
    )


def global_from_envelope(env: dict[str, Any], limits: WireLimits) -> GlobalAdapter:
    version = read_int(env, "version", minimum=0)
    parent_version = read_int(env, "parent_version", minimum=-1)
    method = read_str(env, "method", limits)
    max_rank = read_int(env, "max_rank", minimum=1)
    fingerprint = read_str(env, "fingerprint", limits)
    created_at = read_float(env, "created_at")
    update_ids = read_update_ids(env, limits)
    slot_maps = read_slot_maps(env)
    check_tensor_count(sum(len(m) for m in slot_maps.values() if type(m) is dict), limits)
    specs = {r: read_tensor_specs(m, f"slots[{r}]", limits) for r, m in slot_maps.items()}
    return GlobalAdapter(
        version=version, parent_version=parent_version, method=method, max_rank=max_rank,
        fingerprint=fingerprint, created_at=created_at, update_ids=update_ids,
        slots={r: tensors_from_specs(s) for r, s in specs.items()},
    )  # fmt: skip


def tensors_from_specs(specs: dict[str, TensorSpec]) -> Tensors:
    return {name: float32_tensor(spec) for name, spec in specs.items()}


def float32_tensor(spec: TensorSpec) -> torch.Tensor:
    """A new, writable, contiguous CPU float32 tensor (never a view of the message bytes)."""
    if not spec.data:
        return torch.zeros(spec.shape, dtype=torch.float32)
    buf = bytearray(spec.data)  # our own writable copy: torch.frombuffer needs no warning
    raw = torch.frombuffer(buf, dtype=torch.uint8)
    if _BIG_ENDIAN_HOST:
        raw = raw.view(-1, ITEMSIZE[spec.dtype]).flip(1).reshape(-1)
    t = raw.view(_TORCH_DTYPES[spec.dtype])
    if spec.dtype != "float32":
        t = t.to(torch.float32)
    return t.reshape(spec.shape)
