"""The client commands' connection options (target, timeout, TLS, token), the client they make,
and how a connection's errors are told in those options' words.

The TLS flags are the server's, seen from the other end: ``--tls-ca`` trusts the CA that signed
the server's ``--tls-cert``, and ``--tls-cert``/``--tls-key`` are what a server with
``--tls-client-ca`` asks for. They have no environment variables: ``MFSERVE_TLS_CERT`` already
names the server's own certificate, and a shell that runs both must not mix them up.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Mapping

from ._client import RecommenderClient
from ._config import DEFAULT_TARGET
from ._exceptions import MfserveError, TlsMismatchError, TlsMismatchReason
from ._tls import TlsConfig

# What to change, by reason, in the flags' words (the SDK's are in ``_exceptions``).
_REMEDIES: Mapping[TlsMismatchReason, str] = {
    "server_plaintext": "drop {tls_flags}",
    "server_tls": "add --tls (or --tls-ca FILE)",
    "server_mutual_tls": "add --tls-ca FILE --tls-cert FILE --tls-key FILE",
    "server_certificate_untrusted": "pass the CA that signed it with --tls-ca FILE",
    "server_certificate_wrong_name": "use a --target host name the certificate lists",
    "client_certificate_required": "add --tls-cert FILE --tls-key FILE",
    "client_certificate_refused": "use one signed by a CA the server trusts",
}


def connection_options() -> argparse.ArgumentParser:
    """Options every client command takes (a parent parser, so they go after the command)."""
    parent = argparse.ArgumentParser(add_help=False)
    group = parent.add_argument_group("connection")
    group.add_argument(
        "--target",
        default=os.environ.get("MFSERVE_TARGET", DEFAULT_TARGET),
        help="server address, any gRPC target (env MFSERVE_TARGET; default: %(default)s)",
    )
    group.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds per call, retries included (default: %(default)s)",
    )
    group.add_argument(
        "--tls", action="store_true", help="use TLS, trusting the system's root certificates"
    )
    group.add_argument(
        "--tls-ca",
        metavar="FILE",
        help="use TLS, trusting the CA certificate(s) in this PEM file instead",
    )
    group.add_argument("--ca-cert", metavar="FILE", help="deprecated: the old name of --tls-ca")
    group.add_argument(
        "--tls-cert",
        metavar="FILE",
        help="mutual TLS: present this PEM client certificate (with --tls-key; implies --tls)",
    )
    group.add_argument("--tls-key", metavar="FILE", help="the PEM private key of --tls-cert")
    group.add_argument(
        "--token",
        default=os.environ.get("MFSERVE_TOKEN"),
        help="bearer token (env MFSERVE_TOKEN); needs TLS unless the target is this machine",
    )
    parent.add_argument("--json", action="store_true", help="print JSON instead of a table")
    return parent


def tls_option(args: argparse.Namespace) -> bool | TlsConfig:
    """The client's ``tls=`` from the flags; ``ValueError`` (a usage error) for a bad mix."""
    if args.ca_cert:
        print("warning: --ca-cert is deprecated; use --tls-ca", file=sys.stderr)
        if args.tls_ca and args.tls_ca != args.ca_cert:
            raise ValueError("--ca-cert is the old name of --tls-ca: give one of them")
    ca = args.tls_ca or args.ca_cert
    if bool(args.tls_cert) != bool(args.tls_key):
        given, missing = (
            ("--tls-cert", "--tls-key") if args.tls_cert else ("--tls-key", "--tls-cert")
        )
        raise ValueError(f"{given} needs {missing}: a client certificate and its private key")
    if ca or args.tls_cert:
        return TlsConfig(ca=ca, cert=args.tls_cert, key=args.tls_key)
    return bool(args.tls)


def open_client(args: argparse.Namespace) -> RecommenderClient:
    return RecommenderClient(
        args.target, timeout=args.timeout, tls=tls_option(args), token=args.token
    )


def _tls_flags(args: argparse.Namespace) -> str:
    """The TLS flags given, as a list to drop: "--tls", "--tls-ca, --tls-cert and --tls-key"."""
    names = ("--tls", "--tls-ca", "--ca-cert", "--tls-cert", "--tls-key")
    given = [name for name in names if getattr(args, name[2:].replace("-", "_"), None)]
    if len(given) < 2:
        return given[0] if given else "--tls"
    return f"{', '.join(given[:-1])} and {given[-1]}"


def error_message(exc: MfserveError, args: argparse.Namespace) -> str:
    """What ``error:`` says for ``exc``: a TLS mismatch's remedy in flags, others as they are."""
    if not isinstance(exc, TlsMismatchError):
        return str(exc)
    remedy = _REMEDIES[exc.reason].format(tls_flags=_tls_flags(args))
    return f"{exc.code.name}: {exc.problem}; {remedy}"
