"""Loading explicit ratings: the bundled MovieLens set, MovieLens releases, or any table.

Everything downstream (splits, encoders, fingerprints in artifacts) trusts what this module
returns, so it is strict: ids are read as text (``"007"`` is not ``7``), rows stay in file
order (the evaluation protocol permutes file order with a seed), and every problem is a
:class:`DataError` that points at ``file:line:column`` the way a compiler would.
"""

from __future__ import annotations

import hashlib
import os
import re
import zipfile
import zlib
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

import numpy as np
import pandas as pd

from mfserve.training._lines import (
    ROLES,
    DataError,
    Layout,
    SourceFile,
    TextFormat,
    choose_columns,
    disk_file,
    locate_row,
    read_csv_frame,
    read_dat_ratings,
    read_delimited,
    read_header,
    row_error,
)

__all__ = ["DataError", "RatingsData", "bundled_dataset_path", "load_ratings"]

MOVIELENS_RANGE = (0.5, 5.0)  # every CSV release and ml-10m: half stars
ML_1M_RANGE = (1.0, 5.0)  # ml-1m: whole stars only
_NO_GENRES = "(no genres listed)"
_NAN_WORDS = ("nan", "+nan", "-nan")
_ZIP_ERRORS = (zipfile.BadZipFile, zlib.error, EOFError)
_URL = re.compile(r"^(https?|file)://", re.IGNORECASE)
_SUFFIXES = {".csv": ",", ".tsv": "\t", ".tab": "\t", ".parquet": "", ".pq": "", ".dat": "::"}


@dataclass(frozen=True, eq=False)  # eq=False: DataFrames have no truth value to compare with
class RatingsData:
    """Ratings in file order plus the metadata an artifact records about where they came from."""

    ratings: pd.DataFrame  # user: str, item: str, rating: float32
    items: pd.DataFrame | None  # item: str, title: str, genres: list[str]; None for plain tables
    source: str
    fingerprint: str  # sha256 of the ratings file bytes: same data, same fingerprint
    rating_range: tuple[float, float]


@dataclass(frozen=True)
class _Release:
    ratings: SourceFile
    movies: SourceFile | None
    rating_range: tuple[float, float]


def bundled_dataset_path() -> Path:
    """The ml-latest-small copy shipped inside the package (works without network)."""
    return Path(str(resources.files("mfserve.training") / "datasets" / "ml-latest-small"))


def load_ratings(
    source: str | os.PathLike[str] | None = None,
    *,
    user_col: str | None = None,
    item_col: str | None = None,
    rating_col: str | None = None,
    rating_range: tuple[float, float] | None = None,
    cache_dir: str | os.PathLike[str] | None = None,
    sha256: str | None = None,
    progress: bool = True,
) -> RatingsData:
    """Load ratings from a MovieLens folder/zip/URL, or a .csv/.tsv/.parquet table.

    ``source=None`` is the bundled ml-latest-small. ``*_col`` name the columns of a plain
    table (defaults: ``user``/``userId``, ``item``/``movieId``, ``rating``). ``rating_range``
    overrides the range (MovieLens releases know theirs; plain tables default to the
    observed min/max). ``sha256`` checks the downloaded (or local) file.
    """
    wanted = _check_range(rating_range)
    columns = (user_col, item_col, rating_col)
    path, description = _resolve(source, cache_dir, sha256, progress)
    kind = _SUFFIXES.get(path.suffix.lower(), "zip" if path.suffix.lower() == ".zip" else None)
    if path.is_dir() or kind in ("zip", "::"):
        if any(columns):
            raise ValueError("user_col/item_col/rating_col apply to plain tables, not MovieLens")
        try:
            with ExitStack() as stack:
                release = _find_release(path, stack)
                return _load_release(release, description, wanted)
        except _ZIP_ERRORS as error:
            raise DataError(f"corrupt zip archive: {error}", path=path) from error
    if kind is None:
        raise DataError(
            f"unsupported file type {path.suffix or '(none)'!r}: expected a MovieLens folder or "
            ".zip, or a .csv, .tsv or .parquet table",
            path=path,
        )
    return _load_table(path, kind, columns, wanted, description)


