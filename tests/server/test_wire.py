"""The hand-written packed encoding against protobuf's own serializer."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given
from hypothesis import strategies as st

from mfserve.server.wire import packed_floats, varint
from mfserve.v1 import recommender_pb2 as pb

RATINGS = pb.BatchPredictResponse.DESCRIPTOR.fields_by_name["ratings"].number


@given(st.lists(st.floats(width=32, allow_nan=False), max_size=300))
def test_packed_ratings_parse_as_protobuf_writes_them(values: list[float]) -> None:
    array = np.array(values, dtype=np.float32)
    merged = pb.BatchPredictResponse(model_version=3, missing_user_ids=["u9"])
    merged.MergeFromString(packed_floats(RATINGS, array))
    built = pb.BatchPredictResponse(model_version=3, missing_user_ids=["u9"], ratings=values)
    assert merged == built
    assert list(merged.ratings) == values
    # Byte for byte too, once serialized (field order is protobuf's, whatever the merge order).
    assert merged.SerializeToString() == built.SerializeToString()


def test_large_batches_need_multi_byte_lengths() -> None:
    array = np.linspace(0.5, 5.0, 100_000, dtype=np.float32)
    merged = pb.BatchPredictResponse()
    merged.MergeFromString(packed_floats(RATINGS, array))
    assert np.array_equal(np.array(merged.ratings, dtype=np.float32), array)


def test_float64_input_is_stored_as_float32() -> None:
    merged = pb.BatchPredictResponse()
    merged.MergeFromString(packed_floats(RATINGS, np.array([1.1, 2.5])))
    assert list(merged.ratings) == [float(np.float32(1.1)), 2.5]


@pytest.mark.parametrize(
    ("value", "encoded"),
    [(0, b"\x00"), (1, b"\x01"), (127, b"\x7f"), (128, b"\x80\x01"), (300, b"\xac\x02")],
)
def test_varint(value: int, encoded: bytes) -> None:
    assert varint(value) == encoded
    with pytest.raises(ValueError, match="negative"):
        varint(-1)
