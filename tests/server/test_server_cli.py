"""``mfserve serve``: flags generated from ``ServerConfig`` and grouped in ``--help``, light
registration, clear argparse errors, exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import serve_command, serve_subprocess

from mfserve.server import cli
from mfserve.server.config import (
    ANN_MODES,
    GROUPS,
    MiB,
    ServerConfig,
    config_from_args,
    flag_fields,
)

# A value for each generated flag, and what the fields it sets become.
SAMPLES: dict[str, tuple[list[str], dict[str, object]]] = {
    "--ann": (["hnsw"], {"ann": "hnsw"}),
    "--ann-ef-search": (["128"], {"ann_ef_search": 128}),
    "--ann-nprobe": (["8"], {"ann_nprobe": 8}),
    "--poll-seconds": (["0"], {"poll_seconds": 0.0}),
    "--host": (["::1"], {"host": "::1"}),
    "--port": (["0"], {"port": 0}),
    "--grace": (["0.5"], {"grace_seconds": 0.5}),
    "--max-connection-age": (["300"], {"max_connection_age_seconds": 300.0}),
    "--metrics-port": (["9100"], {"metrics_port": 9100}),
    "--max-batch-pairs": (["10"], {"max_batch_pairs": 10}),
    "--max-k": (["7"], {"max_k": 7}),
    "--max-interactions": (["50"], {"max_interactions": 50}),
    "--max-batch-users": (["500"], {"max_batch_users": 500}),
    "--max-concurrent-rpcs": (["0"], {"max_concurrent_rpcs": None}),
    "--max-message-mb": (
        ["2"],
        {"max_receive_message_bytes": 2 * MiB, "max_send_message_bytes": 2 * MiB},
    ),
    "--workers": (["0"], {"workers": 0}),
    "--pin-cpus": (["0"], {"pin_cpus": (0,)}),
    "--idle-poll": ([], {"idle_poll": True}),
    "--max-batch-size": (["1"], {"max_batch_size": 1}),
    "--compute-threads": (["0"], {"compute_threads": 0}),
    "--torch-threads": (["2"], {"torch_threads": 2}),
    "--access-log": ([], {"access_log": True}),
    "--tls-cert": (["server.pem"], {"tls_cert": "server.pem"}),
    "--tls-key": (["server.key"], {"tls_key": "server.key"}),
    "--tls-client-ca": (["ca.pem"], {"tls_client_ca": "ca.pem"}),
    "--auth-tokens": (["tokens"], {"auth_tokens": "tokens"}),
    "--admin-tokens": (["admin"], {"admin_tokens": "admin"}),
    "--no-reflection": ([], {"no_reflection": True}),
    "--reflection-needs-token": ([], {"reflection_needs_token": True}),
}
# Benchmark-only knobs that are not flags (docs/serving.md says why none is shipped).
REMOVED = ["--lone-torch-threads", "--predict-on-loop-pairs", "--max-queue-delay-us"]


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mfserve")
    cli.register(root.add_subparsers(dest="command"))
    return root


def serve_parser() -> argparse.ArgumentParser:
    serve: argparse.ArgumentParser = parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    return serve


def config_of(*argv: str) -> ServerConfig:
    return config_from_args(parser().parse_args(["serve", "--model", "m", *argv]))


def test_register_imports_no_heavy_modules() -> None:
    code = (
        "import argparse, sys\n"
        "from mfserve.server.cli import register\n"
        "from mfserve.server.config import ServerConfig\n"
        "register(argparse.ArgumentParser().add_subparsers())\n"
        "ServerConfig(port=0)\n"
        "heavy = ('torch', 'grpc', 'numpy', 'google.protobuf')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_every_field_has_a_flag_but_the_one_workers_set() -> None:
    flagged = {spec.name for specs in flag_fields().values() for spec in specs}
    assert {spec.name for spec in dataclasses.fields(ServerConfig)} - flagged == {"so_reuseport"}
    assert set(flag_fields()) == set(SAMPLES)


def test_no_flags_give_the_default_config() -> None:
    assert config_of() == ServerConfig()
    assert config_of().max_concurrent_rpcs == 256


@pytest.mark.parametrize("flag", sorted(SAMPLES))
def test_each_flag_sets_its_fields(flag: str) -> None:
    argv, fields = SAMPLES[flag]
    if flag == "--pin-cpus" and 0 not in os.sched_getaffinity(0):
        pytest.skip("CPU 0 is not this process's")
    assert config_of(flag, *argv) == dataclasses.replace(ServerConfig(), **fields)


def test_pin_cpus_alone_means_every_allowed_cpu() -> None:
    allowed = tuple(sorted(os.sched_getaffinity(0)))
    assert config_of("--pin-cpus").pin_cpus == allowed
    assert config_of("--pin-cpus", "auto").pin_cpus == allowed


def test_help_is_grouped_and_shows_each_default_once() -> None:
    serve = serve_parser()
    text = serve.format_help()
    # Two screens at most: a list of operating flags (config sources, reload, metrics, security),
    # not one of benchmark knobs.
    assert len(text.splitlines()) < 120
    titles = [group.title for group in serve._action_groups]
    for title in GROUPS.values():
        assert title in titles and f"\n{title}:\n" in text
    assert "(default: None)" not in text and "(default: ())" not in text
    where = {
        action.option_strings[0]: group.title
        for group in serve._action_groups
        for action in group._group_actions
        if action.option_strings
    }
    assert where["--model"] == where["--ann"] == GROUPS["model"]
    assert where["--port"] == GROUPS["network"]
    assert where["--max-k"] == GROUPS["limits"]
    assert where["--workers"] == where["--pin-cpus"] == GROUPS["performance"]
    assert where["--log-level"] == where["--access-log"] == GROUPS["logging"]
    for action in serve._actions:
        if (
            action.option_strings
            and action.nargs != 0
            and action.dest not in ("help", "model", "config")
        ):
            assert (action.help or "").count("(default: ") == 1, action.dest
    assert "(default: 64)" in where_help(serve, "--max-message-mb")  # MiB, as the flag takes
    for flag in REMOVED:
        assert flag not in text


def where_help(serve: argparse.ArgumentParser, flag: str) -> str:
    [action] = [a for a in serve._actions if flag in a.option_strings]
    return action.help or ""


def test_ann_modes_match_the_server() -> None:
    from mfserve.server.model_holder import ANN_MODES as SERVER_ANN_MODES

    assert ANN_MODES == SERVER_ANN_MODES


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--port", "70000"], "argument --port: '70000' is out of range (0 to 65535)"),
        (["--max-k", "0"], "argument --max-k: '0' is out of range (at least 1)"),
        (["--workers", "two"], "argument --workers: 'two' is not a number"),
        (["--max-message-mb", "0"], "argument --max-message-mb: '0' is out of range"),
        (["--ann", "exact"], "argument --ann: invalid choice: 'exact'"),
        (["--pin-cpus", "0-x"], "argument --pin-cpus: --pin-cpus '0-x'"),
        (["--max-queue-delay-us", "0"], "unrecognized arguments: --max-queue-delay-us"),
    ],
)
def test_a_bad_value_is_an_argparse_error(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    with pytest.raises(SystemExit) as exit_:
        parser().parse_args(["serve", "--model", "m", *argv])
    assert exit_.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: mfserve") and message in err, err


def test_the_python_api_names_the_field_and_its_range() -> None:
    with pytest.raises(ValueError, match=r"ServerConfig.max_k=0 is out of range \(at least 1\)"):
        ServerConfig(max_k=0)


def test_missing_model_exits_1_with_a_message(tmp_path: Path) -> None:
    result = subprocess.run(
        serve_command(tmp_path / "no-such-model"),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 1
    assert "cannot load the model" in result.stderr and "no-such-model" in result.stderr


def test_bad_config_exits_2_before_loading_anything(model_dir: Path) -> None:
    result = subprocess.run(
        serve_command(model_dir, "--max-k", "0"),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "argument --max-k: '0' is out of range (at least 1)" in result.stderr
    assert "serving" not in result.stderr


def test_port_in_use_exits_1(model_dir: Path) -> None:
    with serve_subprocess(model_dir) as first:
        command = [*serve_command(model_dir), "--port", str(first.port)]  # the last --port wins
        result = subprocess.run(command, check=False, capture_output=True, text=True, timeout=120)
        assert result.returncode == 1
        assert "cannot bind" in result.stderr
        assert first.proc.poll() is None


@pytest.mark.skipif(
    importlib.util.find_spec("mfserve.client._cli") is None,
    reason="the mfserve dispatcher is not there yet",
)
def test_mfserve_serve_through_the_dispatcher(model_dir: Path) -> None:
    help_text = subprocess.run(
        [sys.executable, "-m", "mfserve", "serve", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert help_text.returncode == 0, help_text.stderr
    assert "--max-batch-pairs" in help_text.stdout
    # The benchmark harness is not a command of the installed package (python -m benchmarks...).
    bench = subprocess.run(
        [sys.executable, "-m", "mfserve", "bench", "--help"],
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bench.returncode == 2 and "invalid choice: 'bench'" in bench.stderr
    with serve_subprocess(model_dir, entry="mfserve") as server:
        assert server.model == "synthetic v1"
        assert server.terminate() == 0
