"""`helora bench` and `helora status` (helora/bench*.py, helora/status.py)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from helora.cli_common import AmqpUrl, Federation, LogLevel, _fail, _settings
from helora.shared.errors import HeloraError
from helora.shared.logging import configure_logging

ops_app = typer.Typer()


@ops_app.command()
def bench(
    out: Annotated[Path, typer.Option(help="Where to write the JSON.")] = Path("out/bench.json"),
    data: Annotated[
        str, typer.Option(help="SST-2 folder for the accuracy part.")
    ] = "../shared/data/sst2",
    accuracy: Annotated[
        bool, typer.Option("--accuracy/--no-accuracy", help="Run the bf16 accuracy part.")
    ] = True,
    large: Annotated[
        bool, typer.Option("--large/--no-large", help="Include the 7B-class adapter.")
    ] = True,
    variants: Annotated[
        bool, typer.Option("--variants/--no-variants", help="Extra large runs (bf16, patched).")
    ] = True,
    small_messages: Annotated[int, typer.Option(help="MiniLM updates per ingest run.")] = 1000,
    large_messages: Annotated[int, typer.Option(help="7B-class updates per ingest run.")] = 32,
    memory_updates: Annotated[int, typer.Option(help="Updates per memory case.")] = 2000,
    amqp_url: AmqpUrl = None,
    log_level: LogLevel = "warning",
) -> None:
    """Measure ingest throughput vs raw RabbitMQ, wire bytes, stage costs, memory, bf16 accuracy."""
    configure_logging(log_level)
    from helora.bench import BenchConfig, run_bench
    from helora.bench_report import print_tables
    from helora.broker.connection import broker_answers

    s = _settings(amqp_url=amqp_url)
    url = s.amqp_url.get_secret_value()
    if not broker_answers(url):
        _fail(ConnectionError("no RabbitMQ broker answers; start one (`make broker`)"))
    cfg = BenchConfig(
        out=out,
        data=data,
        accuracy=accuracy,
        large=large,
        variants=variants,
        small_messages=small_messages,
        small_batch=min(200, small_messages),
        large_messages=large_messages,
        memory_updates=memory_updates,
        stage_updates_small=min(200, max(8, small_messages)),
    )
    try:
        result = run_bench(url, cfg)
    except HeloraError as exc:
        _fail(exc)
    print_tables(result)
    typer.echo(f"bench written to {out} in {result['seconds']:.0f} s")


@ops_app.command()
def status(
    amqp_url: AmqpUrl = None,
    federation: Federation = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="The aggregator's checkpoint dir (reads status.json).")
    ] = None,
    metrics_url: Annotated[
        str | None, typer.Option(help="The aggregator's metrics endpoint, e.g. http://h:9100.")
    ] = None,
    dead_letters: Annotated[
        int, typer.Option(help="Show the reasons of the last N dead letters (not removed).")
    ] = 0,
    timeout: Annotated[float, typer.Option(help="Seconds to wait for the global.")] = 2.0,
    json_output: Annotated[bool, typer.Option("--json", help="Print JSON instead.")] = False,
) -> None:
    """Show a federation: global version, queue depths, counters and recent dead letters.

    Exits 1 if some part could not be read (it is listed as an error), 2 if no broker answers."""
    configure_logging("error")
    import json

    from helora.status import collect_status, render

    try:
        s = _settings(amqp_url=amqp_url, federation=federation)
        result = collect_status(
            s.amqp_url.get_secret_value(),
            s.federation,
            checkpoint_dir=checkpoint_dir,
            metrics_url=metrics_url,
            dead_letters=dead_letters,
            timeout=timeout,
        )
    except HeloraError as exc:
        _fail(exc)
    if json_output:
        typer.echo(json.dumps(result, indent=1, sort_keys=True, default=str))
    else:
        from rich.console import Console

        Console().print(render(result))
    if result["errors"]:
        raise typer.Exit(1)  # something could not be read: the errors are in the output
