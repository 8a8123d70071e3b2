"""The model artifact: a numbered, checksummed, pickle-free folder that a server can trust.

Layout of one version, ``models/NAME/<N>/``::

    manifest.json              format version, model version, hyper-parameters, metrics, sha256 of every file
    model.safetensors          factor tables and biases (float32)
    interactions.safetensors   each user's training items (CSR) and item popularity
    users.json, items.json     the id lists; position = embedding row (the encoders, as plain data)
    item_metadata.json         titles and genres, aligned with items.json (null where unknown)

A version is written to a hidden temporary folder and renamed into place, so a crash never leaves a
half-written version and a reader never sees one. Tensors are safetensors, memory-mapped on load:
nothing here can execute code, and several server processes share the pages of one file.
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
MANIFEST = "manifest.json"
MODEL_TENSORS = "model.safetensors"
INTERACTIONS = "interactions.safetensors"
USERS = "users.json"
ITEMS = "items.json"
ITEM_METADATA = "item_metadata.json"

_VERSION_DIR = re.compile(r"^[0-9]+$")
# Magic bytes of what we refuse: a raw pickle stream and the zip that torch.save writes around one.
_PICKLE_MAGIC = (b"\x80", b"PK\x03\x04")


class ArtifactError(Exception):
    """The artifact is missing, corrupt, of another format version, or unsafe to load."""


class ArtifactWriteError(ArtifactError, OSError):
    """A new version could not be written (a full disk, a read-only folder, a file in the way);
    nothing of it is left behind. An ``OSError`` too, as the failure it reports."""


@dataclass(frozen=True)
class ModelArtifact:
    """Everything a trained model is: tensors, id maps, and what is known about its training.

    ``tensors`` holds ``user_factors``, ``item_factors``, ``user_bias``, ``item_bias`` and, for the
    ranking head, ``rank_user_factors``, ``rank_item_factors`` and optionally ``rank_item_bias``.
    """

    tensors: dict[str, torch.Tensor]
    user_ids: list[str]
    item_ids: list[str]
    global_mean: float
    rating_range: tuple[float, float]
    # int64 [n_users + 1]: user u's training items are seen_indices[indptr[u]:indptr[u + 1]]
    seen_indptr: torch.Tensor
    seen_indices: torch.Tensor  # int64 [n_train_ratings], sorted within each user
    item_popularity: torch.Tensor  # int64 [n_items]: training ratings per item
    item_titles: list[str | None] | None = None
    item_genres: list[list[str] | None] | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    metrics: dict[str, float] = field(default_factory=dict)
    dataset: dict[str, Any] = field(default_factory=dict)  # fingerprint, source, counts
    name: str = ""
    version: int = 0
    created_time: str = ""
    path: Path | None = None

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @property
    def factors(self) -> int:
        return int(self.tensors["user_factors"].shape[1])

    @property
    def rank_factors(self) -> int:
        rank = self.tensors.get("rank_user_factors")
        return 0 if rank is None else int(rank.shape[1])

    @property
    def rating_count(self) -> int:
        return int(self.seen_indices.numel())


def sha256_file(path: Path) -> str:
    """Hex sha256 of a file, read in 1 MiB blocks (model files can be gigabytes)."""
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _write_json(path: Path, payload: Any) -> None:
    path.write_text(json.dumps(payload, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")


def _fsync_tree(folder: Path) -> None:
    for child in folder.iterdir():
        with child.open("rb") as handle:
            os.fsync(handle.fileno())


def list_versions(root: Path) -> list[int]:
    """The version numbers present under a model folder, ascending."""
    if not root.is_dir():
        return []
    return sorted(int(p.name) for p in root.iterdir() if p.is_dir() and _VERSION_DIR.match(p.name))


def check_writable(root: str | os.PathLike[str]) -> None:
    """Raise :class:`ArtifactWriteError` now if no version could be written under ``root``
    (read-only, a file in the way): before hours of training, not after. Probes with a folder
    made and removed in ``root`` or its nearest existing parent, so it leaves nothing behind."""
    root = Path(root)
    existing = root
    while not existing.exists() and existing.parent != existing:
        existing = existing.parent
    try:
        if not existing.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, os.strerror(errno.ENOTDIR), str(existing))
        Path(tempfile.mkdtemp(prefix=".staging-", dir=existing)).rmdir()
    except OSError as exc:
        raise _write_error(root, exc) from exc


def _write_error(root: Path, exc: OSError | SafetensorError) -> ArtifactWriteError:
    reason = exc.strerror if isinstance(exc, OSError) and exc.strerror else str(exc)
    return ArtifactWriteError(
        f"{root}: cannot write the new model version: {reason}; nothing was saved"
    )


def save_artifact(root: str | os.PathLike[str], artifact: ModelArtifact) -> Path:
    """Write ``artifact`` as the next numbered version under ``root`` and return its folder.

    Versions are never overwritten: if another writer takes the number first, the next one is used.
    """
    root = Path(root)
    try:
        return _write_version(root, artifact)
    except (OSError, SafetensorError) as exc:
        raise _write_error(root, exc) from exc


def _write_version(root: Path, artifact: ModelArtifact) -> Path:
    """:func:`save_artifact`'s work: a staging folder, renamed into place once complete."""
    root.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".staging-", dir=root))
    try:
        tensors = {
            name: t.detach().to(torch.float32).contiguous() for name, t in artifact.tensors.items()
        }
        save_file(tensors, str(staging / MODEL_TENSORS))
        save_file(
            {
                "seen_indptr": artifact.seen_indptr.to(torch.int64).contiguous(),
                "seen_indices": artifact.seen_indices.to(torch.int64).contiguous(),
                "item_popularity": artifact.item_popularity.to(torch.int64).contiguous(),
            },
            str(staging / INTERACTIONS),
        )
        _write_json(staging / USERS, list(artifact.user_ids))
        _write_json(staging / ITEMS, list(artifact.item_ids))
        _write_json(
            staging / ITEM_METADATA,
            {"titles": artifact.item_titles, "genres": artifact.item_genres},
        )
        files = {p.name: sha256_file(p) for p in sorted(staging.iterdir())}
        created = artifact.created_time or datetime.now(timezone.utc).isoformat(timespec="seconds")
        while True:
            version = (list_versions(root) or [0])[-1] + 1
            manifest = {
                "format_version": FORMAT_VERSION,
                "name": root.name,
                "version": version,
                "created_time": created,
                "factors": artifact.factors,
                "rank_factors": artifact.rank_factors,
                "global_mean": artifact.global_mean,
                "rating_range": list(artifact.rating_range),
                "counts": {
                    "users": artifact.n_users,
                    "items": artifact.n_items,
                    "ratings": artifact.rating_count,
                },
                "hyperparameters": artifact.hyperparameters,
                "metrics": artifact.metrics,
                "dataset": artifact.dataset,
                "files": files,
            }
            _write_json(staging / MANIFEST, manifest)
            _fsync_tree(staging)
            target = root / str(version)
            try:
                # rename(2) of a folder onto a missing name is atomic; onto an existing one it fails.
                os.rename(staging, target)
            except OSError:
                if target.exists():
                    continue
                raise
            return target
    finally:
        if staging.exists():
            shutil.rmtree(staging, ignore_errors=True)


