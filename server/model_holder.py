"""The one swappable reference to the model being served.

What is swapped is a ``ServingModel``: the ``Recommender`` and the ranker chosen for it when it was
loaded (``mfserve.training.scoring``: with ``--ann``, the approximate index stored beside that
version). The two are loaded together and published by one attribute assignment, so a hot reload
can never pair a new model with an old index (or the reverse).

Every RPC reads :attr:`ModelHolder.serving` (or :attr:`ModelHolder.current`, its ``Recommender``)
exactly once and answers entirely from that object, so a call is answered by one model version
even if a reload swaps the reference mid-call. Swapping is a single attribute assignment (atomic
under the GIL); the old model stays alive for the calls still holding it and is freed when the
last one finishes. That is all hot reload needs.

Approximate index modes (``ServerConfig.ann``): ``none`` never loads one; ``auto`` uses one if it is
stored beside the version (hnsw before ivf) and serves exactly otherwise; ``hnsw`` / ``ivf``
require that kind, and a version without it fails to load. In every mode an index that is there
but corrupt or stale (built from other factors) is refused with ``AnnError``, never silently
ignored: a version pushed without rebuilding its index must not quietly serve a different answer
or cost 40x more per call.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Union

import numpy as np

from mfserve.server.batch_decode import BatchDecoder, batch_decoder
from mfserve.server.log_format import model_fields
from mfserve.training.ann_store import load_index
from mfserve.training.artifact import ModelArtifact, load_artifact
from mfserve.training.recommender import Recommender
from mfserve.training.scoring import ApproximateRanker, Ranker, RankRequest
from mfserve.training.scoring.ann import KINDS, AnnError
from mfserve.training.scoring.approximate import SEARCH_PARAM

ANN_MODES = ("none", "auto", *KINDS)


@dataclass(frozen=True, eq=False)
class ServingModel:
    """What the holder swaps: a model and the ranker chosen for it when it was loaded."""

    recommender: Recommender
    # TopK's one path (mfserve.training.scoring): approximate with an index, else the model's own.
    ranker: Ranker
    # BatchPredict's id lookup from the request's bytes, compiled (None without numba).
    batch_decoder: BatchDecoder | None = None

    @property
    def ann(self) -> ApproximateRanker | None:
        """The approximate index serving TopK, if one does."""
        return self.ranker if isinstance(self.ranker, ApproximateRanker) else None

    def predict(self, users: np.ndarray, items: np.ndarray) -> np.ndarray:
        """Ratings (float32) for row pairs (-1 = unknown), as ``Recommender.predict_rows``."""
        ratings: np.ndarray = self.recommender.predict_rows(users, items)
        return ratings


def serving_model(recommender: Recommender, ann: ApproximateRanker | None = None) -> ServingModel:
    """``recommender`` ready to serve, with its ranker and compiled fast paths all built now, so
    that a hot reload publishes a model whose first call pays for nothing."""
    decoder = batch_decoder(recommender.user_index, recommender.item_index)
    # With an approximate index the index answers known users: no exact kernel to build.
    recommender.prepare(ranking=ann is None)
    ranker: Ranker = ann if ann is not None else recommender.ranker
    if recommender.n_users and recommender.n_items:
        # One call through the real scoring path before the version takes any: a failure here
        # refuses the version, and nothing is left to compile or fault in on the first call.
        ranker.top_k([0], 1, [RankRequest()])
        ranker.similar([0], 1, [RankRequest(exclude_seen=False)])
        rows = np.zeros(1, dtype=np.int64)
        recommender.predict_rows(rows, rows)
    log.info(
        "mfserve: TopK for %s: %s",
        describe(recommender),
        ranker.describe(),
        extra=model_fields(recommender),
    )
    return ServingModel(recommender, ranker, decoder)


# What create_server and ModelHolder.set accept as "a model".
ModelSource = Union[str, "os.PathLike[str]", ModelArtifact, Recommender, ServingModel, None]

log = logging.getLogger("mfserve.server")

Listener = Callable[[Recommender | None], None]


def to_recommender(model: ModelSource) -> Recommender | None:
    """A ``Recommender``: a path (version folder, or model folder: newest), an artifact, or one."""
    if model is None or isinstance(model, Recommender):
        return model
    if isinstance(model, ServingModel):
        return model.recommender
    if isinstance(model, ModelArtifact):
        return Recommender(model)
    if isinstance(model, (str, os.PathLike)):
        # load_artifact verifies every file's sha256 against the manifest before trusting it.
        return Recommender(load_artifact(Path(model)))
    raise TypeError(
        f"not a model: {type(model).__name__} (expected a path, ModelArtifact or Recommender)"
    )


def serving_index(
    recommender: Recommender, ann: str = "none", search: Mapping[str, int] | None = None
) -> ApproximateRanker | None:
    """The approximate ranker to serve beside ``recommender`` under mode ``ann`` (module doc).

    ``search``: overrides of the stored search parameters (``ef_search``, ``nprobe``); the one
    that fits the index kind is used. Raises ``AnnError`` when the mode needs an index that is
    missing, or the index found is corrupt or stale.
    """
    if ann not in ANN_MODES:
        raise AnnError(f"unknown --ann mode {ann!r}; expected one of {', '.join(ANN_MODES)}")
    if ann == "none":
        return None
    artifact = recommender.artifact
    folder = artifact.path
    if folder is None:
        if ann == "auto":
            return None
        raise AnnError(
            f"--ann {ann}: the model was never saved, so no index can be stored beside it"
        )
    index = load_index(folder, artifact, None if ann == "auto" else ann)
    if index is None:
        if ann == "auto":
            log.info("mfserve: no approximate index beside %s: TopK is exact", folder)
            return None
        raise AnnError(
            f"--ann {ann}: no {ann} index beside {folder} (ann-{ann}.json); build one with "
            f"`mfserve index --model {folder} --kind {ann}`, or serve with --ann auto or none"
        )
    # The log names the layout: an index built before graphs were renumbered for locality is
    # "item order", and rebuilding it with `mfserve index` makes its lone searches ~1.5x faster.
    return ApproximateRanker(index, recommender.exact, (search or {}).get(SEARCH_PARAM[index.kind]))


def describe(model: Recommender | ServingModel | None) -> str:
    """``"movielens v3"`` for logs."""
    if model is None:
        return "no model"
    recommender = model.recommender if isinstance(model, ServingModel) else model
    artifact = recommender.artifact
    return f"{artifact.name or 'unnamed'} v{artifact.version}"


class ModelHolder:
    """Holds the current ``ServingModel`` (``None`` while none is loaded); swaps it atomically.

    ``ann`` / ``ann_search``: how each model loaded or set here gets its approximate index (see
    :func:`serving_index`); a ``ServingModel`` passed in keeps the ranker it comes with.
    """

    def __init__(
        self,
        model: Recommender | None = None,
        *,
        ann: str = "none",
        ann_search: Mapping[str, int] | None = None,
    ) -> None:
        if ann not in ANN_MODES:
            raise ValueError(f"unknown ann mode {ann!r}; expected one of {', '.join(ANN_MODES)}")
        self.ann = ann
        self.ann_search = dict(ann_search or {})
        self._serving = None if model is None else serving_model(model)
        # Serialises loads: two concurrent reloads cannot publish out of order. Readers never lock.
        self._load_lock = threading.Lock()
        self._listeners: list[Listener] = []

    @property
    def current(self) -> Recommender | None:
        """The model to answer with. Read it once per RPC and keep the local reference."""
        serving = self._serving
        return None if serving is None else serving.recommender

    @property
    def serving(self) -> ServingModel | None:
        """The model and its index, swapped together. Read it once per RPC."""
        return self._serving

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(new_model)`` after every swap (health status, metrics, logs)."""
        self._listeners.append(listener)

    def prepare(self, model: ModelSource) -> ServingModel | None:
        """``model`` loaded (if a path) and paired with its index per this holder's ``ann`` mode.

        Blocking (file reads, sha256). Raises ``ArtifactError`` / ``AnnError``.
        """
        if model is None or isinstance(model, ServingModel):
            return model
        recommender = to_recommender(model)
        assert recommender is not None
        return serving_model(recommender, serving_index(recommender, self.ann, self.ann_search))

    def set(self, model: ModelSource) -> Recommender | None:
        """Swap in ``model`` (anything :func:`to_recommender` accepts); returns the previous one."""
        serving = self.prepare(model)
        with self._load_lock:
            return self._swap(serving)

    def load(self, path: str | os.PathLike[str]) -> Recommender:
        """Load and verify the artifact at ``path`` (and its index, per ``ann``) and swap it in.
        Blocking: file reads + sha256.

        On failure (``ArtifactError``, ``AnnError``) the current model stays in place, so a bad
        push never takes a serving process down.
        """
        with self._load_lock:
            serving = self.prepare(path)
            assert serving is not None
            self._swap(serving)
        recommender = serving.recommender
        log.info(
            "mfserve: loaded %s from %s",
            describe(recommender),
            recommender.artifact.path or path,
            extra=model_fields(recommender),
        )
        return recommender

    def clear(self) -> Recommender | None:
        """Unload: RPCs answer UNAVAILABLE until the next load."""
        with self._load_lock:
            return self._swap(None)

    def _swap(self, serving: ServingModel | None) -> Recommender | None:
        previous, self._serving = self._serving, serving
        model = None if serving is None else serving.recommender
        for listener in list(self._listeners):
            try:
                listener(model)
            except Exception:  # a broken listener must not undo or block a swap
                log.exception("mfserve: model listener failed")
        return None if previous is None else previous.recommender
