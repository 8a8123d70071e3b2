"""TLS: a root-certificate path and a bearer token over a real TLS server (self-signed, openssl)."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path
from typing import Any

import grpc
import pytest

from mfserve.client import RecommenderClient, UnauthenticatedError, UnavailableError
from mfserve.client._cli import main
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

pytestmark = pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl CLI")


class _TokenEcho(pb_grpc.RecommenderServiceServicer):  # type: ignore[misc]
    """Answers GetModelInfo with the bearer token it received as the model name."""

    def GetModelInfo(self, request: Any, context: grpc.ServicerContext) -> Any:  # noqa: N802
        headers = dict(context.invocation_metadata())
        token = str(headers.get("authorization", "")).removeprefix("Bearer ")
        if not token:
            context.abort(grpc.StatusCode.UNAUTHENTICATED, "no token")
        return pb.GetModelInfoResponse(model_name=token)


@pytest.fixture(scope="module")
def certificate(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tls")
    key, cert = folder / "key.pem", folder / "cert.pem"
    request = ["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "1"]
    names = ["-subj", "/CN=localhost", "-addext", "subjectAltName=DNS:localhost"]
    subprocess.run(
        [*request, "-keyout", str(key), "-out", str(cert), *names],
        check=True,
        capture_output=True,
        timeout=60,
    )
    return key, cert


@pytest.fixture(scope="module")
def tls_target(certificate: tuple[Path, Path]) -> Iterator[str]:
    key, cert = certificate
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_RecommenderServiceServicer_to_server(_TokenEcho(), server)
    credentials = grpc.ssl_server_credentials([(key.read_bytes(), cert.read_bytes())])
    port = server.add_secure_port("localhost:0", credentials)
    server.start()
    try:
        yield f"localhost:{port}"
    finally:
        server.stop(None).wait()


def test_tls_with_a_root_certificate_path_carries_the_token(
    tls_target: str, certificate: tuple[Path, Path]
) -> None:
    with RecommenderClient(tls_target, tls=certificate[1], token="s3cret") as client:
        assert client.model_info().model_name == "s3cret"
    with (
        RecommenderClient(tls_target, tls=certificate[1]) as client,
        pytest.raises(UnauthenticatedError),
    ):
        client.model_info()


def test_tls_with_untrusted_roots_or_plaintext_fails(tls_target: str) -> None:
    # The system roots do not trust a self-signed certificate; plaintext cannot talk to TLS.
    for tls in (True, False):
        with (
            RecommenderClient(tls_target, tls=tls, retries=1, timeout=5) as client,
            pytest.raises(UnavailableError),
        ):
            client.model_info()


def test_cli_ca_cert_and_token(
    tls_target: str, certificate: tuple[Path, Path], capsys: pytest.CaptureFixture[str]
) -> None:
    argv = ["info", "--json", "--target", tls_target, "--ca-cert", str(certificate[1])]
    assert main([*argv, "--token", "from-cli"]) == 0
    assert '"model_name": "from-cli"' in capsys.readouterr().out
