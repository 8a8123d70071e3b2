"""One TLS ClientHello to learn what a server speaks, so a failed connection can be explained.

gRPC reports a plaintext client at a TLS port, and a TLS client whose certificate (or lack of one)
a mutual-TLS server refuses, with the same words as a server that went away: "Socket closed". A
probe tells them apart, and is only ever made on that failure path (``_exceptions`` decides when),
so a working client never pays for it.

Verification is off on purpose: the question is what the server speaks, not whether to trust it,
and nothing is sent after the handshake.
"""

from __future__ import annotations

import enum
import ipaddress
import socket
import ssl
from dataclasses import dataclass
from urllib.parse import unquote

# Seconds for the TCP connect plus the handshake: the server just answered the real call's
# connection, so anything slower than this is not an answer worth waiting for on an error path.
PROBE_TIMEOUT = 1.0
# Under TLS 1.3 the server checks the client's certificate after the client's side of the
# handshake is done; gRPC servers then close without an alert if they refuse it, and send their
# HTTP/2 settings at once if they accept it. This is how long to wait for either.
VERDICT_TIMEOUT = 0.5


@dataclass(frozen=True)
class Connection:
    """What is known of a client's channel: whether, and with what, a probe may stand in for it.

    ``tls`` is None when the client was given a channel or ``grpc.ChannelCredentials``: what it
    sends is not known, so no probe is made for it. ``client_certificate`` holds the (certificate,
    key) paths a mutual-TLS client presents.
    """

    target: str
    tls: bool | None = None
    client_certificate: tuple[str, str] | None = None


class Speaks(enum.Enum):
    """What a probed server answered a TLS ClientHello with."""

    PLAINTEXT = "plaintext"  # bytes that are not TLS (a plaintext HTTP/2 server's GOAWAY)
    TLS = "tls"  # a completed handshake, and the connection kept open
    TLS_REFUSED = "tls_refused"  # a handshake, then a close or an alert: the client certificate
    UNKNOWN = "unknown"  # no connection, or nothing that says either way


def _socket_address(address: str) -> tuple[socket.AddressFamily, str, int] | None:
    """(family, host or unix path, port) of a gRPC address (``ipv4:1.2.3.4:5``, ``ipv6:[::1]:5``,
    ``unix:/path``, ``host:port``, ``dns:///host:port``); None for what cannot be probed."""
    address = unquote(address)  # gRPC writes "ipv6:%5B::1%5D:5" in its error messages
    if address.startswith("unix:"):
        path = address.removeprefix("unix:")
        return (socket.AF_UNIX, "/" + path.lstrip("/") if path.startswith("//") else path, 0)
    for scheme in ("ipv4:", "ipv6:", "dns:///", "dns:"):
        address = address.removeprefix(scheme)
    host, _, port = address.split(",")[0].rpartition(":")
    if not host or not port.isdigit():
        return None
    return (socket.AF_INET, host.strip("[]"), int(port))


def _is_ip(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


def server_name(target: str) -> str | None:
    """The host name in a gRPC target, for SNI; None for an IP address or a unix socket."""
    where = _socket_address(target)
    if where is None or where[0] == socket.AF_UNIX or _is_ip(where[1]):
        return None
    return where[1]


def probe(
    address: str,
    *,
    server_name: str | None = None,
    cert: str | None = None,
    key: str | None = None,
    timeout: float = PROBE_TIMEOUT,
) -> Speaks:
    """Send one TLS ClientHello to ``address`` (presenting ``cert``/``key`` if given) and say what
    came back. ``server_name`` is the SNI to send (servers behind a TLS router need it)."""
    where = _socket_address(address)
    if where is None:
        return Speaks.UNKNOWN
    family, host, port = where
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    context.set_alpn_protocols(["h2"])  # what a gRPC client offers; some servers insist on it
    try:
        if cert is not None and key is not None:
            context.load_cert_chain(cert, key)
        if family == socket.AF_UNIX:
            sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            sock.settimeout(timeout)
            sock.connect(host)
        else:
            sock = socket.create_connection((host, port), timeout=timeout)
    except (OSError, ssl.SSLError):
        return Speaks.UNKNOWN
    with sock:
        try:
            with context.wrap_socket(sock, server_hostname=server_name) as tls:
                tls.settimeout(VERDICT_TIMEOUT)
                try:
                    return Speaks.TLS if tls.recv(1) else Speaks.TLS_REFUSED
                except TimeoutError:  # silent but open: it took the handshake
                    return Speaks.TLS
                except OSError:  # ssl.SSLError included: an alert or a reset after the handshake
                    return Speaks.TLS_REFUSED
        except ssl.SSLError as exc:
            reason = str(exc.reason or exc)
            if "WRONG_VERSION_NUMBER" in reason or "HTTP_REQUEST" in reason:
                return Speaks.PLAINTEXT
            # An alert during the handshake (TLS 1.2 servers refuse a certificate there) is TLS.
            return Speaks.TLS_REFUSED if "ALERT" in reason else Speaks.UNKNOWN
        except OSError:
            return Speaks.UNKNOWN