def resolve_version(path: str | os.PathLike[str]) -> Path:
    """A version folder as given, or the newest version under a model folder."""
    path = Path(path)
    if (path / MANIFEST).is_file():
        return path
    versions = list_versions(path)
    if not versions:
        if not path.exists():
            raise ArtifactError(f"{path}: no such model folder")
        raise ArtifactError(
            f"{path}: no model version in this folder (expected {path}/<N>/{MANIFEST})"
        )
    return path / str(versions[-1])


def _read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ArtifactError(f"{path}: unreadable JSON: {exc}") from exc


def _verify_files(folder: Path, files: dict[str, str]) -> None:
    for required in (MODEL_TENSORS, INTERACTIONS, USERS, ITEMS, ITEM_METADATA):
        if required not in files:
            raise ArtifactError(f"{folder / MANIFEST}: manifest lists no checksum for {required}")
    for name, expected in files.items():
        file = folder / name
        if Path(name).name != name or not file.is_file():
            raise ArtifactError(f"{file}: listed in the manifest but missing")
        if name.endswith(".safetensors") and _is_pickle(file):
            raise ArtifactError(
                f"{file}: is a pickle (or torch.save zip); mfserve never loads pickles"
            )
        actual = sha256_file(file)
        if actual != expected:
            raise ArtifactError(
                f"{file}: sha256 {actual} does not match the manifest's {expected}; the file is corrupt"
            )


def _is_pickle(file: Path) -> bool:
    """Whether ``file`` starts like a pickle or a torch.save zip rather than like safetensors.

    A safetensors file opens with its JSON header's length (u64, little-endian) and then ``{``;
    that length's first byte is 0x80 for a 640-byte header, so rule safetensors out first.
    """
    with file.open("rb") as handle:
        head = handle.read(9)
    length = int.from_bytes(head[:8], "little")
    if head[8:9] == b"{" and length <= file.stat().st_size - 8:
        return False
    return head.startswith(_PICKLE_MAGIC)


def _load_tensors(file: Path) -> dict[str, torch.Tensor]:
    try:
        return load_file(str(file))
    except (SafetensorError, OSError, ValueError) as exc:
        raise ArtifactError(f"{file}: not a valid safetensors file: {exc}") from exc


