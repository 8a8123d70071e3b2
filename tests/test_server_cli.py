"""``mfserve serve``: light registration, help, defaults matching ``ServerConfig``, exit codes."""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
from server_harness import serve_command, serve_subprocess

from mfserve.server import cli
from mfserve.server.app import MiB, ServerConfig

FLAGS = [
    "--model",
    "--host",
    "--port",
    "--max-batch-pairs",
    "--max-k",
    "--max-concurrent-rpcs",
    "--max-message-mb",
    "--grace",
    "--compute-threads",
    "--max-batch-size",
    "--max-queue-delay-us",
    "--workers",
    "--torch-threads",
    "--pin-cpus",
    "--access-log",
    "--log-level",
]


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="mfserve")
    cli.register(root.add_subparsers(dest="command"))
    return root


def test_register_imports_no_heavy_modules() -> None:
    code = (
        "import argparse, sys\n"
        "from mfserve.server.cli import register\n"
        "register(argparse.ArgumentParser().add_subparsers())\n"
        "heavy = ('torch', 'grpc', 'numpy', 'google.protobuf')\n"
        "print(sorted(m for m in heavy if m in sys.modules))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_help_explains_every_flag_with_its_default() -> None:
    serve = parser()._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    for flag in FLAGS:
        assert flag in text
    for action in serve._actions:
        if action.option_strings and action.dest not in ("help", "model"):
            assert "default" in (action.help or ""), action.dest


def test_defaults_match_server_config() -> None:
    args = parser().parse_args(["serve", "--model", "m"])
    defaults = ServerConfig()
    assert args.host == defaults.host
    assert args.port == defaults.port
    assert args.max_batch_pairs == defaults.max_batch_pairs
    assert args.max_k == defaults.max_k
    assert args.max_concurrent_rpcs == defaults.max_concurrent_rpcs
    assert (
        args.max_message_mb * MiB
        == defaults.max_receive_message_bytes
        == defaults.max_send_message_bytes
    )
    assert args.grace == defaults.grace_seconds
    assert args.compute_threads == defaults.compute_threads
    assert args.max_batch_size == defaults.max_batch_size
    assert args.max_queue_delay_us == defaults.max_queue_delay_us
    assert args.workers == defaults.workers
    assert args.torch_threads == defaults.torch_threads
    assert args.lone_torch_threads == defaults.lone_torch_threads
    assert args.predict_on_loop_pairs == defaults.predict_on_loop_pairs == 0
    assert args.ann == defaults.ann
    assert args.ann_ef_search == defaults.ann_ef_search
    assert args.ann_nprobe == defaults.ann_nprobe
    assert args.access_log is defaults.access_log is False
    assert args.pin_cpus == "" and defaults.pin_cpus == ()
    assert args.handler is cli.run_serve
    # Every ServerConfig field is reachable from the command line or fixed on purpose.
    fixed = {"so_reuseport"}  # turned on by --workers in its worker processes, never by hand
    assert {f.name for f in dataclasses.fields(ServerConfig)} - fixed <= {
        "host",
        "port",
        "max_batch_pairs",
        "max_k",
        "max_concurrent_rpcs",
        "max_receive_message_bytes",
        "max_send_message_bytes",
        "grace_seconds",
        "access_log",
        "compute_threads",
        "max_batch_size",
        "max_queue_delay_us",
        "workers",
        "torch_threads",
        "lone_torch_threads",
        "predict_on_loop_pairs",
        "ann",
        "ann_ef_search",
        "ann_nprobe",
        "pin_cpus",
    }


def test_ann_modes_match_the_server() -> None:
    from mfserve.server.model_holder import ANN_MODES

    assert cli.ANN_MODES == ANN_MODES
    args = parser().parse_args(
        ["serve", "--model", "m", "--ann", "hnsw", "--ann-ef-search", "128", "--ann-nprobe", "8"]
    )
    assert (args.ann, args.ann_ef_search, args.ann_nprobe) == ("hnsw", 128, 8)


def test_flags_parse() -> None:
    args = parser().parse_args(
        [
            "serve",
            "--model",
            "m",
            "--port",
            "0",
            "--max-concurrent-rpcs",
            "0",
            "--log-level",
            "debug",
            "--access-log",
        ]
    )
    assert (args.port, args.max_concurrent_rpcs, args.log_level, args.access_log) == (
        0,
        0,
        "DEBUG",
        True,
    )


def test_pin_cpus_alone_means_auto() -> None:
    assert parser().parse_args(["serve", "--pin-cpus", "--model", "m"]).pin_cpus == "auto"
    assert parser().parse_args(["serve", "--model", "m", "--pin-cpus", "0,2-3"]).pin_cpus == "0,2-3"


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


def test_bad_config_exits_2(model_dir: Path) -> None:
    result = subprocess.run(
        serve_command(model_dir, "--max-k", "0"),
        check=False,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 2
    assert "max_k" in result.stderr


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
    with serve_subprocess(model_dir, entry="mfserve") as server:
        assert server.model == "synthetic v1"
        assert server.terminate() == 0
