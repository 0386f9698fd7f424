"""Wins, ties and losses of the HeLoRA rows against each baseline, from the study's result rows.

Accuracy at rank R, paired by seed (the same seed is the same partition, initial adapter and
client schedule for every method). With two or more paired seeds, a difference counts as a win or
a loss only if its mean exceeds both ``NOISE`` and the standard deviation of the paired
differences; otherwise it is a tie. With one seed, only ``|delta| > ONE_SEED_NOISE`` counts, and
the verdict says "(1 seed)".
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

HELORA_ROWS = ("pad_zero", "pad", "kd")
BASELINES = ("fedavg_rmin", "fedavg_rmax", "zeropad", "hetlora", "flexlora")
NOISE = 0.02  # below this a mean difference is a tie whatever the seeds say
ONE_SEED_NOISE = 0.03  # about the binomial standard error x 1.2 of 300 evaluation examples
SPLIT_ORDER = {"iid": 0, "dir0.5": 1, "dir0.1": 2}


def verdict(ours: dict[int, float], theirs: dict[int, float]) -> dict[str, Any] | None:
    """The paired comparison of two {seed: accuracy} maps (None if no seed is shared)."""
    seeds = sorted(set(ours) & set(theirs))
    if not seeds:
        return None
    diffs = [ours[s] - theirs[s] for s in seeds]
    delta = statistics.fmean(diffs)
    sd = statistics.stdev(diffs) if len(diffs) > 1 else 0.0
    bar = max(NOISE, sd) if len(diffs) > 1 else ONE_SEED_NOISE
    word = "tie" if abs(delta) <= bar else ("win" if delta > 0 else "loss")
    return {"n": len(seeds), "delta": delta, "sd": sd, "verdict": word}


def verdicts(rows: Sequence[dict[str, Any]]) -> dict[tuple[str, str, str, str], dict[str, Any]]:
    """{(helora row, baseline, dataset, split): verdict} over the main-group rows."""
    acc: dict[tuple[str, str, str], dict[int, float]] = defaultdict(dict)
    for r in rows:
        if r["group"] == "main":
            acc[(r["row"], r["dataset"], r["split"])][int(r["seed"])] = float(r["accuracy"])
    out = {}
    for row, dataset, split in list(acc):
        if row not in HELORA_ROWS:
            continue
        for base in BASELINES:
            v = verdict(acc[(row, dataset, split)], acc.get((base, dataset, split), {}))
            if v is not None:
                out[(row, base, dataset, split)] = v
    return out


def verdict_tables(rows: Sequence[dict[str, Any]], labels: dict[str, str]) -> list[str]:
    found = verdicts(rows)
    if not found:
        return []
    lines = [
        "### HeLoRA against each baseline (accuracy at R, paired by seed)",
        "",
        f"Each cell: mean difference (HeLoRA - baseline) ± sd of the paired differences, then the "
        f"verdict: a win or loss needs |mean| > max({NOISE}, sd) with 2+ seeds, > "
        f"{ONE_SEED_NOISE} with 1 seed; anything else is a tie.",
        "",
    ]
    settings = sorted(
        {(d, s) for _, _, d, s in found},
        key=lambda ds: (ds[0] != "sst2", ds[0], SPLIT_ORDER.get(ds[1], 9)),
    )
    for row in HELORA_ROWS:
        present = [b for b in BASELINES if any((row, b, d, s) in found for d, s in settings)]
        if not present:
            continue
        lines += [
            f"**{labels.get(row, row)}**",
            "",
            "| dataset / split | " + " | ".join(labels.get(b, b) for b in present) + " |",
            "|---|" + "---|" * len(present),
        ]
        for d, s in settings:
            cells = []
            for b in present:
                v = found.get((row, b, d, s))
                if v is None:
                    cells.append("-")
                    continue
                sd = f" ± {v['sd']:.3f}" if v["n"] > 1 else ""
                note = "" if v["n"] > 1 else " (1 seed)"
                cells.append(f"{v['delta']:+.3f}{sd} {v['verdict']}{note}")
            if any(c != "-" for c in cells):
                lines.append(f"| {d} / {s} | " + " | ".join(cells) + " |")
        lines.append("")
    return lines
