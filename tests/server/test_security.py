"""The server's TLS, mutual TLS and bearer tokens, against real servers with certificates made here.

What the SDK, the CLI client and grpcurl do against these servers is in tests/client and
tests/e2e; this file checks the server itself over plain grpc channels.
"""

from __future__ import annotations

import contextlib
import logging
import os
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc
from server_harness import running_server, running_server_handle
from tls_certs import Pki, make_pki

from mfserve.server.app import create_server
from mfserve.server.auth import SecurityError, Tokens, read_tokens
from mfserve.server.config import ServerConfig
from mfserve.v1 import recommender_pb2 as pb
from mfserve.v1 import recommender_pb2_grpc as pb_grpc

USER, ADMIN = "user-token-0123", "admin-token-4567"


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Pki:
    return make_pki(tmp_path_factory.mktemp("pki"))


@pytest.fixture(scope="module")
def token_files(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, Path]:
    folder = tmp_path_factory.mktemp("tokens")
    users, admins = folder / "tokens", folder / "admin-tokens"
    users.write_text(f"# the web frontend\n{USER}\n\n  another-user-token  # the batch job\n")
    admins.write_text(f"{ADMIN}\n")
    return users, admins


@contextlib.contextmanager
def _plaintext_server(model_dir: Path, **config: Any) -> Iterator[Any]:
    """A channel to a plaintext server over ``model_dir`` configured with ``config``."""
    with running_server(model_dir, **config) as address, grpc.insecure_channel(address) as channel:
        yield channel


def _channel(address: str, pki: Pki | None, *, client_cert: tuple[Path, Path] | None = None) -> Any:
    if pki is None:
        return grpc.insecure_channel(address)
    key = cert = None
    if client_cert is not None:
        cert, key = (path.read_bytes() for path in client_cert)
    credentials = grpc.ssl_channel_credentials(pki.ca_cert.read_bytes(), key, cert)
    return grpc.secure_channel(address, credentials)


def _code(call: Any, *args: Any, **kwargs: Any) -> tuple[grpc.StatusCode, str]:
    try:
        call(*args, timeout=10, **kwargs)
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


def _bearer(token: str) -> list[tuple[str, str]]:
    return [("authorization", f"Bearer {token}")]


def _health(channel: Any) -> tuple[grpc.StatusCode, str]:
    return _code(health_pb2_grpc.HealthStub(channel).Check, health_pb2.HealthCheckRequest())


def _list_services(channel: Any, metadata: Any = None) -> tuple[grpc.StatusCode, str]:
    stub = reflection_pb2_grpc.ServerReflectionStub(channel)
    request = reflection_pb2.ServerReflectionRequest(list_services="")
    try:
        for _ in stub.ServerReflectionInfo(iter([request]), timeout=10, metadata=metadata):
            pass
    except grpc.RpcError as exc:
        return exc.code(), exc.details() or ""
    return grpc.StatusCode.OK, ""


# ---------------------------------------------------------------------------- TLS and mTLS
def test_tls_serves_a_client_that_trusts_the_ca_and_refuses_plaintext(
    model_dir: Path, pki: Pki
) -> None:
    with running_server(
        model_dir, tls_cert=str(pki.server_cert), tls_key=str(pki.server_key)
    ) as address:
        with _channel(address, pki) as channel:
            assert _health(channel)[0] is grpc.StatusCode.OK
            stub = pb_grpc.RecommenderServiceStub(channel)
            assert stub.TopK(pb.TopKRequest(user_id="u0", k=3), timeout=10).items
        with _channel(address, None) as channel:
            assert _health(channel)[0] is grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_needs_a_client_certificate_from_the_ca(
    model_dir: Path, pki: Pki, tmp_path: Path
) -> None:
    other = make_pki(tmp_path / "other", ca_name="some other CA")
    with running_server(
        model_dir,
        tls_cert=str(pki.server_cert),
        tls_key=str(pki.server_key),
        tls_client_ca=str(pki.ca_cert),
    ) as address:
        with _channel(address, pki, client_cert=(pki.client_cert, pki.client_key)) as channel:
            assert _health(channel)[0] is grpc.StatusCode.OK
        with _channel(address, pki) as channel:  # no client certificate
            assert _health(channel)[0] is grpc.StatusCode.UNAVAILABLE
        with _channel(address, pki, client_cert=(other.client_cert, other.client_key)) as channel:
            assert _health(channel)[0] is grpc.StatusCode.UNAVAILABLE


