"""The artifact format: round trip, numbered versions, atomic writes, and every refusal on load.

Everything runs on small synthetic models written into tmp_path. Damage is done to real files on
disk; where a test must get past the checksum to reach a later check, it rewrites the manifest's
sha256 the way an attacker (or a careless hand edit) would.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import pickle
import struct
import subprocess
import sys
import textwrap
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import save as safetensors_bytes

import mfserve.training.artifact as artifact_module
from mfserve.training.artifact import (
    FORMAT_VERSION,
    INTERACTIONS,
    ITEM_METADATA,
    ITEMS,
    MANIFEST,
    MODEL_TENSORS,
    USERS,
    ArtifactError,
    ModelArtifact,
    list_versions,
    load_artifact,
    resolve_version,
    save_artifact,
)
from mfserve.training.synthetic import synthetic_artifact

DATA_FILES = (MODEL_TENSORS, INTERACTIONS, USERS, ITEMS, ITEM_METADATA)


@pytest.fixture
def artifact() -> ModelArtifact:
    model = synthetic_artifact(12, 20, 4, clusters=3, seed=7)
    return dataclasses.replace(
        model,
        metrics={"rmse": 0.875, "ndcg_at_10": 0.25},
        dataset={**model.dataset, "rows": 60, "holdout": 0.2},
    )


@pytest.fixture
def saved(tmp_path: Path, artifact: ModelArtifact) -> Path:
    return save_artifact(tmp_path / "model", artifact)


def manifest_of(folder: Path) -> dict[str, Any]:
    return json.loads((folder / MANIFEST).read_text(encoding="utf-8"))


def write_manifest(folder: Path, manifest: dict[str, Any]) -> None:
    (folder / MANIFEST).write_text(json.dumps(manifest), encoding="utf-8")


def sha256(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def replace_file(folder: Path, name: str, data: bytes) -> None:
    """Swap a file's bytes and fix up its checksum, so only the later checks can object."""
    (folder / name).write_bytes(data)
    manifest = manifest_of(folder)
    manifest["files"][name] = sha256(folder / name)
    write_manifest(folder, manifest)


def error_of(path: Path) -> str:
    with pytest.raises(ArtifactError) as caught:
        load_artifact(path)
    return str(caught.value)


# -- round trip and versions ----------------------------------------------------------------


def test_round_trip(saved: Path, artifact: ModelArtifact) -> None:
    loaded = load_artifact(saved)
    assert set(loaded.tensors) == set(artifact.tensors)
    for name, tensor in artifact.tensors.items():
        assert loaded.tensors[name].dtype == torch.float32
        assert torch.equal(loaded.tensors[name], tensor.to(torch.float32)), name
    for name in ("seen_indptr", "seen_indices", "item_popularity"):
        got, want = getattr(loaded, name), getattr(artifact, name)
        assert got.dtype == torch.int64 and torch.equal(got, want.to(torch.int64)), name
    assert loaded.user_ids == artifact.user_ids and loaded.item_ids == artifact.item_ids
    assert loaded.item_titles == artifact.item_titles
    assert loaded.item_genres == artifact.item_genres
    assert loaded.global_mean == artifact.global_mean
    assert loaded.rating_range == artifact.rating_range
    assert loaded.hyperparameters == artifact.hyperparameters
    assert loaded.metrics == artifact.metrics
    assert loaded.dataset == artifact.dataset
    assert (loaded.name, loaded.version, loaded.path) == ("model", 1, saved)
    assert (loaded.factors, loaded.rank_factors, loaded.rating_count) == (
        artifact.factors,
        artifact.rank_factors,
        artifact.rating_count,
    )


def test_manifest_records_the_model_and_every_file(saved: Path, artifact: ModelArtifact) -> None:
    manifest = manifest_of(saved)
    assert manifest["format_version"] == FORMAT_VERSION
    assert manifest["version"] == 1 and manifest["name"] == "model"
    created = datetime.fromisoformat(manifest["created_time"])
    assert created.tzinfo is not None
    assert manifest["hyperparameters"] == artifact.hyperparameters
    assert manifest["rating_range"] == list(artifact.rating_range)
    assert manifest["global_mean"] == artifact.global_mean
    assert manifest["counts"] == {
        "users": artifact.n_users,
        "items": artifact.n_items,
        "ratings": artifact.rating_count,
    }
    assert manifest["factors"] == 4 and manifest["rank_factors"] == 4
    assert manifest["dataset"] == artifact.dataset
    assert manifest["metrics"] == artifact.metrics
    on_disk = {p.name for p in saved.iterdir()} - {MANIFEST}
    assert set(manifest["files"]) == on_disk == set(DATA_FILES)
    for name, digest in manifest["files"].items():
        assert digest == sha256(saved / name), name


