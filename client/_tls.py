"""TLS for the clients: :class:`TlsConfig` (a CA to trust, a client certificate for mutual TLS) and
the ``tls=`` argument turned into gRPC channel credentials.

Files are read, and checked with the standard library's OpenSSL, when a client is created: gRPC
itself would accept a bad file silently and only fail the first handshake, with an error that
names no file (and a C-core log line). A client keeps the bytes it read; a rotated file takes
effect in the next client made.
"""

from __future__ import annotations

import os
import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn, TypeAlias

import grpc

from ._exceptions import TlsFileError
from ._probe import Connection

PathLike: TypeAlias = str | os.PathLike[str]


@dataclass(frozen=True)
class TlsConfig:
    """TLS settings for a client: which CA to trust and, for mutual TLS, the certificate to show.

    ``ca``: a PEM file of the CA certificate(s) that signed the server's certificate; None trusts
    the system's roots. ``cert`` and ``key``: a PEM client certificate (chain) and its unencrypted
    PEM private key, for a server that requires client certificates; both or neither.

    ::

        tls = TlsConfig(ca="ca.pem", cert="client.pem", key="client.key")
        RecommenderClient("recs.internal:443", tls=tls, token="...")

    The files are read when a client is created: one missing, unreadable or not PEM, or a key
    that is not the certificate's, raises :class:`TlsFileError` naming the file.
    """

    ca: PathLike | None = None
    cert: PathLike | None = None
    key: PathLike | None = None

    def __post_init__(self) -> None:
        if (self.cert is None) != (self.key is None):
            given, missing = ("cert", "key") if self.cert is not None else ("key", "cert")
            raise ValueError(
                f"TlsConfig({given}=...) needs {missing}= too: a client certificate and its "
                "private key go together"
            )

    @property
    def client_certificate(self) -> tuple[str, str] | None:
        """(certificate, key) paths presented for mutual TLS, or None."""
        if self.cert is None or self.key is None:
            return None
        return (os.fspath(self.cert), os.fspath(self.key))

    def credentials(self) -> grpc.ChannelCredentials:
        """gRPC channel credentials from the files, each checked; raises :class:`TlsFileError`."""
        roots = None if self.ca is None else _read_certificates(self.ca, "CA certificate")
        if self.cert is None or self.key is None:
            return grpc.ssl_channel_credentials(root_certificates=roots)
        chain = _read_certificates(self.cert, "client certificate")
        key = _read(self.key, "client key")
        cert_path, key_path = self.cert, self.key

        def encrypted() -> NoReturn:
            # Called only for an encrypted key: refuse it rather than let OpenSSL prompt on a TTY.
            raise TlsFileError(
                f"the client key {os.fspath(key_path)} is encrypted; gRPC needs an unencrypted "
                "PEM key",
                key_path,
            )

        _check(key_path, "client key", lambda c: c.load_cert_chain(cert_path, key_path, encrypted))
        return grpc.ssl_channel_credentials(
            root_certificates=roots, private_key=key, certificate_chain=chain
        )


def _read(path: PathLike, what: str) -> bytes:
    try:
        data = Path(path).read_bytes()
    except OSError as exc:
        reason = exc.strerror or str(exc)
        raise TlsFileError(f"cannot read the {what} {os.fspath(path)}: {reason}", path) from exc
    if not data.strip():
        raise TlsFileError(f"the {what} file {os.fspath(path)} is empty", path)
    return data


def _read_certificates(path: PathLike, what: str) -> bytes:
    """The PEM certificate(s) in ``path``, checked to parse."""
    data = _read(path, what)
    text = data.decode("ascii", "replace")
    _check(path, what, lambda context: context.load_verify_locations(cadata=text))
    return data


def _check(path: PathLike, what: str, load: Callable[[ssl.SSLContext], object]) -> None:
    """Run ``load`` on a fresh OpenSSL context; its failure is a :class:`TlsFileError` naming
    ``path``."""
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    try:
        load(context)
    except TlsFileError:
        raise
    except (ssl.SSLError, ValueError, OSError) as exc:
        reason = str(getattr(exc, "reason", None) or exc).lower().replace("_", " ")
        if "key values mismatch" in reason:
            message = f"the client key {os.fspath(path)} is not the private key of the certificate"
        else:
            message = f"the {what} {os.fspath(path)} is not a usable PEM file ({reason})"
        raise TlsFileError(message, path) from exc


TlsOption: TypeAlias = bool | str | os.PathLike[str] | TlsConfig | grpc.ChannelCredentials


def channel_credentials(tls: TlsOption) -> grpc.ChannelCredentials | None:
    """Credentials from a client's ``tls=``: False (plaintext), True (system roots), a CA
    certificate path, a :class:`TlsConfig`, or ``grpc.ChannelCredentials`` used as they are."""
    if isinstance(tls, grpc.ChannelCredentials):
        return tls
    if tls is True:
        return grpc.ssl_channel_credentials()
    if tls is False:
        return None
    if isinstance(tls, (str, os.PathLike)):
        Path(tls).read_bytes()  # an unreadable file raises OSError, as it did before TlsConfig
        return TlsConfig(ca=tls).credentials()
    if isinstance(tls, TlsConfig):
        return tls.credentials()
    raise TypeError(
        "tls must be a bool, a CA certificate path, a TlsConfig or grpc.ChannelCredentials, "
        f"not {tls!r}"
    )


def connection(target: str, tls: TlsOption, *, own_channel: bool) -> Connection:
    """What the error mapping may assume about a client's channel (see ``Connection``)."""
    if not own_channel or isinstance(tls, grpc.ChannelCredentials):
        return Connection(target)
    if isinstance(tls, TlsConfig):
        return Connection(target, tls=True, client_certificate=tls.client_certificate)
    return Connection(target, tls=tls is not False)
