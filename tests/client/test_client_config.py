"""Unit tests of the channel configuration: the service config, options, TLS and token rules."""

from __future__ import annotations

import json
from typing import Any

import grpc
import pytest

from mfserve.client import RecommenderClient, RetryPolicy
from mfserve.client._config import channel_options, client_settings, is_local_target


def options_of(**kwargs: Any) -> dict[str, Any]:
    return dict(channel_options(RetryPolicy(**kwargs)))


def test_service_config_retries_unavailable_for_every_method_round_robin() -> None:
    options = options_of(max_attempts=4, initial_backoff=0.25, max_backoff=3, backoff_multiplier=2)
    assert options["grpc.enable_retries"] == 1
    config = json.loads(options["grpc.service_config"])
    assert config["loadBalancingConfig"] == [{"round_robin": {}}]
    [method] = config["methodConfig"]
    assert {"service": "mfserve.v1.RecommenderService"} in method["name"]
    assert method["retryPolicy"] == {
        "maxAttempts": 4,
        "initialBackoff": "0.25s",
        "maxBackoff": "3s",
        "backoffMultiplier": 2,
        "retryableStatusCodes": ["UNAVAILABLE", "RESOURCE_EXHAUSTED"],
    }
    # Deadlines are per call (see _config's docstring), never in the service config.
    assert "timeout" not in method
    assert "waitForReady" not in method


def test_one_attempt_means_no_retry_policy_and_wait_for_ready_is_config() -> None:
    options = dict(channel_options(RetryPolicy(max_attempts=1), wait_for_ready=True))
    [method] = json.loads(options["grpc.service_config"])["methodConfig"]
    assert "retryPolicy" not in method
    assert method["waitForReady"] is True


def test_keepalive_and_reconnect_options_and_user_options_win() -> None:
    options = dict(
        channel_options(RetryPolicy(), extra=[("grpc.keepalive_time_ms", 5), ("grpc.x", 1)])
    )
    assert options["grpc.keepalive_time_ms"] == 5
    assert options["grpc.x"] == 1
    assert options["grpc.keepalive_timeout_ms"] > 0
    assert options["grpc.max_reconnect_backoff_ms"] <= 10_000


@pytest.mark.parametrize("attempts", [0, 6])
def test_retry_policy_refuses_attempts_grpc_would_ignore(attempts: int) -> None:
    with pytest.raises(ValueError, match="max_attempts"):
        RetryPolicy(max_attempts=attempts)


@pytest.mark.parametrize(
    ("target", "local"),
    [
        ("localhost:50051", True),
        ("127.0.0.1:1", True),
        ("127.0.0.2:1", True),
        ("[::1]:50051", True),
        ("dns:///localhost:50051", True),
        ("ipv4:127.0.0.1:1,127.0.0.1:2", True),
        ("ipv4:127.0.0.1:1,10.0.0.1:2", False),
        ("unix:/tmp/mfserve.sock", True),
        ("unix:///tmp/mfserve.sock", True),
        ("recs.example.com:443", False),
        ("dns:///recs.example.com:443", False),
        ("10.1.2.3:50051", False),
        ("[2001:db8::1]:50051", False),
        ("localhost.evil.com:1", False),
    ],
)
def test_is_local_target(target: str, local: bool) -> None:
    assert is_local_target(target) is local


def settings(target: str, **overrides: Any) -> Any:
    arguments: dict[str, Any] = {
        "timeout": 10.0,
        "tls": False,
        "token": None,
        "metadata": (),
        "retries": 4,
        "wait_for_ready": False,
        "options": (),
        "max_batch_pairs": 10,
        "max_batch_bytes": 100,
        "own_channel": True,
    }
    return client_settings(target, **{**arguments, **overrides})


def test_token_is_refused_over_plaintext_to_another_machine() -> None:
    with pytest.raises(ValueError, match="plaintext"):
        settings("recs.example.com:50051", token="s3cret")
    with pytest.raises(ValueError, match="plaintext"):
        RecommenderClient("recs.example.com:50051", token="s3cret")


def test_token_goes_as_bearer_metadata_over_tls_or_locally() -> None:
    remote = settings("recs.example.com:443", token="s3cret", tls=True, metadata={"x-a": "1"})
    assert remote.credentials is not None
    assert remote.metadata == (("x-a", "1"), ("authorization", "Bearer s3cret"))
    local = settings("localhost:50051", token="s3cret")
    assert local.credentials is None
    assert ("authorization", "Bearer s3cret") in local.metadata


def test_tls_accepts_credentials_and_a_certificate_path(tmp_path: Any) -> None:
    credentials = grpc.ssl_channel_credentials()
    assert settings("h:1", tls=credentials).credentials is credentials
    with pytest.raises(OSError):
        settings("h:1", tls=tmp_path / "missing.pem")
    with pytest.raises(TypeError):
        settings("h:1", tls=3)


@pytest.mark.parametrize("bad", [{"timeout": 0}, {"max_batch_pairs": 0}, {"retries": 9}])
def test_bad_arguments_are_refused(bad: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        settings("localhost:1", **bad)


def test_a_caller_channel_is_used_and_left_open() -> None:
    channel = grpc.insecure_channel("localhost:1")
    try:
        with RecommenderClient("remote.example.com:1", token="t", channel=channel) as client:
            assert client.channel is channel
        # Still open: a call fails as an RPC (a closed channel would raise ValueError instead).
        with pytest.raises(grpc.RpcError):
            channel.unary_unary("/x/y")(b"", timeout=0.05)
    finally:
        channel.close()
