"""load_ratings: every supported format, the bundled set, and every DataError case.

All inputs are tiny files written into tmp_path; nothing is downloaded (the URL path is
exercised with file:// and a local HTTP server on 127.0.0.1).
"""

from __future__ import annotations

import functools
import hashlib
import http.server
import threading
import zipfile
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mfserve.training.data import DataError, bundled_dataset_path, load_ratings
from mfserve.training.download import cached_path

RATINGS_CSV = "userId,movieId,rating,timestamp\n2,20,4.0,1\n1,10,3.5,2\n1,20,5.0,3\n"
MOVIES_CSV = (
    "movieId,title,genres\n"
    '10,"Hello, World (1999)",Comedy|Drama\n'
    "20,Nothing (2000),(no genres listed)\n"
)
RATINGS_DAT = "2::20::4::1\n1::10::3::2\n1::20::5::3\n"
MOVIES_DAT = "10::Misérables, Les (1995)::Drama\n20::Toy Story (1995)::Animation|Children's\n"
EXPECTED = [("2", "20", 4.0), ("1", "10", 3.5), ("1", "20", 5.0)]
BUNDLED_SHA256 = "80da8b3393dae325bbba5a31f291a6ba55d8d4f4396de3c456f2c1635b1b70e8"


def rows(data_frame: pd.DataFrame) -> list[tuple[str, str, float]]:
    return [(u, i, float(r)) for u, i, r in data_frame.itertuples(index=False)]


def write(path: Path, text: str, encoding: str = "utf-8") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(text.encode(encoding))
    return path


def make_zip(path: Path, members: dict[str, bytes], stored: bool = False) -> Path:
    method = zipfile.ZIP_STORED if stored else zipfile.ZIP_DEFLATED
    with zipfile.ZipFile(path, "w", method) as archive:
        for name, data in members.items():
            archive.writestr(name, data)
    return path


def csv_release(folder: Path, ratings: str = RATINGS_CSV) -> Path:
    write(folder / "ratings.csv", ratings)
    write(folder / "movies.csv", MOVIES_CSV)
    return folder


def error_of(source: object, **kwargs: object) -> DataError:
    with pytest.raises(DataError) as caught:
        load_ratings(source, progress=False, **kwargs)  # type: ignore[arg-type]
    return caught.value


# -- formats -----------------------------------------------------------------------------


def test_csv_folder(tmp_path: Path) -> None:
    folder = csv_release(tmp_path / "ml-tiny")
    data = load_ratings(folder)
    assert rows(data.ratings) == EXPECTED  # file order, never sorted
    assert list(data.ratings.columns) == ["user", "item", "rating"]
    assert data.ratings["rating"].dtype == np.float32
    assert all(isinstance(v, str) for v in data.ratings["user"])
    assert data.rating_range == (0.5, 5.0)
    assert data.fingerprint == hashlib.sha256(RATINGS_CSV.encode()).hexdigest()
    assert data.items is not None
    assert data.items["item"].tolist() == ["10", "20"]
    assert data.items["title"].tolist() == ["Hello, World (1999)", "Nothing (2000)"]
    assert data.items["genres"].tolist() == [["Comedy", "Drama"], []]
    assert str(folder) in data.source


def test_csv_zip_matches_folder(tmp_path: Path) -> None:
    folder = load_ratings(csv_release(tmp_path / "ml-tiny"))
    archive = make_zip(
        tmp_path / "ml-tiny.zip",
        {"ml-tiny/ratings.csv": RATINGS_CSV.encode(), "ml-tiny/movies.csv": MOVIES_CSV.encode()},
    )
    data = load_ratings(archive)
    assert rows(data.ratings) == EXPECTED
    assert data.fingerprint == folder.fingerprint  # the ratings bytes, not the zip bytes
    assert data.items is not None and folder.items is not None
    pd.testing.assert_frame_equal(data.items, folder.items)


