"""Aggregator and workers as real processes against the broker, with a tiny configuration.

Checks: the version advances, updates are applied, nothing is dead-lettered, the checkpoint
loads with peft, and a worker started late receives the current global at once.
"""

from __future__ import annotations

import json
import os
import time

import pytest

from helora.broker.connection import close_connection, connect
from helora.broker.consumer import GlobalSubscriber
from helora.broker.topology import Topology, declare_topology
from tests.conftest import data_dir
from tests.e2e.procs import TINY, events, spawn, stop

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


def test_two_workers_federate_and_a_late_worker_gets_the_current_global(
    amqp_url, federation, tmp_path
):
    sst2 = data_dir() / "sst2"
    env = {
        **os.environ,
        "HELORA_AMQP_URL": amqp_url,
        "HELORA_FEDERATION": federation,
        "HELORA_TORCH_THREADS": "1",
        "HELORA_MODEL__MAX_RANK": "4",
    }
    ckpt = tmp_path / "ckpt"
    conn = connect(amqp_url, attempts=3)
    topo = Topology(federation)
    declare_topology(conn.channel(), topo)
    sub = GlobalSubscriber(conn, topo, offset="first")
    agg = spawn(
        [
            "aggregator",
            "run",
            "--method",
            "pad",
            "--checkpoint-dir",
            str(ckpt),
            "--buffer-size",
            "2",
            "--buffer-timeout",
            "60",
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
                str(sst2),
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
    procs = [*workers, agg]
    try:
        version = -1
        deadline = time.monotonic() + 240
        while version < 3 and time.monotonic() < deadline:
            got = sub.wait_newer(version, timeout=1.0, settle=0.0)
            if got:
                version = got[0]
            assert all(p.poll() is None for p in procs), "a process died; see its log"
        assert version >= 3, f"global stuck at version {version}"

        late_log = tmp_path / "late.log"
        late = spawn(
            [
                "worker",
                "run",
                "--client-id",
                "late",
                "--rank",
                "2",
                "--data",
                str(sst2),
                "--partition",
                "0/2",
                "--max-updates",
                "1",
                "--outbox-dir",
                str(tmp_path / "outbox"),
                *TINY,
            ],
            late_log,
            env,
        )
        procs.insert(0, late)
        assert late.wait(timeout=120) == 0, late_log.read_text()[-2000:]
        received = [e for e in events(late_log) if e.get("event") == "global_received"]
        current_at_join = sub.wait_newer(-1, timeout=0.1, settle=0.5)
        assert received, late_log.read_text()[-2000:]
        # it trained from the version that was current when it joined (>= 3), not from v0
        assert received[0]["version"] >= 3
        assert current_at_join is not None
    finally:
        stop(procs)
    assert agg.returncode == 0, (tmp_path / "agg.log").read_text()[-3000:]

    status = json.loads((ckpt / "status.json").read_text())
    assert status["counters"].get("applied", 0) >= 6
    assert not any(k.startswith("rejected:") for k in status["counters"]), status
    ch = conn.channel()
    assert ch.queue_declare(topo.dead_queue, passive=True).method.message_count == 0
    sub.close()
    close_connection(conn)

    # the final checkpoint is a PEFT adapter directory
    from peft import PeftModel
    from transformers import AutoModelForSequenceClassification

    from helora.worker.model import default_model_path, quiet_transformers

    quiet_transformers()
    base = AutoModelForSequenceClassification.from_pretrained(default_model_path(), num_labels=2)
    model = PeftModel.from_pretrained(base, status["checkpoint"])
    assert model.peft_config["default"].r == 4
