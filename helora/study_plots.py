"""The study's PNG plots: accuracy against virtual time per method, and per-rank accuracy bars."""

from __future__ import annotations

import math
import statistics
from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from helora.study_report import LABELS, _order, _rank_cols


def plot_curves(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in rows:
        if r["group"] == "main":
            groups[(r["dataset"], r["split"])].append(r)
    for (dataset, split), grp in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(7, 4.5))
        rows_in = _order(r["row"] for r in grp)
        cmap = plt.get_cmap("tab10")
        for i, row in enumerate(rows_in):
            for j, r in enumerate(x for x in grp if x["row"] == row):
                t = [p[0] for p in r["curve"]]
                a = [p[2] for p in r["curve"]]
                ax.plot(
                    t,
                    a,
                    color=cmap(i % 10),
                    alpha=1.0 if j == 0 else 0.35,
                    marker="o",
                    markersize=3,
                    label=LABELS.get(row, row) if j == 0 else None,
                )
        target = grp[0].get("target")
        if target:
            ax.axhline(target, color="grey", linestyle=":", linewidth=1)
        ax.set_xlabel("virtual time (s)")
        ax.set_ylabel("accuracy at R (held-out)")
        ax.set_title(f"{dataset} / {split}: accuracy vs virtual time (faint: other seeds)")
        ax.legend(fontsize=8)
        ax.grid(alpha=0.3)
        fig.tight_layout()
        path = out / f"accuracy_vs_time_{dataset}_{split}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def plot_per_rank(out: Path, rows: Sequence[dict[str, Any]]) -> list[Path]:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    paths = []
    datasets = sorted({r["dataset"] for r in rows if r["group"] == "main"})
    for dataset in datasets:
        grp = [r for r in rows if r["group"] == "main" and r["dataset"] == dataset]
        split = "iid" if any(r["split"] == "iid" for r in grp) else grp[0]["split"]
        grp = [r for r in grp if r["split"] == split]
        rows_in = _order(r["row"] for r in grp)
        ranks = _rank_cols(grp)
        fig, ax = plt.subplots(figsize=(8, 4.5))
        width = 0.8 / max(1, len(ranks))
        for j, k in enumerate(ranks):
            means, errs = [], []
            for row in rows_in:
                vals = [
                    r["per_rank_accuracy"][k]
                    for r in grp
                    if r["row"] == row and k in r["per_rank_accuracy"]
                ]
                means.append(statistics.fmean(vals) if vals else math.nan)
                errs.append(statistics.stdev(vals) if len(vals) > 1 else 0.0)
            xs = [i + (j - (len(ranks) - 1) / 2) * width for i in range(len(rows_in))]
            ax.bar(xs, means, width, yerr=errs, label=f"r={k}", capsize=2)
        ax.set_xticks(range(len(rows_in)))
        ax.set_xticklabels([LABELS.get(r, r) for r in rows_in], rotation=20, ha="right", fontsize=8)
        ax.set_ylabel("accuracy (held-out)")
        lo = min((r2 for r in grp for r2 in r["per_rank_accuracy"].values()), default=0.5)
        ax.set_ylim(max(0.0, lo - 0.1), 1.0)
        ax.set_title(f"{dataset} / {split}: final global cut to each client rank")
        ax.legend(fontsize=8)
        ax.grid(axis="y", alpha=0.3)
        fig.tight_layout()
        path = out / f"per_rank_{dataset}.png"
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths
