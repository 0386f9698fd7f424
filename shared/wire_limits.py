"""The wire codec's limits: bounded msgpack unpacking, and the checks that read envelope fields.

Every reader takes the msgpack-decoded value, checks its type and range against ``WireLimits``
and returns a plain Python value, or raises ``DecodeError(reason, detail)``. Nothing here touches
tensor bytes: ``read_tensor_specs`` only checks the specs, ``wire.py`` turns them into tensors.
The rules themselves are listed at the top of ``wire.py`` and in docs/PROTOCOL.md.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass
from typing import Any

import msgpack

from helora.shared.errors import DecodeError

WIRE_DTYPES = ("float32", "bfloat16", "float16")
ITEMSIZE = {"float32": 4, "bfloat16": 2, "float16": 2}
INT64_MAX = 2**63 - 1
ENVELOPE_KEYS = 32  # head room for the envelope's own map (it has 11 keys today)
_SLOT_KEY = re.compile(r"[1-9][0-9]{0,17}")  # a positive int that fits in int64, no sign/zeros


@dataclass(frozen=True)
class WireLimits:
    max_message_bytes: int = 64 * 2**20  # compressed size on the wire
    max_decompressed_bytes: int = 256 * 2**20  # declared zstd content size must be <= this
    max_tensors: int = 4096  # per message, summed over all slots of a global
    max_name_length: int = 512  # tensor names
    max_dims: int = 4
    max_string_length: int = 256  # ids, method names, fingerprint, metric names
    max_update_ids: int = 100_000

    @property
    def max_map_len(self) -> int:
        """Entries of any one msgpack map (tensors, metrics, slots, the envelope itself)."""
        return max(self.max_tensors, ENVELOPE_KEYS)

    @property
    def max_objects(self) -> int:
        """Array elements plus map entries in a whole message: what a valid message can need.

        Envelope keys, update ids, a metrics map, a slots map, and per tensor a name, three
        spec entries and up to ``max_dims`` dims. Bounds the Python objects msgpack may build
        (msgpack's own limits are per container only).
        """
        per_tensor = 4 + self.max_dims
        return ENVELOPE_KEYS + self.max_update_ids + self.max_map_len * (2 + per_tensor)


@dataclass(frozen=True)
class TensorSpec:
    """One checked tensor entry, still as wire bytes."""

    dtype: str
    shape: tuple[int, ...]
    data: bytes


class _TooManyObjects(Exception):
    """Raised from the msgpack hooks; turned into DecodeError by ``unpack_envelope_map``."""


def unpack_envelope_map(raw: bytes, limits: WireLimits) -> dict[str, Any]:
    """The one msgpack map in ``raw``, unpacked within the limits (rules 4 and 5 in wire.py)."""
    budget = [limits.max_objects]

    def spend(n: int) -> None:
        budget[0] -= n
        if budget[0] < 0:
            raise _TooManyObjects(f"more than {limits.max_objects} array elements + map entries")

    def pairs_hook(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
        spend(len(pairs))
        out = dict(pairs)
        if len(out) != len(pairs):
            raise ValueError("duplicate map key")
        return out

    def list_hook(items: list[Any]) -> list[Any]:
        spend(len(items))
        return items

    def ext_hook(code: int, data: bytes) -> Any:
        raise ValueError(f"ext type {code} is not allowed")

    try:
        obj = msgpack.unpackb(
            raw, raw=False, strict_map_key=True, use_list=True,
            object_pairs_hook=pairs_hook, list_hook=list_hook, ext_hook=ext_hook,
            max_str_len=max(limits.max_string_length, limits.max_name_length),
            max_bin_len=limits.max_decompressed_bytes,
            max_array_len=max(limits.max_update_ids, limits.max_dims),
            max_map_len=limits.max_map_len,
            max_ext_len=0,
        )  # fmt: skip
    # msgpack's errors (ExtraData, FormatError, StackError, OutOfData, limits, bad UTF-8) are
    # all ValueError or UnpackException; TypeError covers unhashable keys.
    except (ValueError, TypeError, msgpack.UnpackException, _TooManyObjects) as exc:
        raise DecodeError("bad_msgpack", f"{type(exc).__name__}: {exc}"[:300]) from exc
    if type(obj) is not dict:
        raise DecodeError("bad_shape", f"the envelope must be a map, got {type(obj).__name__}")
    return obj


def need(env: dict[str, Any], key: str) -> Any:
    """The value of a required key, else ``missing_field``."""
    try:
        return env[key]
    except KeyError as exc:
        raise DecodeError("missing_field", key) from exc


def _type_name(value: Any) -> str:
    return type(value).__name__


def read_int(env: dict[str, Any], key: str, *, minimum: int) -> int:
    """An int in [minimum, 2**63 - 1]. ``bool`` is not an int here (msgpack keeps them apart)."""
    value = need(env, key)
    if type(value) is not int:
        raise DecodeError("bad_field", f"{key}: expected int, got {_type_name(value)}")
    if not minimum <= value <= INT64_MAX:
        raise DecodeError("bad_field", f"{key}={value} is outside [{minimum}, 2**63-1]")
    return value


def read_float(env: dict[str, Any], key: str) -> float:
    """A float; an int (not a bool) is accepted and converted, as some packers shrink 1.0 to 1."""
    return as_float(need(env, key), key)


def as_float(value: Any, where: str) -> float:
    if type(value) not in (float, int):
        raise DecodeError("bad_field", f"{where}: expected float, got {_type_name(value)}")
    return float(value)


def check_string(value: Any, where: str, max_length: int, *, reason: str = "bad_field") -> str:
    """A non-empty str of at most ``max_length`` characters."""
    if type(value) is not str:
        raise DecodeError(reason, f"{where}: expected str, got {_type_name(value)}")
    if not 1 <= len(value) <= max_length:
        raise DecodeError(reason, f"{where}: length {len(value)} is outside [1, {max_length}]")
    return value


def read_str(env: dict[str, Any], key: str, limits: WireLimits) -> str:
    return check_string(need(env, key), key, limits.max_string_length)


def read_map(env: dict[str, Any], key: str) -> dict[Any, Any]:
    value = need(env, key)
    if type(value) is not dict:
        raise DecodeError("bad_field", f"{key}: expected map, got {_type_name(value)}")
    return value


def read_metrics(env: dict[str, Any], limits: WireLimits) -> dict[str, float]:
    """``metrics``: map of metric name -> float (any value, NaN included: not the codec's job)."""
    metrics = read_map(env, "metrics")
    return {
        check_string(name, "metrics key", limits.max_string_length): as_float(v, f"metrics[{name}]")
        for name, v in metrics.items()
    }


def read_update_ids(env: dict[str, Any], limits: WireLimits) -> tuple[str, ...]:
    ids = need(env, "update_ids")
    if type(ids) is not list:
        raise DecodeError("bad_field", f"update_ids: expected array, got {_type_name(ids)}")
    if len(ids) > limits.max_update_ids:
        raise DecodeError("bad_field", f"{len(ids)} update_ids > {limits.max_update_ids}")
    return tuple(check_string(i, "update_ids[]", limits.max_string_length) for i in ids)


def read_slot_maps(env: dict[str, Any]) -> dict[int, Any]:
    """``slots``: a non-empty map "rank level" (decimal, > 0) -> tensors map (checked later)."""
    slots = read_map(env, "slots")
    if not slots:
        raise DecodeError("bad_field", "slots: a global adapter needs at least one slot")
    out: dict[int, Any] = {}
    for key, tensors in slots.items():
        if type(key) is not str or not _SLOT_KEY.fullmatch(key):
            raise DecodeError("bad_field", f"slots: key {key!r:.40} is not a positive decimal")
        out[int(key)] = tensors
    return out


def check_tensor_count(count: int, limits: WireLimits) -> None:
    if count > limits.max_tensors:
        raise DecodeError("bad_tensor", f"{count} tensors > max_tensors {limits.max_tensors}")


def read_tensor_specs(tensors: Any, where: str, limits: WireLimits) -> dict[str, TensorSpec]:
    """A tensors map, every entry checked; no tensor bytes are converted yet."""
    if type(tensors) is not dict:
        raise DecodeError("bad_field", f"{where}: expected map, got {_type_name(tensors)}")
    check_tensor_count(len(tensors), limits)
    specs: dict[str, TensorSpec] = {}
    for name, entry in tensors.items():
        check_string(name, f"{where} name", limits.max_name_length, reason="bad_tensor")
        specs[name] = read_tensor_spec(entry, name, limits)
    return specs


def read_tensor_spec(entry: Any, name: str, limits: WireLimits) -> TensorSpec:
    """One ``{dtype, shape, data}`` entry: allowed dtype, sane shape, and matching byte count."""
    where = f"tensor {name[:80]!r}"
    if type(entry) is not dict:
        raise DecodeError("bad_tensor", f"{where}: expected map, got {_type_name(entry)}")
    try:
        dtype, shape, data = entry["dtype"], entry["shape"], entry["data"]
    except KeyError as exc:
        raise DecodeError("bad_tensor", f"{where}: missing {exc.args[0]!r}") from exc
    if type(dtype) is not str or dtype not in WIRE_DTYPES:
        raise DecodeError("bad_tensor", f"{where}: dtype {dtype!r:.40} not in {WIRE_DTYPES}")
    dims = read_shape(shape, where, limits)
    if type(data) is not bytes:
        raise DecodeError("bad_tensor", f"{where}: data must be bin, got {_type_name(data)}")
    # Each dim is <= max_decompressed_bytes, so the product is an exact (small) Python int.
    count = math.prod(dims)
    if count > limits.max_decompressed_bytes:
        raise DecodeError("bad_tensor", f"{where}: {count} elements is more than any message")
    if count * ITEMSIZE[dtype] != len(data):
        raise DecodeError(
            "bad_tensor",
            f"{where}: shape {dims} {dtype} needs {count * ITEMSIZE[dtype]} bytes, "
            f"data has {len(data)}",
        )
    return TensorSpec(dtype, dims, data)


def read_shape(shape: Any, where: str, limits: WireLimits) -> tuple[int, ...]:
    """An array of at most ``max_dims`` ints, each in [0, max_decompressed_bytes]."""
    if type(shape) is not list:
        raise DecodeError("bad_tensor", f"{where}: shape must be an array")
    if len(shape) > limits.max_dims:
        raise DecodeError("bad_tensor", f"{where}: {len(shape)} dims > {limits.max_dims}")
    for d in shape:
        if type(d) is not int or not 0 <= d <= limits.max_decompressed_bytes:
            raise DecodeError("bad_tensor", f"{where}: bad dim {d!r:.40} in shape")
    return tuple(shape)
