"""Training input and output faults: fuzzed rating files get an error naming file, line and column
(never a traceback, never an artifact), and a full disk or a read-only folder leaves no version.

The fuzzer (hypothesis) builds a valid ratings CSV, breaks one row in one way, and checks the
error points at that row. ``MFSERVE_FUZZ_EXAMPLES`` sets how many files (the soak runs more).
"""

from __future__ import annotations

import os
import resource
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from reliability_load import report

from mfserve.training.artifact import list_versions
from mfserve.training.data import DataError, load_ratings

EXAMPLES = int(os.environ.get("MFSERVE_FUZZ_EXAMPLES", "150"))
FUZZ = settings(
    max_examples=EXAMPLES,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
HEADER = "userId,movieId,rating,timestamp"
RATING_COLUMN = 3
# How a row is broken -> (the row's new text from (user, item), the column the error must name;
# None: the line only).
BREAKS = {
    "not a number": (lambda u, i: f"{u},{i},four,0", RATING_COLUMN),
    "nan": (lambda u, i: f"{u},{i},nan,0", RATING_COLUMN),
    "infinite": (lambda u, i: f"{u},{i},-inf,0", RATING_COLUMN),
    "out of range": (lambda u, i: f"{u},{i},9.5,0", RATING_COLUMN),
    "missing rating": (lambda u, i: f"{u},{i},,0", RATING_COLUMN),
    "too few columns": (lambda u, i: f"{u},{i}", None),
    "empty user": (lambda u, i: f",{i},3,0", 1),
    "unclosed quote": (lambda u, i: f'{u},"{i},3,0', 2),
}


def write_rows(path: Path, rows: list[str]) -> Path:
    path.write_text("\n".join([HEADER, *rows]) + "\n")
    return path


@st.composite
def broken_files(draw: st.DrawFn) -> tuple[list[str], int, str]:
    """Valid rows with one broken: (rows, the broken row's 1-based line, how)."""
    pairs = draw(
        st.lists(
            st.tuples(st.integers(1, 30), st.integers(1, 60)), min_size=2, max_size=40, unique=True
        )
    )
    rows = [f"{u},{i},{draw(st.sampled_from(['0.5', '3', '4.5', '5']))},0" for u, i in pairs]
    at = draw(st.integers(0, len(rows) - 1))
    how = draw(st.sampled_from([*BREAKS, "duplicate pair", "bad encoding"]))
    if how == "duplicate pair":
        at = max(at, 1)
        rows[at] = rows[draw(st.integers(0, at - 1))]
    elif how != "bad encoding":
        user, item = pairs[at]
        rows[at] = BREAKS[how][0](user, item)
    return rows, at + 2, how  # line 1 is the header


@FUZZ
@given(case=broken_files())
def test_fuzzed_rows_name_file_line_and_column(
    tmp_path_factory: pytest.TempPathFactory, case: tuple[list[str], int, str]
) -> None:
    rows, line, how = case
    path = tmp_path_factory.mktemp("fuzz") / "ratings.csv"
    if how == "bad encoding":
        text = "\n".join([HEADER, *rows]).encode()
        start = len("\n".join([HEADER, *rows[: line - 2]]).encode()) + 1
        path.write_bytes(text[:start] + b"\xff\xfe" + text[start:])
    else:
        write_rows(path, rows)
    with pytest.raises(DataError) as caught:
        load_ratings(path, rating_range=(0.5, 5.0))
    error = caught.value
    assert str(error).startswith(f"{path}:"), str(error)
    assert error.line == line, (how, str(error))
    column = BREAKS[how][1] if how in BREAKS else None
    if column is not None:
        assert error.column == column and str(error).startswith(f"{path}:{line}:{column}: ")


def train(
    tmp_path: Path, data: Path, *extra: str, preexec: object = None
) -> subprocess.CompletedProcess[str]:
    command = [sys.executable, "-m", "mfserve", "train", "--data", str(data), "--out"]
    return subprocess.run(
        [*command, str(tmp_path / "models" / "m"), "--epochs", "2", "--no-progress", *extra],
        check=False,
        capture_output=True,
        text=True,
        timeout=300,
        preexec_fn=preexec,  # type: ignore[arg-type]
    )


def assert_nothing_saved(folder: Path) -> None:
    assert list_versions(folder) == []
    assert not folder.exists() or not list(folder.iterdir()), list(folder.iterdir())


def valid_rows() -> list[str]:
    return [f"{u},{i},{(u * i) % 9 / 2 + 0.5},0" for u in range(1, 31) for i in range(1, 61, 4)]


BAD_FILES = {
    "non-finite rating": lambda rows: (
        HEADER + "\n" + "\n".join([*rows[:50], "7,3,inf,0"])
    ).encode(),
    "wrong column count": lambda rows: (HEADER + "\n" + "\n".join([*rows[:50], "7,3"])).encode(),
    "not utf-8": lambda rows: (HEADER + "\n" + "\n".join(rows[:50]) + "\n7,\xe9,3,0\n").encode(
        "latin-1"
    ),
    "0 bytes": lambda rows: b"",
}


@pytest.mark.parametrize("name", [*BAD_FILES, "a zip that is not one"])
def test_bad_files_through_mfserve_train(tmp_path: Path, name: str) -> None:
    if name == "a zip that is not one":
        data = tmp_path / "ml-latest-small.zip"
        data.write_bytes(b"PK\x03\x04 this is not a zip archive")
    else:
        data = tmp_path / "ratings.csv"
        data.write_bytes(BAD_FILES[name](valid_rows()))
    done = train(tmp_path, data)
    assert done.returncode == 2, done.stderr
    assert done.stderr.startswith(f"error: {data}"), done.stderr
    assert "Traceback" not in done.stderr
    if name not in {"0 bytes", "a zip that is not one"}:
        assert f"{data}:52:" in done.stderr  # the header, 50 good rows, then the bad one
    assert_nothing_saved(tmp_path / "models" / "m")


def test_a_full_disk_leaves_no_version(tmp_path: Path) -> None:
    # RLIMIT_FSIZE: a write past 8 KiB fails with EFBIG (Python ignores SIGXFSZ), as a full disk
    # fails a write with ENOSPC, midway through the artifact.
    data = write_rows(tmp_path / "ratings.csv", valid_rows())

    def small_files() -> None:
        resource.setrlimit(resource.RLIMIT_FSIZE, (8 * 1024, 8 * 1024))

    done = train(tmp_path, data, preexec=small_files)
    assert done.returncode == 1, done.stderr
    assert (
        "cannot write the new model version" in done.stderr and "nothing was saved" in done.stderr
    )
    assert "Traceback" not in done.stderr
    assert_nothing_saved(tmp_path / "models" / "m")
    report("training: full disk", error=done.stderr.strip().splitlines()[-1])


def test_a_read_only_folder_fails_before_training(tmp_path: Path) -> None:
    data = write_rows(tmp_path / "ratings.csv", valid_rows())
    out = tmp_path / "models"
    out.mkdir()
    if os.geteuid() != 0:
        out.chmod(0o555)
        done = train(tmp_path, data)
        out.chmod(0o755)
    else:  # root writes through permissions: a read-only bind mount in a mount namespace
        if shutil.which("unshare") is None:
            pytest.skip("running as root without unshare(1): no way to make a folder read-only")
        inner = " ".join(
            [
                f"mount --bind {out} {out} && mount -o remount,bind,ro {out} &&",
                sys.executable,
                "-m mfserve train --data",
                str(data),
                "--out",
                str(out / "m"),
                "--epochs 2 --no-progress",
            ]
        )
        done = subprocess.run(
            ["unshare", "-m", "sh", "-c", inner],
            check=False,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if "mount" in done.stderr and "permission denied" in done.stderr.lower():
            pytest.skip(f"cannot make a read-only mount here: {done.stderr.strip()}")
    assert done.returncode == 1, done.stderr
    assert "Read-only file system" in done.stderr or "Permission denied" in done.stderr
    assert "nothing was saved" in done.stderr and "Traceback" not in done.stderr
    assert "epoch" not in done.stdout  # refused before any training
    assert_nothing_saved(out / "m")
    report("training: read-only folder", error=done.stderr.strip().splitlines()[-1])


def test_zip_without_a_ratings_member(tmp_path: Path) -> None:
    data = tmp_path / "ml-latest-small.zip"
    with zipfile.ZipFile(data, "w") as archive:
        archive.writestr("ml-latest-small/README.txt", "no ratings here")
    done = train(tmp_path, data)
    assert done.returncode == 2 and done.stderr.startswith(f"error: {data}"), done.stderr
    assert_nothing_saved(tmp_path / "models" / "m")