def test_dat_folder_is_ml_1m(tmp_path: Path) -> None:
    folder = tmp_path / "ml-1m"
    write(folder / "ratings.dat", RATINGS_DAT, "latin-1")
    write(folder / "movies.dat", MOVIES_DAT, "latin-1")
    write(folder / "users.dat", "1::F::1::10::48067\n")
    data = load_ratings(folder)
    assert rows(data.ratings) == [("2", "20", 4.0), ("1", "10", 3.0), ("1", "20", 5.0)]
    assert data.rating_range == (1.0, 5.0)
    assert data.items is not None
    assert data.items["title"].tolist()[0] == "Misérables, Les (1995)"
    assert data.items["genres"].tolist() == [["Drama"], ["Animation", "Children's"]]
    direct = load_ratings(folder / "ratings.dat")  # the file itself: same release
    assert rows(direct.ratings) == rows(data.ratings) and direct.rating_range == (1.0, 5.0)


def test_dat_zip_is_ml_10m_with_latin1_title(tmp_path: Path) -> None:
    archive = make_zip(
        tmp_path / "ml-10m.zip",
        {
            "ml-10M100K/ratings.dat": b"1::10::4.5::1\n1::20::0.5::2\n",
            "ml-10M100K/movies.dat": MOVIES_DAT.encode("latin-1"),
            "ml-10M100K/tags.dat": b"",
        },
    )
    data = load_ratings(archive)
    assert rows(data.ratings) == [("1", "10", 4.5), ("1", "20", 0.5)]
    assert data.rating_range == (0.5, 5.0)
    assert data.items is not None
    assert data.items["title"].tolist()[0] == "Misérables, Les (1995)"


def test_parquet(tmp_path: Path) -> None:
    path = tmp_path / "ratings.parquet"
    frame = pd.DataFrame({"user": [7, 8], "item": ["a", "b"], "rating": [1, 3]})
    frame.to_parquet(path)
    data = load_ratings(path)
    assert rows(data.ratings) == [("7", "a", 1.0), ("8", "b", 3.0)]
    assert data.rating_range == (1.0, 3.0)  # observed
    assert data.items is None


def test_generic_csv_with_custom_columns(tmp_path: Path) -> None:
    path = write(tmp_path / "my.csv", "uid,score,iid\n007,9,x\nNA,10,null\n")
    data = load_ratings(path, user_col="uid", item_col="iid", rating_col="score")
    assert rows(data.ratings) == [("007", "x", 9.0), ("NA", "null", 10.0)]  # ids stay text
    assert data.rating_range == (9.0, 10.0)
    ranged = load_ratings(
        path, user_col="uid", item_col="iid", rating_col="score", rating_range=(0, 10)
    )
    assert ranged.rating_range == (0.0, 10.0)


def test_generic_tsv_and_movielens_names(tmp_path: Path) -> None:
    tsv = write(tmp_path / "r.tsv", "user\titem\trating\nu\ti\t2.5\n")
    assert rows(load_ratings(tsv).ratings) == [("u", "i", 2.5)]
    bom = write(tmp_path / "bom.csv", "\ufeffuser,item,rating\nu,i,2\n")  # as Excel saves it
    assert rows(load_ratings(bom).ratings) == [("u", "i", 2.0)]
    ml = write(tmp_path / "ratings.csv", RATINGS_CSV)
    assert rows(load_ratings(ml).ratings) == EXPECTED


@pytest.fixture
def http_root(tmp_path: Path) -> Iterator[tuple[str, Path, list[str]]]:
    """A throwaway HTTP server on 127.0.0.1: (base URL, served folder, request log)."""
    served, log = tmp_path / "served", []
    served.mkdir()

    class Handler(http.server.SimpleHTTPRequestHandler):
        def do_GET(self) -> None:
            log.append(self.path)
            super().do_GET()

        def log_message(self, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(
        ("127.0.0.1", 0), functools.partial(Handler, directory=str(served))
    )
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}", served, log
    finally:
        server.shutdown()
        server.server_close()


