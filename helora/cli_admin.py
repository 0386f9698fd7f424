"""`helora broker add-client | remove-client | list-clients`: per-client broker credentials.

Thin wrappers over helora.broker.admin (registered under `helora broker` by helora/cli.py).
The password of a new client goes to stdout alone (so `PW=$(helora broker add-client c7)`
works); everything else goes to stderr. It is shown once and never logged.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Annotated

import typer

from helora.shared.errors import HeloraError
from helora.shared.logging import configure_logging

if TYPE_CHECKING:
    from helora.broker.admin import ManagementBackend, NewUser, RabbitmqctlBackend

admin_app = typer.Typer(
    help="Per-client RabbitMQ users: publish only their own updates, read only the global.",
    no_args_is_help=True,
)

ClientId = Annotated[
    str, typer.Argument(help="Client id = broker user name = routing key ([A-Za-z0-9_.-]).")
]
Federation = Annotated[
    str,
    typer.Option(help="Federation name; prefixes every queue.", envvar="HELORA_FEDERATION"),
]
Vhost = Annotated[str, typer.Option(help="RabbitMQ virtual host.")]
Node = Annotated[
    str | None,
    typer.Option(help="rabbitmqctl node name (-n), e.g. rabbit@host; default: the local one."),
]
ManagementUrl = Annotated[
    str | None,
    typer.Option(
        "--management-url",
        envvar="HELORA_MANAGEMENT_URL",
        help="Use the management HTTP API instead of rabbitmqctl: "
        "http(s)://admin:password@host:15672 (needs the rabbitmq_management plugin).",
    ),
]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning or error.")]


def _backend(
    node: str | None, management_url: str | None
) -> RabbitmqctlBackend | ManagementBackend:
    from helora.broker.admin import backend_for

    return backend_for(node=node, management_url=management_url)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


@admin_app.command(
    "add-client",
    help="Create broker user CLIENT_ID: it may publish to the federation's updates exchange "
    "with routing key CLIENT_ID only (and must set user_id=CLIENT_ID), read the global stream, "
    "and configure nothing. Refuses a user name that exists already. The generated password "
    "is printed once, alone on stdout.",
)
def add_client_cmd(
    client_id: ClientId,
    password: Annotated[
        str | None,
        typer.Option(
            help="The client's password (at least 12 characters). Default: a generated one, "
            "printed once. A password on the command line ends up in the shell history.",
        ),
    ] = None,
    federation: Federation = "default",
    vhost: Vhost = "/",
    node: Node = None,
    management_url: ManagementUrl = None,
    log_level: LogLevel = "warning",
) -> None:
    configure_logging(log_level)
    from helora.broker.admin import add_client

    try:
        new = add_client(
            _backend(node, management_url), federation, client_id, password=password, vhost=vhost
        )
    except HeloraError as exc:
        _fail(exc)
        return
    p = new.grants
    typer.echo(
        f"added client {client_id!r} to federation {federation!r} (vhost {vhost!r})\n"
        f"  publish: exchange {p.exchange}, routing key exactly {client_id!r} "
        f"(topic regex {p.topic_write}), AMQP user_id {client_id!r}\n"
        f"  read:    {p.read}\n"
        f"  configure: nothing ({p.configure})\n"
        f"  worker:  HELORA_AMQP_URL=amqp://{client_id}:<password>@<host>:5672/<vhost> "
        f"HELORA_WORKER__CLIENT_ID={client_id}",
        err=True,
    )
    _show_generated_password(new)


@admin_app.command(
    "remove-client",
    help="Delete broker user CLIENT_ID and every grant it has; the broker closes its open "
    "connections at once. Refuses users that are not clients of the federation.",
)
def remove_client_cmd(
    client_id: ClientId,
    federation: Federation = "default",
    vhost: Vhost = "/",
    node: Node = None,
    management_url: ManagementUrl = None,
    log_level: LogLevel = "warning",
) -> None:
    configure_logging(log_level)
    from helora.broker.admin import remove_client

    try:
        remove_client(_backend(node, management_url), federation, client_id, vhost=vhost)
    except HeloraError as exc:
        _fail(exc)
        return
    typer.echo(f"removed client {client_id!r} from federation {federation!r} (vhost {vhost!r})")


@admin_app.command(
    "list-clients",
    help="List the federation's client users (those with a topic permission on its updates "
    "exchange) and whether their grants are exactly what add-client sets.",
)
def list_clients_cmd(
    federation: Federation = "default",
    vhost: Vhost = "/",
    node: Node = None,
    management_url: ManagementUrl = None,
    log_level: LogLevel = "warning",
) -> None:
    configure_logging(log_level)
    from helora.broker.admin import list_clients

    try:
        clients = list_clients(_backend(node, management_url), federation, vhost=vhost)
    except HeloraError as exc:
        _fail(exc)
        return
    if not clients:
        typer.echo(f"no clients in federation {federation!r} (vhost {vhost!r})", err=True)
        return
    for c, exact in clients:
        state = "ok" if exact else "DIFFERS from add-client's grants"
        typer.echo(
            f"{c.user}\t{state}\tconfigure={c.configure} write={c.write} read={c.read} "
            f"topic_write={c.topic_write} topic_read={c.topic_read}"
        )


@admin_app.command(
    "add-aggregator",
    help="Create broker user USER for the federation's aggregator: it may declare, delete, "
    "publish to, read and bind the federation's own exchanges and queues, nothing else, so "
    "the aggregator need not run as an administrator. The generated password is printed "
    "once, alone on stdout.",
)
def add_aggregator_cmd(
    user: Annotated[str, typer.Argument(help="Broker user name for the aggregator.")],
    password: Annotated[
        str | None,
        typer.Option(
            help="Its password (at least 12 characters). Default: generated, printed once."
        ),
    ] = None,
    federation: Federation = "default",
    vhost: Vhost = "/",
    node: Node = None,
    management_url: ManagementUrl = None,
    log_level: LogLevel = "warning",
) -> None:
    configure_logging(log_level)
    from helora.broker.admin import add_aggregator

    try:
        new = add_aggregator(
            _backend(node, management_url), federation, user, password=password, vhost=vhost
        )
    except HeloraError as exc:
        _fail(exc)
        return
    typer.echo(
        f"added aggregator user {user!r} for federation {federation!r} (vhost {vhost!r}): "
        f"configure/write/read {new.grants.configure}",
        err=True,
    )
    _show_generated_password(new)


def _show_generated_password(new: NewUser) -> None:
    """A generated password goes alone to stdout, once (the notes go to stderr)."""
    if new.generated:
        typer.echo("password (shown only this once; store it now):", err=True)
        typer.echo(new.password)
