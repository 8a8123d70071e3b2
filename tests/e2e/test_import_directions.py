"""The allowed import directions between the packages (docs/architecture.md), read from the source.

Every module of every source folder is parsed with ``ast``; every ``import`` and ``from ... import``
counts, at module level or inside a function, a class or an ``if TYPE_CHECKING:`` block, since a
lazy import still ties the packages together. A string that names a module (``"mfserve.server.app"``
in an ``importlib.import_module`` table) counts too, with one documented exception: the ``mfserve``
dispatcher in ``client/_cli.py`` finds the other areas' ``cli`` modules by name at run time.
"""

from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]

# Source folder -> the package it is installed (or, for benchmarks, run) as. The most specific
# folder wins: protos/mfserve/v1/ is mfserve.v1, the rest of protos/mfserve/ the root package.
FOLDERS = {
    "protos/mfserve/v1": "mfserve.v1",
    "protos/mfserve": "mfserve",
    "client": "mfserve.client",
    "server": "mfserve.server",
    "training": "mfserve.training",
    "benchmarks": "benchmarks",
}
# Area -> the areas it may import (its own included).
ALLOWED = {
    "mfserve": {"mfserve", "mfserve.client"},  # _command (and __main__) is the console script
    "mfserve.v1": {"mfserve.v1"},
    "mfserve.client": {"mfserve.client", "mfserve.v1", "mfserve"},
    "mfserve.server": {"mfserve.server", "mfserve.training", "mfserve.v1", "mfserve"},
    "mfserve.training": {"mfserve.training", "mfserve.v1", "mfserve"},
    "benchmarks": {
        "benchmarks",
        "mfserve",
        "mfserve.v1",
        "mfserve.client",
        "mfserve.server",
        "mfserve.training",
    },
}
AREAS = sorted(ALLOWED, key=len, reverse=True)  # "mfserve.v1" before "mfserve"
# The dispatcher's run-time registration (client/_cli.py): the only cross-area names allowed.
DISPATCHER = ("client/_cli.py", "_AREA_MODULES")
DISPATCHED = {"mfserve.training.cli", "mfserve.server.cli"}
# A string that is a whole module path of ours, not prose that mentions one.
MODULE_NAME = re.compile(r"(?:mfserve|benchmarks)(?:\.[A-Za-z_]\w*)*")
# The source folders' own names: importable from a checkout, absent from an installed wheel.
BARE = {"server", "client", "training", "protos", "benchmarks"}


@dataclass(frozen=True)
class Edge:
    source: str  # path relative to the repository root
    line: int
    target: str  # the imported module, absolute
    dynamic: bool = False  # named in a string, not an import statement

    def __str__(self) -> str:
        how = "names" if self.dynamic else "imports"
        return f"{self.source}:{self.line} {how} {self.target}"


def area_of(module: str) -> str | None:
    for area in AREAS:
        if module == area or module.startswith(area + "."):
            return area
    return None


