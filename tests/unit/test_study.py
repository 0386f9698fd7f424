"""The study: a tiny real cell writes results.json/.md and a PNG; a second run uses the cache."""

from __future__ import annotations

import json

import pytest

from helora.study import (
    RESULT_KEYS,
    StudyPlan,
    base_config,
    plan_cells,
    row_config,
    run_study,
)
from helora.study_report import render_markdown, sync_ratio
from tests.conftest import TINY_SIMULATION, data_dir


def tiny_plan() -> StudyPlan:
    base = base_config(**TINY_SIMULATION, availability=1.0)
    return StudyPlan(
        datasets=("sst2",),
        main_splits=("iid",),
        seeds=(0,),
        extra_splits=(),
        headline_rows=("pad",),
        ablation_cells=(),
        sync_seeds=(),
        staleness_kinds=(),
        base=base,
        name="tiny",
    )


def test_tiny_study_writes_files_and_resumes(tmp_path):
    out = tmp_path / "study"
    first = run_study(out, tiny_plan(), data_dir(), rows=("pad",), show_progress=False)
    assert (out / "results.json").is_file() and (out / "results.md").is_file()
    assert (out / "accuracy_vs_time_sst2_iid.png").stat().st_size > 1000
    assert (out / "per_rank_sst2.png").stat().st_size > 1000
    doc = json.loads((out / "results.json").read_text())
    (row,) = doc["rows"]
    assert set(RESULT_KEYS) <= set(row)
    assert row["method"] == "pad" and row["dataset"] == "sst2" and row["split"] == "iid"
    assert 0.0 <= row["accuracy"] <= 1.0 and set(row["per_rank_accuracy"]) == {"2", "4"}
    assert row["updates"] == 2 and row["bytes_sent"] > 0 and not row["cached"]
    md = (out / "results.md").read_text()
    assert "HeLoRA-Pad" in md and "run's wall time" in md
    assert len(list((out / "cells").glob("*.json"))) == 1

    def boom(cfg):
        raise AssertionError("a cached cell must not run again")

    second = run_study(
        out, tiny_plan(), data_dir(), rows=("pad",), runner=boom, show_progress=False
    )
    assert second["rows"][0]["cached"] and second["meta"]["cached_cells"] == 1
    assert second["rows"][0]["accuracy"] == first["rows"][0]["accuracy"]


def test_plans_rows_and_report_without_training(tmp_path):
    from pathlib import Path

    base = base_config()
    assert row_config("fedavg_rmin", base).R == 2
    assert row_config("fedavg_rmax", base).ranks == (8,)
    cells = plan_cells(StudyPlan.quick(base), Path("/data"))
    keys = [c.key for c in cells]
    assert len(keys) == len(set(keys))
    assert {c.cfg.mode for c in cells if c.group == "sync"} == {"async", "sync"}
    rows = []
    for c in cells:
        t = 10.0 if c.cfg.mode == "async" else 25.0
        rows.append(
            {
                "row": c.row,
                "group": c.group,
                "method": c.cfg.method,
                "dataset": "sst2",
                "split": "iid" if c.cfg.scheme == "iid" else "dir0.5",
                "seed": c.cfg.seed,
                "mode": c.cfg.mode,
                "accuracy": 0.8,
                "per_rank_accuracy": {"2": 0.7, "8": 0.8},
                "bytes_sent": 10**6,
                "updates": 20,
                "versions": 10,
                "virtual_time": 60.0,
                "virtual_time_to_target": t,
                "target": 0.75,
                "staleness_hist": {"0": 5},
                "curve": [[0.0, 0, 0.5], [t, 10, 0.8]],
                "cpu_seconds": 1.0,
                "wall_seconds": 1.0,
                "config": c.cfg.to_dict(),
            }
        )
    assert sync_ratio(rows)["mean_ratio"] == pytest.approx(2.5)
    md = render_markdown(rows, {"command": "x", "run_seconds": 1.0, "base": base.to_dict()})
    assert "padding \\ weighting" in md and "2.50x" in md
    # the KD row's logit ensemble gets its own line under the table
    kd = next(r for r in rows if r["row"] == "kd")
    kd["ensemble_accuracy"] = 0.7
    assert "logit ensemble (weighted as the distillation teacher): 0.700" in render_markdown(
        rows, {"command": "x", "run_seconds": 1.0, "base": base.to_dict()}
    )


def test_report_only_without_cached_cells_is_a_clear_error(tmp_path):
    from pathlib import Path

    from helora.shared.errors import ConfigError
    from helora.study import report_from_cache

    with pytest.raises(ConfigError, match="no cached cells"):
        report_from_cache(tmp_path / "nothing", StudyPlan.quick(base_config()), Path("/data"))


@pytest.mark.parametrize(
    ("ours", "theirs", "expected"),
    [
        ({0: 0.80, 1: 0.81, 2: 0.79}, {0: 0.75, 1: 0.76, 2: 0.74}, ("win", 3)),  # +0.05, sd 0
        ({0: 0.70, 1: 0.71, 2: 0.69}, {0: 0.75, 1: 0.76, 2: 0.74}, ("loss", 3)),
        ({0: 0.76, 1: 0.75}, {0: 0.75, 1: 0.76}, ("tie", 2)),  # mean 0 with spread
        ({0: 0.85, 1: 0.60}, {0: 0.75, 1: 0.62}, ("tie", 2)),  # +0.04 but sd 0.085 > 0.04
        ({0: 0.80, 5: 0.1}, {0: 0.76}, ("win", 1)),  # only seed 0 is paired; 0.04 > 0.03
        ({0: 0.78}, {0: 0.76}, ("tie", 1)),
    ],
)
def test_verdict_pairs_seeds_and_needs_more_than_noise(ours, theirs, expected):
    from helora.study_verdict import verdict

    v = verdict(ours, theirs)
    assert (v["verdict"], v["n"]) == expected
    assert verdict(ours, {9: 0.5}) is None
