"""Id <-> dense index mapping shared by training, artifacts and serving.

Ids are strings at every boundary: MovieLens writes integers, other sources write UUIDs or
names, and a request over gRPC carries text. Treating ``1`` and ``"1"`` as the same id in one
place, and different ids in another, is the classic silent recommender bug, so every input is
normalised to ``str`` here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt
import pandas as pd

__all__ = ["IdEncoder", "UnknownIdError", "encode_split"]


class UnknownIdError(KeyError, ValueError):
    """An id the encoder was not fitted on.

    Both a ``KeyError`` (it is a failed lookup) and a ``ValueError`` (what scikit-learn's
    ``LabelEncoder`` raises for unseen labels), so callers written for either idiom work.
    """

    def __init__(self, id_: str, count: int = 1) -> None:
        self.id = id_
        self.count = count
        more = f" (and {count - 1} more)" if count > 1 else ""
        super().__init__(f"unknown id {id_!r}{more}")

    def __str__(self) -> str:
        # KeyError.__str__ would repr() the message and wrap it in a second pair of quotes.
        return str(self.args[0])


def _as_str_index(ids: Iterable[Any]) -> pd.Index:
    """Normalise ids to an Index of ``str``, vectorised.

    Integers become their decimal text (MovieLens ``1`` -> ``"1"``). Anything else (floats,
    None, bytes) is rejected: ``str(1.0) == "1.0"`` would quietly create a different id.
    Object dtype (not pandas' Arrow strings) keeps any Python string, surrogates included.
    """
    if isinstance(ids, str):
        raise TypeError("ids must be a collection of ids, not a single string")
    arrays = (np.ndarray, pd.Index, pd.Series, pd.api.extensions.ExtensionArray)
    values = ids if isinstance(ids, arrays) else list(ids)
    if isinstance(getattr(values, "dtype", None), pd.StringDtype):
        # pandas' own text columns (load_ratings output): already str, and converting
        # millions of them to Python objects would cost more than the lookup itself.
        text = pd.Index(values)
        if text.hasnans:
            raise TypeError("ids must be str, got missing values")
        return text
    index = pd.Index(values, dtype=object) if len(values) else pd.Index([], dtype=object)
    kind = pd.api.types.infer_dtype(index, skipna=False)
    if kind in ("string", "empty"):
        return index
    if kind == "integer":
        return pd.Index(index.astype(str), dtype=object)
    if kind == "mixed-integer":  # ints and strs together: rare, so a per-element check is fine
        return pd.Index([_as_str(value) for value in index], dtype=object)
    raise TypeError(f"ids must be str (or int, converted to str), got {kind} values")


def _as_str(id_: object) -> str:
    if isinstance(id_, str):
        return id_
    if isinstance(id_, (int, np.integer)) and not isinstance(id_, bool):
        return str(id_)
    raise TypeError(f"ids must be str (or int, converted to str), got {type(id_).__name__}")


class IdEncoder:
    """``LabelEncoder`` semantics over string ids: classes are the sorted unique ids.

    Sorting (plain Python ``str`` order, as ``LabelEncoder`` does for strings) rather than
    first-seen order makes the mapping a pure function of the id *set*, so two runs over
    the same data agree even if the rows were shuffled.
    """

    __slots__ = ("_array", "_classes", "_lookup", "_positions")

    def __init__(self) -> None:
        self._set_classes(())

    def _set_classes(self, classes: Sequence[str]) -> None:
        self._classes: tuple[str, ...] = tuple(classes)
        self._positions: dict[str, int] = {c: i for i, c in enumerate(self._classes)}
        self._array: npt.NDArray[np.object_] = np.array(self._classes, dtype=object)
        self._lookup = pd.Index(self._array, dtype=object)

    # -- fitting --------------------------------------------------------------------------

    def fit(self, ids: Iterable[Any]) -> IdEncoder:
        """Learn the classes; returns ``self`` for chaining, like scikit-learn."""
        self._set_classes(sorted(_as_str_index(ids).unique()))
        return self

    def fit_transform(self, ids: Iterable[Any]) -> npt.NDArray[np.int64]:
        index = _as_str_index(ids)
        self._set_classes(sorted(index.unique()))
        return self._indices(index)

    # -- mapping --------------------------------------------------------------------------

    def transform(self, ids: Iterable[Any]) -> npt.NDArray[np.int64]:
        """Map ids to indices; an unseen id is an error, never a silent -1."""
        return self._indices(_as_str_index(ids))

    def codes(self, ids: Iterable[Any]) -> npt.NDArray[np.int64]:
        """Map ids to indices, -1 for an unseen id (the evaluation's test part): one vectorised
        lookup, where :meth:`index_of` per id cost ~1 s a million ids."""
        return np.asarray(self._lookup.get_indexer(_as_str_index(ids)), dtype=np.int64)

    def _indices(self, index: pd.Index) -> npt.NDArray[np.int64]:
        positions = np.asarray(self._lookup.get_indexer(index), dtype=np.int64)
        unknown = positions < 0
        if unknown.any():
            first = int(np.argmax(unknown))
            raise UnknownIdError(str(index[first]), int(unknown.sum()))
        return positions

    def inverse_transform(self, indices: npt.ArrayLike | Iterable[int]) -> list[str]:
        """Map indices back to ids; negative indices are rejected, not wrapped around."""
        if isinstance(indices, Iterable) and not isinstance(indices, (np.ndarray, pd.Index)):
            array = np.asarray(list(indices))  # asarray would wrap a generator as one object
        else:
            array = np.asarray(indices)
        if array.size == 0:
            return []
        if array.ndim != 1 or not np.issubdtype(array.dtype, np.integer):
            raise TypeError(f"indices must be a 1-d array of integers, got {array.dtype}")
        bad = (array < 0) | (array >= len(self._classes))
        if bad.any():
            value = int(array[int(np.argmax(bad))])
            raise ValueError(f"index {value} is out of range for {len(self._classes)} classes")
        result: list[str] = self._array[array].tolist()
        return result

    def index_of(self, id_: object) -> int | None:
        """O(1) lookup for the serving path, where a miss means cold start, not an error."""
        return self._positions.get(_as_str(id_))

    # -- container protocol ---------------------------------------------------------------

    @property
    def classes(self) -> list[str]:
        """A copy: the mapping is shared by model and artifact, so callers must not mutate it."""
        return list(self._classes)

    def __len__(self) -> int:
        return len(self._classes)

    def __contains__(self, id_: object) -> bool:
        try:
            return _as_str(id_) in self._positions
        except TypeError:
            return False

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, IdEncoder):
            return NotImplemented
        return self._classes == other._classes

    def __hash__(self) -> int:
        return hash(self._classes)

    def __repr__(self) -> str:
        head = ", ".join(repr(c) for c in self._classes[:3])
        more = ", ..." if len(self._classes) > 3 else ""
        return f"IdEncoder({len(self._classes)} classes: [{head}{more}])"

    # -- persistence (plain JSON data, never pickle) ----------------------------------------

    def to_list(self) -> list[str]:
        return list(self._classes)

    @classmethod
    def from_list(cls, classes: Sequence[Any]) -> IdEncoder:
        """Rebuild from ``to_list()`` output, refusing anything ``fit`` could not have made.

        An artifact whose id list was edited or truncated would otherwise map ids to the
        wrong embedding rows without any error.
        """
        if isinstance(classes, str) or not isinstance(classes, Sequence):
            raise TypeError(f"classes must be a list of str, got {type(classes).__name__}")
        for position, value in enumerate(classes):
            if not isinstance(value, str):
                raise TypeError(f"classes[{position}] is {type(value).__name__}, not str")
        for position in range(1, len(classes)):
            if not classes[position - 1] < classes[position]:
                problem = "duplicated" if classes[position - 1] == classes[position] else "unsorted"
                raise ValueError(f"classes[{position}] = {classes[position]!r} is {problem}")
        encoder = cls()
        encoder._set_classes(classes)
        return encoder


def encode_split(
    ids: Iterable[Any],
    fit_rows: npt.NDArray[np.integer[Any]],
    other_rows: npt.NDArray[np.integer[Any]],
) -> tuple[IdEncoder, npt.NDArray[np.int64], npt.NDArray[np.int64]]:
    """An encoder fitted on ``ids[fit_rows]``, those rows' codes, and ``ids[other_rows]``'s codes
    (-1 for an id the fit rows never hold): what ``fit`` + ``transform`` + ``codes`` give, in one
    pass.

    The ids are factorised once and only the distinct ones are normalised to ``str`` and sorted:
    at 20M ratings the per-row string work of the three calls (hashing 20M Python strings into
    an object Index) was ~100 s of a training run, this is ~2 s.
    """
    if isinstance(ids, str):
        raise TypeError("ids must be a collection of ids, not a single string")
    arrays = (np.ndarray, pd.Index, pd.Series, pd.api.extensions.ExtensionArray)
    values = ids if isinstance(ids, arrays) else pd.Index(list(ids), dtype=object)
    raw_codes, raw_uniques = pd.factorize(values, use_na_sentinel=True)
    if len(raw_codes) and raw_codes.min() < 0:
        raise TypeError("ids must be str, got missing values")
    # 1 and "1" factorise apart but are one id: merge the uniques that normalise to one text.
    merged, texts = pd.factorize(_as_str_index(raw_uniques))
    codes = merged[raw_codes] if len(raw_codes) else np.zeros(0, dtype=np.int64)
    fit_codes = codes[fit_rows]
    present = np.zeros(len(texts), dtype=bool)
    present[fit_codes] = True
    kept = np.flatnonzero(present)
    names = np.asarray(texts, dtype=object)[kept]
    order = np.argsort(names, kind="stable")  # Python str order, as sorted() and LabelEncoder
    encoder = IdEncoder()
    encoder._set_classes(names[order].tolist())
    remap = np.full(len(texts), -1, dtype=np.int64)
    remap[kept[order]] = np.arange(len(kept), dtype=np.int64)
    return encoder, remap[fit_codes], remap[codes[other_rows]]
