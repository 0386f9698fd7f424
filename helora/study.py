"""`helora study`: the accuracy study, a matrix of simulated federations (helora.simulate).

Rows are methods (``fedavg_rmin``, ``fedavg_rmax``, ``zeropad``, ``hetlora``, ``flexlora``,
``pad`` = HeLoRA-Pad defaults, ``kd`` = HeLoRA-KD; each as far as aggregator.methods offers it),
crossed with datasets (SST-2, AG News) and splits (IID, Dirichlet 0.5, Dirichlet 0.1), plus the
HeLoRA-Pad ablations (padding x weighting, staleness on/off) and the asynchronous-vs-synchronous
comparison (pad, stragglers, virtual time to the target accuracy).

Every cell is cached as ``OUT/cells/<key>.json`` (key = hash of the row name and the cell's full
configuration) and skipped when present, so an interrupted study resumes. ``OUT/results.json``
holds one row per cell, ``OUT/results.md`` the tables, and the PNGs the curves and per-rank bars
(helora.study_report).
"""

from __future__ import annotations

import hashlib
import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Annotated, Any

import typer

from helora.simulate import SimConfig, run_simulation, split_name

# Accuracy targets for virtual time-to-target, per dataset (calibrated on quick runs: HeLoRA-Pad
# and the baselines reach them within the versions budget; see results.md).
TARGETS = {"sst2": 0.75, "ag_news": 0.80}
ROWS = ("pad", "zeropad", "fedavg_rmax", "fedavg_rmin", "flexlora", "hetlora", "kd")  # run order
PADDINGS = ("zero", "mean", "context", "adjacent")
WEIGHTINGS = ("data", "rank", "coverage")
SPLITS = {"iid": ("iid", 0.5), "dir0.5": ("dirichlet", 0.5), "dir0.1": ("dirichlet", 0.1)}
KD_OPTIONS = (("distill_batch_size", 16), ("distill_steps", 6))  # scaled-down KD per version
RESULT_KEYS = (
    "row",
    "group",
    "method",
    "dataset",
    "split",
    "seed",
    "mode",
    "accuracy",
    "per_rank_accuracy",
    "bytes_sent",
    "updates",
    "rejected",
    "versions",
    "virtual_time",
    "virtual_time_to_target",
    "target",
    "staleness_hist",
    "curve",
    "wall_seconds",
    "cpu_seconds",
    "config",
)


@dataclass(frozen=True)
class Cell:
    row: str  # e.g. "pad", "fedavg_rmin", "ablation:zero/rank", "sync:pad"
    group: str  # main | ablation | staleness | sync
    cfg: SimConfig

    @property
    def key(self) -> str:
        blob = json.dumps({"row": self.row, "cfg": self.cfg.to_dict()}, sort_keys=True, default=str)
        return hashlib.sha256(blob.encode()).hexdigest()[:20]


@dataclass(frozen=True)
class StudyPlan:
    """The scale of one study; ``quick()`` and ``full()`` are the two presets."""

    datasets: tuple[str, ...]
    main_splits: tuple[str, ...]  # every row x these splits x datasets (headline: every seed)
    seeds: tuple[int, ...]
    extra_splits: tuple[str, ...]  # every row x these splits (first dataset), first seed only
    headline_rows: tuple[str, ...]  # rows run with every seed (others: first seed only)
    ablation_cells: tuple[tuple[str, str], ...]  # (padding, weighting) on sst2/iid, first seed
    sync_seeds: tuple[int, ...]
    base: SimConfig
    name: str = "custom"
    extra_rows: tuple[str, ...] | None = None  # rows of extra_splits (None: all)
    staleness_kinds: tuple[str, ...] = ("constant", "hinge")
    headline_datasets: tuple[str, ...] | None = None  # datasets run with every seed (None: all)

    @classmethod
    def quick(cls, base: SimConfig) -> StudyPlan:
        return cls(
            datasets=("sst2",),
            main_splits=("iid",),
            seeds=(0,),
            extra_splits=("dir0.5",),
            headline_rows=ROWS,
            ablation_cells=(
                ("zero", "rank"),
                ("mean", "rank"),
                ("adjacent", "rank"),
                ("context", "data"),
                ("context", "coverage"),
            ),
            sync_seeds=(0,),
            base=base,
            name="quick",
            extra_rows=("zeropad", "pad"),
            staleness_kinds=("constant",),
        )

    @classmethod
    def full(cls, base: SimConfig) -> StudyPlan:
        return cls(
            datasets=("sst2", "ag_news"),
            main_splits=("iid", "dir0.5"),
            seeds=(0, 1, 2),
            extra_splits=("dir0.1",),
            headline_rows=("fedavg_rmin", "fedavg_rmax", "zeropad", "flexlora", "pad"),
            ablation_cells=tuple((p, w) for p in PADDINGS for w in WEIGHTINGS),
            sync_seeds=(0, 1, 2),
            base=base,
            name="full",
            headline_datasets=("sst2",),
        )


