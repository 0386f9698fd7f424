"""The `helora` command: thin typer wrappers that build settings once and hand them down."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import structlog
import typer

from helora.cli_admin import admin_app
from helora.cli_common import AmqpUrl, Federation, LogLevel, _fail, _ints, _settings
from helora.cli_ops import ops_app
from helora.cli_sim import simulate_command
from helora.shared.errors import HeloraError
from helora.shared.logging import configure_logging
from helora.study import study_command

app = typer.Typer(
    help="Asynchronous rank-heterogeneous federated LoRA (HeLoRA) over RabbitMQ.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
)
broker_app = typer.Typer(
    help="Declare or delete a federation's RabbitMQ topology.", no_args_is_help=True
)
aggregator_app = typer.Typer(help="The aggregator service.", no_args_is_help=True)
worker_app = typer.Typer(help="A federated client.", no_args_is_help=True)
app.add_typer(broker_app, name="broker")
broker_app.add_typer(admin_app)  # add-client, remove-client, list-clients, add-aggregator
app.registered_commands += ops_app.registered_commands  # bench, status
app.command("simulate")(simulate_command)
app.command("study")(study_command)
app.add_typer(aggregator_app, name="aggregator")
app.add_typer(worker_app, name="worker")
log = structlog.get_logger("helora.cli")


@broker_app.command("init")
def broker_init(
    amqp_url: AmqpUrl = None, federation: Federation = None, log_level: LogLevel = "info"
) -> None:
    """Declare the federation's exchanges and queues (idempotent)."""
    configure_logging(log_level)
    from helora.broker.connection import connect
    from helora.broker.topology import Topology, declare_topology

    try:
        s = _settings(amqp_url=amqp_url, federation=federation)
        conn = connect(
            s.amqp_url.get_secret_value(), attempts=s.connect_attempts, tls=s.tls.connect_kwargs()
        )
        topo = Topology(s.federation)
        declare_topology(conn.channel(), topo)
        conn.close()
    except HeloraError as exc:
        _fail(exc)
    typer.echo(
        f"declared federation {s.federation!r}: {topo.updates_exchange} (topic) -> "
        f"{topo.updates_queue}; {topo.global_exchange} (fanout) -> {topo.global_stream} "
        f"(stream); {topo.dead_exchange} -> {topo.dead_queue}"
    )


@broker_app.command("delete")
def broker_delete(
    amqp_url: AmqpUrl = None,
    federation: Federation = None,
    yes: Annotated[bool, typer.Option("--yes", help="Do not ask.")] = False,
) -> None:
    """Delete the federation's exchanges and queues, with the messages in them."""
    from helora.broker.connection import connect
    from helora.broker.topology import Topology, delete_topology

    s = _settings(amqp_url=amqp_url, federation=federation)
    if not yes and not typer.confirm(f"delete every queue of federation {s.federation!r}?"):
        raise typer.Exit(1)
    try:
        conn = connect(
            s.amqp_url.get_secret_value(), attempts=s.connect_attempts, tls=s.tls.connect_kwargs()
        )
        delete_topology(conn.channel(), Topology(s.federation))
        conn.close()
    except HeloraError as exc:
        _fail(exc)
    typer.echo(f"deleted federation {s.federation!r}")


