"""``mfserve train``, ``evaluate`` and ``recommend`` through the real ``mfserve`` entry point.

A few cases run ``python -m mfserve`` in a subprocess (the console script as a user runs it: exit
code, exactly what reaches stderr); the rest call ``mfserve.client._cli.main`` in-process, which is
the same function the console script calls. Training data is a tiny generated CSV, so a fit takes
about a second.
"""

from __future__ import annotations

import dataclasses
import json
import os
import random
import shutil
import subprocess
import sys
import zipfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from mfserve.client._cli import main
from mfserve.training.config import TrainConfig

FAST = ["--epochs", "2", "--rank-iters", "2", "--no-progress"]
CONSOLE_TIMEOUT = 180


@dataclasses.dataclass(frozen=True)
class Trained:
    data: Path
    models: Path
    stdout: str
    stderr: str
    returncode: int


def write_tiny_csv(path: Path) -> Path:
    """300 ratings, 30 users x 40 items in three taste groups: a user loves their group's items."""
    rng = random.Random(0)
    rows = ["user,item,rating"]
    for user in range(30):
        for item in sorted(rng.sample(range(40), 10)):
            rating = 5 if item % 3 == user % 3 else 1 + (item * user) % 3
            rows.append(f"u{user},i{item},{rating}")
    path.write_text("\n".join(rows) + "\n", encoding="utf-8")
    return path


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """``mfserve ARGS`` as a user runs it."""
    env = {**os.environ, "PYTHONDONTWRITEBYTECODE": "1"}
    return subprocess.run(
        [sys.executable, "-m", "mfserve", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=CONSOLE_TIMEOUT,
        check=False,
    )


def manifest(folder: Path) -> dict[str, Any]:
    return json.loads((folder / "manifest.json").read_text(encoding="utf-8"))


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> Trained:
    """One model, trained by the console script with paths relative to its working folder."""
    work = tmp_path_factory.mktemp("work")
    data = write_tiny_csv(work / "tiny.csv")
    result = console("train", "--data", "tiny.csv", "--out", "models", *FAST, cwd=work)
    return Trained(data, work / "models", result.stdout, result.stderr, result.returncode)


# -- train --------------------------------------------------------------------------------


def test_train_writes_version_1_and_prints_the_metrics(trained: Trained) -> None:
    assert trained.returncode == 0, trained.stderr
    assert sorted(p.name for p in trained.models.iterdir()) == ["1"]  # no staging left behind
    recorded = manifest(trained.models / "1")
    lines = trained.stdout.splitlines()
    assert lines[0] == f"saved {Path('models') / '1'}"
    printed = dict(line.split() for line in lines[1:])
    for name in ("rmse", "mae", "ndcg_at_10", "train_seconds"):
        assert float(printed[name]) == pytest.approx(recorded["metrics"][name], abs=5e-5)
    # Recorded so that `mfserve evaluate` finds the data from any working folder.
    assert recorded["dataset"]["source"] == str(trained.data.resolve())
    assert recorded["hyperparameters"]["factors"] == TrainConfig().factors
    assert recorded["hyperparameters"]["epochs"] == 2
    assert recorded["hyperparameters"]["rank_iters"] == 2
    assert recorded["counts"]["users"] == 30


def test_a_second_run_writes_version_2_as_json(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    models = tmp_path / "models"
    shutil.copytree(trained.models, models)
    code = main(["train", "--data", str(trained.data), "--out", str(models), "--json", *FAST])
    out = capsys.readouterr().out
    assert code == 0
    report = json.loads(out)
    assert report["path"] == str(models / "2")
    assert sorted(p.name for p in models.iterdir()) == ["1", "2"]
    assert report["metrics"] == manifest(models / "2")["metrics"]
    assert {"rmse", "mae", "ndcg_at_10"} <= set(report["metrics"])


def test_reference_recipe(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "reference"
    args = ["train", "--data", str(trained.data), "--out", str(out), "--reference", *FAST]
    assert main(args) == 0, capsys.readouterr().err
    hyperparameters = manifest(out / "1")["hyperparameters"]
    reference = dataclasses.asdict(TrainConfig.reference())
    assert hyperparameters["factors"] == 8 and hyperparameters["use_biases"] is False
    assert hyperparameters["rank_head"] == "none" and hyperparameters["optimizer"] == "adam"
    assert hyperparameters["epochs"] == 2  # a flag still overrides the recipe
    expected = {**reference, "epochs": 2, "rank_iters": 2}
    assert {k: hyperparameters[k] for k in expected} == expected


def test_train_help_lists_every_hyperparameter(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["train", "--help"]) == 0
    text = capsys.readouterr().out
    flags = ["--" + spec.name.replace("_", "-") for spec in dataclasses.fields(TrainConfig)]
    assert "--rank-alpha" in flags and "--factors" in flags
    missing = [flag for flag in flags if flag not in text.split()]
    assert not missing, missing
    for flag in ("--data", "--out", "--holdout", "--reference", "--json", "--rating-range"):
        assert flag in text


def _flag_entries(text: str) -> dict[str, str]:
    """Each flag's ``--help`` entry, folded onto one line, by the flag."""
    entries: dict[str, str] = {}
    flag = None
    for line in text.splitlines():
        stripped = line.strip()
        if line.startswith("  --"):
            flag = stripped.split()[0]
            entries[flag] = stripped
        elif flag is not None and line.startswith(" " * 10) and stripped:
            entries[flag] += " " + stripped
        else:
            flag = None
    return entries


@pytest.mark.parametrize("command", ["train", "synth", "index"])
def test_help_shows_each_default_once_and_never_none(
    command: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main([command, "--help"]) == 0
    text = capsys.readouterr().out
    assert "(default: None)" not in text and "(default: False)" not in text
    assert "%%" not in text  # argparse does not %-format descriptions
    entries = _flag_entries(text)
    assert entries
    for entry in entries.values():
        assert entry.count("(default") <= 1, entry
    if command == "train":
        # The recipe's value, not the None that lets --reference tell "not given".
        assert entries["--factors"].endswith(f"(default: {TrainConfig().factors})")
        assert entries["--holdout"].endswith("(default: 0.2)")
        assert "(default" not in entries["--json"]  # an off switch says nothing


def test_each_command_is_registered_by_its_area() -> None:
    # `index` is a training command beside `synth`, each in the module its name says.
    code = (
        "import argparse, sys\n"
        "from mfserve.training import cli, index_cli, synth\n"
        "sub = argparse.ArgumentParser().add_subparsers()\n"
        "cli.register(sub)\n"
        "print(sorted(sub.choices), sub.choices['index'].get_default('handler').__module__,"
        " sub.choices['synth'].get_default('handler').__module__)\n"
        "print(sorted(m for m in ('torch', 'numpy', 'faiss', 'pandas') if m in sys.modules))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, timeout=60
    ).stdout.splitlines()
    assert out[0] == (
        "['evaluate', 'index', 'recommend', 'synth', 'train'] "
        "mfserve.training.index_cli mfserve.training.synth"
    )
    assert out[1] == "[]"


def _rows(*lines: str) -> bytes:
    return ("\n".join(lines) + "\n").encode()


def _bad_zip(path: Path) -> None:
    path.write_bytes(b"PK\x03\x04 this is not really a zip archive")


def _zip_without_ratings(path: Path) -> None:
    with zipfile.ZipFile(path, "w") as archive:
        archive.writestr("ml-x/movies.csv", "movieId,title,genres\n1,A,Drama\n")


BAD_INPUTS: dict[str, tuple[str, bytes | Callable[[Path], None] | None, list[str], str]] = {
    # id: (file name, content (None: no file), extra flags, expected stderr after the path)
    "missing-file": ("absent.csv", None, [], ": no such file or directory"),
    "missing-column": (
        "nocol.csv",
        _rows("user,item,score", "u1,i1,3"),
        [],
        ":1: missing rating column 'rating' (found: 'user', 'item', 'score')",
    ),
    "non-numeric": (
        "nonnum.csv",
        _rows("user,item,rating", "u1,i1,3", "u1,i2,abc"),
        [],
        ":3:3: column 'rating': 'abc' is not a number",
    ),
    "non-numeric-first-column": (
        "reordered.csv",
        _rows("rating,user,item", "3,u1,i1", "", "four,u1,i2"),
        [],
        ":4:1: column 'rating': 'four' is not a number",
    ),
    "out-of-range": (
        "range.csv",
        _rows("user,item,rating", "u1,i1,3", "u1,i2,7"),
        ["--rating-range", "1", "5"],
        ":3:3: column 'rating': '7' is outside the rating range 1.0..5.0",
    ),
    "empty-file": ("empty.csv", b"", [], ": file is empty"),
    "header-only": ("header.csv", _rows("user,item,rating"), [], ": no ratings below the header"),
    "duplicate-pair": (
        "dup.csv",
        _rows("user,item,rating", "u1,i1,3", "u2,i1,3", "u1,i1,4"),
        [],
        ":4: duplicate rating for user 'u1' and item 'i1' (first on line 2)",
    ),
    "bad-zip": ("bad.zip", _bad_zip, [], ": not a valid zip archive"),
    "zip-without-ratings": (
        "noratings.zip",
        _zip_without_ratings,
        [],
        ": no ratings.csv or ratings.dat in this zip archive",
    ),
}


def _make_bad_input(tmp_path: Path, case: str) -> tuple[Path, list[str], str]:
    name, content, flags, expected = BAD_INPUTS[case]
    path = tmp_path / name
    if callable(content):
        content(path)
    elif content is not None:
        path.write_bytes(content)
    return path, flags, expected


@pytest.mark.parametrize("case", list(BAD_INPUTS))
def test_bad_input_is_one_located_line_and_writes_nothing(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], case: str
) -> None:
    path, flags, expected = _make_bad_input(tmp_path, case)
    out = tmp_path / "models"
    code = main(["train", "--data", str(path), "--out", str(out), *flags, *FAST])
    captured = capsys.readouterr()
    assert code == 2
    lines = captured.err.splitlines()
    assert len(lines) == 1, captured.err
    assert lines[0].startswith(f"error: {path}{expected}"), lines[0]
    assert not out.exists()  # no version folder, and no staging folder either
    assert captured.out == ""


def test_bad_input_through_the_console_script(tmp_path: Path) -> None:
    path, flags, expected = _make_bad_input(tmp_path, "out-of-range")
    (tmp_path / "models").mkdir()
    result = console("train", "--data", path.name, "--out", "models", *flags, *FAST, cwd=tmp_path)
    assert result.returncode == 2
    assert result.stderr.splitlines() == [f"error: {path.name}{expected}"]
    assert result.stdout == ""
    assert list((tmp_path / "models").iterdir()) == []


# -- evaluate -------------------------------------------------------------------------------


def test_evaluate_prints_the_model_and_its_baselines(
    trained: Trained,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)  # not where training ran: the data is found by its absolute path
    assert main(["evaluate", "--model", str(trained.models)]) == 0, capsys.readouterr().err
    lines = capsys.readouterr().out.splitlines()
    header = ["RMSE", "MAE", "NDCG@10", "P@10", "R@10", "HR@10", "MAP@10", "coverage"]
    assert lines[0].split() == header
    rows = {line.split()[0]: line.split()[1:] for line in lines[1:]}
    assert list(rows) == ["model", "global_mean", "popularity"]
    assert all(len(cells) == 8 for cells in rows.values())
    stored = manifest(trained.models / "1")["metrics"]
    assert float(rows["model"][0]) == pytest.approx(stored["rmse"], abs=5e-5)
    assert rows["global_mean"][2] == "-" and rows["popularity"][0] == "-"


def test_evaluate_json_matches_what_training_measured(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["evaluate", "--model", str(trained.models / "1"), "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert set(report) == {"model", "global_mean", "popularity"}
    stored = manifest(trained.models / "1")["metrics"]
    for name in ("rmse", "mae", "ndcg_at_10", "recall_at_10"):
        assert report["model"][name] == pytest.approx(stored[name], rel=1e-6), name
    assert {"rmse", "mae"} <= set(report["global_mean"])
    assert "ndcg_at_10" in report["popularity"]


def test_evaluate_a_missing_model(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    absent = tmp_path / "no-such-model"
    assert main(["evaluate", "--model", str(absent)]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [f"error: {absent}: no such model folder"]
    assert captured.out == ""


def test_evaluate_refuses_changed_data(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    changed = tmp_path / "tiny.csv"
    changed.write_text(trained.data.read_text(encoding="utf-8").replace(",5\n", ",4\n", 1))
    code = main(["evaluate", "--model", str(trained.models), "--data", str(changed)])
    err = capsys.readouterr().err
    assert code == 2
    assert len(err.splitlines()) == 1 and "differs from the data the model was trained on" in err


# -- recommend ------------------------------------------------------------------------------


def test_recommend_prints_k_rows(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--model", str(trained.models), "--user", "u1", "-k", "3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 3
    assert [line.split()[0] for line in lines] == ["1", "2", "3"]
    items = json.loads((trained.models / "1" / "items.json").read_text(encoding="utf-8"))
    assert all(line.split()[1] in items for line in lines)


def test_recommend_json_leaves_out_seen_items(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    from mfserve.training.artifact import load_artifact

    artifact = load_artifact(trained.models)
    row = artifact.user_ids.index("u1")
    start, end = artifact.seen_indptr[row : row + 2].tolist()
    seen = {artifact.item_ids[i] for i in artifact.seen_indices[start:end].tolist()}
    assert seen
    args = ["recommend", "--model", str(trained.models), "--user", "u1", "-k", "5", "--json"]
    assert main(args) == 0
    rows = json.loads(capsys.readouterr().out)
    assert [r["rank"] for r in rows] == [1, 2, 3, 4, 5]
    assert not seen & {r["item_id"] for r in rows}
    scores = [r["score"] for r in rows]
    assert scores == sorted(scores, reverse=True)


def test_recommend_an_unknown_user(trained: Trained, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["recommend", "--model", str(trained.models), "--user", "nobody", "-k", "3"]) == 2
    captured = capsys.readouterr()
    assert len(captured.err.splitlines()) == 1 and "'nobody'" in captured.err
    assert captured.out == ""


def test_recommend_refuses_a_non_positive_k(
    trained: Trained, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["recommend", "--model", str(trained.models), "--user", "u1", "-k", "0"]) == 2
    assert "-k must be positive" in capsys.readouterr().err


# -- the dispatcher -------------------------------------------------------------------------


def test_mfserve_help_lists_every_command(tmp_path: Path) -> None:
    result = console("--help", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # every area registered its commands without a warning
    listed = result.stdout.split()
    for command in ("train", "evaluate", "recommend", "serve", "predict", "topk"):
        assert command in listed, command


def test_recommend_all_writes_every_users_list_as_parquet(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    import pandas as pd

    from mfserve.training.artifact import load_artifact
    from mfserve.training.recommender import Recommender

    out = tmp_path / "recs.parquet"
    args = ["recommend", "--model", str(trained.models), "--all", "--out", str(out), "-k", "4"]
    assert main(args) == 0
    assert "wrote" in capsys.readouterr().out
    table = pd.read_parquet(out)
    model = Recommender(load_artifact(trained.models))
    assert list(table.columns) == ["user_id", "rank", "item_id", "score"]
    assert table["user_id"].nunique() == model.n_users
    for user in ("u1", model.user_ids[-1]):
        mine = table[table["user_id"] == user]
        [(rows, _)] = model.top_k_lists([model.user_row(user)], 4)
        assert list(mine["item_id"]) == [model.item_ids[r] for r in rows]
        assert list(mine["rank"]) == [1, 2, 3, 4]
    assert not [p for p in tmp_path.iterdir() if p.name != "recs.parquet"]  # no temporary left


def test_recommend_all_needs_out_and_excludes_user(
    trained: Trained, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["recommend", "--model", str(trained.models), "--all"]) == 2
    assert "--all and --out go together" in capsys.readouterr().err
    assert main(["recommend", "--model", str(trained.models), "--all", "--user", "u1"]) == 2
    assert "not allowed with" in capsys.readouterr().err
    out = tmp_path / "missing-folder" / "recs.parquet"
    args = ["recommend", "--model", str(trained.models), "--all", "--out", str(out)]
    assert main(args) != 0
    assert str(out) in capsys.readouterr().err
