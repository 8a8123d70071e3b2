"""The server's compiled fast paths against protobuf and torch: the id decoder must give the rows
protobuf's parser plus the id maps give, or decline; the pair and rank kernels must give
``Recommender``'s ratings and rankings (to float32 rounding) and never depend on their batch."""

from __future__ import annotations

import dataclasses
from typing import Any

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from mfserve.server.batch_compute import top_k_batch
from mfserve.server.batch_decode import BatchDecoder, batch_decoder
from mfserve.server.jit import HAVE_NUMBA, compiled
from mfserve.server.model_holder import serving_model
from mfserve.server.pair_kernel import pair_kernel
from mfserve.server.rank_kernel import FULL_SCAN_MAX_USERS, RankKernel, rank_kernel
from mfserve.server.wire import varint
from mfserve.training.ranking import RankingTables
from mfserve.training.recommender import RankRequest, Recommender
from mfserve.training.synthetic import synthetic_artifact
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


# ---------------------------------------------------------------------------- the pair kernel
@pytest.fixture(scope="module")
def model(synthetic_model: Any) -> Recommender:
    return Recommender(synthetic_model)


def test_kernel_matches_recommender_predict(model: Recommender) -> None:
    kernel = pair_kernel(model)
    assert kernel is not None
    rng = np.random.default_rng(1)
    # -1 rows included: the cold-start estimate (no factors, only the known biases).
    users = rng.integers(-1, model.n_users, 5_000)
    items = rng.integers(-1, model.n_items, 5_000)
    got = kernel.predict(users, items)
    want = model.predict(torch.from_numpy(users), torch.from_numpy(items)).numpy()
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-5)
    low, high = model.rating_range
    assert got.min() >= low and got.max() <= high


def test_kernel_answers_do_not_depend_on_the_batch(model: Recommender) -> None:
    kernel = pair_kernel(model)
    assert kernel is not None
    rng = np.random.default_rng(2)
    users = rng.integers(0, model.n_users, 300)
    items = rng.integers(0, model.n_items, 300)
    together = kernel.predict(users, items)
    one_by_one = np.concatenate(
        [kernel.predict(users[i : i + 1], items[i : i + 1]) for i in range(300)]
    )
    assert np.array_equal(together, one_by_one)  # exactly: each pair is computed alone


class NoCacheLocator:
    """A numba cache locator that finds no place to write, as on a read-only install."""

    @classmethod
    def from_function(cls, function: Any, source: str) -> None:
        return None


