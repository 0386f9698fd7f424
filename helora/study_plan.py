"""The study's plan: its rows, splits and scale presets, and the cells they expand to.

A cell is one simulated federation (helora.simulate) named by its row; its cache key is a hash of
the row name and the full SimConfig, so moving code never invalidates a cached cell.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from helora.simulate import SimConfig

# Accuracy targets for virtual time-to-target, per dataset: about what HeLoRA-Pad and the
# baselines reach late in the versions budget at the study's scale (a cell that never gets there
# says "not reached" in results.md).
TARGETS = {"sst2": 0.75, "ag_news": 0.80}
# run order; "pad" = HeLoRA-Pad as section 0 reads it (context padding), "pad_zero" = helora's
# default (zero padding, rank weights: the study found context padding worse at R)
ROWS = ("pad", "zeropad", "fedavg_rmax", "fedavg_rmin", "flexlora", "hetlora", "kd", "pad_zero")
PADDINGS = ("zero", "mean", "context", "adjacent")
WEIGHTINGS = ("data", "rank", "coverage")
SPLITS = {"iid": ("iid", 0.5), "dir0.5": ("dirichlet", 0.5), "dir0.1": ("dirichlet", 0.1)}
KD_OPTIONS = (("distill_batch_size", 16), ("distill_steps", 6))  # scaled-down KD per version


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
            ablation_cells=(("mean", "rank"), ("context", "data"), ("context", "coverage")),
            sync_seeds=(0,),
            base=base,
            name="quick",
            extra_rows=("pad", "pad_zero"),
            staleness_kinds=("constant",),
        )

    @classmethod
    def full(cls, base: SimConfig) -> StudyPlan:
        return cls(
            datasets=("sst2", "ag_news"),
            main_splits=("iid", "dir0.5"),
            seeds=(0, 1, 2),
            extra_splits=("dir0.1",),
            headline_rows=ROWS,
            ablation_cells=tuple((p, w) for p in PADDINGS for w in WEIGHTINGS),
            sync_seeds=(0, 1, 2),
            base=base,
            name="full",
            headline_datasets=("sst2",),
        )


def available_rows() -> tuple[str, ...]:
    """The study rows whose aggregation method exists in aggregator.methods right now."""
    from helora.aggregator.methods import METHODS

    need = {"fedavg_rmin": "fedavg", "fedavg_rmax": "fedavg", "pad_zero": "pad"}
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
    if row == "pad_zero":
        return replace(base, method="pad", padding="zero", speed_ref_rank=ref)
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


def base_config(**overrides: Any) -> SimConfig:
    """The study's per-cell scale (CPU-friendly; see the module doc)."""
    defaults: dict[str, Any] = dict(
        num_clients=6,
        ranks=(2, 4, 8),
        local_steps=8,
        buffer_size=2,
        max_versions=12,
        lr=5e-3,  # 2e-3 sat on the majority-class plateau for ~8 versions (measured)
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
        # HeLoRA-Pad as HELORA_METHOD.md section 0 reads it, pinned so that the study's cells
        # (and their cache keys) do not move when the library's defaults do
        padding="context",
        weighting="rank",
        beta=1.0,
        staleness="polynomial",
        staleness_a=0.5,
    )
    defaults.update(overrides)
    return SimConfig(**defaults)


def quick_base_config(**overrides: Any) -> SimConfig:
    """The --quick scale: 8 versions of K=2 updates of E=8 steps, 200 eval examples."""
    defaults: dict[str, Any] = dict(max_versions=8, local_steps=8, eval_size=200)
    defaults.update(overrides)
    return base_config(**defaults)
