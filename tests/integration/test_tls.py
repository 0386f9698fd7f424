"""TLS (amqps://) against a throwaway RabbitMQ node that requires client certificates.

The node (tests/integration/broker_node.py) listens with TLS on its own port with
``ssl_options.verify = verify_peer`` and ``fail_if_no_peer_cert = true``; a CA, a server
certificate (SAN IP:127.0.0.1, DNS:localhost), a client certificate and an unrelated second CA
are made here with the openssl CLI. Without a throwaway node (no rabbitmq-server, not root) or
without openssl the node tests skip with the reason. The option parsing tests need neither.
"""

from __future__ import annotations

import secrets
import shutil
import ssl
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import quote

import pika
import pika.exceptions as pex
import pytest

from helora.broker.connection import connect, connection_parameters
from helora.broker.tls import TlsOptions, client_context, tls_options_for
from helora.shared.errors import BrokerUnavailable, ConfigError
from tests.integration.broker_node import BrokerNode, BrokerNodeError, TlsListener

# ---- certificates ----


@dataclass(frozen=True)
class Pki:
    ca: Path
    server_cert: Path
    server_key: Path
    client_cert: Path
    client_key: Path
    other_ca: Path


def _openssl(*args: str, cwd: Path) -> None:
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True, timeout=60)


def _ca(d: Path, name: str) -> None:
    _openssl(
        "req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.pem", "-days", "2", "-subj", f"/CN={name}",
        "-addext", "basicConstraints=critical,CA:TRUE",
        "-addext", "keyUsage=critical,keyCertSign,cRLSign",
        cwd=d,
    )  # fmt: skip


def _leaf(d: Path, name: str, ca: str, extensions: str) -> None:
    (d / f"{name}.ext").write_text(extensions)
    _openssl(
        "req", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes",
        "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", f"/CN={name}",
        cwd=d,
    )  # fmt: skip
    _openssl(
        "x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.pem", "-CAkey", f"{ca}.key",
        "-set_serial", str(secrets.randbits(62) + 1), "-days", "2",
        "-out", f"{name}.pem", "-extfile", f"{name}.ext",
        cwd=d,
    )  # fmt: skip


def make_pki(d: Path) -> Pki:
    _ca(d, "helora-test-ca")
    _ca(d, "other-ca")
    common = "basicConstraints=CA:FALSE\nkeyUsage=critical,digitalSignature,keyEncipherment\n"
    _leaf(
        d,
        "server",
        "helora-test-ca",
        common + "extendedKeyUsage=serverAuth\nsubjectAltName=IP:127.0.0.1,DNS:localhost\n",
    )
    _leaf(d, "client", "helora-test-ca", common + "extendedKeyUsage=clientAuth\n")
    return Pki(
        ca=d / "helora-test-ca.pem",
        server_cert=d / "server.pem",
        server_key=d / "server.key",
        client_cert=d / "client.pem",
        client_key=d / "client.key",
        other_ca=d / "other-ca.pem",
    )


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    if shutil.which("openssl") is None:
        pytest.skip("the openssl CLI is not installed (needed to make test certificates)")
    return make_pki(tmp_path_factory.mktemp("pki"))


TLS_VERSIONS = "ssl_options.versions.1 = tlsv1.3\nssl_options.versions.2 = tlsv1.2"


@pytest.fixture(scope="module")
def tls_node(pki: Pki) -> Iterator[BrokerNode]:
    """A throwaway node with a TLS listener requiring client certificates (~4 s + ~3.5 s)."""
    reason = BrokerNode.unavailable_reason()
    if reason:
        pytest.skip(f"cannot start a throwaway RabbitMQ node here: {reason}")
    node = BrokerNode()
    try:
        node.start(
            tls=TlsListener(pki.ca, pki.server_cert, pki.server_key),
            extra_config=TLS_VERSIONS,  # as docs/SECURITY.md recommends
        )
    except BrokerNodeError as exc:
        node.close()
        pytest.skip(f"the throwaway RabbitMQ node did not start: {exc}")
    try:
        yield node
    finally:
        node.close()  # stops the node and the epmd it started, even after failures


