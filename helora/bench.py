"""`helora bench`: throughput, bytes, stage costs, memory and bf16 accuracy in one run.

Sections (each in its own module):
- ``bench_ingest``   aggregator ingest through the real broker vs raw pika on the same messages
                     (MiniLM rank-8 and a 7B-class rank-16 adapter), plus variants of the large
                     run: bfloat16 wire, zstd level -1, the core changes proposed in
                     ``bench_fastpath`` (patched) and a threaded service loop (+thread);
- ``bench_stages``   wire bytes per dtype, ms per stage and per MB, a cProfile of the large
                     path, measured gains of each proposal, and a glibc malloc probe;
- ``bench_memory``   aggregator RSS after N updates from 10 vs 1,000 distinct clients (fresh
                     processes);
- ``bench_accuracy`` a short real training run, deltas sent in float32 vs bfloat16.

Everything runs with one torch thread (what the aggregator uses). The JSON holds every number;
the console gets rich tables (``helora.bench_report``).
"""

from __future__ import annotations

import json
import os
import platform
import signal
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
from rich.console import Console

from helora.bench_synth import LARGE, SMALL

SHAPES = {"small": SMALL, "large": LARGE}


@dataclass(frozen=True)
class BenchConfig:
    out: Path = Path("out/bench.json")
    data: str = "../shared/data/sst2"
    small_messages: int = 1000
    small_batch: int = 200
    large: bool = True
    large_messages: int = 32
    large_batch: int = 8  # 8 x 31 MB: keeps the quorum queue's backlog in memory
    variants: bool = True  # extra large runs: bf16 wire, proposals
    accuracy: bool = True
    memory_updates: int = 2000
    stage_updates_small: int = 200
    stage_updates_large: int = 8
    prefetch: int = 64  # the service's default (>= K x chunks per update)
    buffer_size: int = 8
    chunk_mb: float = 8.0  # the worker's default chunk size


def machine_info() -> dict[str, Any]:
    from importlib.metadata import version

    return {
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        **{lib: version(lib) for lib in ("pika", "msgpack", "zstandard", "prometheus-client")},
        "platform": platform.platform(),
        "load_average_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def run_bench(url: str, cfg: BenchConfig, console: Console | None = None) -> dict[str, Any]:
    """Run every section, write ``cfg.out`` (JSON) and return the same dict."""
    from helora import bench_ingest, bench_memory, bench_stages

    console = console or Console(stderr=True)
    start = time.perf_counter()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    # SIGTERM unwinds like Ctrl-C, so every `finally` deletes the bench federations it declared
    previous = signal.signal(signal.SIGTERM, _raise_interrupt) if _main_thread() else None

    def say(msg: str) -> None:
        console.print(f"[dim]{time.perf_counter() - start:6.1f}s {msg}[/dim]")

    shapes = ["small", "large"] if cfg.large else ["small"]
    res: dict[str, Any] = {"machine": machine_info(), "config": _jsonable(asdict(cfg))}
    try:
        say("wire bytes")
        res["wire_bytes"] = {a: bench_stages.wire_bytes(SHAPES[a]) for a in shapes}
        say("stage costs")
        stage_n = {"small": cfg.stage_updates_small, "large": cfg.stage_updates_large}
        stages = {
            a: bench_stages.stage_costs(SHAPES[a], stage_n[a], cfg.buffer_size) for a in shapes
        }
        res["stage_ms"] = {a: s["ms"] for a, s in stages.items()}
        res["stage_ms_per_mb"] = {a: s["ms_per_mb"] for a, s in stages.items()}
        if cfg.large:
            say("profile and proposals (large)")
            res["profile_large"] = bench_stages.profile_path(LARGE)
            res["proposals_large"] = bench_stages.proposal_gains(LARGE)
            say("malloc probe (two fresh processes)")
            res["malloc_probe"] = bench_stages.malloc_probe()
        c = cfg.chunk_mb
        # the writers' default zstd level is "auto" (shared/wire.py): the headline runs use it
        runs = [("small", "float32", "auto", "current", c)]
        if cfg.large:
            runs.append(("large", "float32", "auto", "current", c))
            runs.append(("large", "float32", 1, "current", c))  # always-compress, for comparison
            if cfg.variants:
                runs += [
                    ("large", "float32", 1, "current", 0.0),  # one 31 MB message per update
                    ("large", "bfloat16", 1, "current", c),
                    ("large", "float32", 1, "current+thread", c),
                    ("large", "float32", -1, "patched+thread", c),
                    ("large", "bfloat16", -1, "patched+thread", c),
                ]
        ingest = []
        for adapter, dtype, level, variant, chunk_mb in runs:
            small = adapter == "small"
            r = bench_ingest.measure_ingest(
                url,
                SHAPES[adapter],
                messages=cfg.small_messages if small else cfg.large_messages,
                batch=cfg.small_batch if small else cfg.large_batch,
                wire_dtype=dtype,
                level=level,
                variant=variant,
                chunk_mb=chunk_mb,
                prefetch=cfg.prefetch,
                buffer_size=cfg.buffer_size,
                progress=lambda m, v=variant, lv=level: say(f"ingest {m} [{v}, zstd {lv}]"),
            )
            ingest.append(r.as_dict())
        res["ingest"] = ingest
        for adapter in ("small", "large"):
            base = next((r for r in ingest if r["adapter"] == adapter), None)
            res[f"ingest_ratio_{adapter}"] = base and base["ratio"]
            res[f"ingest_updates_per_s_{adapter}"] = base and base["ours_updates_per_s"]
            res[f"raw_msgs_per_s_{adapter}"] = base and base["raw_msgs_per_s"]  # AMQP messages
            res[f"raw_updates_per_s_{adapter}"] = base and base["raw_updates_per_s"]
        say(f"memory: {cfg.memory_updates} updates from 10 and from 1,000 clients")
        res["memory"] = {
            str(c): bench_memory.measure_in_subprocess(c, cfg.memory_updates) for c in (10, 1000)
        }
        res["rss_mb_10_clients"] = res["memory"]["10"]["rss_mb"]
        res["rss_mb_1000_clients"] = res["memory"]["1000"]["rss_mb"]
        res["fp32_accuracy"] = res["bf16_accuracy"] = None
        if cfg.accuracy:
            from helora.bench_accuracy import AccuracyConfig, run_accuracy

            say("accuracy: float32 vs bfloat16 transport (a short real training run)")
            acc = run_accuracy(AccuracyConfig(data=cfg.data))
            res["accuracy"] = acc
            res["fp32_accuracy"] = acc["fp32_accuracy"]
            res["bf16_accuracy"] = acc["bf16_accuracy"]
    finally:
        torch.set_num_threads(threads)
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
    res["machine"]["load_average_at_end"] = [round(x, 2) for x in os.getloadavg()]
    res["seconds"] = time.perf_counter() - start
    cfg.out.parent.mkdir(parents=True, exist_ok=True)
    cfg.out.write_text(json.dumps(_jsonable(res), indent=1, sort_keys=True) + "\n")
    return res


def _raise_interrupt(signum: int, _frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _main_thread() -> bool:
    return threading.current_thread() is threading.main_thread()


def _jsonable(value: Any) -> Any:
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_jsonable(v) for v in value]
    if isinstance(value, Path):
        return str(value)
    return value


if __name__ == "__main__":  # pragma: no cover - use `helora bench`
    sys.exit("run `helora bench --out FILE` (or `make bench`)")
