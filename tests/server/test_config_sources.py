"""``mfserve serve`` settings from flags, ``MFSERVE_*`` variables and a ``--config`` TOML file
(flag > env > file > default), ``--print-config``, errors naming their source, and
``--log-format json``: all through real ``python -m mfserve.server serve`` processes."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
from pathlib import Path

import grpc
import pytest
from server_harness import SERVING_LINE, ServerProcess, serve_command, wait_for

from mfserve.v1 import recommender_pb2, recommender_pb2_grpc

SERVE = [sys.executable, "-m", "mfserve.server", "serve"]


def clean_env(**variables: str) -> dict[str, str]:
    """This environment without any MFSERVE_* (a developer's own must not leak in), plus these."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("MFSERVE_")}
    return {**env, "PYTHONUNBUFFERED": "1", **variables}


def run(*argv: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [*SERVE, *argv],
        env=env or clean_env(),
        capture_output=True,
        text=True,
        check=False,
        timeout=120,
    )


def printed(*argv: str, env: dict[str, str] | None = None) -> dict[str, tuple[str, str]]:
    """``--print-config``'s lines as ``key -> (value, source)``."""
    result = run(*argv, "--print-config", env=env)
    assert result.returncode == 0, result.stderr
    lines = {}
    for line in result.stdout.splitlines():
        if line.startswith("#"):
            continue
        setting, _, source = line.partition("  # ")
        key, _, value = setting.partition(" = ")
        lines[key] = (value, source)
    return lines


def write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_precedence_is_flag_env_file_default(tmp_path: Path) -> None:
    config = write(
        tmp_path / "serve.toml",
        'model = "models/from-file"\nport = 1111\nmax_k = 500\n\n[serve]\nmax_batch_size = 8\n',
    )
    env = clean_env(MFSERVE_PORT="2222", MFSERVE_MAX_K="600", MFSERVE_ACCESS_LOG="true")
    lines = printed("--config", str(config), "--port", "3333", env=env)
    assert lines["port"] == ("3333", "flag --port")  # flag over env over file
    assert lines["max_k"] == ("600", "env MFSERVE_MAX_K")  # env over file
    assert lines["max_batch_size"] == ("8", f"file {config} key serve.max_batch_size")
    assert lines["model"] == ('"models/from-file"', f"file {config} key model")
    assert lines["access_log"] == ("true", "env MFSERVE_ACCESS_LOG")
    assert lines["host"] == ('"127.0.0.1"', "default")
    assert lines["max_message_mb"] == ("64", "default")  # in the flag's units
    assert lines["log_format"] == ('"text"', "default")


def test_print_config_is_a_config_file_that_gives_the_same_settings(tmp_path: Path) -> None:
    env = clean_env(MFSERVE_MAX_MESSAGE_MB="2", MFSERVE_MAX_CONCURRENT_RPCS="0")
    first = run("--model", "models/m", "--grace", "0.5", "--print-config", env=env)
    assert first.returncode == 0, first.stderr
    assert "max_message_mb = 2  # env MFSERVE_MAX_MESSAGE_MB" in first.stdout
    again = printed("--config", str(write(tmp_path / "printed.toml", first.stdout)))
    assert again["max_message_mb"][0] == "2" and again["max_concurrent_rpcs"][0] == "0"
    assert again["grace"][0] == "0.5" and again["model"][0] == '"models/m"'


def test_print_config_loads_no_model() -> None:
    result = run("--model", "/no/such/model", "--print-config")
    assert result.returncode == 0, result.stderr
    assert "serving" not in result.stderr and "cannot load" not in result.stderr


def test_every_flag_has_a_variable() -> None:
    # Derived from the parser, so a field another change adds is covered with no list to update:
    # set every variable to the value printed for it and see each one win.
    lines = printed("--model", "m")
    variables = {"MFSERVE_" + key.upper(): value.strip('"') for key, (value, _) in lines.items()}
    variables.update(MFSERVE_ACCESS_LOG="1", MFSERVE_IDLE_POLL="0", MFSERVE_PIN_CPUS="auto")
    again = printed(env=clean_env(**variables))
    assert set(again) == set(lines) | {"pin_cpus"}
    for key, (_, source) in again.items():
        assert source == f"env MFSERVE_{key.upper()}", key


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("max_k = 0\n", "key max_k: '0' is out of range (at least 1)"),
        ("[serve]\nport = 70000\n", "key serve.port: '70000' is out of range (0 to 65535)"),
        ('workers = "two"\n', "key workers: 'two' is not a number"),
        ("access_log = 1\n", "key access_log: 1 is not true or false"),
        ('ann = "exact"\n', "key ann: invalid choice 'exact'"),
        ("max_kk = 5\n", "unknown key max_kk (did you mean max_k?)"),
        ("[serve]\nbogus = 1\n", "unknown key serve.bogus"),
        ("port = 1\n[serve]\nport = 2\n", "key port is given twice"),
        ("max_k = 5\nport = \n", "not valid TOML: Invalid value (at line 2, column 8)"),
    ],
)
def test_a_bad_file_value_names_the_file_and_key(tmp_path: Path, text: str, message: str) -> None:
    config = write(tmp_path / "bad.toml", text)
    result = run("--config", str(config), "--model", "m")
    assert result.returncode == 2
    assert f"mfserve serve: error: file {config}" in result.stderr, result.stderr
    assert message in result.stderr, result.stderr
    assert "serving" not in result.stderr


