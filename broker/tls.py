"""TLS for AMQP connections (amqps://): CA, client certificate and key; verification on by default.

Where the settings come from, in order (each field separately; keyword arguments win):
1. keyword arguments of ``connection_parameters`` (``tls_ca``, ``tls_cert``, ``tls_key``,
   ``tls_verify``, ``tls_server_name``);
2. the TLS query parameters of the RabbitMQ URI spec in the URL itself:
   ``amqps://u:p@host:5671/%2F?cacertfile=/ca.pem&certfile=/c.pem&keyfile=/c.key``
   plus ``verify=verify_peer|verify_none`` and ``server_name_indication=NAME``;
3. otherwise the system's trusted CAs (``ssl.create_default_context``).
pika's own ``ssl_options={...}`` query parameter is honoured as pika defines it, but only
alone: mixing it with the settings above is a ConfigError (which one would win is unclear).

The server certificate and its host name (or IP address, matched against the certificate's
subjectAltName) are verified unless verification is switched off explicitly
(``tls_verify=False`` or ``verify=verify_none``), which logs a warning. TLS settings with a
plain amqp:// URL are a ConfigError rather than being ignored: credentials would otherwise go
out in clear text while the operator believes TLS is on. Encrypted private keys are not
supported (a service cannot answer OpenSSL's passphrase prompt).
"""

from __future__ import annotations

import ssl
from dataclasses import dataclass
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

import pika
import structlog

from helora.shared.errors import ConfigError

log = structlog.get_logger(__name__)

URL_TLS_KEYS = ("cacertfile", "certfile", "keyfile", "verify", "server_name_indication")


@dataclass(frozen=True)
class TlsOptions:
    ca: str | None = None  # PEM file of the CA(s) to trust; None: the system's CAs
    cert: str | None = None  # PEM client certificate (chain) for brokers that verify peers
    key: str | None = None  # its unencrypted PEM private key (may be inside ``cert``)
    verify: bool = True  # verify the broker's certificate and host name
    server_name: str | None = None  # name to verify and send as SNI; default: the URL's host


def tls_options_for(
    url: str,
    *,
    ca: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    verify: bool = True,
    server_name: str | None = None,
) -> tuple[str, TlsOptions | None]:
    """(URL for pika without the TLS query parameters, the merged TLS options or None).

    None means "let pika decide": a plain amqp:// URL, or an amqps:// URL carrying pika's own
    ``ssl_options`` query parameter."""
    parts = urlsplit(url)
    pairs = parse_qsl(parts.query, keep_blank_values=True)
    from_url = {k: v for k, v in pairs if k in URL_TLS_KEYS}
    rest = [(k, v) for k, v in pairs if k not in URL_TLS_KEYS]
    pika_url = urlunsplit(parts._replace(query=urlencode(rest))) if from_url else url
    explicit = any(x is not None for x in (ca, cert, key, server_name)) or not verify
    if parts.scheme.lower() != "amqps":
        if explicit or from_url:
            raise ConfigError(
                "TLS settings were given for a plain amqp:// URL; use amqps:// (TLS) or drop them"
            )
        return pika_url, None
    if any(k == "ssl_options" for k, _ in rest):
        if explicit or from_url:
            raise ConfigError(
                "the URL has pika's ssl_options and TLS settings are given too; use one of them"
            )
        return pika_url, None
    url_verify = from_url.get("verify", "verify_peer")
    if url_verify not in ("verify_peer", "verify_none"):
        raise ConfigError(
            f"URL parameter verify must be verify_peer or verify_none, not {url_verify!r}"
        )
    return pika_url, TlsOptions(
        ca=ca or from_url.get("cacertfile") or None,
        cert=cert or from_url.get("certfile") or None,
        key=key or from_url.get("keyfile") or None,
        verify=verify and url_verify == "verify_peer",
        server_name=server_name or from_url.get("server_name_indication") or None,
    )


def client_context(opts: TlsOptions) -> ssl.SSLContext:
    """A client SSLContext (TLS 1.2+) for ``opts``; ConfigError for unreadable/invalid files."""
    if opts.key and not opts.cert:
        raise ConfigError("a TLS client key was given without its certificate (tls_cert)")
    try:
        if opts.verify:
            ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=opts.ca)
        else:
            ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
            ctx.check_hostname = False
            ctx.verify_mode = ssl.CERT_NONE
        ctx.minimum_version = ssl.TLSVersion.TLSv1_2
        if opts.cert:
            # a bytes password: an encrypted key fails instead of prompting on the terminal
            ctx.load_cert_chain(opts.cert, opts.key, password=b"")
    except (OSError, ssl.SSLError) as exc:
        files = ", ".join(
            f"{n}={p}" for n, p in (("ca", opts.ca), ("cert", opts.cert), ("key", opts.key)) if p
        )
        hint = " (the key must be an unencrypted PEM file)" if opts.cert else ""
        raise ConfigError(f"cannot load TLS files ({files}): {exc}{hint}") from exc
    if not opts.verify:
        log.warning("tls_verification_disabled", reason="explicitly configured")
    return ctx


def ssl_options(opts: TlsOptions) -> pika.SSLOptions:
    return pika.SSLOptions(client_context(opts), server_hostname=opts.server_name)