def test_titles_and_genres_may_be_absent(tmp_path: Path) -> None:
    plain = synthetic_artifact(5, 6, 2, clusters=2, titles=False, rank_head=False)
    loaded = load_artifact(save_artifact(tmp_path / "plain", plain))
    assert loaded.item_titles is None and loaded.item_genres is None
    assert loaded.rank_factors == 0


def test_numbered_versions_and_the_newest_wins(tmp_path: Path, artifact: ModelArtifact) -> None:
    root = tmp_path / "model"
    paths = [
        save_artifact(root, dataclasses.replace(artifact, global_mean=3.0 + v)) for v in range(3)
    ]
    assert paths == [root / "1", root / "2", root / "3"]
    assert list_versions(root) == [1, 2, 3]
    assert resolve_version(root) == root / "3"
    assert resolve_version(root / "2") == root / "2"
    newest = load_artifact(root)
    assert (newest.version, newest.global_mean) == (3, 5.0)
    assert load_artifact(root / "1").global_mean == 3.0
    assert [manifest_of(p)["version"] for p in paths] == [1, 2, 3]
    # Version folders sort as numbers, and other names are not versions.
    (root / "10").mkdir()
    (root / "notes").mkdir()
    assert list_versions(root) == [1, 2, 3, 10]


def test_no_model_folder_and_no_version(tmp_path: Path) -> None:
    assert "no such model folder" in error_of(tmp_path / "absent")
    (tmp_path / "empty").mkdir()
    message = error_of(tmp_path / "empty")
    assert str(tmp_path / "empty") in message and "no model version" in message


# -- atomic writes --------------------------------------------------------------------------


def _crash_in_save_file(monkeypatch: pytest.MonkeyPatch) -> None:
    real = artifact_module.save_file
    calls = []

    def save_then_crash(tensors: dict[str, torch.Tensor], filename: str) -> None:
        calls.append(filename)
        real(tensors, filename)  # the model file is complete; the crash comes on the next one
        if len(calls) == 2:
            raise OSError(28, "No space left on device")

    monkeypatch.setattr(artifact_module, "save_file", save_then_crash)


def _crash_in_manifest(monkeypatch: pytest.MonkeyPatch) -> None:
    real = artifact_module._write_json

    def write_then_crash(path: Path, payload: Any) -> None:
        if path.name == MANIFEST:
            path.write_text('{"format_version": 1, "vers', encoding="utf-8")  # half written
            raise KeyboardInterrupt
        real(path, payload)

    monkeypatch.setattr(artifact_module, "_write_json", write_then_crash)


@pytest.mark.parametrize(
    ("crash", "raised"),
    [(_crash_in_save_file, OSError), (_crash_in_manifest, KeyboardInterrupt)],
    ids=["tensors", "manifest"],
)
def test_a_crash_mid_write_leaves_no_version(
    tmp_path: Path,
    artifact: ModelArtifact,
    monkeypatch: pytest.MonkeyPatch,
    crash: Any,
    raised: type[BaseException],
) -> None:
    root = tmp_path / "model"
    save_artifact(root, artifact)
    with monkeypatch.context() as patch:
        crash(patch)
        with pytest.raises(raised):
            save_artifact(root, artifact)
    assert sorted(p.name for p in root.iterdir()) == ["1"]  # no "2", no ".staging-*"
    assert load_artifact(root).version == 1
    assert save_artifact(root, artifact) == root / "2"


