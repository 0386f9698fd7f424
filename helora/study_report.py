"""The study's markdown tables (results.md) and plots (PNG) from its result rows."""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

from helora.study_verdict import verdict_tables

ROW_ORDER = (
    "fedavg_rmin",
    "fedavg_rmax",
    "zeropad",
    "hetlora",
    "flexlora",
    "pad",
    "pad_zero",
    "kd",
)
LABELS = {
    "fedavg_rmin": "FedAvg r=min",
    "fedavg_rmax": "FedAvg r=max",
    "zeropad": "zero-pad",
    "hetlora": "HetLoRA",
    "flexlora": "FlexLoRA",
    "pad": "HeLoRA-Pad (context, rank; section 0)",
    "pad_zero": "HeLoRA-Pad (zero, rank; default)",
    "kd": "HeLoRA-KD",
}
PADDINGS = ("zero", "mean", "context", "adjacent")
WEIGHTINGS = ("data", "rank", "coverage")
MARKS = {("context", "rank"): " (section 0)", ("zero", "rank"): " (default)"}


def mean_std(values: Sequence[float]) -> str:
    if not values:
        return "-"
    m = statistics.fmean(values)
    if len(values) == 1:
        return f"{m:.3f}"
    return f"{m:.3f} ± {statistics.stdev(values):.3f}"


def _order(rows: Iterable[str]) -> list[str]:
    return sorted(set(rows), key=lambda r: (ROW_ORDER.index(r) if r in ROW_ORDER else 99, r))


def _time_to_target(rows: Sequence[dict[str, Any]]) -> str:
    times = [r["virtual_time_to_target"] for r in rows if r["virtual_time_to_target"] is not None]
    if not times:
        return f"not reached (0/{len(rows)})"
    return f"{statistics.fmean(times):.0f} ({len(times)}/{len(rows)})"


def _rank_cols(rows: Sequence[dict[str, Any]]) -> list[str]:
    return sorted({k for r in rows for k in r["per_rank_accuracy"]}, key=int)


def main_tables(rows: Sequence[dict[str, Any]]) -> list[str]:
    main = [r for r in rows if r["group"] == "main"]
    groups: dict[tuple[str, str], list[dict[str, Any]]] = defaultdict(list)
    for r in main:
        groups[(r["dataset"], r["split"])].append(r)
    lines: list[str] = []
    split_order = {"iid": 0, "dir0.5": 1, "dir0.1": 2}
    for (dataset, split), grp in sorted(
        groups.items(), key=lambda kv: (kv[0][0] != "sst2", split_order.get(kv[0][1], 9))
    ):
        ranks = _rank_cols(grp)
        target = grp[0].get("target")
        lines += [
            f"### {dataset} / {split} (asynchronous; target accuracy {target})",
            "",
            "| method | seeds | accuracy at R | "
            + " | ".join(f"r={k}" for k in ranks)
            + " | MB sent | updates applied | virtual time to target (reached) |",
            "|---|---:|---:|" + "---:|" * len(ranks) + "---:|---:|---:|",
        ]
        by_row: dict[str, list[dict[str, Any]]] = defaultdict(list)
        for r in grp:
            by_row[r["row"]].append(r)
        for row in _order(by_row):
            rs = by_row[row]
            per_rank = [
                mean_std([r["per_rank_accuracy"][k] for r in rs if k in r["per_rank_accuracy"]])
                for k in ranks
            ]
            mb = statistics.fmean(r["bytes_sent"] for r in rs) / 1e6
            upd = statistics.fmean(r["updates"] for r in rs)
            lines.append(
                f"| {LABELS.get(row, row)} | {len(rs)} | {mean_std([r['accuracy'] for r in rs])} | "
                + " | ".join(per_rank)
                + f" | {mb:.1f} | {upd:.0f} | {_time_to_target(rs)} |"
            )
        for row in _order(by_row):
            ens = [r["ensemble_accuracy"] for r in by_row[row] if r.get("ensemble_accuracy")]
            if ens:
                lines += [
                    "",
                    f"{LABELS.get(row, row)}, the slots' logit ensemble (weighted as the "
                    f"distillation teacher): {mean_std(ens)} "
                    f"({len(ens)} seed{'s' * (len(ens) > 1)})",
                ]
        lines.append("")
    return lines