def _check_range(rating_range: tuple[float, float] | None) -> tuple[float, float] | None:
    if rating_range is None:
        return None
    low, high = (float(value) for value in rating_range)
    if not (np.isfinite(low) and np.isfinite(high) and low < high):
        raise ValueError(f"rating_range must be two finite numbers, low < high: {rating_range}")
    return low, high


def _resolve(
    source: str | os.PathLike[str] | None,
    cache_dir: str | os.PathLike[str] | None,
    sha256: str | None,
    progress: bool,
) -> tuple[Path, str]:
    """Turn ``source`` into an existing local path (downloading URLs) and a description."""
    if source is None:
        return bundled_dataset_path(), "MovieLens ml-latest-small (bundled with mfserve)"
    if isinstance(source, str) and _URL.match(source):
        from mfserve.training.download import fetch  # only URL users pay for urllib/tqdm

        path = fetch(source, cache_dir=cache_dir, sha256=sha256, progress=progress)
        return path, f"{source} (cached at {path})"
    path = Path(source).expanduser()
    if not path.exists():
        raise DataError("no such file or directory", path=path)
    if sha256 is not None:
        if path.is_dir():
            raise ValueError("sha256= checks a file or a URL, not a folder")
        _check_digest(disk_file(path), sha256)
    return path, str(path)


def _check_digest(file: SourceFile, expected: str) -> None:
    actual, expected = _sha256(file), expected.lower()
    if actual != expected:
        raise DataError(f"sha256 mismatch: expected {expected}, got {actual}", path=file.path)


def _sha256(file: SourceFile) -> str:
    digest = hashlib.sha256()
    with file.open() as handle:
        while chunk := handle.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


# -- MovieLens releases ------------------------------------------------------------------


def _find_release(path: Path, stack: ExitStack) -> _Release:
    """Locate ratings/movies files in a folder, a zip (any top folder) or beside a .dat."""
    if path.is_file() and path.suffix.lower() == ".dat":
        names = {p.name: p for p in path.parent.iterdir()}
        names["ratings.dat"] = path
    elif path.is_dir():
        names = {p.name: p for p in path.iterdir()}
    else:
        return _find_zip_release(path, stack)
    ratings = names.get("ratings.csv") or names.get("ratings.dat")
    if ratings is None:
        found = ", ".join(sorted(names)[:10]) or "nothing"
        raise DataError(f"no ratings.csv or ratings.dat in this folder (found: {found})", path=path)
    movies = names.get("movies" + ratings.suffix)
    files = (disk_file(ratings), disk_file(movies) if movies else None)
    return _Release(*files, _release_range(ratings.suffix, ratings.parent.name, set(names)))


def _find_zip_release(path: Path, stack: ExitStack) -> _Release:
    try:
        archive = stack.enter_context(zipfile.ZipFile(path))
    except _ZIP_ERRORS as error:
        raise DataError(f"not a valid zip archive: {error}", path=path) from error
    members = [n for n in archive.namelist() if not n.startswith("__MACOSX/")]
    found = [n for n in members if n.rsplit("/", 1)[-1] in ("ratings.csv", "ratings.dat")]
    if not found:
        raise DataError("no ratings.csv or ratings.dat in this zip archive", path=path)
    ratings = min(found, key=lambda n: (n.count("/"), not n.endswith(".csv")))
    folder, suffix = ratings[: -len("ratings.csv")], ratings[-4:]
    siblings = {n[len(folder) :] for n in members if n.startswith(folder)}

    def member(name: str) -> SourceFile:
        return SourceFile(f"{path}/{name}", lambda: archive.open(name))

    movies = member(folder + "movies" + suffix) if "movies" + suffix in siblings else None
    top = folder.rstrip("/").rsplit("/", 1)[-1] or path.stem
    return _Release(member(ratings), movies, _release_range(suffix, top, siblings))


def _release_range(suffix: str, folder: str, siblings: set[str]) -> tuple[float, float]:
    """ml-1m is whole stars (it alone ships users.dat); every other release has half stars."""
    is_1m = suffix == ".dat" and ("users.dat" in siblings or folder.lower() == "ml-1m")
    return ML_1M_RANGE if is_1m else MOVIELENS_RANGE


