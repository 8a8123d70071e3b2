"""TLS for the server port, and the one object that re-reads certificates and tokens on reload.

Certificates are read from their files when the server is built, checked (each file parses, the
key matches the certificate) so that a bad file is a startup error naming it rather than every
handshake failing later, and served through gRPC's dynamic credentials: on SIGHUP, ``ReloadModel``
or a watcher tick, files that changed are read and checked again, and the next handshake takes
them. Connections already open keep the certificate they were made with, as with any TLS server.
A changed file that does not check out is refused with a log line; the old certificate serves on.

Tokens live in ``mfserve.server.auth``; :class:`Security` holds both and reloads both.
"""

from __future__ import annotations

import logging
import os
import ssl
from dataclasses import dataclass
from pathlib import Path

import grpc

from mfserve.server.auth import AuthPolicy, SecurityError
from mfserve.server.config import ServerConfig

log = logging.getLogger("mfserve.server")

__all__ = ["Security", "SecurityError", "TlsCredentials", "TlsFiles"]


@dataclass(frozen=True)
class TlsFiles:
    """The PEM files TLS is served with; ``client_ca`` set means mutual TLS."""

    cert: Path
    key: Path
    client_ca: Path | None = None

    @classmethod
    def from_config(cls, config: ServerConfig) -> TlsFiles | None:
        """The files ``config`` names, or None for plaintext; raises ``SecurityError`` for a
        combination that cannot work (a key with no certificate, mTLS without TLS)."""
        if not (config.tls_cert or config.tls_key or config.tls_client_ca):
            return None
        if not config.tls_cert or not config.tls_key:
            given, missing = (
                ("--tls-cert", "--tls-key") if config.tls_cert else ("--tls-key", "--tls-cert")
            )
            if config.tls_client_ca and not (config.tls_cert or config.tls_key):
                given, missing = "--tls-client-ca", "--tls-cert and --tls-key"
            raise SecurityError(f"{given} needs {missing}: TLS takes a certificate and its key")
        client_ca = Path(config.tls_client_ca) if config.tls_client_ca else None
        return cls(Path(config.tls_cert), Path(config.tls_key), client_ca)

    def signature(self) -> tuple[tuple[str, int, int], ...]:
        """(path, size, mtime) of each file: a rotation changes it."""
        return tuple(_stat(path) for path in (self.cert, self.key, self.client_ca) if path)


def read_certificates(files: TlsFiles) -> grpc.ServerCertificateConfiguration:
    """The certificate configuration for ``files``, checked; raises ``SecurityError`` naming the
    file at fault (missing, unreadable, not PEM, or a key that is not the certificate's)."""
    cert = _read(files.cert, "--tls-cert", "certificate")
    key = _read(files.key, "--tls-key", "private key")
    # The stdlib's OpenSSL checks what gRPC would otherwise only find at the first handshake.
    context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    try:
        context.load_verify_locations(cadata=cert.decode("ascii", "replace"))
    except (ssl.SSLError, ValueError) as exc:
        raise SecurityError(
            f"{files.cert} (--tls-cert): not a PEM certificate ({_reason(exc)})"
        ) from None
    try:
        context.load_cert_chain(files.cert, files.key)
    except ssl.SSLError as exc:
        if "KEY_VALUES_MISMATCH" in str(exc):
            raise SecurityError(
                f"{files.key} (--tls-key) is not the private key of the certificate {files.cert}"
            ) from None
        raise SecurityError(
            f"{files.key} (--tls-key): not an unencrypted PEM private key ({_reason(exc)})"
        ) from None
    roots = None
    if files.client_ca is not None:
        roots = _read(files.client_ca, "--tls-client-ca", "CA bundle")
        try:
            context.load_verify_locations(cadata=roots.decode("ascii", "replace"))
        except (ssl.SSLError, ValueError) as exc:
            raise SecurityError(
                f"{files.client_ca} (--tls-client-ca): not a PEM CA bundle ({_reason(exc)})"
            ) from None
    return grpc.ssl_server_certificate_configuration([(key, cert)], root_certificates=roots)


class TlsCredentials:
    """The server's TLS credentials; :meth:`reload` rotates them for the next handshake."""

    def __init__(self, files: TlsFiles) -> None:
        self.files = files
        self._signature = files.signature()
        self._initial = read_certificates(files)
        self._pending: grpc.ServerCertificateConfiguration | None = None

    @property
    def mutual(self) -> bool:
        return self.files.client_ca is not None

    def credentials(self) -> grpc.ServerCredentials:
        # grpc-stubs types the fetcher as never returning None, which grpc documents it may.
        return grpc.dynamic_ssl_server_credentials(
            self._initial,
            self._next_certificates,  # type: ignore[arg-type]
            require_client_authentication=self.mutual,
        )

    def reload(self) -> bool:
        """Re-read the files if they changed; True if new certificates will be served. Raises
        ``SecurityError`` for changed files that do not check out (the old ones serve on)."""
        signature = self.files.signature()
        if signature == self._signature:
            return False
        try:
            self._pending = read_certificates(self.files)
        finally:
            # A refused set is not retried until its files change again: one log line per change.
            self._signature = signature
        return True

    def _next_certificates(self) -> grpc.ServerCertificateConfiguration | None:
        # gRPC asks before every handshake (on one of its threads); None keeps the current set.
        pending, self._pending = self._pending, None
        return pending


class Security:
    """TLS and tokens as ``config`` sets them, built (and every file checked) at once."""

    def __init__(self, config: ServerConfig) -> None:
        files = TlsFiles.from_config(config)
        self.tls = TlsCredentials(files) if files is not None else None
        self.auth = AuthPolicy.from_config(config)

    def describe(self) -> str:
        """How the port is secured, for the start line: "TLS, tokens", "plaintext", ..."""
        parts = [
            "mutual TLS" if self.tls and self.tls.mutual else "TLS" if self.tls else "plaintext"
        ]
        parts.append(self.auth.describe() if self.auth is not None else "no tokens")
        return ", ".join(parts)

    def reload(self) -> None:
        """Re-read what changed (certificates, token files), logging what happened; a file that
        no longer checks out is logged and the previous one stays in force."""
        parts: tuple[tuple[str, TlsCredentials | AuthPolicy | None], ...] = (
            ("TLS certificates", self.tls),
            ("tokens", self.auth),
        )
        for name, part in parts:
            if part is None:
                continue
            try:
                if part.reload():
                    log.info("mfserve: reloaded the %s", name)
            except SecurityError as exc:
                log.error("mfserve: kept the previous %s: %s", name, exc)


def _read(path: Path, flag: str, what: str) -> bytes:
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise SecurityError(f"{path} ({flag}): cannot read the {what}: {exc.strerror}") from None
    if not data.strip():
        raise SecurityError(f"{path} ({flag}): the {what} file is empty")
    return data


def _stat(path: Path) -> tuple[str, int, int]:
    try:
        info = os.stat(path)
    except OSError:
        return (str(path), -1, -1)
    return (str(path), info.st_size, info.st_mtime_ns)


def _reason(error: Exception) -> str:
    reason = getattr(error, "reason", None)
    return str(reason or error).lower().replace("_", " ")