def _reference_pad(rows: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
    abl = [r for r in rows if r["group"] in ("ablation", "staleness")]
    if not abl:
        return None
    return _main_row_like(rows, "pad", abl[0])


def _main_row_like(
    rows: Sequence[dict[str, Any]], row: str, like: dict[str, Any]
) -> dict[str, Any] | None:
    """The main-group result of ``row`` on the dataset, split and seed of ``like``."""
    for r in rows:
        if (
            r["group"] == "main"
            and r["row"] == row
            and (r["dataset"], r["split"], r["seed"])
            == (like["dataset"], like["split"], like["seed"])
        ):
            return r
    return None


def ablation_tables(rows: Sequence[dict[str, Any]]) -> list[str]:
    abl = [r for r in rows if r["group"] == "ablation"]
    ref = _reference_pad(rows)
    if not abl and ref is None:
        return []
    cells: dict[tuple[str, str], dict[str, Any]] = {}
    for r in abl:
        cells[(r["config"]["padding"], r["config"]["weighting"])] = r
    if ref is not None:
        cells.setdefault(("context", "rank"), ref)
        zero = _main_row_like(rows, "pad_zero", ref)
        if zero is not None:
            cells.setdefault(("zero", "rank"), zero)
    some = next(iter(cells.values()))
    lines = [
        f"### HeLoRA-Pad ablation: padding x weighting ({some['dataset']} / {some['split']}, "
        f"seed {some['seed']}, one run per cell)",
        "",
        "Each cell: accuracy at R / mean accuracy over the client ranks.",
        "",
        "| padding \\ weighting | " + " | ".join(WEIGHTINGS) + " |",
        "|---|" + "---:|" * len(WEIGHTINGS),
    ]
    for p in PADDINGS:
        vals = []
        for w in WEIGHTINGS:
            r = cells.get((p, w))
            if r is None:
                vals.append("-")
            else:
                pr = list(r["per_rank_accuracy"].values())
                star = MARKS.get((p, w), "")
                vals.append(f"{r['accuracy']:.3f} / {statistics.fmean(pr):.3f}{star}")
        lines.append(f"| {p} | " + " | ".join(vals) + " |")
    lines.append("")
    stale = [r for r in rows if r["group"] == "staleness"]
    if stale:
        lines += [
            "### Staleness weighting on/off (HeLoRA-Pad context/rank, the cell above)",
            "",
            "| staleness | accuracy at R | mean over ranks | virtual time to target | "
            "staleness histogram |",
            "|---|---:|---:|---:|---|",
        ]
        entries = ([("polynomial (default)", ref)] if ref else []) + [
            (r["config"]["staleness"], r) for r in stale
        ]
        for name, r in entries:
            pr = list(r["per_rank_accuracy"].values())
            ttt = r["virtual_time_to_target"]
            lines.append(
                f"| {name} | {r['accuracy']:.3f} | {statistics.fmean(pr):.3f} | "
                f"{'not reached' if ttt is None else f'{ttt:.0f}'} | {r['staleness_hist']} |"
            )
        lines.append("")
    return lines


def first_time(curve: Sequence[Sequence[float]], threshold: float) -> float | None:
    """The first virtual time a curve's accuracy reaches ``threshold`` (None: never)."""
    return next((float(t) for t, _, a in curve if a >= threshold), None)


def sync_ratio(
    rows: Sequence[dict[str, Any]], thresholds: Sequence[float] | None = None
) -> dict[str, Any]:
    """Per seed and threshold: virtual time to reach it, sync / async (pad, same data and seed).

    Times come from the evaluation curves, so besides the configured target any lower threshold
    can be read off the same runs; ``mean_ratio`` is at the configured target over the seeds
    where both runs reached it."""
    pairs: dict[int, dict[str, dict[str, Any]]] = defaultdict(dict)
    for r in rows:
        if r["group"] == "sync":
            pairs[r["seed"]][r["mode"]] = r
    some = next((r for r in rows if r["group"] == "sync"), None)
    target = (some or {}).get("target") or 0.75
    levels = sorted(set(thresholds or (0.6, 0.65, 0.7)) | {target})
    per_seed = []
    for seed, modes in sorted(pairs.items()):
        a, s = modes.get("async"), modes.get("sync")
        if a is None or s is None:
            continue
        for level in levels:
            ta, ts = first_time(a["curve"], level), first_time(s["curve"], level)
            per_seed.append(
                {
                    "seed": seed,
                    "threshold": level,
                    "async_time": ta,
                    "sync_time": ts,
                    "ratio": ts / ta if ta and ts else None,
                    "async_versions": a["versions"],
                    "sync_rounds": s["versions"],
                    "async_updates": a["updates"],
                    "sync_updates": s["updates"],
                    "async_budget": a["virtual_time"],
                    "sync_budget": s["virtual_time"],
                }
            )
    out: dict[str, Any] = {"per_seed": per_seed, "target": target, "by_threshold": {}}
    for level in levels:
        ratios = [p["ratio"] for p in per_seed if p["threshold"] == level and p["ratio"]]
        out["by_threshold"][level] = {
            "mean": statistics.fmean(ratios) if ratios else None,
            "std": statistics.stdev(ratios) if len(ratios) > 1 else None,
            "n": len(ratios),
        }
    at_target = out["by_threshold"][target]
    out["mean_ratio"], out["std_ratio"] = at_target["mean"], at_target["std"]
    return out


def sync_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    info = sync_ratio(rows)
    if not info["per_seed"]:
        return []
    some = next(r for r in rows if r["group"] == "sync")
    lines = [
        f"### Asynchronous vs synchronous (HeLoRA-Pad, {some['dataset']} / {some['split']}, "
        f"stragglers; runs stop at the target {some['target']} or the versions budget)",
        "",
        "Virtual time until the global first reaches each accuracy (evaluated after every "
        "version / round).",
        "",
        "| seed | accuracy | async: time (versions, updates) | sync: time (rounds, updates) | "
        "sync / async |",
        "|---:|---:|---:|---:|---:|",
    ]

    def fmt(t: float | None, budget: float) -> str:
        return f"not reached (> {budget:.0f})" if t is None else f"{t:.0f}"

    for p in info["per_seed"]:
        ratio = "-" if p["ratio"] is None else f"{p['ratio']:.2f}x"
        lines.append(
            f"| {p['seed']} | {p['threshold']:g} | {fmt(p['async_time'], p['async_budget'])} "
            f"({p['async_versions']}, {p['async_updates']}) | "
            f"{fmt(p['sync_time'], p['sync_budget'])} ({p['sync_rounds']}, {p['sync_updates']}) "
            f"| {ratio} |"
        )
    lines.append("")
    for level, st in info["by_threshold"].items():
        if st["mean"] is not None:
            sd = f" ± {st['std']:.2f}" if st["std"] else ""
            lines.append(
                f"- mean sync/async time ratio at accuracy {level:g}: **{st['mean']:.2f}x**{sd} "
                f"(n = {st['n']} seeds)"
            )
    lines.append("")
    return lines


def render_markdown(rows: Sequence[dict[str, Any]], meta: dict[str, Any]) -> str:
    base = meta.get("base", {})
    total = meta.get("run_seconds", 0.0)
    lines = [
        "# helora study results",
        "",
        f"- command: `{meta.get('command', '')}`",
        (
            "- **PARTIAL: the study is still running or was interrupted**\n"
            if meta.get("partial")
            else ""
        )
        + f"- plan: {meta.get('plan')}; {meta.get('cells')} of {meta.get('planned_cells')} cells "
        f"({meta.get('cached_cells', 0)} from the cache)",
        f"- this run's wall time: {total:.0f} s ({total / 60:.1f} min); sum of all cells' own "
        f"wall times (incl. cached): {meta.get('all_cells_seconds', 0.0):.0f} s; process CPU "
        f"time {meta.get('cpu_seconds', 0.0):.0f} s (torch uses 2 threads, so on an idle 2-core "
        f"machine wall ~ CPU / 2); load average at start/end "
        f"{meta.get('load_average_start_end')} (the machine is shared)",
        f"- scale per cell: {base.get('num_clients')} clients, ranks {base.get('ranks')} (cycled), "
        f"E = {base.get('local_steps')} local steps of batch {base.get('batch_size')} "
        f"(lr {base.get('lr')}), K = {base.get('buffer_size')}, {base.get('max_versions')} "
        f"versions, max length {base.get('max_length')}, eval on {base.get('eval_size')} "
        "held-out examples",
        f"- clients: {base.get('straggler_fraction')} stragglers slowed x"
        f"{base.get('straggler_factor')}, step time ~ (r/8)^{base.get('rank_speed_exponent')}, "
        f"availability {base.get('availability')} (mean online period "
        f"{base.get('mean_online')} virtual s)",
        f"- targets for virtual time-to-target: {meta.get('targets')}",
        "- accuracy = the final global evaluated at R (KD: the rank-R slot); r=k columns = the "
        "global cut to rank k (KD: slot k). Mean ± std over seeds.",
        "",
    ]
    lines += main_tables(rows)
    lines += verdict_tables(rows, LABELS)
    lines += ablation_tables(rows)
    lines += sync_table(rows)
    return "\n".join(lines) + "\n"


def write_report(
    out: Path, rows: Sequence[dict[str, Any]], meta: dict[str, Any], *, plots: bool = True
) -> None:
    (out / "results.md").write_text(render_markdown(rows, meta))
    if plots:
        from helora.study_plots import plot_curves, plot_per_rank

        plot_curves(out, rows)
        plot_per_rank(out, rows)
