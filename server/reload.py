"""Hot reload: a new version of the served model, loaded off the serving path and swapped in only
once it has been verified and warmed up.

Every trigger also re-reads changed certificate and token files first (``refresh``, set by the
server; ``mfserve.server.security``).

Three triggers, one path (:meth:`Reloader.reload`): the folder watcher (``--poll-seconds``, which
only ever moves to a newer version), SIGHUP, and the ``ReloadModel`` RPC. A load runs on the
reloader's own thread, at a lower CPU priority than the serving threads, and does everything
expensive there: sha256 of every file, the format and shape checks, the approximate index with
``--ann``, the compiled kernels and one warm-up call through the real scoring path
(``ModelHolder.load``). Only then is the new ``ServingModel`` published, by one reference
assignment: a call in flight finishes on the version it started on.

The watcher also checks, every tick, that the folder and the serving version's manifest can
still be read: a folder deleted or made unreadable under a running server is reported (a log
line, ``mfserve_model_folder_readable`` 0, ``GetModelInfo``'s ``model_folder_error``) while the
loaded model keeps serving.

A version that fails to load is refused: a log line, ``GetModelInfo``'s ``last_reload_*`` fields,
and the version served before keeps serving. The watcher remembers the refused version's files (names,
sizes, mtimes) and tries it again only when they change, so a half-copied folder is picked up
once the copy completes, and a later good version is picked up whatever came before it (unlike
poll modes that stop after one failure).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

from mfserve.server import metrics
from mfserve.server.log_format import model_fields
from mfserve.server.model_holder import ModelHolder, describe
from mfserve.training.artifact import MANIFEST, ArtifactError, list_versions
from mfserve.training.scoring.ann import AnnError

log = logging.getLogger("mfserve.server")

# The loader's nice value above the serving threads': the kernel gives the serving threads the
# CPU first whenever both want it (the GIL is still shared; see the module doc).
LOADER_NICENESS = 10


class ReloadError(Exception):
    """A reload that did not happen; ``kind`` says why (``not_found``, ``refused``, ``pinned``,
    ``busy``), which ``ReloadModel`` maps to its status code."""

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind


@dataclass(frozen=True)
class ReloadState:
    """The last reload attempt, for ``GetModelInfo`` (all empty before the first)."""

    time: datetime | None = None
    version: int = 0
    error: str = ""


class Reloader:
    """Reloads ``holder``'s model from ``folder`` (a model folder ``models/NAME``).

    ``pinned``: the server was given one version folder, so the watcher is off and a reload may
    only reload that version. ``poll_seconds``: how often :meth:`watch` looks for a newer version.
    """

    def __init__(
        self,
        holder: ModelHolder,
        folder: Path,
        *,
        pinned: int | None = None,
        poll_seconds: float = 0.0,
    ) -> None:
        self.holder = holder
        self.folder = folder
        self.pinned = pinned
        self.poll_seconds = poll_seconds
        self.state = ReloadState()
        # Run before every reload and watcher tick: the server re-reads certificates and tokens.
        self.refresh: Callable[[], None] | None = None
        # version -> the signature of its files when it was refused (module doc).
        self._refused: dict[int, tuple[tuple[str, int, int], ...]] = {}
        # Why the folder or the serving version's files cannot be read ("" when they can); None
        # before the first look (check_folder).
        self.folder_error: str | None = None
        self._busy = threading.Lock()
        self._executor = ThreadPoolExecutor(
            1, thread_name_prefix="mfserve-reload", initializer=_lower_priority
        )

    @classmethod
    def for_path(
        cls, holder: ModelHolder, path: str | os.PathLike[str], poll_seconds: float
    ) -> Reloader:
        """The reloader for what ``mfserve serve --model PATH`` was given: a model folder (watched
        every ``poll_seconds``, 0: never), or one version folder (pinned: never watched)."""
        path = Path(path)
        if (path / MANIFEST).is_file() and path.name.isdigit():
            return cls(holder, path.parent, pinned=int(path.name))
        return cls(holder, path, poll_seconds=poll_seconds)

    def load_first(self) -> None:
        """The load at start: the pinned version, or the newest version of the folder that loads
        (an older one when the newest is refused, which stays refused until its files change).
        Raises ``ArtifactError`` / ``AnnError`` when none does."""
        if self.pinned is not None:
            self.holder.load(self.folder / str(self.pinned))
            metrics.record_reload(True)
            return
        versions = list_versions(self.folder)
        if not versions:
            self.holder.load(self.folder)  # raises the ArtifactError that says what is missing
            return
        first_error: Exception | None = None
        for version in reversed(versions):
            folder = self.folder / str(version)
            before = _signature(folder)
            try:
                self.holder.load(folder)
            except (ArtifactError, AnnError, OSError, ValueError) as exc:
                metrics.record_reload(False)
                first_error = first_error or exc
                self._refused[version] = before
                self.state = ReloadState(_now(), version, str(exc))
                log.error("mfserve: version %d refused at start: %s", version, exc)
                continue
            metrics.record_reload(True)
            return
        assert first_error is not None
        raise first_error

    @property
    def watching(self) -> bool:
        return self.pinned is None and self.poll_seconds > 0

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)

    # ----------------------------------------------------------------- triggers
    async def reload(self, version: int | None = None, *, reason: str) -> tuple[int, bool]:
        """Load ``version`` (None: the newest, or the pinned one) and swap it in; returns the
        version serving afterwards and whether it changed. Raises :class:`ReloadError`."""
        if self.refresh is not None:
            self.refresh()
        if not self._busy.acquire(blocking=False):
            raise ReloadError("busy", "another reload is in progress; retry when it ends")
        try:
            loop = asyncio.get_running_loop()
            return await loop.run_in_executor(self._executor, self._reload, version, reason)
        finally:
            self._busy.release()

    async def watch(self) -> None:
        """Every ``poll_seconds``, reload a version newer than the one serving (until cancelled)."""
        while True:
            await asyncio.sleep(self.poll_seconds)
            if self.refresh is not None:
                self.refresh()
            if self.check_folder():
                continue  # reported; the loaded model keeps serving
            try:
                newest = self._newest()
            except OSError:  # gone since the check: the next tick reports it
                continue
            serving = self._serving_version()
            if newest is None or (serving is not None and newest <= serving):
                continue
            if self._refused.get(newest) == _signature(self.folder / str(newest)):
                continue  # refused before, and its files have not changed since
            # A refusal is logged and recorded where it happens; the watcher keeps watching.
            with contextlib.suppress(ReloadError):
                await self.reload(newest, reason="new version in the model folder")
            # (Nothing else can escape: _reload turns every load failure into a refusal.)

    def check_folder(self) -> str:
        """Why the model folder or the serving version's manifest cannot be read now ("" when
        they can). A change is logged and sets ``mfserve_model_folder_readable``; the loaded
        model is in memory (its tensors memory-mapped, which outlives the files' deletion), so
        it keeps serving either way."""
        problem = _unreadable(self.folder, self._serving_version())
        if problem != self.folder_error:
            if problem:
                log.error(
                    "mfserve: model folder %s %s; still serving %s",
                    self.folder,
                    problem,
                    describe(self.holder.current),
                    extra=model_fields(self.holder.current),
                )
            elif self.folder_error is not None:
                log.info("mfserve: model folder %s can be read again", self.folder)
            self.folder_error = problem
            metrics.set_folder_readable(not problem)
        return problem

    # ----------------------------------------------------------------- the load itself
    def _reload(self, version: int | None, reason: str) -> tuple[int, bool]:
        wanted = self._pick(version)
        serving = self._serving_version()
        if serving == wanted:
            return wanted, False
        folder = self.folder / str(wanted)
        # Taken before the load: files that change while it runs (a copy finishing) must make the
        # watcher try again, not be taken for the refused state.
        before = _signature(folder)
        try:
            self.holder.load(folder)
        except Exception as exc:  # whatever a bad folder makes the load raise, it is refused
            metrics.record_reload(False)
            self._refused[wanted] = before
            self.state = ReloadState(_now(), wanted, str(exc))
            log.error(
                "mfserve: reload refused (%s): %s; still serving %s",
                reason,
                exc,
                describe(self.holder.current),
                extra={**model_fields(self.holder.current), "refused_version": wanted},
            )
            raise ReloadError("refused", f"version {wanted} was refused: {exc}") from exc
        metrics.record_reload(True)
        self._refused.pop(wanted, None)
        self.state = ReloadState(_now(), wanted, "")
        log.info(
            "mfserve: reloaded to %s (%s)",
            describe(self.holder.current),
            reason,
            extra=model_fields(self.holder.current),
        )
        return wanted, True

    def _pick(self, version: int | None) -> int:
        if self.pinned is not None:
            if version not in (None, self.pinned):
                raise ReloadError(
                    "pinned",
                    f"the server serves the pinned version folder {self.folder / str(self.pinned)};"
                    f" start it with --model {self.folder} to serve version {version}",
                )
            return self.pinned
        if version is None:
            newest = self._newest()
            if newest is None:
                raise ReloadError("not_found", f"{self.folder}: no model version in this folder")
            return newest
        if not (self.folder / str(version)).is_dir():
            raise ReloadError("not_found", f"version {version}: no {self.folder / str(version)}")
        return version

    def _newest(self) -> int | None:
        versions = list_versions(self.folder)
        return versions[-1] if versions else None

    def _serving_version(self) -> int | None:
        current = self.holder.current
        return None if current is None else int(current.artifact.version)


def _unreadable(folder: Path, version: int | None) -> str:
    """What stops ``folder`` from being listed, or ``version``'s manifest from being read."""
    try:
        with os.scandir(folder):
            pass
        if version is not None:
            with open(folder / str(version) / MANIFEST, "rb") as manifest:
                manifest.read(1)
    except OSError as exc:
        return f"cannot be read: {exc}"
    return ""


def _signature(folder: Path) -> tuple[tuple[str, int, int], ...]:
    """What a folder's files are now (name, size, mtime): a copy in progress changes it."""
    try:
        entries = sorted(os.scandir(folder), key=lambda entry: entry.name)
        return tuple(
            (entry.name, entry.stat().st_size, entry.stat().st_mtime_ns) for entry in entries
        )
    except OSError:
        return ()


def _lower_priority() -> None:
    # Linux: a thread's own nice value (its native id is its pid for setpriority); elsewhere the
    # loader keeps the process's priority.
    with contextlib.suppress(AttributeError, OSError):
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), LOADER_NICENESS)


def _now() -> datetime:
    return datetime.now(timezone.utc)
