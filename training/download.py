"""Download-once cache for dataset URLs (MovieLens zips from GroupLens, or any mirror).

A half-written file must never look like a finished download, so bytes go to a temporary
file in the cache folder and are renamed into place only after the optional sha256 check:
readers see either nothing or the complete, verified file.
"""

from __future__ import annotations

import contextlib
import hashlib
import http.client
import os
import tempfile
import urllib.error
import urllib.parse
import urllib.request
from pathlib import Path
from typing import IO

from mfserve.training.data import DataError

__all__ = ["default_cache_dir", "fetch"]

_CHUNK = 1 << 20
_TIMEOUT_S = 60.0


def default_cache_dir() -> Path:
    """``$MFSERVE_CACHE`` if set (CI and shared machines point it somewhere roomy), else
    ``~/.cache/mfserve``."""
    configured = os.environ.get("MFSERVE_CACHE")
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "mfserve"


def cached_path(url: str, cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """Where ``url`` is kept: keyed by a hash of the URL (two mirrors may share a file name)
    but keeping the file name, whose suffix (.zip, .csv) tells the loader the format."""
    root = Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()
    name = Path(urllib.parse.unquote(urllib.parse.urlsplit(url).path)).name or "download"
    key = hashlib.sha256(url.encode("utf-8")).hexdigest()[:16]
    return root / "downloads" / key / name


def fetch(
    url: str,
    *,
    cache_dir: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> Path:
    """Return a local copy of ``url``, downloading it only if the cache lacks a good copy.

    A cached copy that fails ``sha256`` is treated as corrupt and fetched again; a fresh
    download that fails it is deleted and raises :class:`DataError`, leaving no file behind.
    """
    expected = sha256.lower() if sha256 is not None else None
    target = cached_path(url, cache_dir)
    if target.is_file():
        if expected is None or _file_sha256(target) == expected:
            return target
        target.unlink()
    target.parent.mkdir(parents=True, exist_ok=True)
    handle = tempfile.NamedTemporaryFile(  # noqa: SIM115 - renamed into place, not closed-and-lost
        dir=target.parent, prefix=f".{target.name}.", suffix=".part", delete=False
    )
    partial = Path(handle.name)
    try:
        with handle:
            actual = _stream(url, handle, progress, target.name)
        if expected is not None and actual != expected:
            raise DataError(f"sha256 mismatch: expected {expected}, got {actual}", path=url)
        os.replace(partial, target)
    except BaseException:
        partial.unlink(missing_ok=True)
        _remove_if_empty(target.parent)
        raise
    return target


def _stream(url: str, out: IO[bytes], progress: bool, label: str) -> str:
    """Copy ``url`` into ``out`` chunk by chunk (datasets reach ~1 GB), hashing as it goes."""
    from tqdm.auto import tqdm

    digest = hashlib.sha256()
    try:
        with urllib.request.urlopen(url, timeout=_TIMEOUT_S) as response:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            bar = tqdm(
                total=total,
                unit="B",
                unit_scale=True,
                unit_divisor=1024,
                desc=f"downloading {label}",
                disable=not progress,
            )
            received = 0
            with bar:
                while chunk := response.read(_CHUNK):
                    out.write(chunk)
                    digest.update(chunk)
                    bar.update(len(chunk))
                    received += len(chunk)
    except (urllib.error.URLError, http.client.HTTPException, OSError, ValueError) as error:
        # HTTPError's str has the status code; a plain URLError's reason is the readable part.
        plain = isinstance(error, urllib.error.URLError) and not hasattr(error, "code")
        reason = getattr(error, "reason", error) if plain else error
        raise DataError(f"download failed: {reason}", path=url) from error
    if total is not None and received != total:
        raise DataError(f"download incomplete: {received} of {total} bytes", path=url)
    return digest.hexdigest()


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        while chunk := handle.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _remove_if_empty(folder: Path) -> None:
    """Leave the cache as it was: an empty per-URL folder would only be clutter."""
    with contextlib.suppress(OSError):
        folder.rmdir()
