"""Make sure a RabbitMQ broker answers: the configured one, else start one the machine allows.

Order: the broker at HELORA_AMQP_URL; a local `rabbitmq-server` (started detached, then awaited);
the RabbitMQ service of infra/compose.yaml when a Docker engine answers; otherwise a clear error
that says how to get one.
"""

from __future__ import annotations

import shutil
import subprocess
import time
from pathlib import Path

import structlog

from helora.broker.connection import broker_answers
from helora.shared.errors import BrokerUnavailable

log = structlog.get_logger(__name__)
COMPOSE_FILE = Path(__file__).resolve().parents[1] / "infra" / "compose.yaml"
HOW_TO = (
    "No RabbitMQ broker answers at {url}. Get one with any of:\n"
    "  - Debian/Ubuntu: apt-get install rabbitmq-server && rabbitmq-server -detached\n"
    "  - Docker: docker compose -f infra/compose.yaml up -d rabbitmq\n"
    "  - an existing broker: export HELORA_AMQP_URL=amqp://user:pass@host:5672/%2F"
)


COMPOSE_URL = "amqp://helora:helora@127.0.0.1:5672/%2F"  # the user infra/compose.yaml creates


def ensure_broker(url: str, *, wait: float = 90.0) -> tuple[str, str]:
    """(how, url): how the broker was found ("running", "rabbitmq-server", "docker") and the URL
    to use (the compose broker has its own user: guest cannot log in through Docker's ports)."""
    if broker_answers(url):
        return "running", url
    if shutil.which("rabbitmq-server"):
        log.info("starting_local_broker", how="rabbitmq-server -detached")
        subprocess.run(["rabbitmq-server", "-detached"], check=False, capture_output=True)
        if _await(url, wait):
            return "rabbitmq-server", url
    if shutil.which("docker") and _docker_engine_answers() and COMPOSE_FILE.exists():
        log.info("starting_local_broker", how="docker compose")
        subprocess.run(
            ["docker", "compose", "-f", str(COMPOSE_FILE), "up", "-d", "rabbitmq"], check=False
        )
        if _await(COMPOSE_URL, wait):
            return "docker", COMPOSE_URL
    raise BrokerUnavailable(HOW_TO.format(url=_redact(url)))


def _await(url: str, wait: float) -> bool:
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline:
        if broker_answers(url):
            return True
        time.sleep(1.0)
    return False


def _docker_engine_answers() -> bool:
    # `docker version` exits 0 without an engine; `docker info` does not.
    try:
        proc = subprocess.run(
            ["docker", "info", "--format", "{{.ServerVersion}}"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.TimeoutExpired):
        return False
    return proc.returncode == 0 and bool(proc.stdout.strip())


def _redact(url: str) -> str:
    if "@" in url and "://" in url:
        scheme, rest = url.split("://", 1)
        return f"{scheme}://***@{rest.split('@', 1)[1]}"
    return url
