"""Offline costs (no broker): bytes on the wire, time per stage, a profile, and the measured gain
of every proposal in ``helora.bench_fastpath``.

Stages, each timed alone with perf_counter over many updates (median), on rank-R updates encoded
in float32 at zstd level 1 (the defaults), one torch thread:

    reassemble  Reassembler.add of the worker's 8 MiB chunks (join + sha256; 0 if one message)
    decode      wire.decode_update(body)
    norm        guards.adapter_norm(tensors)            (the intake's norm guard)
    validate    AggregatorCore._validate(update)       (the core's own check, called directly)
    pad         pad_to_rank(delta, R)                   (at rank R this is a copy)
    pad_half    pad_to_rank of a rank-R/2 delta to R    (real padding)
    accumulate  PadAccumulator.add                      (includes the pad above)
    apply       AggregatorCore.flush                    (per version: result + global update)
    checkpoint  CheckpointStore.save                    (per version: safetensors + fsync)
    encode_global  wire.encode_global                   (per version: what publishing encodes)

``stage_ms_per_mb`` divides by the float32 size of the tensors concerned (the update's for the
per-update stages, the global's for the per-version ones), in MB of 10^6 bytes.
"""

from __future__ import annotations

import cProfile
import pstats
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from helora import bench_fastpath
from helora.aggregator.checkpoint import Checkpoint, CheckpointStore
from helora.aggregator.core import AggregatorCore, CoreState, PadConfig
from helora.aggregator.guards import adapter_norm
from helora.aggregator.strategies import PadAccumulator
from helora.bench_ingest import encoded_updates
from helora.bench_synth import AdapterShape, initial_global, spec_for, synthetic_update
from helora.shared.chunking import Complete, Reassembler, chunk_header, split
from helora.shared.lora_ops import pad_to_rank
from helora.shared.wire import WIRE_DTYPES, decode_update, encode_global, encode_update

PER_VERSION = ("apply", "checkpoint", "encode_global")
CHUNK_BYTES = 8 * 2**20  # the worker's default chunk_mb


def median_ms(fn: Callable[[], Any], repeat: int) -> float:
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


def wire_bytes(shape: AdapterShape) -> dict[str, int]:
    """Encoded bytes of one rank-R update per wire dtype with the writers' default zstd level
    ("auto"), the same at level 1 (``<dtype>_level1``), and the raw float32 tensor bytes."""
    spec = spec_for(shape)
    u = synthetic_update(shape, spec, client_id="c")
    out = {dt: len(encode_update(u, wire_dtype=dt)) for dt in WIRE_DTYPES}
    out |= {f"{dt}_level1": len(encode_update(u, wire_dtype=dt, level=1)) for dt in WIRE_DTYPES}
    out["raw_float32"] = shape.float32_bytes()
    return out


