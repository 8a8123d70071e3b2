"""BatchPredict's compiled id decoder against protobuf: it must give the rows protobuf's parser
plus the id maps give, or decline, and never read past the request."""

from __future__ import annotations

from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mfserve.server.batch_decode import BatchDecoder, batch_decoder
from mfserve.server.wire import varint
from mfserve.training.scoring.jit import HAVE_NUMBA
from mfserve.v1 import recommender_pb2 as pb

pytestmark = pytest.mark.skipif(not HAVE_NUMBA, reason="the fast paths need numba")

# Ids as real catalogues have them, plus the awkward ones: non-ASCII, past 127 bytes (a
# two-byte length on the wire), and prefixes of one another.
ID = st.text(st.characters(codec="utf-8"), min_size=1, max_size=150)


def _decoder(users: list[str], items: list[str]) -> BatchDecoder:
    decoder = batch_decoder(
        {u: row for row, u in enumerate(users)}, {i: row for row, i in enumerate(items)}
    )
    assert decoder is not None
    return decoder


@settings(max_examples=150, deadline=None)
@given(
    users=st.lists(ID, min_size=1, max_size=40, unique=True),
    items=st.lists(ID, min_size=1, max_size=40, unique=True),
    data=st.data(),
)
def test_known_ids_decode_to_the_rows_protobuf_gives(
    users: list[str], items: list[str], data: Any
) -> None:
    n = data.draw(st.integers(0, 30))
    user_ids = data.draw(st.lists(st.sampled_from(users), min_size=n, max_size=n))
    item_ids = data.draw(st.lists(st.sampled_from(items), min_size=n, max_size=n))
    cold = data.draw(st.booleans())
    raw = pb.BatchPredictRequest(
        user_ids=user_ids, item_ids=item_ids, allow_cold_start=cold
    ).SerializeToString()
    decoded = _decoder(users, items).decode(raw, 1000)
    assert decoded is not None
    rows_u, rows_i = decoded
    assert rows_u.tolist() == [users.index(u) for u in user_ids]
    assert rows_i.tolist() == [items.index(i) for i in item_ids]


@settings(max_examples=100, deadline=None)
@given(
    known=st.lists(ID, min_size=1, max_size=20, unique=True),
    stranger=ID,
    data=st.data(),
)
def test_an_unknown_or_empty_id_declines(known: list[str], stranger: str, data: Any) -> None:
    odd = data.draw(st.sampled_from(["", stranger]))
    if odd in known:
        return
    ids = [*data.draw(st.lists(st.sampled_from(known), max_size=5)), odd]
    as_users = pb.BatchPredictRequest(user_ids=ids, item_ids=known[:1] * len(ids))
    as_items = pb.BatchPredictRequest(user_ids=known[:1] * len(ids), item_ids=ids)
    decoder = _decoder(known, known)
    assert decoder.decode(as_users.SerializeToString(), 1000) is None
    assert decoder.decode(as_items.SerializeToString(), 1000) is None


def test_interleaved_fields_decode_as_protobuf_parses_them() -> None:
    # Repeated fields may arrive interleaved; protobuf appends each element in order.
    def field(number: int, value: str) -> bytes:
        data = value.encode()
        return varint(number << 3 | 2) + varint(len(data)) + data

    raw = field(1, "b") + field(2, "y") + field(1, "a") + b"\x18\x01" + field(2, "x")
    parsed = pb.BatchPredictRequest.FromString(raw)
    assert list(parsed.user_ids) == ["b", "a"] and list(parsed.item_ids) == ["y", "x"]
    decoded = _decoder(["a", "b"], ["x", "y"]).decode(raw, 10)
    assert decoded is not None
    assert decoded[0].tolist() == [1, 0] and decoded[1].tolist() == [1, 0]


@pytest.mark.parametrize(
    ("raw", "why"),
    [
        (b"\x0a\x05ab", "a length past the end"),
        (b"\x0a", "a tag with no length"),
        (b"\x0a\x80", "a varint cut short"),
        (b"\x20\x01", "an unknown field (4, varint)"),
        (b"\x0d\x00\x00\x00\x00", "field 1 with the wrong wire type"),
        (b"\x18", "allow_cold_start with no value"),
        (b"\x18" + b"\xff" * 11, "a varint longer than ten bytes"),
    ],
)
def test_anything_unusual_declines(raw: bytes, why: str) -> None:
    assert _decoder(["a"], ["x"]).decode(raw, 10) is None, why


def test_more_ids_than_allowed_declines() -> None:
    decoder = _decoder(["a"], ["x"])
    raw = pb.BatchPredictRequest(user_ids=["a"] * 5, item_ids=["x"] * 5).SerializeToString()
    assert decoder.decode(raw, 4) is None
    decoded = decoder.decode(raw, 5)
    assert decoded is not None and len(decoded[0]) == len(decoded[1]) == 5


def test_unequal_lengths_decode_as_they_are() -> None:
    # The caller's size check then names both fields, as on the protobuf path.
    raw = pb.BatchPredictRequest(user_ids=["a", "a"], item_ids=["x"]).SerializeToString()
    decoded = _decoder(["a"], ["x"]).decode(raw, 10)
    assert decoded is not None and (len(decoded[0]), len(decoded[1])) == (2, 1)


def test_a_large_catalogue_keeps_every_id_apart() -> None:
    ids = [str(n) for n in range(50_000)]
    decoder = _decoder(ids, ids)
    rng = np.random.default_rng(0)
    picks = rng.integers(0, len(ids), 2_000)
    raw = pb.BatchPredictRequest(
        user_ids=[ids[p] for p in picks], item_ids=[ids[p] for p in picks[::-1]]
    ).SerializeToString()
    decoded = decoder.decode(raw, 10_000)
    assert decoded is not None
    assert np.array_equal(decoded[0], picks) and np.array_equal(decoded[1], picks[::-1])


@settings(max_examples=400, deadline=None)
@given(data=st.data())
def test_hostile_bytes_decode_as_protobuf_parses_them_or_decline(data: Any) -> None:
    # The decoder runs without bounds checks, so it must never read past the request: any bytes
    # (mutated valid requests, truncations, random junk) either decline or give exactly the rows
    # protobuf's own parser gives.
    users, items = ["a", "bb", "ccc"], ["x", "yy", "\u00e9t\u00e9"]
    valid = pb.BatchPredictRequest(
        user_ids=data.draw(st.lists(st.sampled_from(users), max_size=6)),
        item_ids=data.draw(st.lists(st.sampled_from(items), max_size=6)),
        allow_cold_start=data.draw(st.booleans()),
    ).SerializeToString()
    raw = data.draw(
        st.one_of(
            st.binary(max_size=64),
            st.just(valid[: data.draw(st.integers(0, len(valid)))]),
            st.builds(
                lambda at, byte: valid[:at] + bytes([byte]) + valid[at + 1 :],
                st.integers(0, max(0, len(valid) - 1)),
                st.integers(0, 255),
            ),
        )
    )
    decoded = _decoder(users, items).decode(raw, 1000)
    if decoded is None:
        return
    parsed = pb.BatchPredictRequest.FromString(raw)  # must parse: the decoder accepted it
    assert decoded[0].tolist() == [users.index(u) for u in parsed.user_ids]
    assert decoded[1].tolist() == [items.index(i) for i in parsed.item_ids]
