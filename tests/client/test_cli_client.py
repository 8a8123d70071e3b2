"""The ``mfserve`` client commands end to end against a real server, and the dispatcher's rules."""

from __future__ import annotations

import argparse
import io
import json
import subprocess
import sys
import types
from pathlib import Path
from typing import Any

import pytest
from server_harness import running_server

from mfserve import __version__
from mfserve.client import _cli
from mfserve.client._cli import main

Run = tuple[int, str, str]
AREA_WARNING = "warning: the commands of mfserve."


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> Run:
    """Exit code, stdout, stderr; stderr without the warning about another area's commands
    failing to register (that area's own state, tested in ``test_help_lists_every_command``)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    err = "".join(
        line for line in err.splitlines(keepends=True) if not line.startswith(AREA_WARNING)
    )
    return code, out, err


@pytest.fixture
def cli(server_address: str, capsys: pytest.CaptureFixture[str]) -> Any:
    """``cli("topk", "u1")`` runs a client command against the module's server."""

    def invoke(command: str, *args: str) -> Run:
        return run(capsys, command, "--target", server_address, *args)

    return invoke


# ----------------------------------------------------------------------------- help, version
def test_help_lists_every_command(capsys: pytest.CaptureFixture[str]) -> None:
    code = main(["--help"])
    out = capsys.readouterr().out
    assert code == 0
    for command in ("predict", "batch-predict", "topk", "batch-topk", "similar", "info", "health"):
        assert f"    {command}" in out
    for area in ("mfserve.server.cli", "mfserve.training.cli"):
        try:
            module = __import__(area, fromlist=["register"])
            parser = argparse.ArgumentParser()
            module.register(parser.add_subparsers())
        except ImportError:
            continue  # that area's commands are not available in this tree yet
        for name in parser._subparsers._group_actions[0].choices:  # type: ignore[union-attr]
            assert f"    {name}" in out


def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "--version") == (0, f"mfserve {__version__}\n", "")


def test_usage_errors_exit_2(capsys: pytest.CaptureFixture[str]) -> None:
    assert run(capsys, "topk")[0] == 2  # the user is required
    code, _, err = run(capsys, "topk", "u1", "-k", "many")
    assert code == 2 and "invalid int value" in err
    assert run(capsys)[0] == 2  # no command: help on stderr


# ----------------------------------------------------------------------------- client commands
def test_predict_table_and_json(cli: Any) -> None:
    code, out, err = cli("predict", "u3", "i7")
    assert code == 0 and err == ""
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert lines["user_id"] == "u3" and lines["model_version"] == "1"
    assert 0.5 <= float(lines["rating"]) <= 5.0 and "missing_user_ids" not in lines
    code, out, _ = cli("predict", "nobody", "i7", "--cold-start")
    assert "missing_user_ids  nobody" in out.splitlines()
    code, out, _ = cli("predict", "nobody", "i7", "--cold-start", "--json")
    data = json.loads(out)
    assert data["missing_user_ids"] == ["nobody"] and 0.5 <= data["rating"] <= 5.0


def test_batch_predict_from_a_csv_file(cli: Any, tmp_path: Path) -> None:
    pairs = tmp_path / "pairs.csv"
    pairs.write_text("item,user\ni1,u1\ni2,u2\ni3,u3\n")  # header names the columns
    code, out, _ = cli("batch-predict", str(pairs), "--csv", "--batch-size", "2")
    assert code == 0
    rows = out.splitlines()
    assert rows[0] == "user,item,rating"
    assert [row.split(",")[:2] for row in rows[1:]] == [["u1", "i1"], ["u2", "i2"], ["u3", "i3"]]
    code, out, _ = cli("batch-predict", str(pairs))
    assert out.splitlines()[0].split() == ["user", "item", "rating"]
    assert len(out.splitlines()) == 4


def test_batch_predict_from_stdin_as_json(cli: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO("u1,i1\nghost,i2\n"))  # no header
    code, out, _ = cli("batch-predict", "--cold-start", "--json")
    data = json.loads(out)
    assert code == 0 and data["missing_user_ids"] == ["ghost"]
    assert [p["user_id"] for p in data["predictions"]] == ["u1", "ghost"]


def test_batch_predict_bad_input_exits_2(cli: Any, tmp_path: Path) -> None:
    code, _, err = cli("batch-predict", str(tmp_path / "missing.csv"))
    assert code == 2 and err.startswith("error: ")
    bad = tmp_path / "bad.csv"
    bad.write_text("u1\n")
    code, _, err = cli("batch-predict", str(bad))
    assert code == 2 and "expected user,item" in err