def test_certificates_rotate_on_reload_without_a_restart(
    model_dir: Path, pki: Pki, tmp_path: Path
) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    rotated = make_pki(tmp_path / "rotated", ca_name="the next CA")
    with running_server_handle(model_dir, tls_cert=str(cert), tls_key=str(key)) as handle:
        address = f"127.0.0.1:{handle.port}"
        with _channel(address, pki) as channel:
            assert _health(channel)[0] is grpc.StatusCode.OK
        # Files replaced as a rotation does (new files renamed over the old), then SIGHUP's path.
        for source, target in ((rotated.server_cert, cert), (rotated.server_key, key)):
            shutil.copy(source, target.with_suffix(".new"))
            os.replace(target.with_suffix(".new"), target)
        handle.call(handle.server.reload_on_signal())
        with _channel(address, rotated) as channel:
            assert _health(channel)[0] is grpc.StatusCode.OK
        with _channel(address, pki) as channel:  # a new connection gets the new certificate
            assert _health(channel)[0] is grpc.StatusCode.UNAVAILABLE


def test_a_bad_rotated_certificate_is_refused_and_the_old_one_serves_on(
    model_dir: Path, pki: Pki, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    cert, key = tmp_path / "server.pem", tmp_path / "server.key"
    shutil.copy(pki.server_cert, cert)
    shutil.copy(pki.server_key, key)
    with running_server_handle(model_dir, tls_cert=str(cert), tls_key=str(key)) as handle:
        address = f"127.0.0.1:{handle.port}"
        shutil.copy(pki.client_key, key)  # a key that is not the certificate's
        with caplog.at_level(logging.ERROR, logger="mfserve.server"):
            handle.call(handle.server.reload_on_signal())
        assert f"{key} (--tls-key) is not the private key of the certificate {cert}" in caplog.text
        with _channel(address, pki) as channel:
            assert _health(channel)[0] is grpc.StatusCode.OK


# ---------------------------------------------------------------------------- startup errors
def _startup_error(**config: Any) -> str:
    with pytest.raises(SecurityError) as caught:
        create_server(None, ServerConfig(**config))
    return str(caught.value)


def test_bad_tls_files_are_startup_errors_naming_the_file(pki: Pki, tmp_path: Path) -> None:
    missing = tmp_path / "missing.pem"
    not_pem = tmp_path / "notes.txt"
    not_pem.write_text("not a certificate\n")
    cert, key = str(pki.server_cert), str(pki.server_key)
    message = _startup_error(tls_cert=str(missing), tls_key=key)
    assert str(missing) in message and "--tls-cert" in message and "cannot read" in message
    message = _startup_error(tls_cert=cert, tls_key=str(tmp_path))  # a folder: unreadable
    assert f"{tmp_path} (--tls-key): cannot read the private key" in message
    message = _startup_error(tls_cert=str(not_pem), tls_key=key)
    assert f"{not_pem} (--tls-cert): not a PEM certificate" in message
    message = _startup_error(tls_cert=cert, tls_key=str(pki.client_key))
    assert message == (
        f"{pki.client_key} (--tls-key) is not the private key of the certificate {cert}"
    )
    message = _startup_error(tls_cert=cert, tls_key=key, tls_client_ca=str(not_pem))
    assert f"{not_pem} (--tls-client-ca): not a PEM CA bundle" in message
    assert "--tls-cert needs --tls-key" in _startup_error(tls_cert=cert)
    assert "--tls-client-ca needs --tls-cert and --tls-key" in _startup_error(
        tls_client_ca=str(pki.ca_cert)
    )


def test_bad_token_files_are_startup_errors_naming_file_line_and_column(tmp_path: Path) -> None:
    tokens = tmp_path / "tokens"
    tokens.write_text("# ok\ngood-token\n  bad token\n")
    assert _startup_error(auth_tokens=str(tokens)).startswith(f"{tokens}:3:6 (--auth-tokens)")
    tokens.write_text("# only a comment\n\n")
    assert _startup_error(admin_tokens=str(tokens)) == (
        f"{tokens} (--admin-tokens): no token in the file (one per line)"
    )
    tokens.write_bytes(b"\xff\xfe token\n")
    assert "not UTF-8 text" in _startup_error(auth_tokens=str(tokens))
    assert "cannot read the tokens" in _startup_error(auth_tokens=str(tmp_path / "absent"))
    assert "needs --auth-tokens" in _startup_error(reflection_needs_token=True)


def test_the_serve_command_exits_2_naming_the_file(
    model_dir: Path, pki: Pki, tmp_path: Path
) -> None:
    command = [sys.executable, "-m", "mfserve.server", "serve", "--model", str(model_dir)]
    flags = ["--port", "0", "--tls-cert", str(pki.server_cert), "--tls-key", str(pki.client_key)]
    done = subprocess.run(
        [*command, *flags], capture_output=True, text=True, timeout=120, check=False
    )
    assert done.returncode == 2, done.stderr
    assert f"{pki.client_key} (--tls-key) is not the private key" in done.stderr
    assert "serving" not in done.stderr


def test_token_digests_match_only_the_exact_token(tmp_path: Path) -> None:
    path = tmp_path / "tokens"
    path.write_text("abc123\nzz==\n")
    tokens = Tokens(read_tokens(path, "--auth-tokens"), frozenset())
    assert tokens.role("abc123") == "user" and tokens.role("zz==") == "user"
    for wrong in ("abc12", "abc1234", "ABC123", "", " abc123", "zz="):
        assert tokens.role(wrong) is None


# ---------------------------------------------------------------------------- tokens
@pytest.fixture(scope="module")
def token_server(model_dir: Path, token_files: tuple[Path, Path]) -> Iterator[str]:
    users, admins = token_files
    with running_server(model_dir, auth_tokens=str(users), admin_tokens=str(admins)) as address:
        yield address


def test_tokens_guard_every_call_but_health(token_server: str) -> None:
    with grpc.insecure_channel(token_server) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        topk = pb.TopKRequest(user_id="u0", k=3)
        code, message = _code(stub.TopK, topk)
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert "TopK needs a bearer token" in message
        code, message = _code(stub.TopK, topk, metadata=_bearer("not-a-token"))
        assert code is grpc.StatusCode.UNAUTHENTICATED
        assert message == "the bearer token is not one this server accepts"
        assert "not-a-token" not in message
        code, message = _code(stub.TopK, topk, metadata=[("authorization", "Basic dXNlcg==")])
        assert code is grpc.StatusCode.UNAUTHENTICATED and "'Bearer <token>'" in message
        for token in (USER, "another-user-token", ADMIN):
            assert _code(stub.TopK, topk, metadata=_bearer(token))[0] is grpc.StatusCode.OK
        # Refused before the request is parsed: bytes that are no request are refused the same.
        raw = channel.unary_unary("/mfserve.v1.RecommenderService/TopK")
        assert _code(raw, b"\xff\xff")[0] is grpc.StatusCode.UNAUTHENTICATED
        assert _health(channel)[0] is grpc.StatusCode.OK
        assert _list_services(channel)[0] is grpc.StatusCode.OK  # reflection: open by default


def test_only_admin_tokens_may_reload(token_server: str) -> None:
    with grpc.insecure_channel(token_server) as channel:
        reload = pb_grpc.RecommenderServiceStub(channel).ReloadModel
        request = pb.ReloadModelRequest()
        assert _code(reload, request)[0] is grpc.StatusCode.UNAUTHENTICATED
        assert (
            _code(reload, request, metadata=_bearer("wrong"))[0] is grpc.StatusCode.UNAUTHENTICATED
        )
        code, message = _code(reload, request, metadata=_bearer(USER))
        assert code is grpc.StatusCode.PERMISSION_DENIED
        assert message == "ReloadModel needs a token of the server's --admin-tokens file"
        assert _code(reload, request, metadata=_bearer(ADMIN))[0] is grpc.StatusCode.OK


def test_without_an_admin_file_no_token_may_reload(
    model_dir: Path, token_files: tuple[Path, Path]
) -> None:
    with _plaintext_server(model_dir, auth_tokens=str(token_files[0])) as channel:
        reload = pb_grpc.RecommenderServiceStub(channel).ReloadModel
        code, message = _code(reload, pb.ReloadModelRequest(), metadata=_bearer(USER))
        assert code is grpc.StatusCode.PERMISSION_DENIED and "--admin-tokens" in message


def test_admin_tokens_alone_guard_reload_and_leave_the_rest_open(
    model_dir: Path, token_files: tuple[Path, Path]
) -> None:
    with _plaintext_server(model_dir, admin_tokens=str(token_files[1])) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        assert _code(stub.TopK, pb.TopKRequest(user_id="u0", k=3))[0] is grpc.StatusCode.OK
        reload = stub.ReloadModel
        assert _code(reload, pb.ReloadModelRequest())[0] is grpc.StatusCode.UNAUTHENTICATED
        assert (
            _code(reload, pb.ReloadModelRequest(), metadata=_bearer(ADMIN))[0] is grpc.StatusCode.OK
        )


def test_reflection_can_need_a_token_or_be_off(
    model_dir: Path, token_files: tuple[Path, Path]
) -> None:
    users = str(token_files[0])
    with _plaintext_server(model_dir, auth_tokens=users, reflection_needs_token=True) as channel:
        assert _list_services(channel)[0] is grpc.StatusCode.UNAUTHENTICATED
        assert _list_services(channel, _bearer(USER))[0] is grpc.StatusCode.OK
        assert _health(channel)[0] is grpc.StatusCode.OK
    with _plaintext_server(model_dir, no_reflection=True) as channel:
        assert _list_services(channel)[0] is grpc.StatusCode.UNIMPLEMENTED


def test_token_files_are_reread_on_reload(model_dir: Path, tmp_path: Path) -> None:
    users, admins = tmp_path / "tokens", tmp_path / "admin"
    users.write_text("first-token\n")
    admins.write_text(f"{ADMIN}\n")
    with _plaintext_server(model_dir, auth_tokens=str(users), admin_tokens=str(admins)) as channel:
        stub = pb_grpc.RecommenderServiceStub(channel)
        info = pb.GetModelInfoRequest()
        assert _code(stub.GetModelInfo, info, metadata=_bearer("first-token"))[0].name == "OK"
        users.write_text("second-token\n")
        assert _code(stub.ReloadModel, pb.ReloadModelRequest(), metadata=_bearer(ADMIN))[0] is (
            grpc.StatusCode.OK
        )
        assert _code(stub.GetModelInfo, info, metadata=_bearer("second-token"))[0].name == "OK"
        assert (
            _code(stub.GetModelInfo, info, metadata=_bearer("first-token"))[0]
            is grpc.StatusCode.UNAUTHENTICATED
        )
        # A broken file on the next reload keeps the tokens in force.
        users.write_text("not a token line\n")
        stub.ReloadModel(pb.ReloadModelRequest(), metadata=_bearer(ADMIN), timeout=10)
        assert _code(stub.GetModelInfo, info, metadata=_bearer("second-token"))[0].name == "OK"


def test_tls_and_tokens_together(model_dir: Path, pki: Pki, token_files: tuple[Path, Path]) -> None:
    with (
        running_server(
            model_dir,
            tls_cert=str(pki.server_cert),
            tls_key=str(pki.server_key),
            tls_client_ca=str(pki.ca_cert),
            auth_tokens=str(token_files[0]),
        ) as address,
        _channel(address, pki, client_cert=(pki.client_cert, pki.client_key)) as channel,
    ):
        stub = pb_grpc.RecommenderServiceStub(channel)
        request = pb.TopKRequest(user_id="u0", k=3)
        assert _code(stub.TopK, request)[0] is grpc.StatusCode.UNAUTHENTICATED
        assert _code(stub.TopK, request, metadata=_bearer(USER))[0] is grpc.StatusCode.OK
