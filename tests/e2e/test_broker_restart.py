"""A broker restart mid-run: the aggregator and the workers reconnect with backoff and carry on,
and no update a worker saw confirmed is lost (durable topology, persistent messages, outbox).

Runs its own throwaway RabbitMQ node (tests/integration/broker_node.py), so the shared broker is
never restarted. Progress is read from the checkpoint directory, not over the broker.
"""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from helora.aggregator.checkpoint import load_checkpoint
from tests.conftest import data_dir
from tests.e2e.procs import TINY, events, spawn, stop
from tests.integration.broker_node import BrokerNode

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def version(ckpt: Path) -> int:
    latest = ckpt / "LATEST"
    if not latest.exists():
        return -1
    return int(json.loads(latest.read_text())["checkpoint"][1:])


def wait_version(ckpt: Path, at_least: int, procs, timeout: float) -> int:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        v = version(ckpt)
        if v >= at_least:
            return v
        for p in procs:
            assert p.poll() is None, f"{p.args[3:5]} died"
        time.sleep(0.5)
    raise AssertionError(f"stuck at version {version(ckpt)} (wanted {at_least})")


def published_ids(log: Path) -> set[str]:
    return {e["update_id"] for e in events(log) if e.get("event") == "update_published"}


def test_everyone_reconnects_after_a_broker_restart_and_nothing_confirmed_is_lost(tmp_path):
    reason = BrokerNode.unavailable_reason()
    if reason:
        if os.environ.get("CI"):
            pytest.fail(f"a throwaway RabbitMQ node cannot start: {reason}")
        pytest.skip(reason)
    with BrokerNode() as node:  # its own directory: the rabbitmq user must own it
        url = node.start()
        env = {
            **os.environ,
            "HELORA_AMQP_URL": url,
            "HELORA_FEDERATION": "restart",
            "HELORA_TORCH_THREADS": "1",
            "HELORA_MODEL__MAX_RANK": "4",
        }
        ckpt = tmp_path / "ckpt"
        agg = spawn(
            [
                "aggregator",
                "run",
                "--checkpoint-dir",
                str(ckpt),
                "--buffer-size",
                "2",
                "--buffer-timeout",
                "2",
            ],
            tmp_path / "agg.log",
            env,
        )
        workers = [
            spawn(
                [
                    "worker",
                    "run",
                    "--client-id",
                    f"w{i}",
                    "--rank",
                    str(r),
                    "--data",
                    str(data_dir() / "sst2"),
                    "--partition",
                    f"{i}/2",
                    "--outbox-dir",
                    str(tmp_path / "outbox"),
                    *TINY,
                ],
                tmp_path / f"w{i}.log",
                env,
            )
            for i, r in enumerate([2, 4])
        ]
        try:
            before = wait_version(ckpt, 2, [agg, *workers], timeout=180)
            node.restart()
            wait_version(ckpt, before + 3, [agg, *workers], timeout=240)
            stop(workers)
            sent = published_ids(tmp_path / "w0.log") | published_ids(tmp_path / "w1.log")
            deadline = time.monotonic() + 60  # the aggregator drains what was confirmed
            while time.monotonic() < deadline:
                ledger = load_checkpoint(
                    ckpt / json.loads((ckpt / "LATEST").read_text())["checkpoint"]
                ).ledger
                if sent <= set(ledger):
                    break
                time.sleep(0.5)
        finally:
            stop([*workers, agg])
        agg_log = (tmp_path / "agg.log").read_text()
        assert agg.returncode == 0, agg_log[-3000:]
        assert "broker_connection_lost" in agg_log
        for i in range(2):
            assert "broker_connection_lost" in (tmp_path / f"w{i}.log").read_text()
        assert sent and sent <= set(ledger), f"lost: {sorted(sent - set(ledger))[:5]}"
        status = json.loads((ckpt / "status.json").read_text())
        assert not any(k.startswith("rejected:") for k in status["counters"]), status