def test_topk_table_csv_and_json(cli: Any) -> None:
    code, out, _ = cli("topk", "u1", "-k", "3", "--metadata")
    assert code == 0
    header, *rows = out.splitlines()
    assert header.split() == ["rank", "item_id", "score", "title", "genres"]
    assert len(rows) == 3 and rows[0].split()[0] == "1" and "Item " in rows[0]
    code, out, _ = cli("topk", "u1", "-k", "3", "--csv", "--exclude", "i1", "i5")
    assert out.splitlines()[0] == "rank,item_id,score"
    code, out, _ = cli("topk", "u1", "-k", "2", "--json", "--candidates", "i1", "i5", "i9")
    data = json.loads(out)
    assert [item["rank"] for item in data["items"]] == [1, 2]
    assert {item["item_id"] for item in data["items"]} <= {"i1", "i5", "i9"}


def test_topk_cold_start_notes_the_unknown_ids(cli: Any) -> None:
    code, _, err = cli("topk", "nobody", "--cold-start", "--candidates", "i1", "zz")
    assert code == 0
    assert "unknown user ids (cold start): nobody" in err
    assert "unknown item ids (cold start): zz" in err


def test_similar(cli: Any) -> None:
    code, out, _ = cli("similar", "i8", "-k", "4", "--json")
    data = json.loads(out)
    assert code == 0 and len(data["items"]) == 4 and data["missing_ids"] == []


def test_info_table_and_json(cli: Any) -> None:
    code, out, _ = cli("info")
    lines = dict(line.split(None, 1) for line in out.splitlines())
    assert code == 0 and lines["item_count"] == "400"
    assert lines["hyperparameters.synthetic"] == "true"
    assert lines["last_reload_error"] == "-"  # no reload tried: a row, never a blank
    code, out, _ = cli("info", "--json")
    assert json.loads(out)["user_count"] == 60


def test_health(cli: Any) -> None:
    assert cli("health") == (0, "SERVING\n", "")
    code, out, _ = cli("health", "--json", "--wait", "5")
    assert code == 0 and json.loads(out) == {"service": "", "status": "SERVING"}


def test_health_not_serving_exits_1(capsys: pytest.CaptureFixture[str]) -> None:
    with running_server(None) as address:
        assert run(capsys, "health", "--target", address) == (1, "NOT_SERVING\n", "")


def test_service_errors_exit_1_with_the_status(cli: Any) -> None:
    code, out, err = cli("predict", "nobody", "i1")
    assert (code, out) == (1, "")
    assert err.startswith("error: NOT_FOUND: ") and "nobody" in err
    code, _, err = cli("topk", "u1", "-k", "-4")
    assert code == 1 and err.startswith("error: INVALID_ARGUMENT: ")


