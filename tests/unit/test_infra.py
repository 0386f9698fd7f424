"""infra/ is checked like code: the compose file's structure, its ${VAR:-default} interpolations,
the Dockerfile against pyproject's package map, and rabbitmq.conf against the codec's limits.

`docker compose config -q` validates the compose file without an engine when the compose plugin
is installed; it is run if available and skipped (with the reason) otherwise.
"""

from __future__ import annotations

import re
import shutil
import subprocess
import tomllib
from pathlib import Path, PurePosixPath

import pytest
import yaml

from helora.shared.wire import WireLimits

REPO = Path(__file__).resolve().parents[2]
INFRA = REPO / "infra"
COMPOSE = INFRA / "compose.yaml"
# ${NAME}, ${NAME:-default}, ${NAME-default}, ${NAME:?err}, ${NAME?err}, ${NAME:+alt}, ${NAME+alt}
INTERPOLATION = re.compile(r"\$\{[A-Za-z_][A-Za-z0-9_]*(?:(?::?[-?+])[^${}]*)?\}")
CONF_LINE = re.compile(r"^([a-z0-9_]+(?:\.[a-z0-9_]+)*)\s*=\s*(\S.*)$")


@pytest.fixture(scope="module")
def compose() -> dict:
    doc = yaml.safe_load(COMPOSE.read_text())
    assert isinstance(doc, dict)
    return doc


@pytest.fixture(scope="module")
def services(compose) -> dict:
    return compose["services"]


def package_dirs() -> dict[str, str]:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    return pyproject["tool"]["setuptools"]["package-dir"]


def depends(service: dict) -> dict[str, dict]:
    """depends_on in either syntax, as {service: options}."""
    dep = service.get("depends_on", {})
    return {name: {} for name in dep} if isinstance(dep, list) else dict(dep)


def test_services_exist_with_images_or_builds(services):
    assert {"rabbitmq", "aggregator", "worker"} <= set(services)
    assert str(services["rabbitmq"]["image"]).startswith("rabbitmq:")
    for name in ("aggregator", "worker"):
        build = services[name]["build"]
        dockerfile = (INFRA / build["context"] / build["dockerfile"]).resolve()
        assert dockerfile == (INFRA / "Dockerfile").resolve() and dockerfile.is_file(), name


def test_broker_has_a_healthcheck_and_the_aggregator_waits_for_it(services):
    hc = services["rabbitmq"]["healthcheck"]
    assert hc["test"][0] in ("CMD", "CMD-SHELL") and len(hc["test"]) > 1
    for key in ("interval", "timeout"):
        assert re.fullmatch(r"\d+(ms|s|m)", str(hc[key])), key
    assert int(hc["retries"]) >= 1
    assert depends(services["aggregator"])["rabbitmq"].get("condition") == "service_healthy"
    worker_deps = depends(services["worker"])
    assert "aggregator" in worker_deps or "rabbitmq" in worker_deps


def test_named_volumes_are_declared_and_bind_mounts_exist(compose, services):
    declared = set(compose.get("volumes") or {})
    used = set()
    for name, svc in services.items():
        for vol in svc.get("volumes", []):
            source = vol.split(":")[0] if isinstance(vol, str) else vol["source"]
            if source.startswith("${"):
                continue  # a path chosen by the user (checked for syntax below)
            if source.startswith((".", "/")):
                assert (INFRA / source).exists(), f"{name}: bind mount {source} is missing"
            else:
                used.add(source)
    assert used <= declared, f"undeclared named volumes: {used - declared}"
    assert declared <= used, f"declared but unused volumes: {declared - used}"


def test_aggregator_checkpoints_land_on_a_volume(services):
    agg = services["aggregator"]
    cmd = agg["command"]
    ckpt = cmd[cmd.index("--checkpoint-dir") + 1]
    targets = [v.split(":")[1] for v in agg["volumes"] if isinstance(v, str)]
    assert any(PurePosixPath(ckpt).is_relative_to(t) for t in targets), (ckpt, targets)


