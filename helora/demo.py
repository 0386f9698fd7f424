"""`helora demo`: a real local federation of processes against the broker.

Starts one aggregator and N workers (each a `python -m helora ...` process with its own log file),
follows the global stream to show live progress, stops everything with SIGTERM once the global
reaches the requested version, then evaluates the initial and final global adapters on the
held-out split at every client rank and writes a JSON report.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import structlog
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from helora.broker.connection import close_connection, connect
from helora.broker.consumer import GlobalSubscriber
from helora.broker.topology import Topology, declare_topology, delete_topology
from helora.localbroker import ensure_broker
from helora.runtime import evaluate_adapter, set_torch_threads
from helora.shared.errors import HeloraError
from helora.shared.settings import Settings
from helora.shared.wire import decode_global

log = structlog.get_logger(__name__)
console = Console(stderr=True)


@dataclass(frozen=True)
class DemoConfig:
    clients: int
    ranks: list[int]
    slowness: list[float]
    versions: int
    data: str
    report: Path
    steps: int = 30
    lr: float = 2e-3
    buffer_size: int = 2
    scheme: str = "iid"
    max_train: int = 8000
    eval_size: int | None = None
    timeout: float = 1200.0
    max_rank: int | None = None


def run_demo(settings: Settings, cfg: DemoConfig) -> dict[str, Any]:
    from helora.worker.data import load_federated_data

    started = time.monotonic()
    url = settings.amqp_url.get_secret_value()
    how, url = ensure_broker(url)
    console.print(f"broker: {how}")
    max_rank = cfg.max_rank or max(settings.model.max_rank, *cfg.ranks)
    data = load_federated_data(cfg.data, max_train=cfg.max_train, eval_size=cfg.eval_size)
    fed = f"demo-{uuid.uuid4().hex[:8]}"
    out = cfg.report.parent / fed
    (out / "logs").mkdir(parents=True, exist_ok=True)
    topo = Topology(fed)
    conn = connect(url, name="helora-demo")
    declare_topology(conn.channel(), topo)
    subscriber = GlobalSubscriber(conn, topo, offset="first")  # sees version 0 too
    env = {
        **os.environ,
        "HELORA_AMQP_URL": url,
        "HELORA_FEDERATION": fed,
        "HELORA_TORCH_THREADS": "1",
        "HELORA_MODEL__MAX_RANK": str(max_rank),
    }
    procs = _start_processes(cfg, data.train.num_labels, out, env)
    console.print(
        f"federation {fed}: aggregator + {cfg.clients} workers, ranks {cfg.ranks}, "
        f"logs in {out / 'logs'}"
    )
    try:
        initial_body, final_version = _follow(subscriber, procs, cfg, out / "logs")
    finally:
        _stop_all(procs)
        subscriber.close()
        close_connection(conn)
    ckpt_dir = out / "checkpoints"
    status = json.loads((ckpt_dir / "status.json").read_text())
    final_ckpt = Path(status["checkpoint"])

    console.print("evaluating the initial and final global adapters on the held-out split ...")
    set_torch_threads(0)
    s = settings.model_copy(
        update={"model": settings.model.model_copy(update={"max_rank": max_rank})}
    )
    initial = decode_global(initial_body).slots[max_rank]
    from helora.aggregator.checkpoint import load_checkpoint

    final = load_checkpoint(final_ckpt)
    ranks = sorted(set(cfg.ranks) | {max_rank})
    ev = data.eval
    init_acc = evaluate_adapter(s, initial, ev.texts, ev.labels, ev.num_labels, [max_rank])
    per_rank = evaluate_adapter(s, final.adapter, ev.texts, ev.labels, ev.num_labels, ranks)
    counters = status["counters"]
    report = {
        "method": "pad",
        "dataset": data.name,
        "federation": fed,
        "clients": cfg.clients,
        "ranks": cfg.ranks,
        "max_rank": max_rank,
        "buffer_size": cfg.buffer_size,
        "global_version": final.version,
        "updates_applied": int(counters.get("applied", 0)),
        "updates_rejected": sum(v for k, v in counters.items() if k.startswith("rejected:")),
        "updates_stale": sum(v for k, v in status["staleness_hist"].items() if int(k) > 0),
        "updates_duplicate": int(counters.get("duplicate", 0)),
        "rejected_by_reason": {
            k.split(":", 1)[1]: v for k, v in counters.items() if k.startswith("rejected:")
        },
        "staleness_hist": status["staleness_hist"],
        "initial_accuracy": init_acc[max_rank],
        "accuracy": per_rank[max_rank],
        "per_rank_accuracy": {str(r): a for r, a in per_rank.items()},
        "eval_examples": len(ev),
        "wall_seconds": round(time.monotonic() - started, 1),
        "checkpoint_dir": str(final_ckpt),
    }
    cfg.report.parent.mkdir(parents=True, exist_ok=True)
    cfg.report.write_text(json.dumps(report, indent=2) + "\n")
    _print_table(report)
    _cleanup(url, topo)
    return report


def _start_processes(
    cfg: DemoConfig, num_labels: int, out: Path, env: dict[str, str]
) -> dict[str, subprocess.Popen]:
    helora = [sys.executable, "-m", "helora"]
    procs: dict[str, subprocess.Popen] = {}
    agg = [
        *helora,
        "aggregator",
        "run",
        "--method",
        "pad",
        "--checkpoint-dir",
        str(out / "checkpoints"),
        "--num-labels",
        str(num_labels),
        "--buffer-size",
        str(cfg.buffer_size),
        "--buffer-timeout",
        "120",
    ]
    procs["aggregator"] = _spawn(agg, out / "logs" / "aggregator.log", env)
    for i in range(cfg.clients):
        cmd = [
            *helora,
            "worker",
            "run",
            "--client-id",
            f"client-{i}",
            "--rank",
            str(cfg.ranks[i]),
            "--data",
            cfg.data,
            "--partition",
            f"{i}/{cfg.clients}",
            "--scheme",
            cfg.scheme,
            "--max-train",
            str(cfg.max_train),
            "--steps",
            str(cfg.steps),
            "--lr",
            str(cfg.lr),
            "--slowness",
            str(cfg.slowness[i]),
            "--outbox-dir",
            str(out / "outbox"),
        ]
        procs[f"client-{i}"] = _spawn(cmd, out / "logs" / f"client-{i}.log", env)
    return procs


def _spawn(cmd: list[str], log_path: Path, env: dict[str, str]) -> subprocess.Popen:
    f = open(log_path, "wb")  # noqa: SIM115 - closed when the process is reaped
    return subprocess.Popen(cmd, stdout=f, stderr=subprocess.STDOUT, env=env)


def _follow(
    subscriber: GlobalSubscriber, procs: dict[str, subprocess.Popen], cfg: DemoConfig, logs: Path
) -> tuple[bytes, int]:
    """Show progress until the global reaches cfg.versions; returns (version-0 body, version)."""
    deadline = time.monotonic() + cfg.timeout
    initial: bytes | None = None
    version = -1
    columns = [
        TextColumn("[bold]global version"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total}"),
        TimeElapsedColumn(),
        TextColumn("{task.description}"),
    ]
    with Progress(*columns, console=console, transient=False) as bar:
        task = bar.add_task("starting processes", total=cfg.versions)
        while version < cfg.versions:
            got = subscriber.wait_newer(version, timeout=1.0, settle=0.0)
            if got is not None:
                version, body = got
                if initial is None:
                    initial = body
                bar.update(task, completed=max(version, 0), description="training")
            dead = [n for n, p in procs.items() if p.poll() is not None]
            if dead:
                raise HeloraError(f"{', '.join(dead)} exited early; see {logs}/{dead[0]}.log")
            if time.monotonic() > deadline:
                raise HeloraError(f"timed out after {cfg.timeout:.0f} s at version {version}")
    assert initial is not None
    return initial, version


def _stop_all(procs: dict[str, subprocess.Popen]) -> None:
    """SIGTERM workers first, then the aggregator; SIGKILL what does not exit in time."""
    workers = [p for n, p in procs.items() if n != "aggregator"]
    for group in (workers, [procs["aggregator"]]):
        for p in group:
            if p.poll() is None:
                p.send_signal(signal.SIGTERM)
        for p in group:
            try:
                p.wait(timeout=60)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def _cleanup(url: str, topo: Topology) -> None:
    try:
        conn = connect(url, attempts=2, name="helora-demo-cleanup")
        delete_topology(conn.channel(), topo)
        conn.close()
    except HeloraError as exc:
        log.warning("demo_cleanup_failed", error=str(exc))


def _print_table(r: dict[str, Any]) -> None:
    t = Table(
        title=f"helora demo: HeLoRA-Pad on {r['dataset']}, {r['clients']} clients, "
        f"{r['global_version']} versions, {r['wall_seconds']} s"
    )
    t.add_column("adapter")
    t.add_column("rank", justify="right")
    t.add_column("accuracy", justify="right")
    t.add_row("initial global (v0)", str(r["max_rank"]), f"{r['initial_accuracy']:.4f}")
    for rank, acc in r["per_rank_accuracy"].items():
        t.add_row(f"final global (v{r['global_version']}) cut to rank", rank, f"{acc:.4f}")
    console.print(t)
    console.print(
        f"updates applied {r['updates_applied']}, stale {r['updates_stale']}, "
        f"rejected {r['updates_rejected']}, duplicates {r['updates_duplicate']}; "
        f"checkpoint {r['checkpoint_dir']}"
    )
