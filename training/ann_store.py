"""An approximate index stored beside a model version, as a checksummed sidecar.

The artifact's manifest is immutable and checksummed, so an index is a *sidecar* in the version
folder with its own checksums::

    models/NAME/<N>/ann-hnsw.faiss     faiss's own write_index format (not a pickle)
    models/NAME/<N>/ann-hnsw.json      kind, params, build seconds, sha256 of the index file and of
                                       the model.safetensors it was built from

Loading checks both sha256s, so a corrupt index or one built from other factors (a stale index) is
refused rather than silently answering for another model.
"""

from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

from mfserve.training.artifact import MODEL_TENSORS, ModelArtifact, sha256_file
from mfserve.training.scoring.ann import KINDS, AnnError, AnnIndex, faiss_module, model_sha256
from mfserve.training.scoring.types import ranking_tables

SIDECAR_FORMAT = 1


def save_index(index: AnnIndex, folder: str | os.PathLike[str]) -> Path:
    """Write ``ann-<kind>.faiss`` and its JSON sidecar into ``folder``; return the sidecar."""
    faiss = faiss_module()
    folder = Path(folder)
    index_path = folder / f"ann-{index.kind}.faiss"
    sidecar = folder / f"ann-{index.kind}.json"
    # Write-then-rename: a reader never sees a half-written file. Mid-rebuild a reader may pair a
    # new index with the old sidecar; the sha256 check then refuses it rather than misanswer.
    fd, tmp = tempfile.mkstemp(prefix=".ann-", dir=folder)
    os.close(fd)
    try:
        faiss.write_index(index.index, tmp)
        os.chmod(tmp, 0o644)  # mkstemp's 0600 would hide it from a server running as another user
        index.index_sha256 = sha256_file(Path(tmp))
        os.replace(tmp, index_path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    payload = {
        "format": SIDECAR_FORMAT,
        "kind": index.kind,
        "params": index.params,
        "dim": int(index.index.d),
        "augmented": index.augmented,
        "n_items": index.n_items,
        "build_seconds": round(index.build_seconds, 3),
        "faiss_version": str(getattr(faiss, "__version__", "")),
        "index_file": index_path.name,
        "index_sha256": index.index_sha256,
        "model_file": MODEL_TENSORS,
        "model_sha256": index.model_sha256,
        **index.extra,
    }
    tmp_json = sidecar.with_name(f".{sidecar.name}.tmp")
    tmp_json.write_text(json.dumps(payload, indent=1) + "\n", encoding="utf-8")
    os.replace(tmp_json, sidecar)
    return sidecar


def load_index(
    folder: str | os.PathLike[str], artifact: ModelArtifact, kind: str | None = None
) -> AnnIndex | None:
    """The index stored beside ``artifact`` in ``folder``, or None when there is none.

    Raises ``AnnError`` when one exists but is corrupt, stale (built from other factors), does not
    fit the artifact's shapes, or faiss is not installed.
    """
    folder = Path(folder)
    kinds = [kind] if kind is not None else list(KINDS)
    sidecars = [folder / f"ann-{k}.json" for k in kinds if (folder / f"ann-{k}.json").is_file()]
    if not sidecars:
        return None
    sidecar = sidecars[0]
    try:
        meta = json.loads(sidecar.read_text(encoding="utf-8"))
        index_path = folder / Path(str(meta["index_file"])).name
        expected_index, expected_model = str(meta["index_sha256"]), str(meta["model_sha256"])
    except (OSError, KeyError, TypeError, json.JSONDecodeError) as exc:
        raise AnnError(f"{sidecar}: unreadable index sidecar: {exc}") from exc
    if meta.get("format") != SIDECAR_FORMAT:
        raise AnnError(f"{sidecar}: sidecar format {meta.get('format')!r} is not supported")
    current_model = model_sha256(artifact)
    if expected_model != current_model:
        raise AnnError(
            f"{sidecar}: stale index: built from a model.safetensors with sha256 "
            f"{expected_model[:12]}..., but this version's is {current_model[:12]}...; rebuild it"
        )
    if not index_path.is_file():
        raise AnnError(f"{index_path}: listed in {sidecar.name} but missing")
    actual = sha256_file(index_path)
    if actual != expected_index:
        raise AnnError(
            f"{index_path}: sha256 {actual} does not match the sidecar's; the file is corrupt"
        )
    faiss = faiss_module()
    index = faiss.read_index(str(index_path))
    tables = ranking_tables(artifact)
    dim = tables.keys.shape[1] + (1 if tables.key_bias is not None else 0)
    if index.ntotal != artifact.n_items or index.d != dim:
        raise AnnError(
            f"{index_path}: index has {index.ntotal} items of width {index.d}, "
            f"the artifact {artifact.n_items} of width {dim}"
        )
    known = {"format", "kind", "params", "dim", "augmented", "n_items", "build_seconds"}
    known |= {"faiss_version", "index_file", "index_sha256", "model_file", "model_sha256"}
    return AnnIndex(
        kind=str(meta["kind"]),
        index=index,
        params={str(k): int(v) for k, v in dict(meta["params"]).items()},
        tables=tables,
        build_seconds=float(meta.get("build_seconds", 0.0)),
        model_sha256=expected_model,
        index_sha256=actual,
        extra={k: v for k, v in meta.items() if k not in known},
    )
