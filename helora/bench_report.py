"""The console tables of `helora bench` (rich), built from the result dict of ``run_bench``."""

from __future__ import annotations

from typing import Any

from rich.console import Console
from rich.table import Table

_SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16"}


def tables(res: dict[str, Any]) -> list[Table]:
    out = [_ingest_table(res), _wire_table(res), _stage_table(res)]
    if res.get("proposals_large"):
        out.append(_proposal_table(res))
    if res.get("profile_large"):
        out.append(_profile_table(res))
    out.append(_summary_table(res))
    return out


def _ingest_table(res: dict[str, Any]) -> Table:
    t = Table(title="Ingest through RabbitMQ: aggregator path vs raw pika (same messages)")
    t.add_column("run: adapter wire zstd chunks code", no_wrap=True)
    for col in ("MB/upd", "upd", "raw msg/s", "raw upd/s", "raw MB/s", "ours upd/s", "ours MB/s"):
        t.add_column(col, justify="right")
    t.add_column("ratio", justify="right")
    t.add_column("decode ms", justify="right")
    t.add_column("admit ms", justify="right")  # norm guard + core.offer (incl. apply)
    for r in res["ingest"]:
        t.add_row(
            f"{r['adapter']} {_SHORT[r['wire_dtype']]} z{r['zstd_level']} "
            f"x{r['chunks_per_update']} {r['variant']}",
            f"{r['body_bytes'] / 1e6:.2f}",
            str(r["messages"]),
            f"{r['raw_msgs_per_s']:.1f}",
            f"{r['raw_updates_per_s']:.1f}",
            f"{r['raw_mb_per_s']:.0f}",
            f"{r['ours_updates_per_s']:.1f}",
            f"{r['ours_mb_per_s']:.0f}",
            f"[bold]{r['ratio']:.2f}[/bold]",
            f"{r['stage_ms_mean']['decode']:.1f}",
            f"{r['stage_ms_mean']['accumulate']:.1f}",
        )
    return t


OPT_TITLE = (
    "Optimisations measured on a 7B-class update, median ms (current = without it); "
    "adopted: finite check, float32 norm, zstd auto"
)


def _wire_table(res: dict[str, Any]) -> Table:
    t = Table(title="Bytes on the wire per rank-R update (zstd level auto; level 1 in brackets)")
    for col in ("adapter", "raw float32", "float32", "bfloat16", "float16"):
        t.add_column(col, justify="right")
    for adapter, b in res["wire_bytes"].items():
        raw = b["raw_float32"]
        cells = [
            f"{b[d]:,} ({b[d] / raw:.2f}) [{b[d + '_level1']:,}]"
            for d in ("float32", "bfloat16", "float16")
        ]
        t.add_row(adapter, f"{raw:,}", *cells)
    return t


def _stage_table(res: dict[str, Any]) -> Table:
    t = Table(title="Cost per stage: median ms (ms per MB of float32 tensors)")
    t.add_column("stage")
    adapters = list(res["stage_ms"])
    for a in adapters:
        t.add_column(a, justify="right")
    for stage in res["stage_ms"][adapters[0]]:
        cells = [
            f"{res['stage_ms'][a][stage]:.2f} ({res['stage_ms_per_mb'][a][stage]:.2f})"
            for a in adapters
        ]
        per = " per version" if stage in ("apply", "checkpoint", "encode_global") else ""
        t.add_row(stage + per, *cells)
    return t


def _proposal_table(res: dict[str, Any]) -> Table:
    t = Table(
        title="Optimisations measured on a 7B-class update, median ms (current = without it); "
        "adopted: finite check, float32 norm, zstd auto"
    )
    for col in ("change", "current", "proposed", "saving"):
        t.add_column(col, justify="right" if col != "change" else "left")
    for name, p in res["proposals_large"].items():
        t.add_row(
            name, f"{p['current_ms']:.1f}", f"{p['proposed_ms']:.1f}", f"{p['saving_ms']:.1f}"
        )
    probe = res.get("malloc_probe")
    if probe:
        for dt in ("float32", "bfloat16"):
            key = f"decode_{dt}_ms"
            a, b = probe["default"][key], probe["tuned"][key]
            t.add_row(
                f"decode_{dt} with MALLOC_MMAP_THRESHOLD_", f"{a:.1f}", f"{b:.1f}", f"{a - b:.1f}"
            )
    return t


def _profile_table(res: dict[str, Any]) -> Table:
    t = Table(title="Where the time goes: decode + offer of a 7B-class float32 update (cProfile)")
    for col in ("function", "calls", "own ms", "cum ms"):
        t.add_column(col, justify="right" if col != "function" else "left")
    for row in res["profile_large"]:
        t.add_row(
            row["function"][:70],
            f"{row['calls_per_update']:.0f}",
            f"{row['own_ms_per_update']:.1f}",
            f"{row['cum_ms_per_update']:.1f}",
        )
    return t


def _summary_table(res: dict[str, Any]) -> Table:
    t = Table(title="Summary")
    t.add_column("what")
    t.add_column("value", justify="right")

    def fmt(v: Any, spec: str = ".2f") -> str:
        return "skipped" if v is None else format(v, spec)

    t.add_row("ingest ratio, MiniLM rank 8", fmt(res["ingest_ratio_small"]))
    t.add_row(
        "ingest ratio, 7B-class rank 16 (float32, 8 MiB chunks, current code)",
        fmt(res["ingest_ratio_large"]),
    )
    for c in (10, 1000):
        m = res["memory"][str(c)]
        t.add_row(
            f"aggregator RSS after {m['updates']} updates from {c} clients",
            f"{m['rss_mb']:.1f} MB (+{m['rss_growth_mb']:.1f})",
        )
    acc = res.get("accuracy")
    t.add_row("accuracy, float32 transport", fmt(res["fp32_accuracy"], ".3f"))
    t.add_row("accuracy, bfloat16 transport", fmt(res["bf16_accuracy"], ".3f"))
    if acc:
        t.add_row("  initial accuracy", f"{acc['initial_accuracy']:.3f}")
        t.add_row("  bf16 delta relative error", f"{acc['bf16_delta_relative_error']:.2e}")
    m = res["machine"]
    t.add_row("machine", f"{m['cores']} cores, python {m['python']}, torch {m['torch']}")
    t.add_row(
        "load average start / end", f"{m['load_average_at_start']} / {m.get('load_average_at_end')}"
    )
    t.add_row("seconds", f"{res['seconds']:.0f}")
    return t


def print_tables(res: dict[str, Any], console: Console | None = None) -> None:
    if console is None:  # not a terminal (make bench | tee): wide enough for every column
        console = Console()
        if not console.is_terminal:
            console = Console(width=132)
    for table in tables(res):
        console.print(table)
