"""Per-client broker credentials: one RabbitMQ user per federated client, allowed exactly this.

For client ``ID`` of federation ``FED`` (user name = client id, dots in names escaped):

    configure  ^$                               declare/delete nothing
    write      ^helora\\.FED\\.updates$          publish to the updates exchange only
    read       ^helora\\.FED\\.global\\.stream$  consume the global stream only
    topic permission on exchange helora.FED.updates:
      write    ^ID$                             routing key = its own id, nothing else
      read     ^$

The aggregator's own user (``add_aggregator``) gets configure, write and read on
``^helora\\.FED\\.(updates|dead|global|global\\.stream)$`` only, so it need not be an admin.

Publishing with AMQP property ``user_id`` = ID is then checked by the broker (a different
user_id is refused with 406), so the aggregator can trust ``Delivery.user_id``. The user has no
tags (in particular not ``impersonator``, which would lift the user_id check). See
docs/SECURITY.md for what each regex allows and forbids, and what is tested.

Two backends: ``rabbitmqctl`` (a local node; ``-n NODE`` for another one) and the management
HTTP API (``http(s)://admin:password@host:15672``). Passwords never appear on a command line,
in a log line or in an error: the password is hashed here (RabbitMQ's salted SHA-256 format) and
only the hash is sent, via ``rabbitmqctl import_definitions`` on stdin or an HTTP body.
"""

from __future__ import annotations

import base64
import json
import shutil
import ssl
import subprocess
import time
import urllib.error
import urllib.request
from typing import Any
from urllib.parse import quote, unquote, urlsplit, urlunsplit

import structlog

from helora.broker.grants import (
    HASHING_ALGORITHM,
    MIN_PASSWORD_CHARS,
    AdminBackend,
    BrokerAdminError,
    Grants,
    NewUser,
    aggregator_grants,
    check_name,
    client_grants,
    clients_of,
    generate_password,
    grants_of,
    password_hash,
)
from helora.shared.errors import ConfigError

__all__ = [
    "AdminBackend",
    "BrokerAdminError",
    "Grants",
    "ManagementBackend",
    "NewUser",
    "RabbitmqctlBackend",
    "add_aggregator",
    "add_client",
    "aggregator_grants",
    "backend_for",
    "client_grants",
    "clients_of",
    "grants_of",
    "list_clients",
    "remove_client",
]

log = structlog.get_logger(__name__)


# ---- backends ----


class RabbitmqctlBackend:
    """A node reachable by ``rabbitmqctl`` (root or the rabbitmq user on the broker host).

    ``env`` is passed to rabbitmqctl (e.g. ERL_EPMD_PORT for a node with its own epmd)."""

    def __init__(
        self,
        node: str | None = None,
        *,
        executable: str = "rabbitmqctl",
        env: dict[str, str] | None = None,
        timeout: float = 60.0,
        settle_timeout: float = 30.0,
    ) -> None:
        self.node = node
        self.executable = executable
        self.env = env
        self.timeout = timeout
        self.settle_timeout = settle_timeout

    def describe(self) -> str:
        return f"rabbitmqctl -n {self.node}" if self.node else "rabbitmqctl"

    def run(self, *args: str, input: bytes | None = None) -> str:
        """``rabbitmqctl -q [-n NODE] ARGS``; stdout, or BrokerAdminError. Never pass secrets in
        ``args`` (other local users can read a process's command line)."""
        cmd = [self.executable, "-q"] + (["-n", self.node] if self.node else []) + list(args)
        try:
            proc = subprocess.run(
                cmd, input=input, capture_output=True, env=self.env, timeout=self.timeout
            )
        except FileNotFoundError as exc:
            raise ConfigError(f"{self.executable} not found; use --management-url") from exc
        except subprocess.TimeoutExpired as exc:
            raise BrokerAdminError(f"{self.describe()} {args[0]} timed out") from exc
        if proc.returncode != 0:
            err = (proc.stderr or proc.stdout).decode(errors="replace").strip()
            raise BrokerAdminError(
                f"{self.describe()} {args[0]} failed (rc={proc.returncode}): {err[-800:]}"
            )
        return proc.stdout.decode(errors="replace")

    def _json(self, *args: str) -> list[dict[str, Any]]:
        out = self.run(*args, "--formatter", "json").strip()
        try:
            return list(json.loads(out or "[]"))
        except json.JSONDecodeError as exc:
            raise BrokerAdminError(f"{self.describe()} {args[0]}: unexpected output") from exc

    def vhost_exists(self, vhost: str) -> bool:
        return any(v.get("name") == vhost for v in self._json("list_vhosts", "name"))

    def user_exists(self, user: str) -> bool:
        return any(u.get("user") == user for u in self._json("list_users"))

    def create_user(self, grants: Grants, pw_hash: str) -> None:
        """One definitions import from stdin (no secret in argv), then wait until applied:
        ``rabbitmqctl import_definitions`` returns before the import is done."""
        g = grants
        definitions: dict[str, Any] = {
            "users": [
                {
                    "name": g.user,
                    "password_hash": pw_hash,
                    "hashing_algorithm": HASHING_ALGORITHM,
                    "tags": [],
                }
            ],
            "permissions": [
                {
                    "user": g.user,
                    "vhost": g.vhost,
                    "configure": g.configure,
                    "write": g.write,
                    "read": g.read,
                }
            ],
            "topic_permissions": [],
        }
        if g.exchange is not None:
            definitions["topic_permissions"].append(
                {
                    "user": g.user,
                    "vhost": g.vhost,
                    "exchange": g.exchange,
                    "write": g.topic_write,
                    "read": g.topic_read,
                }
            )
        self.run("import_definitions", "--format", "json", input=json.dumps(definitions).encode())
        deadline = time.monotonic() + self.settle_timeout
        while (found := grants_of(self, g.user, g.vhost, g.exchange)) != g:
            if time.monotonic() > deadline:
                raise BrokerAdminError(
                    f"{self.describe()}: the grants of {g.user!r} did not appear within "
                    f"{self.settle_timeout:.0f} s (found {found})"
                )
            time.sleep(0.2)

    def delete_user(self, user: str) -> None:
        self.run("delete_user", user)

    def permissions(self, vhost: str) -> list[dict[str, Any]]:
        return self._json("list_permissions", "-p", vhost)

    def topic_permissions(self, vhost: str) -> list[dict[str, Any]]:
        return self._json("list_topic_permissions", "-p", vhost)