def _load_release(
    release: _Release, description: str, wanted: tuple[float, float] | None
) -> RatingsData:
    ratings_file, movies_file = release.ratings, release.movies
    rating_range = wanted or release.rating_range
    if ratings_file.path.endswith(".dat"):
        frame, layout = read_dat_ratings(ratings_file)
        items = _read_dat_movies(movies_file) if movies_file else None
    else:
        text = TextFormat(",", header=True, encoding="utf-8")
        frame, layout = read_delimited(ratings_file, text, ("userId", "movieId", "rating"))
        items = _read_csv_movies(movies_file) if movies_file else None
    ratings, _ = _validate(frame, layout, rating_range)
    return RatingsData(ratings, items, description, _sha256(ratings_file), rating_range)


def _read_dat_movies(file: SourceFile) -> pd.DataFrame:
    """ml-1m's movies.dat is latin-1 and ml-10m's is UTF-8; try UTF-8 first, it is strict."""
    with file.open() as handle:
        data = handle.read()
    try:
        content = data.decode("utf-8")
    except UnicodeDecodeError:
        content = data.decode("latin-1")
    rows = []
    for number, line in enumerate(content.splitlines(), 1):
        if line.strip():
            parts = line.split("::", 2)
            if len(parts) != 3:
                raise DataError("expected MovieID::Title::Genres", path=file.path, line=number)
            rows.append(parts)
    frame = pd.DataFrame(rows, columns=["item", "title", "genres"], dtype=str)
    return _finish_items(frame)


def _read_csv_movies(file: SourceFile) -> pd.DataFrame:
    text = TextFormat(",", header=True, encoding="utf-8")
    wanted, roles = ("movieId", "title", "genres"), ("item", "title", "genres")
    names = choose_columns(read_header(file, text), wanted, file.path, 1, roles)
    frame = read_csv_frame(file, text, {"sep": ",", "usecols": list(names)})
    frame = frame[list(names)].set_axis(["item", "title", "genres"], axis=1).fillna("")
    return _finish_items(frame)


def _finish_items(frame: pd.DataFrame) -> pd.DataFrame:
    frame["genres"] = [[] if g in ("", _NO_GENRES) else g.split("|") for g in frame["genres"]]
    return frame.reset_index(drop=True)


# -- plain tables ------------------------------------------------------------------------


def _load_table(
    path: Path,
    delimiter: str,
    columns: tuple[str | None, ...],
    wanted: tuple[float, float] | None,
    description: str,
) -> RatingsData:
    file = disk_file(path)
    if delimiter:
        text = TextFormat(delimiter, header=True, encoding="utf-8-sig")
        frame, layout = read_delimited(file, text, columns)
    else:
        frame, layout = _read_parquet(file, columns)
    ratings, rating_range = _validate(frame, layout, wanted)
    return RatingsData(ratings, None, description, _sha256(file), rating_range)


def _read_parquet(file: SourceFile, wanted: Sequence[str | None]) -> tuple[pd.DataFrame, Layout]:
    import pyarrow as pa
    import pyarrow.parquet as pq

    try:
        found = pq.read_schema(file.path).names
        names = choose_columns(found, wanted, file.path, None)
        table = pd.read_parquet(file.path, columns=list(names))
    except (pa.ArrowException, OSError) as error:
        raise DataError(f"not a readable Parquet file: {error}", path=file.path) from error
    fields = tuple(found.index(name) + 1 for name in names)
    layout = Layout(file, None, names, fields)
    frame = pd.DataFrame({"rating": table[names[2]]})
    for role, name in zip(ROLES[:2], names[:2], strict=True):
        frame[role] = _ids_as_text(table[name], layout, name)
    rating = frame["rating"]
    if pd.api.types.is_bool_dtype(rating) or not (
        pd.api.types.is_numeric_dtype(rating) or _is_text(rating)
    ):
        raise DataError(f"column {names[2]!r}: ratings must be numbers", path=file.path)
    return frame[list(ROLES)], layout


def _is_text(series: pd.Series) -> bool:
    types = pd.api.types
    return bool(types.is_string_dtype(series) or types.infer_dtype(series) == "string")