def load_artifact(path: str | os.PathLike[str]) -> ModelArtifact:
    """Load and validate a version folder (or the newest version under a model folder).

    Raises ``ArtifactError`` for another format version, a file whose sha256 differs from the
    manifest, a pickle, or tables whose shapes disagree with the id lists.
    """
    folder = resolve_version(path)
    manifest = _read_json(folder / MANIFEST)
    if not isinstance(manifest, dict):
        raise ArtifactError(f"{folder / MANIFEST}: not a JSON object")
    found = manifest.get("format_version")
    if found != FORMAT_VERSION:
        raise ArtifactError(
            f"{folder / MANIFEST}: format_version {found!r} is not supported (this mfserve reads {FORMAT_VERSION})"
        )
    files = manifest.get("files")
    if not isinstance(files, dict):
        raise ArtifactError(f"{folder / MANIFEST}: no 'files' checksum table")
    _verify_files(folder, files)
    numbered = bool(_VERSION_DIR.match(folder.name))
    tensors = _load_tensors(folder / MODEL_TENSORS)
    interactions = _load_tensors(folder / INTERACTIONS)
    metadata = _read_json(folder / ITEM_METADATA)
    try:
        recorded_version = int(manifest["version"])  # checked even where the folder says it
        artifact = ModelArtifact(
            tensors=tensors,
            user_ids=_read_json(folder / USERS),
            item_ids=_read_json(folder / ITEMS),
            global_mean=float(manifest["global_mean"]),
            rating_range=(float(manifest["rating_range"][0]), float(manifest["rating_range"][1])),
            seen_indptr=interactions["seen_indptr"],
            seen_indices=interactions["seen_indices"],
            item_popularity=interactions["item_popularity"],
            item_titles=metadata.get("titles"),
            item_genres=metadata.get("genres"),
            hyperparameters=manifest.get("hyperparameters", {}),
            metrics=manifest.get("metrics", {}),
            dataset=manifest.get("dataset", {}),
            # A numbered folder is the version (models/NAME/N, as the contract says), whatever
            # the manifest recorded where it was written: versions are copied between folders.
            name=folder.parent.name if numbered else str(manifest.get("name", folder.parent.name)),
            version=int(folder.name) if numbered else recorded_version,
            created_time=str(manifest.get("created_time", "")),
            path=folder,
        )
    except (KeyError, IndexError, TypeError, ValueError, AttributeError) as exc:
        # A hand-edited or truncated manifest: report it like every other bad artifact.
        raise ArtifactError(
            f"{folder / MANIFEST}: malformed manifest or id files ({type(exc).__name__}: {exc})"
        ) from exc
    _check_shapes(artifact, folder)
    return artifact


def _check_shapes(artifact: ModelArtifact, folder: Path) -> None:
    n_users, n_items = artifact.n_users, artifact.n_items
    expected_rows = {
        "user_factors": n_users,
        "user_bias": n_users,
        "rank_user_factors": n_users,
        "item_factors": n_items,
        "item_bias": n_items,
        "rank_item_factors": n_items,
        "rank_item_bias": n_items,
    }
    for name in ("user_factors", "item_factors", "user_bias", "item_bias"):
        if name not in artifact.tensors:
            raise ArtifactError(f"{folder / MODEL_TENSORS}: tensor {name!r} is missing")
    for name, tensor in artifact.tensors.items():
        rows = expected_rows.get(name)
        found = tensor.shape[0] if tensor.dim() else 0
        if rows is not None and (tensor.dim() == 0 or found != rows):
            raise ArtifactError(
                f"{folder / MODEL_TENSORS}: {name} has {found} rows but the id list has {rows}"
            )
    tensors = artifact.tensors
    for users, items in (
        ("user_factors", "item_factors"),
        ("rank_user_factors", "rank_item_factors"),
    ):
        if (users in tensors) != (items in tensors):
            present, absent = (users, items) if users in tensors else (items, users)
            raise ArtifactError(f"{folder / MODEL_TENSORS}: has {present} but not {absent}")
        if users in tensors and (
            tensors[users].dim() != 2
            or tensors[items].dim() != 2
            or tensors[users].shape[1] != tensors[items].shape[1]
        ):
            raise ArtifactError(
                f"{folder / MODEL_TENSORS}: {users} {list(tensors[users].shape)} and {items} "
                f"{list(tensors[items].shape)} must be tables of the same width"
            )
    for name in ("user_bias", "item_bias", "rank_item_bias"):
        if name in tensors and tensors[name].dim() != 1:
            raise ArtifactError(
                f"{folder / MODEL_TENSORS}: {name} has shape {list(tensors[name].shape)}; "
                "expected one value per row"
            )
    if artifact.seen_indptr.numel() != n_users + 1 or artifact.item_popularity.numel() != n_items:
        raise ArtifactError(
            f"{folder / INTERACTIONS}: interaction tables do not match the id lists"
        )
    # The seen-item lists are indexed without bounds checks by the server's compiled TopK, so a
    # file whose checksum matches but whose index points outside the tables is refused here.
    indptr, indices = artifact.seen_indptr, artifact.seen_indices
    if (
        int(indptr[0]) != 0
        or int(indptr[-1]) != indices.numel()
        or bool((indptr[1:] < indptr[:-1]).any())
    ):
        raise ArtifactError(
            f"{folder / INTERACTIONS}: seen_indptr is not a CSR index over seen_indices (it must "
            f"start at 0, never decrease and end at {indices.numel()})"
        )
    if indices.numel() and (int(indices.min()) < 0 or int(indices.max()) >= n_items):
        raise ArtifactError(
            f"{folder / INTERACTIONS}: seen_indices holds item rows outside 0..{n_items - 1}"
        )
