"""Aggregator memory against the number of distinct clients, one fresh process per case.

``python -m helora.bench_memory --clients C --updates N`` pushes N MiniLM-size rank-8 updates,
client ids cycling over C, through the whole update path in memory: encode -> decode ->
``AggregatorCore.offer`` (K = 8, so every 8th update applies a version) -> AggregatorMetrics.
It prints one JSON line: RSS after setup, RSS after the updates, and the growth. Each case runs
in its own interpreter so that heap growth of one case cannot hide in the other's.

The core keeps no per-client state (only the ledger of applied update ids, which grows with N,
not with C) and the metrics have no per-client labels, so the two cases should differ by noise.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import subprocess
import sys
from typing import Any


def rss_mb() -> float:
    """Resident set size of this process in MB (psutil if installed, else /proc)."""
    try:
        import psutil
    except ImportError:  # pragma: no cover - psutil is installed here
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        raise RuntimeError("no VmRSS in /proc/self/status") from None
    return psutil.Process().memory_info().rss / 2**20


def run_case(clients: int, updates: int, buffer_size: int = 8) -> dict[str, Any]:
    import torch

    from helora.aggregator.core import AggregatorCore, CoreState, PadConfig
    from helora.aggregator.metrics import AggregatorMetrics
    from helora.bench_synth import SMALL, initial_global, spec_for, synthetic_update
    from helora.shared.wire import decode_update, encode_update

    torch.set_num_threads(1)
    spec = spec_for(SMALL)
    core = AggregatorCore(
        spec,
        PadConfig(buffer_size=buffer_size, max_staleness=10**6),
        CoreState(0, initial_global(SMALL)),
    )
    metrics = AggregatorMetrics()
    pool = [synthetic_update(SMALL, spec, client_id="c", seed=s).tensors for s in range(16)]
    # warm up every code path once (allocator pools, lazy imports) before the baseline
    warm = synthetic_update(SMALL, spec, client_id="warm", tensors=pool[0])
    decode_update(encode_update(warm))
    gc.collect()
    before = rss_mb()
    for i in range(updates):
        u = synthetic_update(
            SMALL,
            spec,
            client_id=f"client-{i % clients:05d}",
            base_version=core.version,
            tensors=pool[i % len(pool)],
        )
        decoded = decode_update(encode_update(u))
        metrics.received()
        core.offer(decoded)
        metrics.rank(decoded.rank)
        metrics.buffer(core.buffer_fill)
        metrics.version(core.version)
    gc.collect()
    after = rss_mb()
    return {
        "clients": clients,
        "updates": updates,
        "versions": core.version,
        "ledger_entries": len(core.state.applied),
        "rss_mb_before": round(before, 1),
        "rss_mb": round(after, 1),
        "rss_growth_mb": round(after - before, 1),
    }


def measure_in_subprocess(clients: int, updates: int, timeout: float = 300.0) -> dict[str, Any]:
    env = dict(os.environ)
    env.setdefault("HELORA_TORCH_THREADS", "1")
    proc = subprocess.run(
        [sys.executable, "-m", "helora.bench_memory", "--clients", str(clients)]
        + ["--updates", str(updates)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=env,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"memory case failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients", type=int, required=True)
    parser.add_argument("--updates", type=int, required=True)
    args = parser.parse_args(argv)
    print(json.dumps(run_case(args.clients, args.updates)))


if __name__ == "__main__":
    main()