class ManagementBackend:
    """The management plugin's HTTP API: ``http(s)://user:password@host:15672[/prefix]``.

    The admin credentials come from the URL and are sent as HTTP basic auth; https verifies the
    server with the system CAs (or ``ca_file``)."""

    def __init__(self, url: str, *, timeout: float = 15.0, ca_file: str | None = None) -> None:
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError("management URL must be http(s)://user:password@host:port")
        if parts.username is None or parts.password is None:
            raise ConfigError("management URL needs the admin user and password (user:pw@host)")
        netloc = parts.hostname + (f":{parts.port}" if parts.port else "")
        self.base = urlunsplit((parts.scheme, netloc, parts.path.rstrip("/"), "", ""))
        token = f"{unquote(parts.username)}:{unquote(parts.password)}".encode()
        self._auth = "Basic " + base64.b64encode(token).decode("ascii")
        self.timeout = timeout
        self._ssl = ssl.create_default_context(cafile=ca_file) if parts.scheme == "https" else None

    def describe(self) -> str:
        return f"management API at {self.base}"  # no credentials

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.base + path, data=data, method=method)
        req.add_header("Authorization", self._auth)
        req.add_header("Content-Type", "application/json")
        try:
            with urllib.request.urlopen(req, timeout=self.timeout, context=self._ssl) as resp:
                raw = resp.read()
        except urllib.error.HTTPError as exc:
            if exc.code == 404 and method == "GET":
                return None
            detail = exc.read().decode(errors="replace")[:300]
            if exc.code == 401:
                detail = "the management API refused the admin credentials"
            raise BrokerAdminError(
                f"{self.describe()}: {method} {path} -> {exc.code} {detail}"
            ) from None
        except (urllib.error.URLError, OSError) as exc:
            raise BrokerAdminError(f"cannot reach the {self.describe()}: {exc}") from None
        return json.loads(raw) if raw.strip() else None

    def vhost_exists(self, vhost: str) -> bool:
        return self._request("GET", f"/api/vhosts/{quote(vhost, safe='')}") is not None

    def user_exists(self, user: str) -> bool:
        return self._request("GET", f"/api/users/{quote(user, safe='')}") is not None

    def create_user(self, grants: Grants, pw_hash: str) -> None:
        g = grants
        user, vhost = quote(g.user, safe=""), quote(g.vhost, safe="")
        body = {"password_hash": pw_hash, "hashing_algorithm": HASHING_ALGORITHM, "tags": ""}
        self._request("PUT", f"/api/users/{user}", body)
        try:
            self._request(
                "PUT",
                f"/api/permissions/{vhost}/{user}",
                {"configure": g.configure, "write": g.write, "read": g.read},
            )
            if g.exchange is not None:
                self._request(
                    "PUT",
                    f"/api/topic-permissions/{vhost}/{user}",
                    {"exchange": g.exchange, "write": g.topic_write, "read": g.topic_read},
                )
        except BrokerAdminError:
            self.delete_user(g.user)  # no half-configured user left behind
            raise

    def delete_user(self, user: str) -> None:
        self._request("DELETE", f"/api/users/{quote(user, safe='')}")

    def permissions(self, vhost: str) -> list[dict[str, Any]]:
        return self._request("GET", f"/api/vhosts/{quote(vhost, safe='')}/permissions") or []

    def topic_permissions(self, vhost: str) -> list[dict[str, Any]]:
        path = f"/api/vhosts/{quote(vhost, safe='')}/topic-permissions"
        return self._request("GET", path) or []


