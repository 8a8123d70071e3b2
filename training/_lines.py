"""Text files line by line: reading them with pandas and tracing a row back to its line.

``mfserve.training.data`` parses whole files with pandas' C engine, which knows rows, not lines. When
a check fails, the helpers here rescan the file with the ``csv`` module to find the line (and the
field as written) of the first bad row, so a :class:`DataError` reads ``file:line:column: message``.
That rescan happens on the error path only.
"""

from __future__ import annotations

import csv
import io
import os
import re
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import numpy as np
import pandas as pd

DEFAULT_NAMES = (("user", "userId"), ("item", "movieId"), ("rating",))
ROLES = ("user", "item", "rating")


class DataError(ValueError):
    """Bad input data, located like a compiler error so an editor can jump to it.

    ``line`` is the line a text editor shows (header = 1), ``column`` the 1-based field;
    either is None where it does not apply (a missing file, a Parquet row).
    """

    # Its public home: tracebacks and pickles name mfserve.training.data.DataError.
    __module__ = "mfserve.training.data"

    def __init__(
        self,
        message: str,
        *,
        path: str | os.PathLike[str],
        line: int | None = None,
        column: int | None = None,
        column_name: str | None = None,
    ) -> None:
        self.message = message
        self.path = os.fspath(path)
        self.line = line
        self.column = column if line is not None else None
        self.column_name = column_name
        parts = [self.path, *(str(p) for p in (self.line, self.column) if p is not None)]
        super().__init__(f"{':'.join(parts)}: {message}")


@dataclass(frozen=True)
class SourceFile:
    """A readable file on disk or inside a zip; ``path`` is what error messages show."""

    path: str
    open: Callable[[], IO[bytes]]


@dataclass(frozen=True)
class TextFormat:
    """How a text file splits into records, so a DataFrame row can be traced to its line."""

    delimiter: str  # ",", "\t" or "::"
    header: bool
    encoding: str


@dataclass(frozen=True)
class Layout:
    """Where the user, item and rating columns live, for error messages."""

    file: SourceFile
    text: TextFormat | None  # None: not a text file (Parquet), so errors name rows, not lines
    names: tuple[str, ...]  # user, item, rating: as the file spells them
    fields: tuple[int, ...]  # their 1-based field numbers


def disk_file(path: Path) -> SourceFile:
    return SourceFile(str(path), lambda: path.open("rb"))


def read_header(file: SourceFile, text: TextFormat) -> list[str]:
    header = next((fields for _, fields in iter_records(file, text)), None)
    if header is None:
        raise DataError("file is empty", path=file.path)
    return header


def iter_records(file: SourceFile, text: TextFormat) -> Iterator[tuple[int, list[str]]]:
    """(first line, fields) of each non-blank record, skipping blank lines like pandas does."""
    with file.open() as handle:
        stream = io.TextIOWrapper(handle, encoding=text.encoding, errors="replace", newline="")
        if text.delimiter == "::":
            for number, line in enumerate(stream, 1):
                if line.strip():
                    yield number, line.rstrip("\r\n").split("::")
            return
        reader = csv.reader(stream, delimiter=text.delimiter, skipinitialspace=True)
        end = 0
        for fields in reader:
            start, end = end + 1, reader.line_num
            if len(fields) > 1 or (fields and fields[0].strip()):
                yield start, fields


def locate_row(layout: Layout, row: int) -> tuple[int | None, list[str] | None]:
    """(line, fields) of a 0-based data row, by rescanning the file: the error path only."""
    if layout.text is None:
        return None, None
    records = iter_records(layout.file, layout.text)
    for _ in range(row + layout.text.header):
        next(records, None)
    return next(records, (None, None))


def row_error(
    layout: Layout, row: int, role: int | None, message: str, value: str | None = None
) -> DataError:
    """Build a DataError for a DataFrame row, tracing it back to its line in the file.

    ``{value}`` in the message is filled with the field as written in the file where it can
    be found ("4,5" or " nan"), which says more than the parsed value would.
    """
    line, fields = locate_row(layout, row)
    name = layout.names[role] if role is not None else None
    column = layout.fields[role] if role is not None else None
    if value is not None:
        if fields is not None and column is not None and column <= len(fields):
            value = fields[column - 1]
        message = message.format(value=repr(value))
    if name is not None:
        message = f"column {name!r}: {message}"
    if line is None:
        message = f"row {row + 1}: {message}"
    return DataError(message, path=layout.file.path, line=line, column=column, column_name=name)


