"""`helora status`: what a federation looks like right now, from the broker and the aggregator.

- the current global version: the newest ``x-helora-version`` header on the global stream, read
  from offset "last" with a short timeout (the bodies are never decoded);
- the depth (and consumers) of the updates queue and the dead-letter queue (passive declares);
- optionally ``status.json`` from the aggregator's checkpoint directory (cumulative counters);
- optionally the aggregator's Prometheus endpoint, scraped for the ``helora_aggregator_*`` series;
- optionally the reasons of the last N dead letters: every dead letter is fetched with
  ``basic.get`` (no ack) up to ``scan_limit``, then all are nacked with requeue in one call, so
  nothing is removed (the classic queue puts them back in their original order).

Every part is independent: a part that fails (a federation that was never declared, a metrics
endpoint that does not answer) is reported as an error in its row and the others still run.
"""

from __future__ import annotations

import json
import urllib.error
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from helora.broker.connection import close_connection, connect
from helora.broker.consumer import DETAIL_HEADER, REASON_HEADER, GlobalSubscriber
from helora.broker.topology import Topology

METRIC_PREFIX = "helora_aggregator_"


def collect_status(
    url: str,
    federation: str,
    *,
    checkpoint_dir: Path | None = None,
    metrics_url: str | None = None,
    dead_letters: int = 0,
    scan_limit: int = 10_000,
    timeout: float = 2.0,
    connect_attempts: int = 2,
) -> dict[str, Any]:
    """Everything `helora status` shows, as a JSON-ready dict."""
    topo = Topology(federation)
    out: dict[str, Any] = {"federation": federation, "errors": {}}
    errors: dict[str, str] = out["errors"]
    conn = connect(url, attempts=connect_attempts, name="helora-status")
    try:
        out["queues"] = {}
        for label, queue in (("updates", topo.updates_queue), ("dead", topo.dead_queue)):
            out["queues"][label] = _broker_part(
                errors, f"queue {queue}", lambda q=queue: _queue_info(conn, q)
            )
        out["global_version"] = _broker_part(
            errors, "global stream", lambda: _global_version(conn, topo, timeout)
        )
        if dead_letters > 0:
            out["dead_letters"] = _broker_part(
                errors,
                "dead letters",
                lambda: peek_dead_letters(conn, topo, dead_letters, scan_limit),
            )
    finally:
        close_connection(conn)
    if checkpoint_dir is not None:
        out["aggregator_status"] = _read_status_json(Path(checkpoint_dir), errors)
    if metrics_url is not None:
        out["metrics"] = _scrape(metrics_url, timeout, errors)
    return out


def _broker_part(errors: dict[str, str], label: str, fn: Callable[[], Any]) -> Any:
    """Run one broker query; a broker-side refusal (e.g. 404 for a queue that does not exist)
    becomes an error entry. pika's exception classes cannot be named outside helora.broker, so
    they are recognised by their module; anything else is a bug and propagates."""
    try:
        return fn()
    except Exception as exc:
        if not type(exc).__module__.startswith("pika"):
            raise
        errors[label] = f"{type(exc).__name__}: {exc}"[:300]
        return None


def _queue_info(conn: Any, queue: str) -> dict[str, int]:
    ch = conn.channel()
    ok = ch.queue_declare(queue, passive=True)
    ch.close()
    return {"messages": int(ok.method.message_count), "consumers": int(ok.method.consumer_count)}


def _global_version(conn: Any, topo: Topology, timeout: float) -> int | None:
    """The newest version on the global stream, or None if nothing arrives within ``timeout``."""
    sub = GlobalSubscriber(conn, topo, offset="last")
    try:
        got = sub.wait_newer(-1, timeout=timeout, settle=0.1)
    finally:
        sub.close()
    return None if got is None else got[0]


def peek_dead_letters(conn: Any, topo: Topology, n: int, scan_limit: int) -> list[dict[str, Any]]:
    """The last ``n`` dead letters (oldest first) among the first ``scan_limit``; none removed."""
    ch = conn.channel()
    seen: list[dict[str, Any]] = []
    last_tag = None
    try:
        for _ in range(scan_limit):
            method, props, body = ch.basic_get(topo.dead_queue, auto_ack=False)
            if method is None:
                break
            last_tag = method.delivery_tag
            seen.append(_dead_letter_row(props, len(body)))
            del seen[:-n]
    finally:
        if ch.is_open:  # a 404 (no such queue) has closed it already
            if last_tag is not None:
                ch.basic_nack(delivery_tag=last_tag, multiple=True, requeue=True)
            ch.close()
    return seen