def test_connection_failure_exits_1(
    model_dir: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    with running_server(model_dir) as address:
        pass  # stopped: nothing listens there now
    monkeypatch.setenv("MFSERVE_TARGET", address)  # the default --target
    code, _, err = run(capsys, "info", "--timeout", "5")
    assert code == 1 and err.startswith("error: UNAVAILABLE: ")


def test_a_token_over_plaintext_to_a_remote_host_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    code, _, err = run(capsys, "info", "--target", "recs.example.com:50051", "--token", "t")
    assert code == 2 and "plaintext" in err


def test_python_dash_m_mfserve(server_address: str) -> None:
    done = subprocess.run(
        [sys.executable, "-m", "mfserve", "topk", "u1", "-k", "2", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
        env={"MFSERVE_TARGET": server_address, "PATH": ""},
    )
    assert done.returncode == 0, done.stderr
    assert len(json.loads(done.stdout)["items"]) == 2


# ----------------------------------------------------------------------------- other areas
def fake_area(
    monkeypatch: pytest.MonkeyPatch, command: str, error: BaseException
) -> types.ModuleType:
    """A command module like ``mfserve.training.cli`` whose handler fails with ``error``."""
    module = types.ModuleType("fake_area_cli")

    def handler(args: argparse.Namespace) -> int:
        raise error

    def register(subparsers: Any) -> None:
        subparsers.add_parser(command, help=f"fake {command}").set_defaults(handler=handler)

    module.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "fake_area_cli", module)
    monkeypatch.setattr(_cli, "_AREA_MODULES", ("fake_area_cli",))
    return module


@pytest.mark.parametrize(
    ("command", "missing", "extra"),
    [
        ("train", "torch", "train"),
        ("evaluate", "pandas", "train"),
        ("serve", "torch", "server"),
        ("serve", "grpc_health.v1", "server"),
        ("index", "faiss", "ann"),
    ],
)
def test_a_missing_extra_names_the_extra_to_install(
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    command: str,
    missing: str,
    extra: str,
) -> None:
    fake_area(
        monkeypatch, command, ModuleNotFoundError(f"No module named {missing!r}", name=missing)
    )
    code, _, err = run(capsys, command)
    assert code == 2
    assert err == (
        f"error: 'mfserve {command}' needs the [{extra}] extra: pip install 'mfserve[{extra}]'\n"
    )


def test_other_missing_modules_are_bugs_not_extras(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    fake_area(monkeypatch, "train", ModuleNotFoundError("No module named 'typo'", name="typo"))
    with pytest.raises(ModuleNotFoundError):
        main(["train"])


def test_absent_areas_are_skipped_and_broken_ones_warned_about(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(_cli, "_AREA_MODULES", ("mfserve.nowhere.cli",))
    code, out, err = run(capsys, "--help")
    assert code == 0 and err == "" and "predict" in out
    broken = types.ModuleType("broken_area_cli")

    def register(subparsers: Any) -> None:
        raise ImportError("cannot import name 'thing'")

    broken.register = register  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "broken_area_cli", broken)
    monkeypatch.setattr(_cli, "_AREA_MODULES", ("broken_area_cli",))
    code, out, err = run(capsys, "--help")
    assert code == 0 and "predict" in out
    assert "broken_area_cli" in err and "cannot import name" in err


def test_topk_and_predict_fold_in_interactions(cli: Any, server_address: str) -> None:
    from mfserve.client import RecommenderClient

    with RecommenderClient(server_address) as client:
        want = client.top_k(interactions=[("i3", 5.0), ("i7", 4.5), "i9"], k=4).item_ids
        rating = client.predict(None, "i20", interactions=[("i3", 5.0)]).rating
    code, out, _ = cli(
        "topk", "--interactions", "i3:5,i7:4.5", "--interactions", "i9", "-k", "4", "--json"
    )
    assert code == 0
    assert [item["item_id"] for item in json.loads(out)["items"]] == want
    code, _, err = cli("topk", "newbie", "--interactions", "i3:5,nope:1", "-k", "2")
    assert code == 0
    assert "unknown user ids (folded in from --interactions): newbie" in err
    assert "unknown item ids (skipped): nope" in err
    code, out, _ = cli("predict", "", "i20", "--interactions", "i3:5", "--json")
    assert code == 0 and json.loads(out)["rating"] == pytest.approx(rating)
    code, out, _ = cli("topk", "u1", "-k", "6", "--page-size", "4", "--csv")
    assert code == 0 and len(out.splitlines()) == 5


@pytest.mark.parametrize("bad", ["i3:x", ":5", "i3:5:1:2", "i3:inf"])
def test_bad_interactions_flag_names_the_entry(cli: Any, bad: str) -> None:
    code, _, err = cli("topk", "--interactions", bad)
    assert code == 2
    assert f"argument --interactions: {bad!r}" in err, err


def test_topk_needs_a_user_or_interactions(cli: Any) -> None:
    code, _, err = cli("topk")
    assert code == 2 and "give a user id" in err


def test_batch_topk_streams_every_users_list(cli: Any, server_address: str, tmp_path: Path) -> None:
    from mfserve.client import RecommenderClient

    users = tmp_path / "users.txt"
    users.write_text("u1\n\nu2\nu3\n")
    code, out, _ = cli("batch-topk", str(users), "-k", "3")
    assert code == 0
    header, *rows = out.splitlines()
    assert header == "user,rank,item,score" and len(rows) == 9
    with RecommenderClient(server_address) as client:
        assert [r.split(",")[2] for r in rows[:3]] == client.top_k("u1", k=3).item_ids
    code, out, _ = cli("batch-topk", str(users), "-k", "2", "--json")
    lines = [json.loads(line) for line in out.splitlines()]
    assert [line["user_id"] for line in lines] == ["u1", "u2", "u3"]
    assert all(len(line["items"]) == 2 for line in lines)
    users.write_text("u1\nghost\n")
    code, _, err = cli("batch-topk", str(users))
    assert code == 1 and "ghost" in err