def test_url_is_downloaded_once(tmp_path: Path, http_root: tuple[str, Path, list[str]]) -> None:
    base, served, log = http_root
    zipped = make_zip(served / "ml-tiny.zip", {"ml-tiny/ratings.csv": RATINGS_CSV.encode()})
    digest = hashlib.sha256(zipped.read_bytes()).hexdigest()
    url, cache = f"{base}/ml-tiny.zip", tmp_path / "cache"
    first = load_ratings(url, cache_dir=cache, sha256=digest.upper(), progress=False)
    second = load_ratings(url, cache_dir=cache, sha256=digest, progress=False)
    assert log == ["/ml-tiny.zip"]
    assert rows(first.ratings) == rows(second.ratings) == EXPECTED
    assert cached_path(url, cache).read_bytes() == zipped.read_bytes()
    assert url in first.source
    assert [p.name for p in cache.rglob("*") if p.is_file()] == ["ml-tiny.zip"]


def test_file_url_and_cache_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    source = write(tmp_path / "src" / "r.csv", "user,item,rating\na,b,1\n")
    monkeypatch.setenv("MFSERVE_CACHE", str(tmp_path / "env-cache"))
    data = load_ratings(source.as_uri(), progress=False)
    assert rows(data.ratings) == [("a", "b", 1.0)]
    assert cached_path(source.as_uri()).is_relative_to(tmp_path / "env-cache")
    assert cached_path(source.as_uri()).is_file()


def test_url_sha256_mismatch_leaves_no_file(
    tmp_path: Path, http_root: tuple[str, Path, list[str]]
) -> None:
    base, served, _ = http_root
    write(served / "r.csv", "user,item,rating\na,b,1\n")
    cache = tmp_path / "cache"
    error = error_of(f"{base}/r.csv", cache_dir=cache, sha256="0" * 64)
    assert error.path == f"{base}/r.csv"
    assert "sha256 mismatch: expected 000" in str(error)
    assert not [p for p in cache.rglob("*") if p.is_file()]


def test_url_not_found(tmp_path: Path, http_root: tuple[str, Path, list[str]]) -> None:
    base, _, _ = http_root
    error = error_of(f"{base}/missing.zip", cache_dir=tmp_path / "cache")
    assert "download failed: HTTP Error 404" in str(error)
    assert not [p for p in (tmp_path / "cache").rglob("*") if p.is_file()]


# -- the bundled set ---------------------------------------------------------------------


def test_bundled_ml_latest_small() -> None:
    data = load_ratings()
    ratings = data.ratings
    assert len(ratings) == 100_836
    assert ratings["user"].nunique() == 610
    assert ratings["item"].nunique() == 9_724
    assert data.items is not None and len(data.items) == 9_742
    assert data.fingerprint == BUNDLED_SHA256 == load_ratings().fingerprint
    assert data.rating_range == (0.5, 5.0)
    assert rows(ratings.head(1)) == [("1", "1", 4.0)]
    raw = pd.read_csv(bundled_dataset_path() / "ratings.csv", dtype=str)  # file order kept
    assert ratings["user"].tolist() == raw["userId"].tolist()
    assert ratings["item"].tolist() == raw["movieId"].tolist()
    toy_story = data.items.iloc[0]
    assert (toy_story["item"], toy_story["title"]) == ("1", "Toy Story (1995)")


# -- errors ------------------------------------------------------------------------------


def test_error_format() -> None:
    full = DataError("column 'r': bad", path="x.csv", line=3, column=2, column_name="r")
    assert str(full) == "x.csv:3:2: column 'r': bad"
    assert str(DataError("bad", path="x.csv", line=3)) == "x.csv:3: bad"
    assert str(DataError("bad", path="x.csv")) == "x.csv: bad"
    assert isinstance(full, ValueError)


def test_missing_file_and_folder(tmp_path: Path) -> None:
    error = error_of(tmp_path / "nope.csv")
    assert str(error) == f"{tmp_path / 'nope.csv'}: no such file or directory"
    assert error.line is None and error.column is None
    assert "no such file" in str(error_of(tmp_path / "nope"))


def test_folder_without_ratings(tmp_path: Path) -> None:
    write(tmp_path / "movies.csv", MOVIES_CSV)
    assert "no ratings.csv or ratings.dat in this folder (found: movies.csv)" in str(
        error_of(tmp_path)
    )