def _dead_letter_row(props: Any, size: int) -> dict[str, Any]:
    headers = dict(props.headers or {})
    reason = headers.get(REASON_HEADER)
    if reason is None:  # dead-lettered by RabbitMQ itself (e.g. the delivery limit)
        deaths = headers.get("x-death") or [{}]
        reason = f"x-death:{deaths[0].get('reason', 'unknown')}"
    return {
        "reason": _text(reason),
        "detail": _text(headers.get(DETAIL_HEADER, ""))[:200],
        "routing_key": _text(headers.get("x-helora-routing-key", "")),
        "message_id": props.message_id,
        "bytes": size,
    }


def _text(value: Any) -> str:
    return value.decode(errors="replace") if isinstance(value, bytes) else str(value)


def _read_status_json(root: Path, errors: dict[str, str]) -> dict[str, Any] | None:
    path = root / "status.json"
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        errors["status.json"] = f"{path}: {exc}"
        return None


def _scrape(url: str, timeout: float, errors: dict[str, str]) -> dict[str, float] | None:
    """``helora_aggregator_*`` counters and gauges from a Prometheus text endpoint (histogram
    series are left out: they are for dashboards)."""
    from prometheus_client.parser import text_string_to_metric_families

    if not url.rstrip("/").endswith("/metrics"):
        url = url.rstrip("/") + "/metrics"
    try:
        with urllib.request.urlopen(url, timeout=timeout) as resp:
            text = resp.read().decode()
    except (OSError, urllib.error.URLError) as exc:
        errors["metrics"] = f"{url}: {exc}"
        return None
    out: dict[str, float] = {}
    for family in text_string_to_metric_families(text):
        if not family.name.startswith(METRIC_PREFIX) or family.type not in ("counter", "gauge"):
            continue
        for sample in family.samples:
            if sample.name.endswith("_created"):
                continue
            labels = ",".join(f'{k}="{v}"' for k, v in sorted(sample.labels.items()))
            name = sample.name[len(METRIC_PREFIX) :]
            out[f"{name}{{{labels}}}" if labels else name] = sample.value
    return out


def render(status: dict[str, Any]) -> Any:
    """A rich Table of the status dict."""
    from rich.table import Table

    table = Table(title=f"helora federation {status['federation']!r}", show_lines=False)
    table.add_column("what")
    table.add_column("value", overflow="fold")
    version = status.get("global_version")
    if version is None:
        version = "?" if "global stream" in status.get("errors", {}) else "none published"
    table.add_row("global version", str(version))
    for label, info in (status.get("queues") or {}).items():
        value = (
            "?" if info is None else f"{info['messages']} messages, {info['consumers']} consumers"
        )
        table.add_row(f"{label} queue", value)
    agg = status.get("aggregator_status")
    if agg:
        table.add_section()
        table.add_row("status.json version", str(agg.get("version")))
        for key, value in sorted((agg.get("counters") or {}).items()):
            table.add_row(f"  {key}", str(value))
        table.add_row("  buffered, not applied", str(agg.get("buffered_not_applied", "?")))
        hist = agg.get("staleness_hist") or {}
        if hist:
            table.add_row("  staleness histogram", json.dumps(hist))
    metrics = status.get("metrics")
    if metrics:
        table.add_section()
        for key, value in sorted(metrics.items()):
            table.add_row(f"metric {key}", f"{value:g}")
    dead = status.get("dead_letters")
    if dead is not None:
        table.add_section()
        table.add_row("last dead letters", str(len(dead)) if dead else "none")
        for row in dead:
            detail = f" ({row['detail']})" if row["detail"] else ""
            table.add_row(
                f"  {row['routing_key'] or '?'} {row['message_id'] or ''}".rstrip(),
                f"{row['reason']}{detail}",
            )
    for where, err in (status.get("errors") or {}).items():
        table.add_row(f"[red]error: {where}[/red]", err)
    return table