def backend_for(
    *, node: str | None = None, management_url: str | None = None
) -> RabbitmqctlBackend | ManagementBackend:
    """The management API when a URL is given, else rabbitmqctl when it is on PATH."""
    if management_url:
        return ManagementBackend(management_url)
    if shutil.which("rabbitmqctl"):
        return RabbitmqctlBackend(node)
    raise ConfigError(
        "rabbitmqctl is not on PATH: run this on the broker host, or give --management-url "
        "http://admin:password@host:15672 (management plugin)"
    )


# ---- operations ----


def _create(backend: AdminBackend, grants: Grants, password: str | None, role: str) -> NewUser:
    if password is not None and len(password) < MIN_PASSWORD_CHARS:
        raise ConfigError(f"the password must have at least {MIN_PASSWORD_CHARS} characters")
    if not backend.vhost_exists(grants.vhost):
        raise ConfigError(f"vhost {grants.vhost!r} does not exist on the broker")
    if backend.user_exists(grants.user):
        raise ConfigError(
            f"a broker user {grants.user!r} exists already; remove it first (or pick another "
            "name): helora never overwrites a user"
        )
    generated = password is None
    secret = generate_password() if password is None else password
    backend.create_user(grants, password_hash(secret))
    log.info(
        "broker_user_added",
        role=role,
        user=grants.user,
        vhost=grants.vhost,
        via=backend.describe(),
        password="generated" if generated else "given",
    )
    return NewUser(grants, secret, generated)


def add_client(
    backend: AdminBackend,
    federation: str,
    client_id: str,
    *,
    password: str | None = None,
    vhost: str = "/",
) -> NewUser:
    """Create user ``client_id`` with exactly ``client_grants``. Refuses an existing user (so an
    admin such as guest can never be overwritten); the password is generated if not given."""
    return _create(backend, client_grants(federation, client_id, vhost), password, "client")


def add_aggregator(
    backend: AdminBackend,
    federation: str,
    user: str,
    *,
    password: str | None = None,
    vhost: str = "/",
) -> NewUser:
    """Create the aggregator's user with exactly ``aggregator_grants`` (so the aggregator need
    not run as an administrator such as guest)."""
    check_name(user, "user")
    return _create(backend, aggregator_grants(federation, user, vhost), password, "aggregator")


def remove_client(
    backend: AdminBackend, federation: str, client_id: str, *, vhost: str = "/"
) -> None:
    """Delete the client's user (and with it every grant; the broker closes its connections
    with 320 CONNECTION_FORCED). Refuses users that are not clients of this federation."""
    exchange = client_grants(federation, client_id, vhost).exchange
    if not any(g.user == client_id for g in clients_of(backend, federation, vhost)):
        raise ConfigError(
            f"{client_id!r} is not a client of federation {federation!r} in vhost {vhost!r} "
            f"(no topic permission on {exchange}); not deleting it"
        )
    backend.delete_user(client_id)
    log.info("broker_client_removed", client=client_id, federation=federation, vhost=vhost)


def list_clients(
    backend: AdminBackend, federation: str, *, vhost: str = "/"
) -> list[tuple[Grants, bool]]:
    """Every client user of the federation, with whether its grants are exactly the ones
    ``add_client`` sets (False: widened or edited by hand)."""
    out = []
    for found in clients_of(backend, federation, vhost):
        try:
            expected: Grants | None = client_grants(federation, found.user, vhost)
        except ConfigError:
            expected = None
        out.append((found, found == expected))
    return out
