"""`helora bench` in a tiny configuration, and `helora status`, against the real broker.

Structural facts only (keys present, positive rates, bf16 smaller than fp32); never timing
thresholds: timings belong to `make bench`.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import replace

import pytest
import torch
from typer.testing import CliRunner

from helora.aggregator.core import AggregatorCore, CoreState, PadConfig
from helora.aggregator.metrics import AggregatorMetrics
from helora.aggregator.strategies import Weighting
from helora.bench_fastpath import FastCore, all_finite
from helora.bench_synth import SMALL, initial_global, spec_for, synthetic_update
from helora.broker.connection import close_connection, connect
from helora.broker.consumer import KIND_HEADER, VERSION_HEADER, Delivery, dead_letter
from helora.broker.publisher import ConfirmedPublisher
from helora.broker.topology import Topology, declare_topology
from helora.cli import app
from helora.shared.wire import encode_update

pytestmark = pytest.mark.integration

KEYS = {
    "ingest_ratio_small",
    "ingest_ratio_large",
    "ingest_updates_per_s_small",
    "ingest_updates_per_s_large",
    "raw_msgs_per_s_small",
    "raw_msgs_per_s_large",
    "raw_updates_per_s_small",
    "raw_updates_per_s_large",
    "wire_bytes",
    "rss_mb_10_clients",
    "rss_mb_1000_clients",
    "stage_ms_per_mb",
    "bf16_accuracy",
    "fp32_accuracy",
    "machine",
    "seconds",
}


@pytest.mark.timeout(300)
def test_tiny_bench_writes_every_key(amqp_url, tmp_path, monkeypatch):
    monkeypatch.setenv("HELORA_AMQP_URL", amqp_url)
    out = tmp_path / "bench.json"
    result = CliRunner().invoke(
        app,
        ["bench", "--out", str(out), "--no-accuracy", "--no-large"]
        + ["--small-messages", "16", "--memory-updates", "40"],
    )
    assert result.exit_code == 0, result.output
    assert "Ingest through RabbitMQ" in result.output
    res = json.loads(out.read_text())
    assert KEYS <= set(res), KEYS - set(res)
    assert res["ingest_ratio_small"] > 0
    assert res["ingest_updates_per_s_small"] > 0 and res["raw_msgs_per_s_small"] > 0
    assert res["ingest_ratio_large"] is None  # skipped, still present
    (run,) = res["ingest"]
    assert run["messages"] == 16 and run["versions_applied"] == 2  # K = 8: every update applied
    wb = res["wire_bytes"]["small"]
    assert wb["bfloat16"] < wb["float32"] <= wb["raw_float32"] * 1.01
    assert wb["float16"] < wb["float32"]
    assert wb["raw_float32"] == 4 * (12 * 2 * 8 * 384 + 2 * 384 + 2)
    for stage in ("decode", "validate", "pad", "accumulate", "apply"):
        assert res["stage_ms_per_mb"]["small"][stage] > 0, stage
    assert res["rss_mb_10_clients"] > 0 and res["rss_mb_1000_clients"] > 0
    assert res["memory"]["1000"]["ledger_entries"] == 40
    assert res["bf16_accuracy"] is None and res["fp32_accuracy"] is None
    m = res["machine"]
    assert m["cores"] >= 1 and m["torch"] == torch.__version__ and m["python"]
    assert res["seconds"] > 0


@pytest.fixture
def declared(amqp_url, federation):
    conn = connect(amqp_url, attempts=3)
    topo = Topology(federation)
    declare_topology(conn.channel(), topo)
    yield conn, topo
    close_connection(conn)


def _json_status(args: list[str]) -> tuple[int, dict]:
    result = CliRunner().invoke(app, ["status", "--json", *args])
    return result.exit_code, json.loads(result.output)


def test_status_reads_version_depths_dead_letters_status_json_and_metrics(
    amqp_url, federation, declared, tmp_path
):
    conn, topo = declared
    pub = ConfirmedPublisher(conn)
    for version in (0, 1, 2):  # headers only matter: status never decodes the global
        pub.publish(
            topo.global_exchange,
            "",
            b"not decoded",
            headers={KIND_HEADER: "global", VERSION_HEADER: version},
        )
    spec = spec_for(SMALL)
    body = encode_update(synthetic_update(SMALL, spec, client_id="c1"))
    pub.publish(topo.updates_exchange, "c1", body)
    for i, reason in enumerate(("bad_rank", "too_stale", "non_finite")):
        d = Delivery(tag=0, body=b"x" * (i + 1), routing_key=f"c{i}", redelivered=False)
        dead_letter(pub, topo, d, reason, f"detail {i}")
    (tmp_path / "status.json").write_text(
        json.dumps({"version": 2, "counters": {"applied": 4}, "buffered_not_applied": 1})
    )
    metrics = AggregatorMetrics()
    metrics.applied(4)
    metrics.rejected("bad_rank")
    metrics.version(2)
    server = metrics.serve(0)
    args = ["--amqp-url", amqp_url, "--federation", federation]
    try:
        code, st = _json_status(
            args
            + ["--dead-letters", "2", "--checkpoint-dir", str(tmp_path)]
            + ["--metrics-url", server.url]
        )
    finally:
        metrics.close()
    assert code == 0, st
    assert st["errors"] == {}
    assert st["global_version"] == 2
    assert st["queues"]["updates"]["messages"] == 1
    assert st["queues"]["dead"]["messages"] == 3
    assert [d["reason"] for d in st["dead_letters"]] == ["too_stale", "non_finite"]
    assert st["dead_letters"][1]["detail"] == "detail 2"
    assert st["aggregator_status"]["counters"] == {"applied": 4}
    assert st["metrics"]["updates_applied_total"] == 4
    assert st["metrics"]['updates_rejected_total{reason="bad_rank"}'] == 1
    assert st["metrics"]["global_version"] == 2
    # peeking removed nothing, and the table renders too
    code, again = _json_status(args + ["--dead-letters", "5"])
    assert again["queues"]["dead"]["messages"] == 3
    assert [d["reason"] for d in again["dead_letters"]] == ["bad_rank", "too_stale", "non_finite"]
    table = CliRunner().invoke(app, ["status", *args, "--dead-letters", "1"])
    assert table.exit_code == 0 and "non_finite" in table.output


def test_status_of_an_undeclared_federation_reports_errors(amqp_url):
    missing = f"test-missing-{uuid.uuid4().hex[:8]}"  # never declared: nothing to delete
    code, st = _json_status(["--amqp-url", amqp_url, "--federation", missing])
    assert code == 1
    assert st["queues"] == {"updates": None, "dead": None}
    assert any("404" in e for e in st["errors"].values())


# ---- the proposals measured by the bench must not change results (pure, no broker needed) ----


@pytest.mark.parametrize("weighting", list(Weighting))
def test_fastpath_core_gives_the_same_decisions_and_global(weighting):
    spec = spec_for(SMALL)
    cfg = PadConfig(buffer_size=3, weighting=weighting, server_lr=0.7)
    cores = [
        cls(spec, cfg, CoreState(0, initial_global(SMALL))) for cls in (AggregatorCore, FastCore)
    ]
    updates = [
        synthetic_update(SMALL, spec, client_id=f"c{i}", rank=r, seed=i)
        for i, r in enumerate([8, 4, 8, 2, 8, 8, 1])
    ]
    for i, u in enumerate(updates):
        u = replace(u, base_version=cores[0].version)
        decisions = [type(c.offer(u)).__name__ for c in cores]
        assert decisions[0] == decisions[1], i
    bad = synthetic_update(SMALL, spec, client_id="bad", base_version=cores[0].version)
    next(iter(bad.tensors.values()))[0, 0] = float("nan")
    assert [c.offer(bad).reason for c in cores] == ["non_finite", "non_finite"]
    assert cores[0].version == cores[1].version == 2
    for name, t in cores[0].state.adapter.items():
        torch.testing.assert_close(cores[1].state.adapter[name], t, rtol=1e-5, atol=1e-7)


def test_all_finite_is_exact():
    t = torch.randn(64, 64)
    assert all_finite(t)
    for bad in (float("nan"), float("inf"), float("-inf")):
        u = t.clone()
        u[3, 5] = bad
        assert not all_finite(u)
    huge = torch.full((8,), 3e38)  # the sum overflows, every value is finite
    assert all_finite(huge)
    mixed = torch.tensor([float("inf"), float("-inf")])  # sums to NaN
    assert not all_finite(mixed)