def modules() -> list[tuple[Path, str]]:
    """(file, dotted module name) for every Python file of every source folder."""
    found: dict[Path, str] = {}
    for folder, package in sorted(FOLDERS.items(), key=lambda kv: len(kv[0]), reverse=True):
        for path in sorted((ROOT / folder).rglob("*.py")):
            if path in found or "__pycache__" in path.parts:
                continue
            parts = list(path.relative_to(ROOT / folder).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[path] = ".".join([package, *parts])
    return sorted(found.items())


def edges(path: Path, module: str, root: Path = ROOT) -> list[Edge]:
    """What the module at ``path`` (named ``module``) imports or names, targets made absolute."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    package = module if path.name == "__init__.py" else module.rpartition(".")[0]
    source = path.relative_to(root).as_posix()
    found: list[Edge] = []
    skipped: set[int] = set()  # string nodes that are not module references
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found += [Edge(source, node.lineno, alias.name) for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                anchor = package.split(".")
                anchor = anchor[: len(anchor) - (node.level - 1)]
                base = ".".join([*anchor, *([base] if base else [])])
            for alias in node.names:
                # base.name: `from mfserve import client` is the subpackage, not the root.
                target = base if alias.name == "*" else f"{base}.{alias.name}"
                found.append(Edge(source, node.lineno, target))
        elif (
            isinstance(node, ast.Assign)
            and source == DISPATCHER[0]
            and any(isinstance(t, ast.Name) and t.id == DISPATCHER[1] for t in node.targets)
        ):
            # Checked on its own below: it may name exactly the DISPATCHED modules.
            skipped |= {id(n) for n in ast.walk(node.value)}
        elif isinstance(node, ast.Call) and _called(node) == "getLogger":
            # A logger's name follows the package names but imports nothing.
            skipped |= {id(n) for n in node.args}
    for node in ast.walk(tree):
        if (
            isinstance(node, ast.Constant)
            and isinstance(node.value, str)
            and MODULE_NAME.fullmatch(node.value)
            and id(node) not in skipped
        ):
            found.append(Edge(source, node.lineno, node.value, dynamic=True))
    return found


def _called(call: ast.Call) -> str:
    function = call.func
    if isinstance(function, ast.Attribute):
        return function.attr
    return function.id if isinstance(function, ast.Name) else ""


ALL_MODULES = modules()


def test_every_source_folder_has_modules() -> None:
    seen = {area_of(module) for _path, module in ALL_MODULES}
    assert seen == set(ALLOWED), seen
    assert len(ALL_MODULES) > 40


@pytest.mark.parametrize("area", sorted(ALLOWED))
def test_imports_follow_the_allowed_directions(area: str) -> None:
    forbidden = []
    for path, module in ALL_MODULES:
        if area_of(module) != area:
            continue
        for edge in edges(path, module):
            top = edge.target.split(".")[0]
            if top in BARE and not (area == "benchmarks" == top):
                forbidden.append(f"{edge} (a source folder's name; import it as mfserve.*)")
                continue
            target = area_of(edge.target)
            if target is not None and target not in ALLOWED[area]:
                forbidden.append(str(edge))
    assert not forbidden, f"{area} may import only {sorted(ALLOWED[area])}:\n" + "\n".join(
        forbidden
    )


def test_the_dispatcher_is_the_one_dynamic_exception() -> None:
    """The client's table of the other areas' command modules: each is registered by name."""
    path = ROOT / DISPATCHER[0]
    tree = ast.parse(path.read_text(encoding="utf-8"))
    tables = [
        node
        for node in ast.walk(tree)
        if isinstance(node, ast.Assign)
        and any(isinstance(t, ast.Name) and t.id == DISPATCHER[1] for t in node.targets)
    ]
    assert len(tables) == 1, f"{DISPATCHER[0]} has no single {DISPATCHER[1]}"
    names = {n.value for n in ast.walk(tables[0].value) if isinstance(n, ast.Constant)}
    assert names == DISPATCHED


def test_the_checker_sees_lazy_relative_and_named_imports(tmp_path: Path) -> None:
    """The parser itself: an import inside a function, a relative one and a string all count."""
    folder = tmp_path / "training"
    folder.mkdir()
    path = folder / "mod.py"
    path.write_text(
        "from . import data\n"
        "from ..server import app\n"
        "def later():\n"
        "    import mfserve.client\n"
        "    return importlib.import_module('mfserve.server.app')\n"
        "log = logging.getLogger('mfserve.server')\n",
        encoding="utf-8",
    )
    found = {(e.line, e.target, e.dynamic) for e in edges(path, "mfserve.training.mod", tmp_path)}
    assert found == {
        (1, "mfserve.training.data", False),
        (2, "mfserve.server.app", False),
        (4, "mfserve.client", False),
        (5, "mfserve.server.app", True),
    }
