"""The SDK's packaging promises: thin imports, a sorted and complete ``__all__``, ``py.typed``."""

from __future__ import annotations

import inspect
import json
import subprocess
import sys
from pathlib import Path

import mfserve.client

HEAVY = ("torch", "pandas", "numpy", "sklearn", "pyarrow", "safetensors")


def modules_after(code: str) -> set[str]:
    """``sys.modules`` of a FRESH interpreter after running ``code`` (this one has torch loaded)."""
    probe = f"{code}\nimport json, sys\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", probe], capture_output=True, text=True, check=True, timeout=120
    ).stdout
    return set(json.loads(out.splitlines()[-1]))


def heavy(modules: set[str]) -> list[str]:
    return sorted(m for m in modules if m.split(".")[0] in HEAVY)


def test_importing_the_client_pulls_in_nothing_heavy() -> None:
    assert heavy(modules_after("import mfserve.client")) == []


def test_building_the_full_cli_parser_pulls_in_nothing_heavy() -> None:
    """``mfserve --help`` must work on the base install: every area's ``register`` stays thin."""
    loaded = modules_after("from mfserve.client._cli import build_parser; build_parser()")
    assert heavy(loaded) == []


def test_all_is_sorted_and_is_exactly_the_public_names() -> None:
    exported = mfserve.client.__all__
    assert exported == sorted(exported)
    public = {
        name
        for name, value in vars(mfserve.client).items()
        if not name.startswith("_") and not inspect.ismodule(value)
    }
    assert set(exported) == public


def test_public_classes_live_in_the_package_namespace() -> None:
    for name in mfserve.client.__all__:
        value = getattr(mfserve.client, name)
        assert value.__module__ == "mfserve.client", name


def test_py_typed_ships() -> None:
    assert (Path(mfserve.client.__file__).parent / "py.typed").is_file()
