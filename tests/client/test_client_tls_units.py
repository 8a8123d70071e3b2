"""The client's TLS parts alone: ``TlsConfig``'s file checks, the probe against tiny gRPC servers,
the mapping of gRPC's connection failures, and when the CLI quiets gRPC's C-core logs.

End to end, against real mfserve servers: test_client_tls.py.
"""

from __future__ import annotations

import pickle
import socket
import subprocess
import sys
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from tls_certs import Pki, make_pki

from mfserve.client import TlsConfig, TlsFileError, TlsMismatchError, UnavailableError, _exceptions
from mfserve.client._exceptions import _map_error, translate_errors
from mfserve.client._probe import Connection, Speaks, probe, server_name

SOCKET_CLOSED = (
    "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:127.0.0.1:39731: "
    "Socket closed"
)
WRONG_VERSION = (
    "connections to all backends failing; last error: UNKNOWN: ipv4:127.0.0.1:5: Tls handshake "
    "failed (TSI_PROTOCOL_FAILURE): SSL_ERROR_SSL: error:100000f7:SSL routines:"
    "OPENSSL_internal:WRONG_VERSION_NUMBER: Invalid certificate verification context: OK"
)


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


# ---------------------------------------------------------------------------- TlsConfig
def test_a_certificate_and_its_key_go_together(pki: Pki) -> None:
    with pytest.raises(ValueError, match=r"TlsConfig\(cert=\.\.\.\) needs key="):
        TlsConfig(cert=pki.client_cert)
    with pytest.raises(ValueError, match=r"TlsConfig\(key=\.\.\.\) needs cert="):
        TlsConfig(key=pki.client_key)


def test_good_files_make_credentials(pki: Pki) -> None:
    config = TlsConfig(ca=pki.ca_cert, cert=pki.client_cert, key=pki.client_key)
    assert isinstance(config.credentials(), grpc.ChannelCredentials)
    assert config.client_certificate == (str(pki.client_cert), str(pki.client_key))
    assert TlsConfig().client_certificate is None  # system roots, no client certificate


def file_error(config: TlsConfig) -> TlsFileError:
    with pytest.raises(TlsFileError) as info:
        config.credentials()
    assert isinstance(info.value, ValueError)
    return info.value


def test_a_missing_or_empty_file_is_named(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "ca.pem"
    error = file_error(TlsConfig(ca=missing))
    assert str(error) == f"cannot read the CA certificate {missing}: No such file or directory"
    assert error.filename == str(missing)
    empty = tmp_path / "client.key"
    empty.write_text("\n")
    error = file_error(TlsConfig(cert=pki.client_cert, key=empty))
    assert str(error) == f"the client key file {empty} is empty"


def test_files_that_are_not_what_they_should_be_are_named(pki: Pki, tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.pem"
    garbage.write_text("not a certificate\n")
    error = file_error(TlsConfig(ca=garbage))
    assert str(error).startswith(f"the CA certificate {garbage} is not a usable PEM file (")
    error = file_error(TlsConfig(cert=garbage, key=pki.client_key))
    assert str(error).startswith(f"the client certificate {garbage} is not a usable PEM file")
    error = file_error(TlsConfig(cert=pki.client_cert, key=pki.server_key))
    assert str(error) == (
        f"the client key {pki.server_key} is not the private key of the certificate"
    )


def test_an_encrypted_key_is_refused_without_a_prompt(pki: Pki, tmp_path: Path) -> None:
    key = ec.generate_private_key(ec.SECP256R1())
    encrypted = tmp_path / "encrypted.key"
    encrypted.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.BestAvailableEncryption(b"secret"),
        )
    )
    error = file_error(TlsConfig(cert=pki.client_cert, key=encrypted))
    assert (
        str(error) == f"the client key {encrypted} is encrypted; gRPC needs an unencrypted PEM key"
    )


def test_errors_pickle(tmp_path: Path) -> None:
    error = TlsFileError("cannot read it", tmp_path / "x.pem")
    copy = pickle.loads(pickle.dumps(error))
    assert (type(copy), str(copy), copy.filename) == (
        TlsFileError,
        "cannot read it",
        str(tmp_path / "x.pem"),
    )
    mismatch = TlsMismatchError(
        grpc.StatusCode.UNAVAILABLE, "d", reason="server_tls", target="h:1", problem="p"
    )
    copy = pickle.loads(pickle.dumps(mismatch))
    assert (copy.reason, copy.target, copy.problem, str(copy)) == (
        "server_tls",
        "h:1",
        "p",
        "UNAVAILABLE: d",
    )


# ---------------------------------------------------------------------------- the probe
@pytest.fixture(scope="module")
def servers(pki: Pki) -> Iterator[dict[str, int]]:
    """Ports of bare gRPC servers: plaintext, TLS, mutual TLS (no service needed to probe)."""
    pair = [(pki.server_key.read_bytes(), pki.server_cert.read_bytes())]
    kinds = {
        "plaintext": None,
        "tls": grpc.ssl_server_credentials(pair),
        "mtls": grpc.ssl_server_credentials(
            pair, root_certificates=pki.ca_cert.read_bytes(), require_client_auth=True
        ),
    }
    running, ports = [], {}
    for name, credentials in kinds.items():
        server = grpc.server(futures.ThreadPoolExecutor(max_workers=1))
        if credentials is None:
            ports[name] = server.add_insecure_port("127.0.0.1:0")
        else:
            ports[name] = server.add_secure_port("127.0.0.1:0", credentials)
        server.start()
        running.append(server)
    yield ports
    for server in running:
        server.stop(None)