@aggregator_app.command("run")
def aggregator_run(
    method: Annotated[
        str,
        typer.Option(help="pad (HeLoRA-Pad), kd (HeLoRA-KD), zeropad, fedavg, hetlora, flexlora."),
    ] = "pad",
    rank_levels: Annotated[
        str | None, typer.Option(help="KD: comma-separated slot ranks, e.g. 2,4,8.")
    ] = None,
    kd_data: Annotated[
        str | None, typer.Option(help="KD: dataset whose public split is distilled on.")
    ] = None,
    kd_steps: Annotated[
        int | None, typer.Option(help="KD: distillation steps per version.")
    ] = None,
    amqp_url: AmqpUrl = None,
    federation: Federation = None,
    checkpoint_dir: Annotated[
        Path | None, typer.Option(help="Where versions are checkpointed.")
    ] = None,
    num_labels: Annotated[
        int, typer.Option(help="Classes of the task (2 for SST-2, 4 for AG News).")
    ] = 2,
    max_rank: Annotated[int | None, typer.Option(help="Global max rank R.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha at rank R.")] = None,
    model: Annotated[
        str | None,
        typer.Option(help="Base model path or hub id (default: the packaged all-MiniLM-L6-v2)."),
    ] = None,
    buffer_size: Annotated[int | None, typer.Option(help="K: updates per version.")] = None,
    buffer_timeout: Annotated[
        float | None, typer.Option(help="Seconds before a partial buffer is applied.")
    ] = None,
    padding: Annotated[str | None, typer.Option(help="zero, mean, context or adjacent.")] = None,
    weighting: Annotated[str | None, typer.Option(help="data, rank or coverage.")] = None,
    beta: Annotated[float | None, typer.Option(help="Rank-weight exponent.")] = None,
    staleness: Annotated[str | None, typer.Option(help="polynomial, hinge or constant.")] = None,
    max_staleness: Annotated[
        int | None, typer.Option(help="u_max: older updates are rejected.")
    ] = None,
    server_lr: Annotated[float | None, typer.Option(help="eta: server learning rate.")] = None,
    allowed_ranks: Annotated[
        str | None, typer.Option(help="Comma-separated ranks allowed.")
    ] = None,
    wire_dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    log_level: LogLevel = "info",
) -> None:
    """Run the aggregator as a long-lived service (stop with SIGTERM or Ctrl-C)."""
    configure_logging(log_level)
    from helora.runtime import build_aggregator, set_torch_threads

    try:
        s = _settings(
            amqp_url=amqp_url,
            federation=federation,
            model=dict(max_rank=max_rank, lora_alpha=lora_alpha, model=model),
            aggregator=dict(
                method=method,
                checkpoint_dir=checkpoint_dir,
                buffer_size=buffer_size,
                buffer_timeout=buffer_timeout,
                padding=padding,
                weighting=weighting,
                beta=beta,
                staleness=staleness,
                max_staleness=max_staleness,
                server_lr=server_lr,
                allowed_ranks=_ints(allowed_ranks),
                rank_levels=_ints(rank_levels),
                kd_data=kd_data,
                kd_steps=kd_steps,
                wire_dtype=wire_dtype,
            ),
        )
        set_torch_threads(s.torch_threads)
        service = build_aggregator(s, num_labels)
        summary = service.run()
    except HeloraError as exc:
        _fail(exc)
    typer.echo(summary.line())


@worker_app.command("run")
def worker_run(
    client_id: Annotated[str, typer.Option(help="This client's id (routing key).")],
    rank: Annotated[int, typer.Option(help="This client's LoRA rank r <= R.")],
    data: Annotated[
        str, typer.Option(help="Dataset folder/file (SST-2 TSV, AG News CSV) or hub name.")
    ],
    partition: Annotated[str, typer.Option(help="I/N: this client's share of the data.")] = "0/1",
    scheme: Annotated[str | None, typer.Option(help="iid or dirichlet.")] = None,
    alpha: Annotated[float | None, typer.Option(help="Dirichlet concentration.")] = None,
    max_train: Annotated[int | None, typer.Option(help="Cap on the training pool.")] = None,
    steps: Annotated[int | None, typer.Option(help="E: local steps per update.")] = None,
    batch_size: Annotated[int | None, typer.Option(help="Local batch size.")] = None,
    lr: Annotated[float | None, typer.Option(help="Local learning rate.")] = None,
    slowness: Annotated[
        float | None, typer.Option(help=">= 1: idle (slowness-1) x train time.")
    ] = None,
    max_updates: Annotated[
        int | None, typer.Option(help="Stop after this many updates (0: never).")
    ] = None,
    outbox_dir: Annotated[Path | None, typer.Option(help="Unconfirmed updates live here.")] = None,
    wire_dtype: Annotated[str | None, typer.Option(help="float32, bfloat16 or float16.")] = None,
    max_rank: Annotated[int | None, typer.Option(help="Global max rank R.")] = None,
    lora_alpha: Annotated[float | None, typer.Option(help="LoRA alpha at rank R.")] = None,
    model: Annotated[str | None, typer.Option(help="Base model path or id.")] = None,
    max_length: Annotated[int | None, typer.Option(help="Token sequence length.")] = None,
    amqp_url: AmqpUrl = None,
    federation: Federation = None,
    log_level: LogLevel = "info",
) -> None:
    """Run one federated client until --max-updates or a signal."""
    configure_logging(log_level)
    from helora.runtime import build_worker, set_torch_threads

    try:
        s = _settings(
            amqp_url=amqp_url,
            federation=federation,
            model=dict(
                max_rank=max_rank, lora_alpha=lora_alpha, model=model, max_length=max_length
            ),
            worker=dict(
                client_id=client_id,
                rank=rank,
                data=data,
                partition=partition,
                scheme=scheme,
                alpha=alpha,
                max_train=max_train,
                steps=steps,
                batch_size=batch_size,
                lr=lr,
                slowness=slowness,
                max_updates=max_updates,
                outbox_dir=outbox_dir,
                wire_dtype=wire_dtype,
            ),
        )
        set_torch_threads(s.torch_threads)
        summary = build_worker(s).run()
    except HeloraError as exc:
        _fail(exc)
    typer.echo(
        f"worker {client_id} stopped: {summary.updates_sent} updates sent, "
        f"last global version {summary.last_version}"
    )