def read_csv_frame(
    file: SourceFile, text: TextFormat, options: dict[str, Any], rating_column: Any = None
) -> pd.DataFrame:
    """Parse with pandas' C engine, every field as text except ratings, tried as float first.

    Ratings fall back to text only when the float parse fails, i.e. on the error path, where
    the text lets the error quote the bad value.
    """
    base = {
        "index_col": False,  # else a row with one extra field silently shifts into the index
        "na_filter": False,  # "NA" or "null" is a valid id, not a missing value
        "encoding": text.encoding,
        "skipinitialspace": True,
        **options,
    }
    text_dtype = dict.fromkeys(options["usecols"], str)
    attempts = [str] if rating_column is None else ["float64", str]
    for number, rating_dtype in enumerate(attempts, 1):
        dtype = text_dtype if rating_column is None else {**text_dtype, rating_column: rating_dtype}
        kwargs = {**base, "dtype": dtype}
        try:
            with file.open() as handle:
                return pd.read_csv(handle, **kwargs)
        except pd.errors.EmptyDataError as error:
            raise DataError("file is empty", path=file.path) from error
        except pd.errors.ParserError as error:
            raise parser_error(file, error, text) from error
        except UnicodeDecodeError as error:
            raise encoding_error(file, error) from error
        except ValueError:
            if number == len(attempts):
                raise
    raise AssertionError("unreachable")


def parser_error(file: SourceFile, error: Exception, text: TextFormat) -> DataError:
    """pandas' tokenizer errors (an unclosed quote) name the 0-based line where the bad field
    starts; the record starting there is read again to name the field its runaway quote opens
    (the last one the csv module reads: it runs to the end of the file).

    Rows with *extra* fields never get here: with ``usecols`` pandas ignores them.
    """
    detail = str(error).removeprefix("Error tokenizing data. C error: ")
    at = _RECORD.search(detail)
    if at is None:
        return DataError(f"cannot parse: {detail}", path=file.path)
    line = int(at[1]) + 1
    message = f"cannot parse: {_RECORD.sub('', detail)}"
    records = iter_records(file, text)
    column = next((len(fields) for start, fields in records if start == line), None)
    return DataError(message, path=file.path, line=line, column=column)


# Where pandas says a field that never ends started.
_RECORD = re.compile(r" starting at row (\d+)")


def encoding_error(file: SourceFile, error: UnicodeDecodeError) -> DataError:
    with file.open() as handle:
        for number, line in enumerate(handle, 1):
            try:
                line.decode("utf-8")
            except UnicodeDecodeError as bad:
                message = f"not valid UTF-8 (byte {line[bad.start]:#04x}); re-save as UTF-8"
                return DataError(message, path=file.path, line=number, column=None)
    return DataError(f"not valid UTF-8: {error}", path=file.path)


def choose_columns(
    found: Sequence[str],
    wanted: Sequence[str | None],
    path: str,
    header_line: int | None,
    roles: Sequence[str] = ROLES,
) -> tuple[str, ...]:
    """Resolve each column by its explicit name, else by the first default present."""
    chosen = []
    for role, explicit, defaults in zip(roles, wanted, DEFAULT_NAMES, strict=True):
        candidates = (explicit,) if explicit else defaults
        name = next((c for c in candidates if c in found), None)
        if name is None:
            expected = " or ".join(repr(c) for c in candidates)
            listed = ", ".join(repr(c) for c in found)
            hint = "" if explicit else f"; pass {role}_col= to name it"
            raise DataError(
                f"missing {role} column {expected} (found: {listed}){hint}",
                path=path,
                line=header_line,
                column_name=candidates[0],
            )
        chosen.append(name)
    return tuple(chosen)


def read_delimited(
    file: SourceFile, text: TextFormat, wanted: Sequence[str | None]
) -> tuple[pd.DataFrame, Layout]:
    header = read_header(file, text)
    names = choose_columns(header, wanted, file.path, 1)
    fields = tuple(header.index(name) + 1 for name in names)
    options = {"sep": text.delimiter, "usecols": list(names)}
    frame = read_csv_frame(file, text, options, rating_column=names[2])
    frame = frame[list(names)].set_axis(list(ROLES), axis=1)
    return frame, Layout(file, text, names, fields)


def read_dat_ratings(file: SourceFile) -> tuple[pd.DataFrame, Layout]:
    """Read ``a::b::c::d`` with the fast C parser by splitting on ':' and checking the gaps.

    A multi-character separator would force pandas' Python engine, ~20x slower on ml-10m.
    """
    text = TextFormat("::", header=False, encoding="latin-1")
    options: dict[str, Any] = {
        "sep": ":",
        "header": None,
        "names": range(7),
        "usecols": range(5),
        "quoting": csv.QUOTE_NONE,
    }
    raw = read_csv_frame(file, text, options, rating_column=4)
    layout = Layout(file, text, ("UserID", "MovieID", "Rating"), (1, 2, 3))
    for gap, role in ((1, 1), (3, 2)):  # the empty field between the two ':' of each '::'
        bad = (raw[gap].notna() & (raw[gap] != "")).to_numpy()
        if bad.any():
            raise row_error(layout, int(np.argmax(bad)), role, "fields must be separated by '::'")
    frame = raw.rename(columns={0: "user", 2: "item", 4: "rating"})[list(ROLES)]
    return frame, layout