def _ids_as_text(series: pd.Series, layout: Layout, name: str) -> pd.Series:
    """Integer or string ids become text; float ids are refused (``1.0`` is not ``"1"``)."""
    if isinstance(series.dtype, pd.CategoricalDtype):
        series = series.astype(series.cat.categories.dtype)
    if not (pd.api.types.is_integer_dtype(series) or _is_text(series.dropna())):
        raise DataError(f"column {name!r}: ids must be integers or text", path=layout.file.path)
    return series.astype(str).where(series.notna(), "")


# -- validation --------------------------------------------------------------------------


def _validate(
    frame: pd.DataFrame, layout: Layout, wanted: tuple[float, float] | None
) -> tuple[pd.DataFrame, tuple[float, float]]:
    """Check every row at once; only a failing check goes looking for its first row."""
    if frame.empty:
        below = " below the header" if layout.text is None or layout.text.header else ""
        raise DataError(f"no ratings{below}: the file has no data rows", path=layout.file.path)
    raw = frame["rating"]
    values, missing, not_number, not_finite = _parse_ratings(raw)
    checks: list[tuple[np.ndarray, int, str]] = [
        ((frame["user"].isna() | (frame["user"] == "")).to_numpy(), 0, "user id is empty"),
        ((frame["item"].isna() | (frame["item"] == "")).to_numpy(), 1, "item id is empty"),
        (missing, 2, "rating is missing"),
        (not_number, 2, "{value} is not a number"),
        (not_finite, 2, "{value} is not a finite number"),
    ]
    if wanted is not None:
        outside = np.isfinite(values) & ((values < wanted[0]) | (values > wanted[1]))
        lo, hi = wanted
        checks.append((outside, 2, f"{{value}} is outside the rating range {lo!r}..{hi!r}"))
    _raise_first(checks, layout, raw, values)
    _check_duplicates(frame, layout)
    rating_range = wanted or (float(values.min()), float(values.max()))
    ratings = pd.DataFrame(
        {"user": frame["user"], "item": frame["item"], "rating": values.astype(np.float32)}
    )
    return ratings.reset_index(drop=True), rating_range


def _parse_ratings(raw: pd.Series) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Float values plus masks for missing, non-numeric and non-finite ratings."""
    values = pd.to_numeric(raw, errors="coerce").to_numpy(np.float64, na_value=np.nan)
    missing = raw.isna().to_numpy()  # a numeric column: only Parquet nulls can be missing
    nan_word = np.zeros(len(raw), bool)
    if _is_text(raw):  # the text fallback of a bad CSV, or text in a Parquet file
        stripped = raw.str.strip()
        missing = (raw.isna() | (stripped == "")).to_numpy()
        nan_word = stripped.str.lower().isin(_NAN_WORDS).to_numpy()
    not_number = np.isnan(values) & ~missing & ~nan_word
    not_finite = ~np.isfinite(values) & ~missing & ~not_number
    return values, missing, not_number, not_finite


def _raise_first(
    checks: list[tuple[np.ndarray, int, str]], layout: Layout, raw: pd.Series, values: np.ndarray
) -> None:
    failing = [
        (int(np.argmax(mask)), order, role, message)
        for order, (mask, role, message) in enumerate(checks)
        if mask.any()
    ]
    if failing:
        row, _, role, message = min(failing)  # the earliest row in the file, whatever its fault
        value = raw.iloc[row]
        text = value if isinstance(value, str) else repr(float(values[row]))
        raise row_error(layout, row, role, message, value=text)


def _check_duplicates(frame: pd.DataFrame, layout: Layout) -> None:
    """Pack each (user, item) into one int64 so the usual, clean case costs a single sort."""
    users = frame["user"].astype("category").cat.codes.to_numpy(np.int64)
    items = frame["item"].astype("category").cat.codes.to_numpy(np.int64)
    keys = users * (int(items.max()) + 1) + items
    ordered = np.sort(keys)
    if not (ordered[1:] == ordered[:-1]).any():
        return
    second = int(np.argmax(pd.Series(keys).duplicated().to_numpy()))
    first = int(np.argmax(keys == keys[second]))
    user, item = frame["user"].iloc[second], frame["item"].iloc[second]
    where = f"line {locate_row(layout, first)[0]}" if layout.text else f"row {first + 1}"
    message = f"duplicate rating for user {user!r} and item {item!r} (first on {where})"
    raise row_error(layout, second, None, message)
