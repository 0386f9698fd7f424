"""Option types and small helpers shared by the CLI modules (cli.py, cli_ops.py)."""

from __future__ import annotations

from typing import Annotated, Any

import typer

from helora.shared.settings import Settings, load_settings

AmqpUrl = Annotated[
    str | None,
    typer.Option(
        "--amqp-url",
        envvar="HELORA_AMQP_URL",
        help="AMQP URL (default: amqp://guest:guest@127.0.0.1:5672/%2F).",
    ),
]
Federation = Annotated[
    str | None,
    typer.Option(help="Federation name; prefixes every queue.", envvar="HELORA_FEDERATION"),
]
LogLevel = Annotated[str, typer.Option(help="debug, info, warning or error.")]


def _settings(**overrides: Any) -> Settings:
    return load_settings(**overrides)


def _fail(exc: Exception) -> None:
    typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
    raise typer.Exit(2)


def _ints(text: str | None) -> list[int] | None:
    if text is None:
        return None
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None