def test_every_interpolation_is_well_formed():
    text = COMPOSE.read_text()
    without_escapes = text.replace("$$", "")
    for lineno, line in enumerate(without_escapes.splitlines(), 1):
        rest = INTERPOLATION.sub("", line)
        assert "$" not in rest, f"compose.yaml:{lineno}: use ${{VAR:-default}}: {line.strip()}"
    assert INTERPOLATION.search(text), "expected ${VAR:-default} settings in compose.yaml"
    for match in re.finditer(r"\$\{([A-Za-z_]\w*):-([^}]*)\}", text):
        assert match.group(2), f"{match.group(0)}: empty default"


def test_services_agree_on_broker_credentials_and_federation(services):
    env = {n: services[n].get("environment", {}) for n in services}
    user = env["rabbitmq"]["RABBITMQ_DEFAULT_USER"]
    password = env["rabbitmq"]["RABBITMQ_DEFAULT_PASS"]
    for name in ("aggregator", "worker"):
        url = env[name]["HELORA_AMQP_URL"]
        assert url.startswith(f"amqp://{user}:{password}@rabbitmq:5672/"), name
    assert env["aggregator"]["HELORA_FEDERATION"] == env["worker"]["HELORA_FEDERATION"]


def test_dockerfile_copies_every_package_folder():
    text = (INFRA / "Dockerfile").read_text()
    copied = set()
    for line in text.splitlines():
        parts = line.split()
        if parts[:1] == ["COPY"]:
            copied.update(p.rstrip("/") for p in parts[1:-1] if not p.startswith("--"))
    folders = set(package_dirs().values())
    assert folders == {"helora", "shared", "broker", "aggregator", "worker"}
    assert folders <= copied, f"not copied: {folders - copied}"
    assert "pyproject.toml" in copied
    for src in copied:
        assert (REPO / src).exists(), src


def parse_conf(path: Path) -> dict[str, str]:
    out: dict[str, str] = {}
    for lineno, raw in enumerate(path.read_text().splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        m = CONF_LINE.match(line)
        assert m, f"{path.name}:{lineno}: not `key = value`: {raw!r}"
        assert m.group(1) not in out, f"{path.name}:{lineno}: {m.group(1)} set twice"
        out[m.group(1)] = m.group(2).strip()
    return out


def test_rabbitmq_conf_is_key_value_and_fits_the_codec():
    conf = parse_conf(INFRA / "rabbitmq.conf")
    size = int(conf["max_message_size"])
    assert WireLimits().max_message_bytes <= size <= 512 * 2**20  # 3.x accepts up to 512 MiB
    assert int(conf["consumer_timeout"]) >= 60_000  # ms; far above --buffer-timeout
    assert int(conf["listeners.tcp.default"].rsplit(":", 1)[-1]) == 5672
    assert conf["loopback_users.guest"] in ("true", "false")


def test_enabled_plugins_is_an_erlang_list():
    text = (INFRA / "enabled_plugins").read_text().strip()
    m = re.fullmatch(r"\[\s*([a-z_]+(?:\s*,\s*[a-z_]+)*)?\s*\]\s*\.", text)
    assert m, text
    plugins = [p.strip() for p in (m.group(1) or "").split(",") if p.strip()]
    assert plugins and all(p.startswith("rabbitmq_") for p in plugins), plugins
    assert len(set(plugins)) == len(plugins), plugins


def compose_command() -> list[str] | None:
    """`docker compose` (plugin) or `docker-compose`, whichever answers; None if neither."""
    candidates = []
    if shutil.which("docker"):
        candidates.append(["docker", "compose"])
    if shutil.which("docker-compose"):
        candidates.append(["docker-compose"])
    for cmd in candidates:
        try:
            probe = subprocess.run([*cmd, "version"], capture_output=True, text=True, timeout=20)
        except (OSError, subprocess.TimeoutExpired):
            continue
        if probe.returncode == 0 and "compose" in (probe.stdout + probe.stderr).lower():
            return cmd
    return None


def test_docker_compose_config_validates():
    cmd = compose_command()
    if cmd is None:
        pytest.skip(
            "no compose implementation here (`docker compose` is not a command of this docker "
            "client and there is no docker-compose); `config -q` needs no engine, only the plugin"
        )
    proc = subprocess.run(
        [*cmd, "-f", str(COMPOSE), "config", "-q"], capture_output=True, text=True, timeout=60
    )
    assert proc.returncode == 0, proc.stderr
