"""What a broker user may do: the grants of a federated client and of the aggregator, names
checked as regex literals, RabbitMQ's password hash, and reading grants back from a backend.

Pure policy, no I/O of its own: helora.broker.admin applies it through a backend (rabbitmqctl or
the management API). The permission model is explained in helora.broker.admin's docstring and in
docs/SECURITY.md.
"""

from __future__ import annotations

import base64
import hashlib
import os
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Protocol

from helora.broker.topology import Topology
from helora.shared.errors import ConfigError, HeloraError

NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")  # client ids and federations
_LITERAL = re.compile(r"[A-Za-z0-9_.-]+")  # names built from them (any length)
HASHING_ALGORITHM = "rabbit_password_hashing_sha256"
MIN_PASSWORD_CHARS = 12
GENERATED_PASSWORD_CHARS = 32  # 62 symbols: about 190 bits
_ALPHABET = string.ascii_letters + string.digits  # safe in URLs and shells, no escaping


class BrokerAdminError(HeloraError):
    """rabbitmqctl or the management API failed (the message never contains secrets)."""


@dataclass(frozen=True)
class Grants:
    """The permissions of one user in one vhost (as intended, or as found on the broker)."""

    user: str  # for a client: its client id
    vhost: str
    configure: str
    write: str
    read: str
    exchange: str | None = None  # the topic exchange of the topic permission (None: none)
    topic_write: str = ""
    topic_read: str = ""


@dataclass(frozen=True)
class NewUser:
    grants: Grants
    password: str = field(repr=False)  # show once, never log
    generated: bool = True


def regex_literal(name: str) -> str:
    """``name`` as an exact regex fragment. Names are ``[A-Za-z0-9_.-]``: only '.' is special
    (outside a character class '-' and '_' are literals)."""
    if not _LITERAL.fullmatch(name):
        raise ConfigError(f"name {name!r}: only letters, digits, '_', '.', '-' are allowed")
    return name.replace(".", r"\.")


def check_name(name: str, what: str) -> str:
    if not isinstance(name, str) or not NAME.match(name):
        raise ConfigError(f"{what} {name!r}: 1-64 of letters, digits, '_', '.', '-'")
    return name


def client_grants(federation: str, client_id: str, vhost: str = "/") -> Grants:
    """The exact permissions a client user gets (see the module docstring)."""
    check_name(federation, "federation")
    check_name(client_id, "client id")
    topo = Topology(federation)
    return Grants(
        user=client_id,
        vhost=vhost,
        configure="^$",
        write=f"^{regex_literal(topo.updates_exchange)}$",
        read=f"^{regex_literal(topo.global_stream)}$",
        exchange=topo.updates_exchange,
        topic_write=f"^{regex_literal(client_id)}$",
        topic_read="^$",
    )


def aggregator_grants(federation: str, user: str, vhost: str = "/") -> Grants:
    """The aggregator's permissions: configure, write and read the federation's own exchanges
    and queues (declare and delete the topology, consume updates, publish globals and
    dead-letters, bind), nothing of other federations or of the broker."""
    check_name(federation, "federation")
    names = rf"^helora\.{regex_literal(federation)}\.(updates|dead|global|global\.stream)$"
    return Grants(user=user, vhost=vhost, configure=names, write=names, read=names)


def generate_password() -> str:
    return "".join(secrets.choice(_ALPHABET) for _ in range(GENERATED_PASSWORD_CHARS))


def password_hash(password: str, salt: bytes | None = None) -> str:
    """RabbitMQ's stored form (rabbit_password_hashing_sha256): base64(salt + sha256(salt +
    password)), with a random 4-byte salt."""
    salt = os.urandom(4) if salt is None else salt
    digest = hashlib.sha256(salt + password.encode("utf-8")).digest()
    return base64.b64encode(salt + digest).decode("ascii")


class AdminBackend(Protocol):
    def describe(self) -> str: ...
    def vhost_exists(self, vhost: str) -> bool: ...
    def user_exists(self, user: str) -> bool: ...
    def create_user(self, grants: Grants, pw_hash: str) -> None: ...
    def delete_user(self, user: str) -> None: ...
    def permissions(self, vhost: str) -> list[dict[str, Any]]: ...
    def topic_permissions(self, vhost: str) -> list[dict[str, Any]]: ...


def _grants(
    perm: dict[str, Any], topic: dict[str, Any] | None, vhost: str, exchange: str | None
) -> Grants:
    return Grants(
        user=str(perm.get("user", topic.get("user") if topic else "")),
        vhost=vhost,
        configure=str(perm.get("configure", "")),
        write=str(perm.get("write", "")),
        read=str(perm.get("read", "")),
        exchange=exchange if topic is not None else None,
        topic_write=str(topic.get("write", "")) if topic else "",
        topic_read=str(topic.get("read", "")) if topic else "",
    )


def grants_of(
    backend: AdminBackend, user: str, vhost: str, exchange: str | None = None
) -> Grants | None:
    """What the broker has for ``user`` in ``vhost`` (its topic permission on ``exchange``
    included), or None if the user has no permissions there."""
    perm = next((p for p in backend.permissions(vhost) if p.get("user") == user), None)
    if perm is None:
        return None
    topic = None
    if exchange is not None:
        topic = next(
            (
                t
                for t in backend.topic_permissions(vhost)
                if t.get("user") == user and t.get("exchange") == exchange
            ),
            None,
        )
    return _grants(perm, topic, vhost, exchange)


def clients_of(backend: AdminBackend, federation: str, vhost: str = "/") -> list[Grants]:
    """The grants of every user with a topic permission on the federation's updates exchange
    (what makes a user a client of the federation), sorted by user."""
    exchange = Topology(check_name(federation, "federation")).updates_exchange
    topic = [t for t in backend.topic_permissions(vhost) if t.get("exchange") == exchange]
    if not topic:
        return []
    perms = {p.get("user"): p for p in backend.permissions(vhost)}
    out = [
        _grants(perms.get(t.get("user"), {"user": t.get("user")}), t, vhost, exchange)
        for t in topic
    ]
    return sorted(out, key=lambda g: g.user)