def _query_url(node: BrokerNode, **query: str) -> str:
    q = "&".join(f"{k}={quote(str(v), safe='')}" for k, v in query.items())
    return f"{node.tls_url}?{q}"


def _open(params: pika.URLParameters) -> None:
    conn = pika.BlockingConnection(params)
    try:
        assert conn.is_open
        ch = conn.channel()
        ch.queue_declare("", exclusive=True)  # a real AMQP round trip over TLS
    finally:
        conn.close()


def _causes(exc: BaseException) -> str:
    """Every message along the cause/context chain (pika wraps the ssl error)."""
    seen, parts = set(), []
    stack: list[BaseException | None] = [exc]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        parts.append(f"{type(e).__name__}: {e!r}")
        stack += [e.__cause__, e.__context__, *[a for a in e.args if isinstance(a, BaseException)]]
    return " | ".join(parts)


def _node_logged(node: BrokerNode, text: str, timeout: float = 5.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            if text.lower() in node.log_file.read_text(errors="replace").lower():
                return True
        except OSError:
            pass
        time.sleep(0.1)
    return False


# A refused TLS connection surfaces as: the ssl error itself (pika re-raises certificate
# verification failures unwrapped from BlockingConnection, so they pass through connect), or
# connect's BrokerUnavailable/ConfigError around pika's AMQPConnectionError (stream lost).
REFUSED = (ssl.SSLError, pex.AMQPConnectionError, BrokerUnavailable, ConfigError)

# ---- TLS against the node ----


@pytest.mark.integration
def test_connect_over_amqps_with_client_certificate_from_the_url(tls_node: BrokerNode, pki: Pki):
    url = _query_url(tls_node, cacertfile=pki.ca, certfile=pki.client_cert, keyfile=pki.client_key)
    conn = connect(url, attempts=1, name="helora-tls-test")  # helora's connect, unchanged API
    try:
        assert conn.is_open
        conn.channel().queue_declare("", exclusive=True)
    finally:
        conn.close()


@pytest.mark.integration
def test_connect_with_keyword_tls_settings_and_dns_name(tls_node: BrokerNode, pki: Pki):
    _open(
        connection_parameters(
            tls_node.tls_url,
            tls_ca=str(pki.ca),
            tls_cert=str(pki.client_cert),
            tls_key=str(pki.client_key),
        )
    )
    # the certificate also names "localhost": verifying that name instead of the IP works
    _open(
        connection_parameters(
            tls_node.tls_url.replace("127.0.0.1", "localhost"),
            tls_ca=str(pki.ca),
            tls_cert=str(pki.client_cert),
            tls_key=str(pki.client_key),
        )
    )


@pytest.mark.integration
def test_without_client_certificate_the_broker_refuses(tls_node: BrokerNode, pki: Pki):
    # TLS 1.3: the client's handshake completes, then the server sends the alert and closes, so
    # pika sees a lost stream (SSLEOFError) while starting AMQP; the node logs the reason.
    with pytest.raises(REFUSED) as info:
        connect(_query_url(tls_node, cacertfile=pki.ca), attempts=1)
    assert "SSLEOFError" in _causes(info.value) or "certificate" in _causes(info.value).lower()
    assert _node_logged(tls_node, "certificate required"), "node did not log the missing cert"


@pytest.mark.integration
def test_wrong_ca_refuses_the_broker_certificate(tls_node: BrokerNode, pki: Pki):
    url = _query_url(
        tls_node, cacertfile=pki.other_ca, certfile=pki.client_cert, keyfile=pki.client_key
    )
    with pytest.raises(REFUSED) as info:
        connect(url, attempts=1)
    assert "CERTIFICATE_VERIFY_FAILED" in _causes(info.value), _causes(info.value)


@pytest.mark.integration
def test_host_name_is_verified_by_default(tls_node: BrokerNode, pki: Pki):
    params = connection_parameters(
        tls_node.tls_url,
        tls_ca=str(pki.ca),
        tls_cert=str(pki.client_cert),
        tls_key=str(pki.client_key),
        tls_server_name="broker.example.org",  # not in the certificate's subjectAltName
    )
    with pytest.raises(REFUSED) as info:
        pika.BlockingConnection(params)
    chain = _causes(info.value)
    assert "CERTIFICATE_VERIFY_FAILED" in chain and "mismatch" in chain.lower(), chain


@pytest.mark.integration
def test_verification_off_only_when_asked(tls_node: BrokerNode, pki: Pki):
    # the wrong CA would be refused (test above); tls_verify=False accepts any server cert
    _open(
        connection_parameters(
            tls_node.tls_url,
            tls_ca=str(pki.other_ca),
            tls_cert=str(pki.client_cert),
            tls_key=str(pki.client_key),
            tls_verify=False,
        )
    )


@pytest.mark.integration
def test_plain_listener_of_the_node_still_works(tls_node: BrokerNode):
    conn = connect(tls_node.url, attempts=1)
    conn.close()


# ---- option handling (no broker) ----


def test_url_query_tls_parameters_are_parsed_and_stripped():
    url, opts = tls_options_for(
        "amqps://u:p%40ss@h:5671/%2F?heartbeat=5&cacertfile=/a/ca.pem&certfile=/c.pem"
        "&keyfile=/c.key&server_name_indication=broker.example&verify=verify_peer"
    )
    assert opts == TlsOptions(
        ca="/a/ca.pem", cert="/c.pem", key="/c.key", verify=True, server_name="broker.example"
    )
    assert url == "amqps://u:p%40ss@h:5671/%2F?heartbeat=5"  # credentials untouched


def test_keyword_arguments_win_over_the_url():
    _, opts = tls_options_for("amqps://h/?cacertfile=/url-ca.pem&certfile=/u.pem", ca="/kw.pem")
    assert opts is not None and opts.ca == "/kw.pem" and opts.cert == "/u.pem" and opts.verify


def test_amqps_without_settings_uses_system_cas_and_verifies():
    url, opts = tls_options_for("amqps://h:5671/%2F")
    assert url == "amqps://h:5671/%2F" and opts == TlsOptions()
    ctx = client_context(opts)
    assert ctx.verify_mode == ssl.CERT_REQUIRED and ctx.check_hostname
    params = connection_parameters("amqps://h:5671/%2F")
    assert params.ssl_options is not None and params.ssl_options.context.check_hostname


def test_verify_none_must_be_explicit():
    _, opts = tls_options_for("amqps://h/?verify=verify_none")
    assert opts is not None and not opts.verify
    _, opts = tls_options_for("amqps://h/", verify=False)
    assert opts is not None and not opts.verify
    with pytest.raises(ConfigError):
        tls_options_for("amqps://h/?verify=no")


@pytest.mark.parametrize(
    "url, kwargs",
    [
        ("amqp://h/", {"ca": "/ca.pem"}),  # TLS settings with a plain URL
        ("amqp://h/?cacertfile=/ca.pem", {}),
        ("amqps://h/?ssl_options=%7B%27ca_certs%27%3A+%27%2Fx%27%7D", {"ca": "/ca.pem"}),
    ],
)
def test_contradictory_settings_are_config_errors(url, kwargs):
    with pytest.raises(ConfigError):
        tls_options_for(url, **kwargs)


def test_pika_ssl_options_query_alone_is_honoured(pki: Pki):
    opts = quote(repr({"ca_certs": str(pki.ca)}), safe="")
    params = connection_parameters(f"amqps://h:5671/%2F?ssl_options={opts}")
    assert params.ssl_options is not None
    assert params.ssl_options.context.verify_mode == ssl.CERT_REQUIRED


def test_unreadable_files_and_key_without_cert_are_config_errors(tmp_path: Path):
    with pytest.raises(ConfigError, match="cannot load TLS files"):
        client_context(TlsOptions(ca=str(tmp_path / "missing.pem")))
    (tmp_path / "bad.pem").write_text("not a certificate")
    with pytest.raises(ConfigError):
        connection_parameters("amqps://h/", tls_ca=str(tmp_path / "bad.pem"))
    with pytest.raises(ConfigError, match="without its certificate"):
        client_context(TlsOptions(key="/k.pem"))
