"""Output of the client commands: aligned tables for people, JSON and CSV for programs."""

from __future__ import annotations

import csv
import dataclasses
import enum
import json
import math
import struct
import sys
from collections.abc import Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any, TextIO

Row = Sequence[object]


def f32(value: float) -> float:
    """The shortest decimal that is the same float32: ratings travel as float32, so ``3.61``
    arrives as ``3.609999895095825``; this gives ``3.61`` back for JSON and CSV."""
    if math.isnan(value) or math.isinf(value):
        return value
    try:
        target = struct.unpack("f", struct.pack("f", value))[0]
    except OverflowError:  # a float64 beyond float32's range: not a float32, keep it
        return value
    for digits in range(1, 10):
        shorter = float(f"{value:.{digits}g}")
        if struct.unpack("f", struct.pack("f", shorter))[0] == target:
            return shorter
    return value


def jsonable(value: Any) -> Any:
    """Results (dataclasses, tuples, mappings, datetimes, enums) as plain JSON data."""
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: jsonable(getattr(value, f.name)) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {str(k): jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [jsonable(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    if isinstance(value, float):
        return f32(value)
    return value


def print_json(value: Any, out: TextIO | None = None) -> None:
    print(json.dumps(jsonable(value), indent=2, ensure_ascii=False), file=out or sys.stdout)


def _cell(value: object) -> str:
    if isinstance(value, float):
        return f"{value:.4f}"
    if isinstance(value, (list, tuple)):
        return "|".join(str(v) for v in value)
    if value is None:
        return ""
    return str(value)


def table(headers: Sequence[str], rows: Iterable[Row]) -> str:
    """An aligned table with a header line; numbers right-aligned, text left-aligned."""
    materialised = [list(row) for row in rows]
    cells = [[_cell(v) for v in row] for row in materialised]
    widths = [len(h) for h in headers]
    for row in cells:
        widths = [max(w, len(c)) for w, c in zip(widths, row, strict=True)]
    numeric = [
        bool(materialised)
        and all(isinstance(r[i], (int, float)) and not isinstance(r[i], bool) for r in materialised)
        for i in range(len(headers))
    ]

    def line(values: Sequence[str]) -> str:
        parts = [
            v.rjust(w) if num else v.ljust(w)
            for v, w, num in zip(values, widths, numeric, strict=True)
        ]
        return "  ".join(parts).rstrip()

    return "\n".join([line(list(headers)), *(line(row) for row in cells)])


def fields_table(pairs: Iterable[tuple[str, object]]) -> str:
    """A two-column ``name  value`` listing for one record."""
    materialised = [(name, _cell(value)) for name, value in pairs]
    width = max((len(name) for name, _ in materialised), default=0)
    return "\n".join(f"{name.ljust(width)}  {value}".rstrip() for name, value in materialised)


def write_csv(headers: Sequence[str], rows: Iterable[Row], out: TextIO | None = None) -> None:
    writer = csv.writer(out or sys.stdout, lineterminator="\n")
    writer.writerow(headers)
    for row in rows:
        writer.writerow([f32(v) if isinstance(v, float) else _cell(v) for v in row])
