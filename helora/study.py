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

import json
import os
import shlex
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Annotated, Any

import typer

from helora.shared.errors import ConfigError
from helora.simulate import SimConfig, run_simulation, split_name
from helora.study_plan import (
    KD_OPTIONS,
    PADDINGS,
    ROWS,
    SPLITS,
    TARGETS,
    WEIGHTINGS,
    Cell,
    StudyPlan,
    available_rows,
    base_config,
    plan_cells,
    quick_base_config,
    row_config,
)

__all__ = [
    "KD_OPTIONS",
    "PADDINGS",
    "RESULT_KEYS",
    "ROWS",
    "SPLITS",
    "TARGETS",
    "WEIGHTINGS",
    "Cell",
    "StudyPlan",
    "available_rows",
    "base_config",
    "plan_cells",
    "quick_base_config",
    "report_from_cache",
    "row_config",
    "run_cell",
    "run_study",
    "study_command",
]

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
    "ensemble_accuracy",
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
    if not (out / "cells").is_dir():
        raise ConfigError(
            f"no cached cells in {out / 'cells'}: run the study first (without --report-only)"
        )
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


def study_command(
    out: Annotated[Path, typer.Option(help="Output directory (resumable).")] = Path("out/study"),
    quick: Annotated[
        bool,
        typer.Option(
            help="The reduced matrix (16 cells; measured 10.6 min on an idle 2-core machine)."
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
    try:
        if report_only:
            report_from_cache(out, plan, data_dir, rows=selected)
        else:
            run_study(out, plan, data_dir, rows=selected)
    except (ConfigError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
