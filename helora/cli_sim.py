"""`helora simulate` (helora/simulate.py) and `helora study` (helora/study.py)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Annotated

import typer

from helora.shared.errors import ConfigError
from helora.sim_config import DEFAULT_DATA, SimConfig
from helora.simulate import run_simulation


def _parse_ints(text: str) -> tuple[int, ...]:
    try:
        return tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise typer.BadParameter(f"expected comma-separated integers, got {text!r}") from None


def simulate_command(
    method: Annotated[
        str, typer.Option(help="Aggregation method (pad, zeropad, kd, ...).")
    ] = "pad",
    data: Annotated[str, typer.Option(help="Dataset folder/file.")] = DEFAULT_DATA,
    mode: Annotated[str, typer.Option(help="async or sync (round barrier).")] = "async",
    seed: Annotated[int, typer.Option(help="Seed for partition, init, batches, speeds.")] = 0,
    clients: Annotated[int, typer.Option(help="Number of clients.")] = 6,
    ranks: Annotated[str, typer.Option(help="Client ranks, cycled over clients.")] = "2,4,8",
    scheme: Annotated[str, typer.Option(help="iid or dirichlet.")] = "iid",
    alpha: Annotated[float, typer.Option(help="Dirichlet concentration.")] = 0.5,
    steps: Annotated[int, typer.Option(help="Local steps E per update.")] = 20,
    lr: Annotated[float, typer.Option(help="Local AdamW learning rate.")] = 2e-3,
    buffer_size: Annotated[int, typer.Option(help="K updates per version (async).")] = 3,
    versions: Annotated[int, typer.Option(help="Stop after this many versions.")] = 8,
    padding: Annotated[str, typer.Option(help="zero, mean, context or adjacent.")] = "zero",
    weighting: Annotated[str, typer.Option(help="data, rank or coverage.")] = "rank",
    staleness: Annotated[str, typer.Option(help="polynomial, hinge or constant.")] = "polynomial",
    stragglers: Annotated[float, typer.Option(help="Fraction of straggler clients.")] = 0.34,
    straggler_factor: Annotated[float, typer.Option(help="Straggler slow-down.")] = 3.0,
    availability: Annotated[float, typer.Option(help="Long-run online fraction.")] = 1.0,
    max_length: Annotated[int, typer.Option(help="Token length.")] = 48,
    eval_size: Annotated[int, typer.Option(help="Held-out examples evaluated.")] = 400,
    target: Annotated[float | None, typer.Option(help="Accuracy for time-to-target.")] = None,
    out: Annotated[Path | None, typer.Option(help="Write the result JSON here.")] = None,
) -> None:
    """Simulate a federation in one process on a virtual clock (real training, real core)."""
    from rich.console import Console

    console = Console(stderr=True)
    try:
        cfg = SimConfig(
            method=method,
            data=data,
            mode=mode,
            seed=seed,
            num_clients=clients,
            ranks=_parse_ints(ranks),
            scheme=scheme,
            alpha=alpha,
            local_steps=steps,
            lr=lr,
            buffer_size=buffer_size,
            max_versions=versions,
            padding=padding,
            weighting=weighting,
            staleness=staleness,
            straggler_fraction=stragglers,
            straggler_factor=straggler_factor,
            availability=availability,
            max_length=max_length,
            eval_size=eval_size,
            target=target,
        )
        result = run_simulation(
            cfg, on_version=lambda v, t: console.print(f"version {v} at virtual t={t:.1f}")
        )
    except (ConfigError, ValueError) as exc:
        typer.secho(f"error: {exc}", fg=typer.colors.RED, err=True)
        raise typer.Exit(2) from None
    result.pop("log", None)
    text = json.dumps(result, indent=2)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    print(text)
