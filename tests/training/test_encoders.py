"""IdEncoder: LabelEncoder semantics over string ids, and an exact JSON round trip."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from hypothesis import given
from hypothesis import strategies as st
from sklearn.preprocessing import LabelEncoder

from mfserve.training.encoders import IdEncoder, UnknownIdError, encode_split

ids_strategy = st.lists(st.text(max_size=6), min_size=1, max_size=40)


def test_fit_sorts_unique_ids_as_strings() -> None:
    encoder = IdEncoder().fit(["b", "a", "10", "2", "a"])
    assert encoder.classes == ["10", "2", "a", "b"]  # string order, not numeric
    assert len(encoder) == 4
    assert encoder.transform(["a", "10", "b"]).tolist() == [2, 0, 3]
    assert encoder.transform(["a"]).dtype == np.int64


def test_integer_ids_become_their_text() -> None:
    encoder = IdEncoder().fit(np.array([1, 10, 2]))
    assert encoder.classes == ["1", "10", "2"]
    assert encoder.transform([1, "10"]).tolist() == [0, 1]
    assert encoder.index_of(2) == encoder.index_of("2") == 2
    assert 10 in encoder


def test_non_id_values_are_rejected() -> None:
    with pytest.raises(TypeError):
        IdEncoder().fit([1.0, 2.0])
    with pytest.raises(TypeError):
        IdEncoder().fit(["a", None])
    with pytest.raises(TypeError):
        IdEncoder().fit("abc")  # a single string is not a collection of ids


def test_round_trip() -> None:
    ids = ["u3", "u1", "u2", "u1"]
    encoder = IdEncoder().fit(ids)
    assert encoder.inverse_transform(encoder.transform(ids)) == ids
    restored = IdEncoder.from_list(json.loads(json.dumps(encoder.to_list())))
    assert restored == encoder
    assert restored.transform(ids).tolist() == encoder.transform(ids).tolist()


def test_agrees_with_sklearn_label_encoder() -> None:
    ids = [str(v) for v in np.random.default_rng(0).integers(0, 500, 2_000)]
    ours, theirs = IdEncoder(), LabelEncoder()
    assert ours.fit_transform(ids).tolist() == theirs.fit_transform(ids).tolist()
    assert ours.classes == theirs.classes_.tolist()
    assert ours.inverse_transform([0, 5, 7]) == theirs.inverse_transform([0, 5, 7]).tolist()


def test_unknown_id_names_the_first_one() -> None:
    encoder = IdEncoder().fit(["a", "b"])
    with pytest.raises(KeyError) as caught:
        encoder.transform(["a", "zz", "yy"])
    assert str(caught.value) == "unknown id 'zz' (and 1 more)"
    assert caught.value.id == "zz"  # type: ignore[attr-defined]
    with pytest.raises(ValueError, match="unknown id 'c'"):  # LabelEncoder's exception type too
        encoder.transform(["c"])
    assert isinstance(caught.value, UnknownIdError)
    assert encoder.index_of("zz") is None
    assert "zz" not in encoder


def test_inverse_transform_rejects_bad_indices() -> None:
    encoder = IdEncoder().fit(["a", "b"])
    with pytest.raises(ValueError, match="index 2 is out of range"):
        encoder.inverse_transform([0, 2])
    with pytest.raises(ValueError, match="index -1"):
        encoder.inverse_transform(np.array([-1]))
    with pytest.raises(TypeError):
        encoder.inverse_transform([0.5])
    assert encoder.inverse_transform([]) == []
    assert encoder.inverse_transform(i for i in (1, 0)) == ["b", "a"]


def test_from_list_validates() -> None:
    with pytest.raises(ValueError, match="unsorted"):
        IdEncoder.from_list(["b", "a"])
    with pytest.raises(ValueError, match="duplicated"):
        IdEncoder.from_list(["a", "a"])
    with pytest.raises(TypeError, match=r"classes\[1\] is int"):
        IdEncoder.from_list(["a", 1])
    with pytest.raises(TypeError):
        IdEncoder.from_list("ab")  # type: ignore[arg-type]
    assert len(IdEncoder.from_list([])) == 0


def test_classes_is_a_copy() -> None:
    encoder = IdEncoder().fit(["a", "b"])
    encoder.classes.append("c")
    assert encoder.classes == ["a", "b"]


def test_empty_encoder() -> None:
    encoder = IdEncoder()
    assert len(encoder) == 0
    assert encoder.transform([]).tolist() == []
    with pytest.raises(KeyError):
        encoder.transform(["a"])


@given(ids_strategy)
def test_property_matches_label_encoder_and_round_trips(ids: list[str]) -> None:
    encoder = IdEncoder()
    codes = encoder.fit_transform(ids)
    # object dtype: numpy's fixed-width unicode would drop trailing NULs and change the ids
    reference = LabelEncoder().fit(np.array(ids, dtype=object))
    assert encoder.classes == sorted(set(ids)) == reference.classes_.tolist()
    assert codes.tolist() == reference.transform(np.array(ids, dtype=object)).tolist()
    assert encoder.inverse_transform(codes) == ids
    restored = IdEncoder.from_list(json.loads(json.dumps(encoder.to_list())))
    assert restored.classes == encoder.classes
    assert all(restored.index_of(i) == c for i, c in zip(ids, codes.tolist(), strict=True))


def test_pandas_string_columns_take_the_fast_path() -> None:
    column = pd.Series(["b", "a", "b"], dtype="string")
    encoder = IdEncoder().fit(column)
    assert encoder.classes == ["a", "b"]
    assert encoder.transform(column).tolist() == [1, 0, 1]
    with pytest.raises(TypeError, match="missing"):
        encoder.transform(pd.Series(["a", None], dtype="string"))


def test_codes_maps_unseen_ids_to_minus_one() -> None:
    encoder = IdEncoder().fit(["b", "a", "007"])
    assert encoder.codes(["a", "zz", "007", 7, "b"]).tolist() == [1, -1, 0, -1, 2]
    assert encoder.codes([]).tolist() == []


@given(
    st.lists(st.one_of(st.text(max_size=4), st.integers(-20, 20)), min_size=1, max_size=40),
    st.integers(0, 2**32 - 1),
)
def test_encode_split_is_fit_transform_and_codes(ids: list[object], seed: int) -> None:
    rows = np.random.default_rng(seed).permutation(len(ids))
    cut = max(1, len(ids) // 2)
    fit_rows, other_rows = rows[:cut], rows[cut:]
    values = np.array(ids, dtype=object)
    encoder, fit_codes, other_codes = encode_split(values, fit_rows, other_rows)
    reference = IdEncoder().fit(values[fit_rows])
    assert encoder == reference
    assert fit_codes.tolist() == reference.transform(values[fit_rows]).tolist()
    assert other_codes.tolist() == reference.codes(values[other_rows]).tolist()


def test_encode_split_on_pandas_text_merges_int_and_str_and_refuses_missing() -> None:
    text = pd.array(["b", "é", "Z", "b", "a"], dtype="string")
    encoder, fit_codes, other_codes = encode_split(text, np.arange(4), np.array([4]))
    assert encoder.classes == ["Z", "b", "é"]  # Python str order: by code point
    assert fit_codes.tolist() == [1, 2, 0, 1] and other_codes.tolist() == [-1]
    encoder, fit_codes, _ = encode_split([1, "1", 2], np.arange(3), np.arange(0))
    assert encoder.classes == ["1", "2"] and fit_codes.tolist() == [0, 0, 1]
    with pytest.raises(TypeError, match="missing"):
        encode_split(pd.array(["a", None], dtype="string"), np.arange(2), np.arange(0))
    with pytest.raises(TypeError, match="float"):
        encode_split([1.5, 2.0], np.arange(2), np.arange(0))
