"""TLS, mutual TLS and tokens through the SDK (sync and async) and the CLI, against real mfserve
servers with certificates made here (tests/tls_certs.py), and the clear errors for settings that
do not fit the server: plaintext against TLS and back, a missing or refused client certificate.

The server side is checked over raw channels in tests/server/test_security.py, grpcurl in
tests/e2e/test_grpcurl_security.py, the client's parts alone in test_client_tls_units.py.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
from server_harness import running_server
from tls_certs import Pki, make_pki

from mfserve.client import (
    AsyncRecommenderClient,
    HealthStatus,
    PermissionDeniedError,
    RecommenderClient,
    TlsConfig,
    TlsMismatchError,
    UnauthenticatedError,
    UnavailableError,
)
from mfserve.client._cli import main

USER, ADMIN = "user-token-0123", "admin-token-4567"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def tokens(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    folder = tmp_path_factory.mktemp("tokens")
    (folder / "tokens").write_text(f"{USER}\n")
    (folder / "admin-tokens").write_text(f"{ADMIN}\n")
    return {
        "auth_tokens": str(folder / "tokens"),
        "admin_tokens": str(folder / "admin-tokens"),
    }


@pytest.fixture(scope="module")
def tls_server(model_dir: Path, pki: Pki, tokens: dict[str, str]) -> Iterator[str]:
    """TLS (no client certificates) with tokens."""
    config = {"tls_cert": str(pki.server_cert), "tls_key": str(pki.server_key), **tokens}
    with running_server(model_dir, **config) as address:
        yield address


@pytest.fixture(scope="module")
def mtls_server(model_dir: Path, pki: Pki, tokens: dict[str, str]) -> Iterator[str]:
    """Mutual TLS (client certificates signed by the test CA) with tokens."""
    config = {
        "tls_cert": str(pki.server_cert),
        "tls_key": str(pki.server_key),
        "tls_client_ca": str(pki.ca_cert),
        **tokens,
    }
    with running_server(model_dir, **config) as address:
        yield address


def mutual(pki: Pki) -> TlsConfig:
    return TlsConfig(ca=pki.ca_cert, cert=pki.client_cert, key=pki.client_key)


def mismatch(target: str, tls: bool | TlsConfig, *, retries: int = 1) -> TlsMismatchError:
    """The error a call from a client with ``tls`` gets; one attempt keeps the test quick."""
    with (
        RecommenderClient(target, tls=tls, timeout=10, retries=retries) as client,
        pytest.raises(TlsMismatchError) as info,
    ):
        client.model_info()
    return info.value


# ---------------------------------------------------------------------------- what works
def test_tls_with_a_ca_and_a_token(tls_server: str, pki: Pki) -> None:
    with RecommenderClient(tls_server, tls=TlsConfig(ca=pki.ca_cert), token=USER) as client:
        assert client.model_info().model_name == "synthetic"
        assert len(client.top_k("u0", k=3)) == 3
    # The older spelling, a CA path, still works.
    with RecommenderClient(tls_server, tls=str(pki.ca_cert), token=USER) as client:
        assert client.predict("u0", "i1").model_version == 1


def test_mutual_tls_sync(mtls_server: str, pki: Pki) -> None:
    with RecommenderClient(mtls_server, tls=mutual(pki), token=USER) as client:
        assert [r.rank for r in client.top_k("u0", k=3)] == [1, 2, 3]
        assert len(client.batch_predict(["u0", "u1"], ["i0", "i1"])) == 2


def test_mutual_tls_async(mtls_server: str, pki: Pki) -> None:
    async def calls() -> None:
        async with AsyncRecommenderClient(mtls_server, tls=mutual(pki), token=USER) as client:
            assert [r.rank for r in await client.top_k("u0", k=3)] == [1, 2, 3]
            assert (await client.model_info()).model_name == "synthetic"
        async with AsyncRecommenderClient(mtls_server, tls=mutual(pki)) as client:  # no token
            assert await client.health() is HealthStatus.SERVING
            await client.wait_until_ready(10)

    asyncio.run(calls())


def test_health_answers_without_a_token(mtls_server: str, pki: Pki) -> None:
    # Health is open, so probes and wait_until_ready work before a token is configured.
    with RecommenderClient(mtls_server, tls=mutual(pki)) as client:
        assert client.health() is HealthStatus.SERVING
        client.wait_until_ready(10)


# ---------------------------------------------------------------------------- tokens
def test_no_token_or_a_wrong_one_is_unauthenticated(mtls_server: str, pki: Pki) -> None:
    with (
        RecommenderClient(mtls_server, tls=mutual(pki)) as client,
        pytest.raises(UnauthenticatedError, match="needs a bearer token"),
    ):
        client.top_k("u0")
    with RecommenderClient(mtls_server, tls=mutual(pki), token="not-a-token") as client:
        with pytest.raises(UnauthenticatedError) as info:
            client.model_info()
        assert "not-a-token" not in str(info.value)  # the server never echoes a token


def test_reload_needs_an_admin_token(mtls_server: str, pki: Pki) -> None:
    with (
        RecommenderClient(mtls_server, tls=mutual(pki), token=USER) as client,
        pytest.raises(PermissionDeniedError, match="--admin-tokens"),
    ):
        client.reload_model()
    with RecommenderClient(mtls_server, tls=mutual(pki), token=ADMIN) as client:
        assert client.reload_model().model_version == 1  # an admin may do all a user may
        assert client.model_info().model_name == "synthetic"


# ---------------------------------------------------------------------------- clear refusals
def test_mutual_tls_refuses_a_client_without_a_certificate(mtls_server: str, pki: Pki) -> None:
    error = mismatch(mtls_server, TlsConfig(ca=pki.ca_cert))
    assert error.reason == "client_certificate_required"
    assert str(error) == (
        f"UNAVAILABLE: the server at {mtls_server} requires a client certificate (mutual TLS); "
        "pass tls=TlsConfig(ca=FILE, cert=FILE, key=FILE)"
    )
    assert isinstance(error, UnavailableError)
    assert isinstance(error.__cause__, grpc.RpcError)


def test_mutual_tls_refuses_a_certificate_from_another_ca(
    mtls_server: str, pki: Pki, tmp_path: Path
) -> None:
    other = make_pki(tmp_path, "some other CA")
    error = mismatch(
        mtls_server, TlsConfig(ca=pki.ca_cert, cert=other.client_cert, key=other.client_key)
    )
    assert error.reason == "client_certificate_refused"
    assert f"refused the client certificate {other.client_cert}" in str(error)


def test_tls_client_against_a_plaintext_server(server_address: str, pki: Pki) -> None:
    for tls in (True, TlsConfig(ca=pki.ca_cert)):
        error = mismatch(server_address, tls)
        assert error.reason == "server_plaintext"
        assert error.target == server_address
        assert str(error) == (
            f"UNAVAILABLE: the server at {server_address} speaks plaintext; connect without TLS "
            "(tls=False)"
        )


def test_plaintext_client_against_a_tls_server(tls_server: str, mtls_server: str) -> None:
    # The default retries too: a mismatch is still one clear error, after gRPC's own retries.
    error = mismatch(tls_server, False, retries=4)
    assert error.reason == "server_tls"
    assert str(error).startswith(f"UNAVAILABLE: the server at {tls_server} speaks TLS; ")
    assert mismatch(mtls_server, False).reason == "server_mutual_tls"


def test_system_roots_do_not_trust_a_private_ca(tls_server: str) -> None:
    error = mismatch(tls_server, True)
    assert error.reason == "server_certificate_untrusted"
    assert "(unable to get local issuer certificate)" in str(error)


def test_async_mismatches_both_ways(server_address: str, tls_server: str) -> None:
    async def reason(target: str, tls: bool) -> str:
        async with AsyncRecommenderClient(target, tls=tls, retries=1) as client:
            with pytest.raises(TlsMismatchError) as info:
                await client.model_info()
        return info.value.reason

    assert asyncio.run(reason(server_address, True)) == "server_plaintext"
    assert asyncio.run(reason(tls_server, False)) == "server_tls"


def test_a_caller_channel_is_never_probed(tls_server: str) -> None:
    # Its security is not known, so "Socket closed" stays the plain error it is.
    with grpc.insecure_channel(tls_server) as channel:
        client = RecommenderClient(tls_server, channel=channel, retries=1)
        with pytest.raises(UnavailableError) as info:
            client.model_info()
        assert type(info.value) is UnavailableError


# ---------------------------------------------------------------------------- the CLI
def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def test_cli_tls_and_mutual_tls(
    tls_server: str, mtls_server: str, pki: Pki, capsys: pytest.CaptureFixture[str]
) -> None:
    ca = ("--tls-ca", str(pki.ca_cert))
    code, out, _ = run(capsys, "info", "--json", "--target", tls_server, *ca, "--token", USER)
    assert code == 0 and '"model_name": "synthetic"' in out
    client = ("--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key))
    code, out, _ = run(
        capsys, "topk", "u0", "-k", "2", "--target", mtls_server, *ca, *client, "--token", USER
    )
    assert code == 0 and out.splitlines()[0].split()[:2] == ["rank", "item_id"]
    # The old --ca-cert still works, with a warning.
    code, out, err = run(
        capsys, "info", "--target", tls_server, "--ca-cert", str(pki.ca_cert), "--token", USER
    )
    assert code == 0 and err == "warning: --ca-cert is deprecated; use --tls-ca\n"


def test_cli_tokens_and_health(
    mtls_server: str, pki: Pki, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.delenv("MFSERVE_TOKEN", raising=False)
    flags = ["--target", mtls_server, "--tls-ca", str(pki.ca_cert)]
    flags += ["--tls-cert", str(pki.client_cert), "--tls-key", str(pki.client_key)]
    code, out, _ = run(capsys, "health", *flags)
    assert (code, out) == (0, "SERVING\n")
    code, _, err = run(capsys, "info", *flags)
    assert code == 1 and err.startswith("error: UNAUTHENTICATED: GetModelInfo needs a bearer token")
    code, _, err = run(capsys, "info", *flags, "--token", "wrong")
    assert code == 1 and err.startswith("error: UNAUTHENTICATED: ")


def test_cli_usage_errors_name_the_file_or_flag(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    missing = tmp_path / "ca.pem"
    code, _, err = run(capsys, "info", "--tls-ca", str(missing))
    assert (code, err) == (
        2,
        f"error: cannot read the CA certificate {missing}: No such file or directory\n",
    )
    code, _, err = run(capsys, "info", "--tls-cert", str(missing))
    assert (code, err) == (
        2,
        "error: --tls-cert needs --tls-key: a client certificate and its private key\n",
    )


SCRIPT = Path(sys.executable).parent / "mfserve"  # the console script pip installed


def cli(*argv: str, entry: str = "mfserve") -> subprocess.CompletedProcess[str]:
    """The command in a fresh process, as a user runs it: ``python -m ENTRY`` or, for
    ``entry="script"``, the console script (whose import order is what hides gRPC's logs)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("GRPC_", "MFSERVE_"))}
    if entry == "script" and SCRIPT.is_file():
        command = [str(SCRIPT)]
    else:
        command = [sys.executable, "-m", "mfserve" if entry == "script" else entry]
    return subprocess.run(
        [*command, *argv], capture_output=True, text=True, timeout=120, check=False, env=env
    )


def test_cli_mismatch_is_one_clear_line_without_grpc_logs(
    server_address: str, tls_server: str, mtls_server: str, pki: Pki
) -> None:
    done = cli("info", "--tls", "--target", server_address)
    assert (done.returncode, done.stderr) == (
        1,
        f"error: UNAVAILABLE: the server at {server_address} speaks plaintext; drop --tls\n",
    )
    done = cli("info", "--target", tls_server, entry="script")
    assert (done.returncode, done.stderr) == (
        1,
        f"error: UNAVAILABLE: the server at {tls_server} speaks TLS; add --tls (or --tls-ca FILE)\n",
    )
    done = cli("info", "--target", mtls_server, "--tls-ca", str(pki.ca_cert), entry="mfserve")
    assert done.stderr == (
        f"error: UNAVAILABLE: the server at {mtls_server} requires a client certificate (mutual "
        "TLS); add --tls-cert FILE --tls-key FILE\n"
    )