def test_a_killed_writer_leaves_no_version(tmp_path: Path) -> None:
    """A hard kill (no ``finally``) mid-write: the half-written version never becomes visible."""
    root = tmp_path / "model"
    script = textwrap.dedent(
        f"""
        import os
        import mfserve.training.artifact as artifact
        from mfserve.training.synthetic import synthetic_artifact

        real = artifact.save_file
        def save_then_die(tensors, filename):
            real(tensors, filename)
            os._exit(9)
        artifact.save_file = save_then_die
        artifact.save_artifact({str(root)!r}, synthetic_artifact(4, 5, 2, clusters=2))
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, check=False
    )
    assert result.returncode == 9, result.stderr
    leftovers = [p.name for p in root.iterdir()]
    assert leftovers and all(name.startswith(".staging-") for name in leftovers)
    assert list_versions(root) == []
    assert "no model version" in error_of(root)
    save_artifact(root, synthetic_artifact(4, 5, 2, clusters=2))
    assert load_artifact(root).version == 1


# -- refusals on load -----------------------------------------------------------------------


@pytest.mark.parametrize("name", DATA_FILES)
def test_a_corrupt_file_fails_its_checksum(saved: Path, name: str) -> None:
    data = bytearray((saved / name).read_bytes())
    data[-2] ^= 0x01
    (saved / name).write_bytes(bytes(data))
    message = error_of(saved)
    assert str(saved / name) in message and "sha256" in message


class _TouchOnLoad:
    """Unpickling this creates ``marker``: proof that something was unpickled."""

    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return open, (str(self.marker), "w")


def _pickle_payload(kind: str, marker: Path) -> bytes:
    if kind == "torch.save":
        buffer = io.BytesIO()
        torch.save({"user_factors": torch.zeros(2, 2), "hook": _TouchOnLoad(marker)}, buffer)
        return buffer.getvalue()
    return pickle.dumps({"user_factors": _TouchOnLoad(marker)}, protocol=int(kind[-1]))


@pytest.mark.parametrize("target", [MODEL_TENSORS, INTERACTIONS])
@pytest.mark.parametrize("kind", ["protocol2", "protocol4", "protocol5", "torch.save"])
def test_a_pickle_is_refused_unopened(saved: Path, tmp_path: Path, target: str, kind: str) -> None:
    probe = tmp_path / "probe"
    pickle.loads(_pickle_payload("protocol2", probe))  # the payload does fire when unpickled
    assert probe.exists()

    marker = tmp_path / "unpickled"
    replace_file(saved, target, _pickle_payload(kind, marker))
    message = error_of(saved)
    assert str(saved / target) in message and "pickle" in message
    assert not marker.exists()


@pytest.mark.parametrize("protocol", [0, 1])
def test_an_old_protocol_pickle_is_refused_unopened(
    saved: Path, tmp_path: Path, protocol: int
) -> None:
    marker = tmp_path / "unpickled"
    replace_file(saved, MODEL_TENSORS, _pickle_payload(f"protocol{protocol}", marker))
    message = error_of(saved)
    assert str(saved / MODEL_TENSORS) in message and "safetensors" in message
    assert not marker.exists()


def test_a_safetensors_header_that_starts_like_a_pickle_loads(
    tmp_path: Path, artifact: ModelArtifact
) -> None:
    """A 640-byte safetensors header has length bytes 80 02 ..., which is also how a pickle starts."""
    tensors = {name: t.to(torch.float32).contiguous() for name, t in artifact.tensors.items()}
    for width in range(400):
        extra = {**tensors, "x" * (width + 1): torch.zeros(1)}
        (length,) = struct.unpack("<Q", safetensors_bytes(extra)[:8])
        if length % 256 == 0x80:
            break
    else:
        pytest.fail("no tensor name gave a header length of 128 mod 256")
    folder = save_artifact(tmp_path / "model", dataclasses.replace(artifact, tensors=extra))
    assert (folder / MODEL_TENSORS).read_bytes()[:1] == b"\x80"
    assert set(load_artifact(folder).tensors) == set(extra)


@pytest.mark.parametrize("found", [2, 0, "1", None])
def test_another_format_version_is_refused(saved: Path, found: Any) -> None:
    manifest = manifest_of(saved)
    if found is None:
        del manifest["format_version"]
    else:
        manifest["format_version"] = found
    write_manifest(saved, manifest)
    message = error_of(saved)
    assert str(saved / MANIFEST) in message
    assert f"format_version {found!r} is not supported" in message


@pytest.mark.parametrize("name", DATA_FILES)
def test_a_missing_file_is_named(saved: Path, name: str) -> None:
    (saved / name).unlink()
    message = error_of(saved)
    assert str(saved / name) in message and "missing" in message


def test_a_file_left_out_of_the_manifest_is_refused(saved: Path) -> None:
    manifest = manifest_of(saved)
    del manifest["files"][USERS]
    write_manifest(saved, manifest)
    assert f"no checksum for {USERS}" in error_of(saved)


def test_a_manifest_cannot_point_outside_its_folder(saved: Path) -> None:
    manifest = manifest_of(saved)
    manifest["files"]["../outside.json"] = "0" * 64
    write_manifest(saved, manifest)
    assert "missing" in error_of(saved)


@pytest.mark.parametrize(
    ("damage", "expected"),
    [
        ({"global_mean": None}, "malformed manifest"),
        ({"rating_range": [1.0]}, "malformed manifest"),
        ({"version": "latest"}, "malformed manifest"),
        ({"files": None}, "no 'files' checksum table"),
    ],
)
def test_a_malformed_manifest_is_an_artifact_error(
    saved: Path, damage: dict[str, Any], expected: str
) -> None:
    manifest = manifest_of(saved)
    for key, value in damage.items():
        if value is None:
            del manifest[key]
        else:
            manifest[key] = value
    write_manifest(saved, manifest)
    message = error_of(saved)
    assert str(saved / MANIFEST) in message and expected in message


def test_unreadable_manifest(saved: Path) -> None:
    (saved / MANIFEST).write_text("{not json", encoding="utf-8")
    assert "unreadable JSON" in error_of(saved)
    (saved / MANIFEST).write_text("[1, 2]", encoding="utf-8")
    assert "not a JSON object" in error_of(saved)


def _with_tensor(artifact: ModelArtifact, name: str, tensor: torch.Tensor) -> ModelArtifact:
    return dataclasses.replace(artifact, tensors={**artifact.tensors, name: tensor})


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (lambda a: _with_tensor(a, "item_factors", torch.zeros(21, 4)), "item_factors has 21 rows"),
        (lambda a: _with_tensor(a, "user_bias", torch.zeros(11)), "user_bias has 11 rows"),
        (
            lambda a: _with_tensor(a, "rank_item_factors", torch.zeros(19, 4)),
            "rank_item_factors has 19 rows",
        ),
        (
            lambda a: _with_tensor(a, "item_factors", torch.zeros(20, 3)),
            "user_factors [12, 4] and item_factors [20, 3] must be tables of the same width",
        ),
        (lambda a: _with_tensor(a, "item_bias", torch.zeros(20, 1)), "item_bias has shape"),
        (
            lambda a: dataclasses.replace(
                a, tensors={k: v for k, v in a.tensors.items() if k != "rank_item_factors"}
            ),
            "has rank_user_factors but not rank_item_factors",
        ),
        (
            lambda a: dataclasses.replace(
                a, tensors={k: v for k, v in a.tensors.items() if k != "item_bias"}
            ),
            "tensor 'item_bias' is missing",
        ),
    ],
    ids=["rows", "bias-rows", "rank-rows", "width", "bias-2d", "rank-pair", "missing-tensor"],
)
def test_tables_that_disagree_are_refused(
    tmp_path: Path, artifact: ModelArtifact, change: Any, expected: str
) -> None:
    folder = save_artifact(tmp_path / "model", change(artifact))
    message = error_of(folder)
    assert str(folder / MODEL_TENSORS) in message and expected in message


@pytest.mark.parametrize(
    ("change", "expected"),
    [
        (
            lambda a: dataclasses.replace(a, seen_indptr=a.seen_indptr[:-1]),
            "do not match the id lists",
        ),
        (lambda a: dataclasses.replace(a, seen_indices=a.seen_indices + 1000), "outside 0..19"),
        (lambda a: dataclasses.replace(a, seen_indices=a.seen_indices - 1000), "outside 0..19"),
        (lambda a: dataclasses.replace(a, seen_indptr=a.seen_indptr.flip(0)), "not a CSR index"),
        (lambda a: dataclasses.replace(a, seen_indptr=a.seen_indptr * 2), "not a CSR index"),
    ],
    ids=["short-indptr", "past-the-end", "negative", "decreasing", "overrun"],
)
def test_interactions_that_disagree_are_refused(
    tmp_path: Path, artifact: ModelArtifact, change: Any, expected: str
) -> None:
    # The seen lists are indexed without bounds checks by the compiled TopK: refused at load.
    folder = save_artifact(tmp_path / "model", change(artifact))
    message = error_of(folder)
    assert str(folder / INTERACTIONS) in message and expected in message


def test_ids_that_disagree_with_the_tables_are_refused(saved: Path) -> None:
    users = json.loads((saved / USERS).read_text(encoding="utf-8"))
    replace_file(saved, USERS, json.dumps([*users, "extra"]).encode())
    assert "user_factors has 12 rows but the id list has 13" in error_of(saved)