def test_missing_column_names_the_columns_found(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "userId,movieId,score\n1,2,3\n")
    error = error_of(path)
    assert str(error) == (
        f"{path}:1: missing rating column 'rating' (found: 'userId', 'movieId', 'score'); "
        "pass rating_col= to name it"
    )
    assert (error.line, error.column_name) == (1, "rating")
    assert "missing item column 'iid'" in str(error_of(path, item_col="iid"))


def test_non_numeric_rating(tmp_path: Path) -> None:
    folder = csv_release(tmp_path, "userId,movieId,rating,timestamp\n1,1,4,1\n1,2,abc,1\n")
    error = error_of(folder)
    path = folder / "ratings.csv"
    assert str(error) == f"{path}:3:3: column 'rating': 'abc' is not a number"
    assert (error.path, error.line, error.column, error.column_name) == (str(path), 3, 3, "rating")


@pytest.mark.parametrize("value", ["nan", "NaN", "inf", "-Infinity"])
def test_non_finite_rating(tmp_path: Path, value: str) -> None:
    path = write(tmp_path / "r.csv", f"user,item,rating\na,b,1\na,c,{value}\n")
    assert str(error_of(path)).endswith(f":3:3: column 'rating': {value!r} is not a finite number")


def test_missing_rating(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user,item,rating\na,b,\n")
    assert str(error_of(path)).endswith(":2:3: column 'rating': rating is missing")


def test_out_of_range_rating(tmp_path: Path) -> None:
    folder = csv_release(tmp_path, "userId,movieId,rating,timestamp\n1,1,4,1\n1,2,5.5,1\n")
    assert str(error_of(folder)).endswith(
        ":3:3: column 'rating': '5.5' is outside the rating range 0.5..5.0"
    )
    generic = write(tmp_path / "g.csv", "user,item,rating\na,b,0\n")
    error = error_of(generic, rating_range=(1, 5))
    assert str(error).endswith(":2:3: column 'rating': '0' is outside the rating range 1.0..5.0")


def test_empty_files(tmp_path: Path) -> None:
    empty = write(tmp_path / "empty.csv", "")
    assert str(error_of(empty)) == f"{empty}: file is empty"
    header = write(tmp_path / "header.csv", "user,item,rating\n")
    assert (
        str(error_of(header)) == f"{header}: no ratings below the header: the file has no data rows"
    )
    dat = write(tmp_path / "ml-1m" / "ratings.dat", "")
    assert "no ratings" in str(error_of(dat.parent))


def test_duplicate_pair_names_both_lines(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user,item,rating\na,b,1\na,c,2\n\na,b,3\n")
    error = error_of(path)
    assert str(error) == f"{path}:5: duplicate rating for user 'a' and item 'b' (first on line 2)"
    assert error.line == 5


@pytest.mark.parametrize(
    ("line", "message"),
    [
        ("NA,,1", ":2:2: column 'item': item id is empty"),
        (",b,1", ":2:1: column 'user': user id is empty"),
    ],
)
def test_empty_ids(tmp_path: Path, line: str, message: str) -> None:
    path = write(tmp_path / "r.csv", f"user,item,rating\n{line}\n")
    assert str(error_of(path)).endswith(message)


def test_first_bad_row_wins_and_quoted_lines_count(tmp_path: Path) -> None:
    text = 'user,item,rating\n"multi\nline",b,1\n\na,,2\nb,c,zzz\n'
    assert str(error_of(write(tmp_path / "r.csv", text))).endswith(
        ":5:2: column 'item': item id is empty"
    )


def test_unclosed_quote(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", 'user,item,rating\na,b,1\n"a,c,2\n')
    assert str(error_of(path)) == f"{path}:3:1: cannot parse: EOF inside string"
    later = write(tmp_path / "s.csv", 'user,item,rating\na,b,1\n\na,"c,2\nb,c,3\n')
    assert str(error_of(later)) == f"{later}:4:2: cannot parse: EOF inside string"


def test_extra_trailing_fields_are_ignored(tmp_path: Path) -> None:
    """pandas' ``usecols`` drops fields past the header; documented, not an error."""
    path = write(tmp_path / "r.csv", "user,item,rating\na,b,1,extra\n")
    assert rows(load_ratings(path).ratings) == [("a", "b", 1.0)]


def test_not_utf8(tmp_path: Path) -> None:
    path = tmp_path / "r.csv"
    path.write_bytes(b"user,item,rating\na,b,1\n\xe9,c,2\n")
    assert str(error_of(path)) == f"{path}:3: not valid UTF-8 (byte 0xe9); re-save as UTF-8"


def test_dat_errors(tmp_path: Path) -> None:
    folder = tmp_path / "ml-1m"
    write(folder / "ratings.dat", "1::2::3::4\n1:2::3::4\n")
    assert str(error_of(folder)).endswith(
        "ratings.dat:2:2: column 'MovieID': fields must be separated by '::'"
    )
    write(folder / "ratings.dat", "1::2::3::4\n1::3::x::4\n")
    assert str(error_of(folder)).endswith("ratings.dat:2:3: column 'Rating': 'x' is not a number")
    write(folder / "ratings.dat", "1::2::3::4\n1::3::0.5::4\n")  # ml-1m is whole stars 1..5
    assert "'0.5' is outside the rating range 1.0..5.0" in str(error_of(folder))


def test_parquet_errors_name_rows(tmp_path: Path) -> None:
    path = tmp_path / "r.parquet"
    pd.DataFrame({"user": ["a", "a"], "item": ["b", "b"], "rating": [1.0, 2.0]}).to_parquet(path)
    assert (
        str(error_of(path))
        == f"{path}: row 2: duplicate rating for user 'a' and item 'b' (first on row 1)"
    )
    pd.DataFrame({"user": ["a"], "item": ["b"], "rating": [np.inf]}).to_parquet(path)
    assert str(error_of(path)) == f"{path}: row 1: column 'rating': 'inf' is not a finite number"
    pd.DataFrame({"user": [1.5], "item": ["b"], "rating": [1.0]}).to_parquet(path)
    assert "ids must be integers or text" in str(error_of(path))
    path.write_bytes(b"not parquet")
    assert "not a readable Parquet file" in str(error_of(path))


def test_bad_zip(tmp_path: Path) -> None:
    path = write(tmp_path / "ml.zip", "this is not a zip")
    assert str(error_of(path)).startswith(f"{path}: not a valid zip archive")


def test_corrupt_zip_member(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "ml.zip", {"ml/ratings.csv": RATINGS_CSV.encode()}, stored=True)
    path.write_bytes(path.read_bytes().replace(b"4.0,1\n", b"4.0,9\n"))  # CRC no longer matches
    assert str(error_of(path)).startswith(f"{path}: corrupt zip archive: Bad CRC-32")


def test_zip_without_ratings(tmp_path: Path) -> None:
    path = make_zip(tmp_path / "ml.zip", {"ml/movies.csv": MOVIES_CSV.encode()})
    assert str(error_of(path)) == f"{path}: no ratings.csv or ratings.dat in this zip archive"


def test_zip_member_errors_point_inside_the_zip(tmp_path: Path) -> None:
    bad = "userId,movieId,rating,timestamp\n1,1,4,1\n1,1,3,1\n"
    path = make_zip(tmp_path / "ml.zip", {"ml/ratings.csv": bad.encode()})
    assert str(error_of(path)).startswith(f"{path}/ml/ratings.csv:3: duplicate rating")


def test_local_sha256_and_misuse(tmp_path: Path) -> None:
    path = write(tmp_path / "r.csv", "user,item,rating\na,b,1\n")
    digest = hashlib.sha256(path.read_bytes()).hexdigest()
    assert len(load_ratings(path, sha256=digest).ratings) == 1
    assert "sha256 mismatch" in str(error_of(path, sha256="f" * 64))
    assert "unsupported file type '.xlsx'" in str(error_of(write(tmp_path / "r.xlsx", "")))
    with pytest.raises(ValueError, match="plain tables"):
        load_ratings(csv_release(tmp_path / "ml"), user_col="u")
    with pytest.raises(ValueError, match="rating_range"):
        load_ratings(path, rating_range=(5, 1))