@pytest.mark.parametrize(
    ("variable", "value", "message"),
    [
        ("MFSERVE_PORT", "abc", "env MFSERVE_PORT: 'abc' is not a number"),
        ("MFSERVE_MAX_K", "0", "env MFSERVE_MAX_K: '0' is out of range (at least 1)"),
        ("MFSERVE_ACCESS_LOG", "maybe", "env MFSERVE_ACCESS_LOG: 'maybe' is not one of"),
        ("MFSERVE_LOG_FORMAT", "xml", "env MFSERVE_LOG_FORMAT: invalid choice 'xml'"),
    ],
)
def test_a_bad_variable_is_named(variable: str, value: str, message: str) -> None:
    result = run("--model", "m", env=clean_env(**{variable: value}))
    assert result.returncode == 2
    assert message in result.stderr, result.stderr


def test_a_missing_file_and_a_missing_model_exit_2(tmp_path: Path) -> None:
    missing = run("--config", str(tmp_path / "none.toml"), "--model", "m")
    assert (
        missing.returncode == 2 and f"file {tmp_path / 'none.toml'}: cannot read" in missing.stderr
    )
    no_model = run()
    assert no_model.returncode == 2 and "no model: give --model, MFSERVE_MODEL" in no_model.stderr


def test_the_config_file_serves(tmp_path: Path, model_dir: Path) -> None:
    config = write(
        tmp_path / "serve.toml",
        f'[serve]\nmodel = "{model_dir}"\nport = 0\nmax_k = 3\ngrace = 1\n',
    )
    proc = subprocess.Popen(
        [*SERVE, "--config", str(config)],
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = ServerProcess(proc)
    try:
        server.wait_started()
        assert server.model == "synthetic v1"
        with grpc.insecure_channel(server.address) as channel:
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
            with pytest.raises(grpc.RpcError) as error:  # max_k = 3 from the file
                stub.TopK(recommender_pb2.TopKRequest(user_id="u0", k=4), timeout=10)
            assert error.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    finally:
        assert server.terminate() == 0


class JsonServerProcess(ServerProcess):
    """The harness's server, finding the start line in the ``message`` of JSON lines."""

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.lines.append(line.rstrip("\n"))
            with contextlib.suppress(ValueError):  # a line that is not JSON fails the test later
                match = SERVING_LINE.search(json.loads(line)["message"])
                if match and not self._started.is_set():
                    self.port = int(match["port"])
                    self.address = f"{match['host']}:{self.port}"
                    self._started.set()
        self._started.set()


def json_server(model_dir: Path, *argv: str) -> JsonServerProcess:
    proc = subprocess.Popen(
        serve_command(model_dir, "--log-format", "json", *argv),
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    server = JsonServerProcess(proc)
    server.wait_started()
    return server


def test_json_logs_are_one_object_per_line(model_dir: Path) -> None:
    server = json_server(model_dir, "--access-log")
    try:
        with grpc.insecure_channel(server.address) as channel:
            stub = recommender_pb2_grpc.RecommenderServiceStub(channel)
            stub.TopK(recommender_pb2.TopKRequest(user_id="u0", k=3), timeout=10)
    finally:
        assert server.terminate() == 0
    records = []
    for line in server.lines:
        record = json.loads(line)  # every line, stdout and stderr alike
        assert {"time", "level", "message"} <= set(record), line
        records.append(record)
    [start] = [r for r in records if SERVING_LINE.search(r["message"])]
    assert (start["model"], start["version"]) == ("synthetic", 1)
    loaded = [r for r in records if r["message"].startswith("mfserve: loaded ")]
    assert loaded and all(r["version"] == 1 for r in loaded)
    [access] = [r for r in records if r["message"].startswith("access: ")]
    assert access["method"].endswith("/TopK") and access["code"] == "OK"
    assert any(r["message"] == "mfserve: stopped" for r in records)
    assert records[0]["time"].endswith("Z") and records[0]["level"] == "INFO"


def test_json_logs_with_workers_name_the_worker(model_dir: Path) -> None:
    server = json_server(model_dir, "--workers", "2")
    # The first worker's start line is not the parent's "ready": stop once every worker serves.
    assert wait_for(lambda: "workers ready" in server.log, timeout=60)
    assert server.terminate() == 0
    records = [json.loads(line) for line in server.lines]
    assert {r.get("worker") for r in records} >= {1, 2}
    assert any("starting 2 workers" in r["message"] and r["version"] == 1 for r in records)