def available_rows() -> tuple[str, ...]:
    """The study rows whose aggregation method exists in aggregator.methods right now."""
    from helora.aggregator.methods import METHODS

    need = {"fedavg_rmin": "fedavg", "fedavg_rmax": "fedavg"}
    out = []
    for row in ROWS:
        method = need.get(row, row)
        if method in METHODS or (method == "fedavg" and "pad" in METHODS):
            out.append(row)
    return tuple(out)


def row_config(row: str, base: SimConfig) -> SimConfig:
    """The SimConfig of a method row on top of ``base`` (dataset, split, seed already set)."""
    from helora.aggregator.methods import METHODS

    ranks = base.ranks
    ref = max(ranks)  # client speeds are the same hardware whatever the row's ranks
    if row in ("fedavg_rmin", "fedavg_rmax"):
        r = min(ranks) if row == "fedavg_rmin" else max(ranks)
        method = "fedavg" if "fedavg" in METHODS else "pad"
        return replace(
            base,
            method=method,
            ranks=(r,),
            max_rank=r,
            weighting="data",
            padding="zero",
            speed_ref_rank=ref,
        )
    if row == "kd":
        return replace(base, method="kd", method_options=KD_OPTIONS, speed_ref_rank=ref)
    return replace(base, method=row, speed_ref_rank=ref)


def plan_cells(plan: StudyPlan, data_dir: Path, rows: Sequence[str] | None = None) -> list[Cell]:
    rows = tuple(rows) if rows is not None else available_rows()
    data_dir = Path(data_dir).resolve()  # cache keys do not depend on how the path is spelled
    cells: list[Cell] = []
    first = plan.seeds[0]

    def base_for(dataset: str, split: str, seed: int) -> SimConfig:
        scheme, alpha = SPLITS[split]
        return replace(
            plan.base,
            data=str(data_dir / dataset),
            scheme=scheme,
            alpha=alpha,
            seed=seed,
            target=TARGETS.get(dataset, plan.base.target),
        )

    def main_cells(dataset: str, split: str) -> None:
        for row in rows:
            if split not in plan.main_splits and plan.extra_rows is not None:
                if row not in plan.extra_rows:
                    continue
            headline = split in plan.main_splits and row in plan.headline_rows
            if plan.headline_datasets is not None:
                headline = headline and dataset in plan.headline_datasets
            for seed in plan.seeds if headline else (first,):
                cells.append(Cell(row, "main", row_config(row, base_for(dataset, split, seed))))

    # Most informative first, so a partial (interrupted) study already has the headline:
    # the first dataset's main splits, the async/sync pair, the ablations, then the rest.
    lead = plan.datasets[0]
    for split in plan.main_splits:
        main_cells(lead, split)
    if "pad" in rows:
        # Async vs sync: evaluation after every version, stop at the target.
        for seed in plan.sync_seeds:
            b = replace(base_for(lead, "iid", seed), eval_every=1, stop_at_target=True)
            cells.append(Cell("async:pad", "sync", replace(b, mode="async")))
            cells.append(Cell("sync:pad", "sync", replace(b, mode="sync")))
        # Ablations: first dataset, IID, first seed. (context, rank) is the pad row itself.
        sst = base_for(lead, "iid", first)
        for padding, weighting in plan.ablation_cells:
            if (padding, weighting) == ("context", "rank"):
                continue
            cfg = replace(sst, method="pad", padding=padding, weighting=weighting)
            cells.append(Cell(f"ablation:{padding}/{weighting}", "ablation", cfg))
        for kind in plan.staleness_kinds:
            cfg = replace(sst, method="pad", staleness=kind)
            cells.append(Cell(f"staleness:{kind}", "staleness", cfg))
    for split in plan.extra_splits:
        main_cells(lead, split)
    for dataset in plan.datasets[1:]:  # further datasets: the main splits only
        for split in plan.main_splits:
            main_cells(dataset, split)
    seen: set[str] = set()
    unique = []
    for c in cells:
        if c.key not in seen:
            seen.add(c.key)
            unique.append(c)
    return unique