@app.command()
def demo(
    clients: Annotated[int, typer.Option(help="Number of worker processes.")] = 4,
    ranks: Annotated[
        str, typer.Option(help="Comma-separated rank per client (cycled).")
    ] = "2,4,8,8",
    versions: Annotated[int, typer.Option(help="Stop when the global reaches this version.")] = 6,
    data: Annotated[str, typer.Option(help="Dataset folder/file.")] = "../shared/data/sst2",
    report: Annotated[Path, typer.Option(help="Where to write the JSON report.")] = Path(
        "out/report.json"
    ),
    steps: Annotated[int, typer.Option(help="Local steps per update.")] = 30,
    lr: Annotated[float, typer.Option(help="Local learning rate.")] = 2e-3,
    buffer_size: Annotated[int, typer.Option(help="K: updates per version.")] = 2,
    slowness: Annotated[
        str, typer.Option(help="Comma-separated slowness per client (cycled).")
    ] = "1,1,1.5,2",
    scheme: Annotated[str, typer.Option(help="iid or dirichlet.")] = "iid",
    max_train: Annotated[int, typer.Option(help="Cap on the training pool.")] = 8000,
    eval_size: Annotated[int | None, typer.Option(help="Cap on the evaluation split.")] = None,
    timeout: Annotated[float, typer.Option(help="Give up after this many seconds.")] = 1200.0,
    amqp_url: AmqpUrl = None,
    log_level: LogLevel = "warning",
) -> None:
    """Run a local federation (aggregator + workers as processes) and report accuracy."""
    configure_logging(log_level)
    from helora.demo import DemoConfig, run_demo

    rank_list = _ints(ranks) or [8]
    slow_list = [float(x) for x in slowness.split(",") if x.strip()] or [1.0]
    cfg = DemoConfig(
        clients=clients,
        ranks=[rank_list[i % len(rank_list)] for i in range(clients)],
        slowness=[slow_list[i % len(slow_list)] for i in range(clients)],
        versions=versions,
        data=data,
        report=report,
        steps=steps,
        lr=lr,
        buffer_size=buffer_size,
        scheme=scheme,
        max_train=max_train,
        eval_size=eval_size,
        timeout=timeout,
    )
    try:
        result = run_demo(_settings(amqp_url=amqp_url), cfg)
    except HeloraError as exc:
        _fail(exc)
    typer.echo(
        f"accuracy {result['initial_accuracy']:.4f} -> {result['accuracy']:.4f} "
        f"(rank {result['max_rank']}); report written to {report}"
    )


def main() -> None:  # pragma: no cover
    app()