def test_without_a_cache_location_kernels_still_compile(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    import numba.core.config

    monkeypatch.setattr(
        numba.core.config, "CACHE_LOCATOR_CLASSES", f"{__name__}.NoCacheLocator", raising=False
    )

    def double(x: int) -> int:
        return 2 * x

    assert compiled(double)(21) == 42
    assert "numba cannot cache" in caplog.text  # the fallback, not the cached build, ran


# ---------------------------------------------------------------------------- the rank kernel
def long_tailed(artifact: Any, seed: int = 1) -> Any:
    """``artifact`` with item key lengths spread over two orders of magnitude, as trained models
    have them (popular items get long vectors), so the rank kernel's norm bound prunes most of a
    TopK scan; synthetic clusters alone have keys of one length."""
    generator = torch.Generator().manual_seed(seed)
    scale = torch.exp(1.2 * torch.randn(artifact.n_items, 1, generator=generator))
    tensors = dict(artifact.tensors)
    for name in ("item_factors", "rank_item_factors"):
        if name in tensors:
            tensors[name] = tensors[name] * scale
    return dataclasses.replace(artifact, tensors=tensors)


RANKER_SHAPE = {"n_users": 60, "n_items": 400, "factors": 8, "clusters": 4, "seen_per_user": 5}


@pytest.fixture(
    scope="module",
    params=[(True, False), (False, False), (True, True), (False, True)],
    ids=["rank-head-full-scan", "rating-head-full-scan", "rank-head-pruned", "rating-head-pruned"],
)
def ranker(request: pytest.FixtureRequest) -> tuple[Recommender, RankKernel]:
    rank_head, pruned = request.param
    artifact = synthetic_artifact(**RANKER_SHAPE, rank_head=rank_head)
    model = Recommender(long_tailed(artifact) if pruned else artifact)
    kernel = RankKernel.build(model, pruned=pruned)
    assert (kernel.order is not None) == pruned
    return model, kernel


def test_the_kernel_prunes_only_where_it_pays() -> None:
    # Measured at load: long-tailed key lengths (as trained models have them) prune most of a
    # scan; synthetic clusters in 32 dimensions, all of one length, prune almost nothing.
    lengths_vary = Recommender(long_tailed(synthetic_artifact(**RANKER_SHAPE)))
    alike = Recommender(synthetic_artifact(n_users=60, n_items=1000, factors=32, clusters=32))
    pruning, scanning = rank_kernel(lengths_vary), rank_kernel(alike)
    assert pruning is not None and scanning is not None
    assert pruning.order is not None and pruning.max_users is None
    assert scanning.order is None and scanning.max_users == FULL_SCAN_MAX_USERS
    assert pruning.visit_share is not None and pruning.visit_share <= 0.25
    assert scanning.visit_share is not None and scanning.visit_share > 0.25
    assert pruning.describe().startswith("pruned scan (pruning visits ")
    assert scanning.describe().startswith("full scan (pruning visits ")


def test_the_load_log_says_which_scan_serves(caplog: pytest.LogCaptureFixture) -> None:
    model = Recommender(long_tailed(synthetic_artifact(**RANKER_SHAPE)))
    with caplog.at_level("INFO", logger="mfserve.server"):
        serving = serving_model(model)
    assert serving.rank_kernel is not None
    assert f"TopK kernel for unnamed v0: {serving.rank_kernel.describe()}" in caplog.text
    assert "of 400 items" in caplog.text


def test_rank_kernel_matches_the_torch_ranking(ranker: tuple[Recommender, RankKernel]) -> None:
    model, kernel = ranker
    users = list(range(model.n_users))
    seen = [u % 3 != 0 for u in users]  # both kinds in one batch
    got = kernel.top_k(users, 10, seen)
    requests = [RankRequest(exclude_seen=s) for s in seen]
    want = model.top_k_lists(torch.tensor(users), 10, requests)
    for (items, scores), (want_items, want_scores) in zip(got, want, strict=True):
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
        # Items exactly, except where two scores tie to within the tolerance.
        for n, (item, want_item) in enumerate(zip(items, want_items, strict=True)):
            if item != want_item:
                assert abs(scores[n] - want_scores[n]) < 1e-5


def test_rank_kernel_batches_do_not_change_answers(ranker: tuple[Recommender, RankKernel]) -> None:
    _, kernel = ranker
    users = [5, 17, 5, 42, 0]
    together = kernel.top_k(users, 7, [True, True, False, True, False])
    alone = [kernel.top_k([u], 7, [s])[0] for u, s in zip(users, [1, 1, 0, 1, 0], strict=True)]
    assert together == alone  # exactly


def test_rank_kernel_never_returns_seen_items_and_stops_at_the_eligible(
    ranker: tuple[Recommender, RankKernel],
) -> None:
    model, kernel = ranker
    tables = model.ranking_tables()
    [(items, scores)] = kernel.top_k([3], model.n_items + 50, [True])
    seen = set(tables.seen_indices[tables.seen_indptr[3] : tables.seen_indptr[4]].tolist())
    assert seen and not seen & set(items)
    assert len(items) == model.n_items - len(seen)  # every unseen item, none twice
    assert scores == sorted(scores, reverse=True)


def test_a_mixed_batch_keeps_each_call_on_its_own_path(
    ranker: tuple[Recommender, RankKernel],
) -> None:
    # Plain calls go through the kernel, the others through torch, and every answer comes back
    # in its call's place, equal to what the call gets alone.
    model, _ = ranker
    serving = serving_model(model)
    assert serving.rank_kernel is not None
    payloads = [
        (4, 5, RankRequest()),
        (9, 3, RankRequest(exclude=torch.tensor([0, 1, 2]))),  # a deny-list: torch
        (-1, 4, RankRequest()),  # unknown user: popularity, torch
        (11, 6, RankRequest(exclude_seen=False)),
    ]
    together = top_k_batch(serving, payloads)
    alone = [top_k_batch(serving, [payload])[0] for payload in payloads]
    assert [len(items) for items, _ in together] == [5, 3, 4, 6]
    for (items, scores), (want_items, want_scores) in zip(together, alone, strict=True):
        assert items == want_items
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)


def test_a_catalogue_past_one_chunk_keeps_the_torch_path() -> None:
    model = Recommender(synthetic_artifact(n_users=5, n_items=300, factors=4), chunk_size=128)
    assert rank_kernel(model) is None