def test_the_probe_tells_what_a_server_speaks(servers: dict[str, int], pki: Pki) -> None:
    assert probe(f"ipv4:127.0.0.1:{servers['plaintext']}") is Speaks.PLAINTEXT
    assert probe(f"127.0.0.1:{servers['tls']}") is Speaks.TLS
    mtls = f"127.0.0.1:{servers['mtls']}"
    assert probe(mtls) is Speaks.TLS_REFUSED
    assert probe(mtls, cert=str(pki.client_cert), key=str(pki.client_key)) is Speaks.TLS


def test_the_probe_says_unknown_when_nothing_answers() -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # nothing listens once it is closed
    assert probe(f"127.0.0.1:{port}") is Speaks.UNKNOWN
    assert probe("no port here") is Speaks.UNKNOWN


def test_server_names_for_sni() -> None:
    assert server_name("dns:///recs.example.com:443") == "recs.example.com"
    assert server_name("localhost:50051") == "localhost"
    for target in ("127.0.0.1:1", "[::1]:1", "ipv6:%5B::1%5D:1", "unix:/tmp/mfserve.sock"):
        assert server_name(target) is None


# ---------------------------------------------------------------------------- the mapping
class FakeRpcError(grpc.RpcError):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(details)
        self._code, self._details = code, details

    def code(self) -> grpc.StatusCode:
        return self._code

    def details(self) -> str:
        return self._details

    def trailing_metadata(self) -> tuple[()]:
        return ()


UNAVAILABLE = grpc.StatusCode.UNAVAILABLE


def test_a_handshake_answered_in_plaintext_needs_no_probe() -> None:
    error = _map_error(FakeRpcError(UNAVAILABLE, WRONG_VERSION), Connection("h:5", tls=True))
    assert isinstance(error, TlsMismatchError) and error.reason == "server_plaintext"
    assert error.problem == "the server at h:5 speaks plaintext"


@pytest.mark.parametrize(
    ("tls", "certificate", "speaks", "reason"),
    [
        (False, None, Speaks.TLS, "server_tls"),
        (False, None, Speaks.TLS_REFUSED, "server_mutual_tls"),
        (True, None, Speaks.TLS_REFUSED, "client_certificate_required"),
        (True, ("c.pem", "c.key"), Speaks.TLS_REFUSED, "client_certificate_refused"),
        (False, None, Speaks.PLAINTEXT, None),
        (True, None, Speaks.TLS, None),
        (False, None, Speaks.UNKNOWN, None),
    ],
)
def test_socket_closed_is_explained_by_the_probe(
    tls: bool, certificate: tuple[str, str] | None, speaks: Speaks, reason: str | None
) -> None:
    connection = Connection("h:5", tls=tls, client_certificate=certificate)
    error = _map_error(FakeRpcError(UNAVAILABLE, SOCKET_CLOSED), connection, speaks)
    if reason is None:
        assert type(error) is UnavailableError and error.details == SOCKET_CLOSED
    else:
        assert isinstance(error, TlsMismatchError) and error.reason == reason


def test_the_probe_runs_only_when_it_can_explain(monkeypatch: pytest.MonkeyPatch) -> None:
    probed: list[tuple[str, str | None]] = []

    def fake_probe(address: str, **kwargs: object) -> Speaks:
        probed.append((address, kwargs.get("cert")))  # type: ignore[arg-type]
        return Speaks.TLS

    monkeypatch.setattr(_exceptions, "probe", fake_probe)
    refused = (
        "failed to connect to all addresses; last error: UNAVAILABLE: ipv4:h:5: Connection refused"
    )
    cases = [
        (SOCKET_CLOSED, Connection("localhost:39731", tls=False), TlsMismatchError),
        (SOCKET_CLOSED, Connection("localhost:39731"), UnavailableError),  # a caller's channel
        (refused, Connection("h:5", tls=False), UnavailableError),
        ("no healthy model", Connection("h:5", tls=False), UnavailableError),
    ]
    for details, connection, cls in cases:
        with pytest.raises(UnavailableError) as info, translate_errors(connection):
            raise FakeRpcError(UNAVAILABLE, details)
        assert type(info.value) is cls
    # Once, at the address that failed, presenting nothing (a plaintext client has no certificate).
    assert probed == [("ipv4:127.0.0.1:39731", None)]


# ---------------------------------------------------------------------------- C-core logs
def test_importing_the_sdk_leaves_grpc_logging_alone() -> None:
    code = "import os, mfserve.client; print(os.environ.get('GRPC_VERBOSITY'))"
    env = {"PATH": ""}
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        check=True,
    )
    assert done.stdout == "None\n"