def stage_costs(shape: AdapterShape, updates: int, buffer_size: int = 8) -> dict[str, Any]:
    """Median ms per stage (per update, or per version for apply/checkpoint/encode_global)."""
    k = buffer_size
    n = max(k, updates - updates % k)
    bodies, spec = encoded_updates(shape, n, k, "float32")
    ms: dict[str, float] = {}
    chunked = [split(b, uid, CHUNK_BYTES) for _, uid, b in bodies]
    if len(chunked[0]) > 1:  # the worker's chunks, reassembled and digest-checked
        sets = iter(chunked)
        ms["reassemble"] = median_ms(lambda: _reassemble(next(sets)), n)
    else:
        ms["reassemble"] = 0.0
    del chunked
    decoded: list[Any] = []
    ms["decode"] = median_ms(lambda: decoded.append(decode_update(bodies[len(decoded)][2])), n)
    bodies.clear()  # free the encoded bodies before the next stages
    it = iter(decoded * 3)
    ms["norm"] = median_ms(lambda: adapter_norm(next(it).tensors), n)
    core = AggregatorCore(
        spec,
        PadConfig(buffer_size=n + 1, max_staleness=10**6),
        CoreState(0, initial_global(shape)),
    )
    it = iter(decoded * 3)
    ms["validate"] = median_ms(lambda: core._validate(next(it)), n)
    r = shape.rank
    it = iter(decoded * 3)
    ms["pad"] = median_ms(lambda: pad_to_rank(next(it).tensors, r), n)
    half = synthetic_update(shape, spec, client_id="c", rank=max(1, r // 2)).tensors
    ms["pad_half"] = median_ms(lambda: pad_to_rank(half, r), min(n, 20))
    acc = PadAccumulator(r)
    it = iter(decoded * 3)
    ms["accumulate"] = median_ms(lambda: acc.add(next(it).tensors, r, 100, 1.0), n)
    versions = max(2, n // k)
    apply_ms, ckpt_ms, enc_ms = [], [], []
    it = iter(decoded * versions)
    with tempfile.TemporaryDirectory(prefix="helora-bench-") as tmp:
        store = CheckpointStore(Path(tmp), adapter_config={"r": r}, keep=2)
        for _ in range(versions):
            for _ in range(k):
                u = next(it)
                core.offer(_fresh(u, core.version))
            start = time.perf_counter()
            applied = core.flush()
            apply_ms.append(time.perf_counter() - start)
            assert applied is not None
            start = time.perf_counter()
            store.save(_checkpoint(core, spec, applied.update_ids))
            ckpt_ms.append(time.perf_counter() - start)
            start = time.perf_counter()
            encode_global(core.global_adapter(update_ids=applied.update_ids))
            enc_ms.append(time.perf_counter() - start)
    ms["apply"] = 1000 * statistics.median(apply_ms)
    ms["checkpoint"] = 1000 * statistics.median(ckpt_ms)
    ms["encode_global"] = 1000 * statistics.median(enc_ms)
    mb = shape.float32_bytes() / 1e6  # the global and a rank-R update have the same size
    return {
        "updates": n,
        "ms": ms,
        "ms_per_mb": {stage: v / mb for stage, v in ms.items()},
        "mb": mb,
    }


def _reassemble(parts: list[tuple[dict[str, Any], bytes]]) -> bytes:
    gate = Reassembler()
    for tag, (headers, part) in enumerate(parts):
        header = chunk_header(headers)
        assert header is not None
        result = gate.add(header, part, tag, 0.0)
    assert isinstance(result, Complete)
    return result.body


def _fresh(u: Any, version: int) -> Any:
    """The same delta under a new id, trained from the current version (never a duplicate)."""
    from dataclasses import replace

    return replace(u, update_id=uuid.uuid4().hex, base_version=version)


def _checkpoint(core: AggregatorCore, spec: Any, update_ids: tuple[str, ...]) -> Checkpoint:
    st = core.state
    return Checkpoint(
        version=st.version,
        parent_version=st.version - 1,
        method="pad",
        max_rank=spec.max_rank,
        fingerprint=spec.fingerprint,
        adapter=st.adapter,
        update_ids=update_ids,
        ledger=st.applied,
        counters=st.counters,
        staleness_hist=st.staleness_hist,
        created_at=time.time(),
    )


def profile_path(shape: AdapterShape, updates: int = 8, top: int = 12) -> list[dict[str, Any]]:
    """cProfile of decode + offer (current code) over ``updates`` rank-R float32 updates, after
    one warm-up buffer: the functions with the most own time, in ms per update."""
    k = 8
    bodies, spec = encoded_updates(shape, updates + k, k, "float32")
    core = AggregatorCore(
        spec, PadConfig(buffer_size=k, max_staleness=10**6), CoreState(0, initial_global(shape))
    )
    for _, _, body in bodies[:k]:
        core.offer(decode_update(body))
    prof = cProfile.Profile()
    prof.enable()
    for _, _, body in bodies[k:]:
        core.offer(decode_update(body))
    prof.disable()
    stats = pstats.Stats(prof).stats  # type: ignore[attr-defined]
    rows = []
    for (file, line, func), (_cc, ncalls, tottime, cumtime, _callers) in stats.items():
        where = func if file == "~" else f"{Path(file).parent.name}/{Path(file).name}:{line} {func}"
        rows.append(
            {
                "function": where,
                "calls_per_update": ncalls / updates,
                "own_ms_per_update": 1000 * tottime / updates,
                "cum_ms_per_update": 1000 * cumtime / updates,
            }
        )
    rows.sort(key=lambda r: r["own_ms_per_update"], reverse=True)
    return rows[:top]


def proposal_gains(shape: AdapterShape, repeat: int = 5) -> dict[str, dict[str, float]]:
    """Current vs proposed, median ms per rank-R update, for each bench_fastpath proposal."""
    out: dict[str, dict[str, float]] = {}
    spec = spec_for(shape)
    u = synthetic_update(shape, spec, client_id="c")
    r = shape.rank
    for dt in ("float32", "bfloat16"):
        body1 = encode_update(u, wire_dtype=dt, level=1)
        body_neg = encode_update(u, wire_dtype=dt, level=-1)
        out[f"decode_{dt}_zstd_level_-1"] = _pair(
            lambda b=body1: decode_update(b), lambda b=body_neg: decode_update(b), repeat
        )
        out[f"decode_{dt}_zstd_level_-1"]["bytes_current"] = len(body1)
        out[f"decode_{dt}_zstd_level_-1"]["bytes_proposed"] = len(body_neg)
    tensors = list(u.tensors.values())
    out["validate_finite_check"] = _pair(
        lambda: [bool(torch.isfinite(t).all()) for t in tensors],
        lambda: [bench_fastpath.all_finite(t) for t in tensors],
        repeat,
    )
    out["norm_float32_vector_norm"] = _pair(
        lambda: adapter_norm(u.tensors), lambda: bench_fastpath.adapter_norm(u.tensors), repeat
    )
    cur, new = PadAccumulator(r), bench_fastpath.FastPadAccumulator(r)
    cur.add(u.tensors, r, 100, 1.0)
    new.add(u.tensors, r, 100, 1.0)
    out["accumulate_no_pad_copy_at_R"] = _pair(
        lambda: cur.add(u.tensors, r, 100, 1.0), lambda: new.add(u.tensors, r, 100, 1.0), repeat
    )
    g_cur, g_new = initial_global(shape), initial_global(shape)
    out["apply_in_place"] = _pair(
        lambda: _apply_current(cur, g_cur), lambda: new.apply(g_new, 1.0), repeat
    )
    return out


def _apply_current(acc: PadAccumulator, adapter: dict[str, torch.Tensor]) -> None:
    """What flush does today: result() then adapter + eta * d, new tensors."""
    for name, d in acc.result().items():
        adapter[name] = adapter[name] + 1.0 * d


def _pair(current: Callable[[], Any], proposed: Callable[[], Any], repeat: int) -> dict[str, Any]:
    current()
    proposed()
    a, b = median_ms(current, repeat), median_ms(proposed, repeat)
    return {"current_ms": a, "proposed_ms": b, "saving_ms": a - b}


# ---- allocator probe: decode in a fresh process, with and without glibc malloc tuning ----

MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}


def decode_probe(repeat: int = 9) -> dict[str, float]:
    """Median ms to decode one 7B-class update, float32 and bfloat16 at zstd level 1."""
    from helora.bench_synth import LARGE

    torch.set_num_threads(1)
    u = synthetic_update(LARGE, spec_for(LARGE), client_id="c")
    out = {}
    for dt in ("float32", "bfloat16"):
        body = encode_update(u, wire_dtype=dt)
        decode_update(body)
        out[f"decode_{dt}_ms"] = median_ms(lambda b=body: decode_update(b), repeat)
    return out


def malloc_probe(timeout: float = 300.0) -> dict[str, Any]:
    """``decode_probe`` in two fresh interpreters: glibc defaults, then ``MALLOC_ENV``.

    Buffers over glibc's mmap threshold (at most 32 MiB) are mmapped and unmapped on every
    message, so each 33.5 MB decode pays ~8k page faults; a higher threshold keeps them in the
    heap. This is an environment setting (Dockerfile/compose/systemd), not a code change.
    """
    import json
    import os
    import subprocess
    import sys

    results = {}
    for label, extra in (("default", {}), ("tuned", MALLOC_ENV)):
        env = {k: v for k, v in os.environ.items() if not k.startswith("MALLOC_")}
        env.update(extra)
        proc = subprocess.run(
            [sys.executable, "-m", "helora.bench_stages", "--decode-probe"],
            capture_output=True,
            text=True,
            timeout=timeout,
            env=env,
            check=True,
        )
        results[label] = json.loads(proc.stdout.strip().splitlines()[-1])
    results["env"] = dict(MALLOC_ENV)
    return results


if __name__ == "__main__":
    import json
    import sys

    if sys.argv[1:] != ["--decode-probe"]:
        raise SystemExit("usage: python -m helora.bench_stages --decode-probe")
    print(json.dumps(decode_probe()))
