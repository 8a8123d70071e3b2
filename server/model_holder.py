"""The one swappable reference to the model being served.

Every RPC reads :attr:`ModelHolder.current` exactly once and answers entirely from that object, so
a call is answered by one model version even if a reload swaps the reference mid-call. Swapping is
a single attribute assignment (atomic under the GIL); the old ``Recommender`` stays alive for the
calls still holding it and is freed when the last one finishes. That is all hot reload needs.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Union

from mfserve.training.artifact import ModelArtifact, load_artifact
from mfserve.training.recommender import Recommender

# What create_server and ModelHolder.set accept as "a model".
ModelSource = Union[str, "os.PathLike[str]", ModelArtifact, Recommender, None]

log = logging.getLogger("mfserve.server")

Listener = Callable[[Recommender | None], None]


def to_recommender(model: ModelSource) -> Recommender | None:
    """A ``Recommender``: a path (version folder, or model folder: newest), an artifact, or one."""
    if model is None or isinstance(model, Recommender):
        return model
    if isinstance(model, ModelArtifact):
        return Recommender(model)
    if isinstance(model, (str, os.PathLike)):
        # load_artifact verifies every file's sha256 against the manifest before trusting it.
        return Recommender(load_artifact(Path(model)))
    raise TypeError(
        f"not a model: {type(model).__name__} (expected a path, ModelArtifact or Recommender)"
    )


def describe(model: Recommender | None) -> str:
    """``"movielens v3"`` for logs."""
    if model is None:
        return "no model"
    artifact = model.artifact
    return f"{artifact.name or 'unnamed'} v{artifact.version}"


class ModelHolder:
    """Holds the current ``Recommender`` (``None`` while none is loaded); swaps it atomically."""

    def __init__(self, model: Recommender | None = None) -> None:
        self._current = model
        # Serialises loads: two concurrent reloads cannot publish out of order. Readers never lock.
        self._load_lock = threading.Lock()
        self._listeners: list[Listener] = []

    @property
    def current(self) -> Recommender | None:
        """The model to answer with. Read it once per RPC and keep the local reference."""
        return self._current

    def add_listener(self, listener: Listener) -> None:
        """Call ``listener(new_model)`` after every swap (health status, metrics, logs)."""
        self._listeners.append(listener)

    def set(self, model: ModelSource) -> Recommender | None:
        """Swap in ``model`` (anything :func:`to_recommender` accepts); returns the previous one."""
        recommender = to_recommender(model)
        with self._load_lock:
            return self._swap(recommender)

    def load(self, path: str | os.PathLike[str]) -> Recommender:
        """Load and verify the artifact at ``path`` and swap it in. Blocking: file reads + sha256.

        On failure (``ArtifactError``) the current model stays in place, so a bad push never takes
        a serving process down.
        """
        with self._load_lock:
            recommender = to_recommender(path)
            assert recommender is not None
            self._swap(recommender)
        log.info(
            "mfserve: loaded %s from %s", describe(recommender), recommender.artifact.path or path
        )
        return recommender

    def clear(self) -> Recommender | None:
        """Unload: RPCs answer UNAVAILABLE until the next load."""
        with self._load_lock:
            return self._swap(None)

    def _swap(self, model: Recommender | None) -> Recommender | None:
        previous, self._current = self._current, model
        for listener in list(self._listeners):
            try:
                listener(model)
            except Exception:  # a broken listener must not undo or block a swap
                log.exception("mfserve: model listener failed")
        return previous