def run_cell(cell: Cell, out: Path, runner: Callable[[SimConfig], dict[str, Any]]) -> dict:
    """The cell's row (from the cache when present)."""
    path = out / "cells" / f"{cell.key}.json"
    if path.is_file():
        row = json.loads(path.read_text())
        row["cached"] = True
        return row
    result = runner(cell.cfg)
    row = {k: result.get(k) for k in RESULT_KEYS}
    row.update(row=cell.row, group=cell.group, key=cell.key, config=cell.cfg.to_dict())
    row["split"] = split_name(cell.cfg)
    row["dataset"] = Path(cell.cfg.data).name
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(row, indent=1))
    os.replace(tmp, path)
    row["cached"] = False
    return row


def run_study(
    out: Path,
    plan: StudyPlan,
    data_dir: Path,
    *,
    rows: Sequence[str] | None = None,
    runner: Callable[[SimConfig], dict[str, Any]] = run_simulation,
    command: str | None = None,
    show_progress: bool = True,
) -> dict[str, Any]:
    """Run (or resume) every cell, then write results.json, results.md and the plots."""
    from rich.console import Console
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )

    out.mkdir(parents=True, exist_ok=True)
    cells = plan_cells(plan, data_dir, rows)
    _LOAD_START[0] = os.getloadavg()[0]
    _CPU_START[0] = time.process_time()
    console = Console(stderr=True)
    started = time.monotonic()
    results: list[dict[str, Any]] = []
    columns = (
        TextColumn("{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, disable=not show_progress) as progress:
        task = progress.add_task("study", total=len(cells))
        for cell in cells:
            c = cell.cfg
            progress.update(
                task, description=f"{cell.row} {Path(c.data).name}/{split_name(c)} s{c.seed}"
            )
            row = run_cell(cell, out, runner)
            results.append(row)
            if not row["cached"]:  # a partial report after every computed cell
                _write(out, results, plan, command, started, partial=True, planned=len(cells))
            if show_progress and not row["cached"]:
                progress.console.print(
                    f"{cell.row:22s} {row['dataset']}/{row['split']} seed {row['seed']} "
                    f"{row['mode']}: acc {row['accuracy']:.3f} in {row['wall_seconds']:.0f}s "
                    f"(cpu {row.get('cpu_seconds') or 0:.0f}s)"
                )
            progress.advance(task)
    meta = _write(
        out, results, plan, command, started, partial=False, plots=True, planned=len(cells)
    )
    console.print(f"study done: {len(results)} cells in {meta['run_seconds']:.0f}s -> {out}")
    return {"meta": meta, "rows": results}


def report_from_cache(
    out: Path, plan: StudyPlan, data_dir: Path, *, rows: Sequence[str] | None = None
) -> dict[str, Any]:
    """Rewrite results.json/.md and the plots from the cells cached so far (nothing is run)."""
    cells = plan_cells(plan, data_dir, rows)
    results = []
    for cell in cells:
        path = out / "cells" / f"{cell.key}.json"
        if path.is_file():
            results.append({**json.loads(path.read_text()), "cached": True})
    _LOAD_START[0] = os.getloadavg()[0]
    _CPU_START[0] = time.process_time()
    meta = _write(
        out,
        results,
        plan,
        f"report from {len(results)} cached cells",
        time.monotonic(),
        partial=len(results) < len(cells),
        plots=True,
        planned=len(cells),
    )
    return {"meta": meta, "rows": results}


def _write(
    out: Path,
    results: list[dict[str, Any]],
    plan: StudyPlan,
    command: str | None,
    started: float,
    *,
    partial: bool,
    plots: bool = False,
    planned: int = 0,
) -> dict[str, Any]:
    from helora.study_report import write_report

    total = time.monotonic() - started
    computed = sum(r["wall_seconds"] for r in results if not r["cached"])
    cpu_total = time.process_time() - _CPU_START[0]
    meta = {
        "partial": partial,
        "plan": plan.name,
        "command": command or " ".join(shlex.quote(a) for a in sys.argv),
        "run_seconds": total,
        "computed_cell_seconds": computed,
        "cpu_seconds": cpu_total,
        "load_average_start_end": [_LOAD_START[0], os.getloadavg()[0]],
        "all_cells_seconds": sum(r["wall_seconds"] for r in results),
        "cells": len(results),
        "planned_cells": planned,
        "cached_cells": sum(1 for r in results if r["cached"]),
        "targets": TARGETS,
        "base": plan.base.to_dict(),
    }
    (out / "results.json").write_text(json.dumps({"meta": meta, "rows": results}, indent=1))
    write_report(out, results, meta, plots=plots)
    return meta


_CPU_START = [0.0]
_LOAD_START = [0.0]


def base_config(**overrides: Any) -> SimConfig:
    """The study's per-cell scale (CPU-friendly; see the module doc)."""
    defaults: dict[str, Any] = dict(
        num_clients=6,
        ranks=(2, 4, 8),
        local_steps=10,
        buffer_size=2,
        max_versions=10,
        lr=2e-3,
        batch_size=16,
        max_length=48,
        eval_size=300,
        eval_every=2,
        straggler_fraction=0.34,
        straggler_factor=3.0,
        availability=0.8,
        mean_online=40.0,
        max_train=6000,
        threads=2,
    )
    defaults.update(overrides)
    return SimConfig(**defaults)


def quick_base_config(**overrides: Any) -> SimConfig:
    """The --quick scale: 8 versions of K=2 updates of E=8 steps, 200 eval examples."""
    defaults: dict[str, Any] = dict(max_versions=8, local_steps=8, eval_size=200)
    defaults.update(overrides)
    return base_config(**defaults)


def study_command(
    out: Annotated[Path, typer.Option(help="Output directory (resumable).")] = Path("out/study"),
    quick: Annotated[
        bool,
        typer.Option(
            help="The reduced matrix (estimated 8-10 min on an idle 2-core machine; unmeasured)."
        ),
    ] = False,
    data_dir: Annotated[Path, typer.Option(help="Folder holding sst2/ and ag_news/.")] = Path(
        "../shared/data"
    ),
    rows: Annotated[
        str | None, typer.Option(help="Comma-separated rows to run (default: all available).")
    ] = None,
    versions: Annotated[int | None, typer.Option(help="Versions per cell (override).")] = None,
    report_only: Annotated[
        bool, typer.Option(help="Only rebuild the report from the cached cells.")
    ] = False,
) -> None:
    """Run the accuracy study (methods x splits x datasets, ablations, async vs sync)."""
    overrides: dict[str, Any] = {}
    if versions is not None:
        overrides["max_versions"] = versions
    base = quick_base_config(**overrides) if quick else base_config(**overrides)
    plan = StudyPlan.quick(base) if quick else StudyPlan.full(base)
    selected = tuple(r.strip() for r in rows.split(",") if r.strip()) if rows else None
    if selected:
        unknown = set(selected) - set(ROWS)
        if unknown:
            raise typer.BadParameter(f"unknown rows {sorted(unknown)}; choose from {ROWS}")
    if report_only:
        report_from_cache(out, plan, data_dir, rows=selected)
        return
    run_study(out, plan, data_dir, rows=selected)