def test_a_batch_past_the_kernel_limit_gets_the_same_rankings(
    ranker: tuple[Recommender, RankKernel],
) -> None:
    # With full scans, past FULL_SCAN_MAX_USERS the batch is a GEMM through torch: scores to
    # 1e-5. The pruned scan takes the whole batch.
    model, _ = ranker
    serving = serving_model(model)
    payloads = [(user, 5, RankRequest()) for user in range(FULL_SCAN_MAX_USERS + 4)]
    together = top_k_batch(serving, payloads)
    for (items, scores), payload in zip(together, payloads, strict=True):
        [(want_items, want_scores)] = top_k_batch(serving, [payload])
        np.testing.assert_allclose(scores, want_scores, rtol=0, atol=1e-5)
        assert len(items) == len(want_items) == 5


def test_the_pruned_scan_ranks_exactly_as_the_full_scan_while_visiting_less() -> None:
    for rank_head in (True, False):
        model = Recommender(long_tailed(synthetic_artifact(**RANKER_SHAPE, rank_head=rank_head)))
        pruned = RankKernel.build(model, pruned=True)
        full = RankKernel.build(model, pruned=False)
        users = list(range(model.n_users))
        for k in (1, 10, model.n_items + 50):
            for seen in ([True] * len(users), [u % 2 == 0 for u in users]):
                got, scanned = pruned.top_k_scanned(users, k, seen)
                assert got == full.top_k(users, k, seen)  # exactly: items, order and scores
        _, scanned = pruned.top_k_scanned(users, 10, [True] * len(users))
        assert np.mean(scanned) < model.n_items / 4  # the bound stopped most scans early


SMALL = st.integers(-3, 3).map(lambda v: v / 2)  # few distinct values: ties are common


@settings(max_examples=300, deadline=None)
@given(data=st.data())
def test_pruned_and_full_scans_agree_on_any_table(data: Any) -> None:
    # Exact agreement, ties and all, on tables built to be awkward: tiny and repeated values
    # (many equal scores), long and short keys, with or without bias and offsets, NaN and inf.
    n_users = data.draw(st.integers(1, 4))
    n_items = data.draw(st.integers(1, 40))
    factors = data.draw(st.integers(1, 6))
    special = st.sampled_from([float("nan"), float("inf"), -float("inf")])
    value = st.one_of(SMALL, special) if data.draw(st.booleans()) else SMALL

    def table(rows: int, cols: int) -> np.ndarray:
        cells = data.draw(st.lists(value, min_size=rows * cols, max_size=rows * cols))
        return np.array(cells, dtype=np.float32).reshape(rows, cols)

    with np.errstate(invalid="ignore"):  # inf * 0: a NaN key, which is one of the cases
        keys = table(n_items, factors) * table(n_items, 1).clip(0.5, None) * 4  # lengths vary
    seen = [
        sorted(data.draw(st.sets(st.integers(0, n_items - 1), max_size=n_items)))
        for _ in range(n_users)
    ]
    tables = RankingTables(
        queries=table(n_users, factors),
        keys=keys,
        key_bias=table(n_items, 1)[:, 0] if data.draw(st.booleans()) else None,
        user_offset=table(n_users, 1)[:, 0] if data.draw(st.booleans()) else None,
        seen_indptr=np.cumsum([0] + [len(s) for s in seen], dtype=np.int64),
        seen_indices=np.array([i for s in seen for i in s], dtype=np.int64),
    )
    full = RankKernel.from_tables(tables, pruned=False)
    pruned = RankKernel.from_tables(tables, pruned=True)
    users = data.draw(st.lists(st.integers(0, n_users - 1), min_size=1, max_size=5))
    exclude = data.draw(st.lists(st.booleans(), min_size=len(users), max_size=len(users)))
    k = data.draw(st.integers(1, n_items + 2))
    assert pruned.top_k(users, k, exclude) == full.top_k(users, k, exclude)


def test_a_non_finite_key_means_full_scans() -> None:
    artifact = long_tailed(synthetic_artifact(**RANKER_SHAPE))
    tensors = dict(artifact.tensors)
    broken = tensors["rank_item_factors"].clone()
    broken[7, 0] = float("nan")
    tensors["rank_item_factors"] = broken
    model = Recommender(dataclasses.replace(artifact, tensors=tensors))
    kernel = RankKernel.build(model, pruned=True)
    assert kernel.order is None  # no bound holds with a NaN key
    [(items, _)] = kernel.top_k([3], model.n_items, [False])
    assert 7 not in items  # its score is NaN: never ranked


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
