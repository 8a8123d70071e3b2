"""``mfserve.training.scoring`` (source: ``training/scoring/``): every way a model ranks items,
behind one interface, :class:`Ranker`, chosen once per loaded version by :func:`choose_ranker`.

    choose_ranker(exact, index=...)
      index given           -> ApproximateRanker   faiss for known users; exact for the rest
      numba installed       -> CompiledRanker      the numba scan for plain calls; exact for the rest
      otherwise             -> ExactRanker         torch, the reference every other is tested against

The server, ``mfserve evaluate`` and ``mfserve recommend`` all rank through
``Recommender.ranker`` (or the server's approximate ranker over the same exact one), so they cannot
disagree. The rating kernel (:mod:`.ratings`) and the numba decorator (:mod:`.jit`) live here too.

May import: numpy, torch, ``mfserve.training`` (the artifact); numba and faiss when installed.
Never ``mfserve.server`` or ``mfserve.client``.
"""

from __future__ import annotations

import logging

from mfserve.training.scoring.approximate import ApproximateRanker
from mfserve.training.scoring.compiled import CompiledRanker, rank_kernel
from mfserve.training.scoring.exact import DEFAULT_CHUNK, ExactRanker
from mfserve.training.scoring.jit import HAVE_NUMBA
from mfserve.training.scoring.types import (
    Ranked,
    RankedLists,
    RankedRow,
    Ranker,
    RankingTables,
    RankRequest,
    ranking_tables,
)

__all__ = [
    "DEFAULT_CHUNK",
    "HAVE_NUMBA",
    "ApproximateRanker",
    "CompiledRanker",
    "ExactRanker",
    "RankRequest",
    "Ranked",
    "RankedLists",
    "RankedRow",
    "Ranker",
    "RankingTables",
    "choose_ranker",
    "ranking_tables",
]

log = logging.getLogger("mfserve.training")


def choose_ranker(
    exact: ExactRanker,
    *,
    index: ApproximateRanker | None = None,
    compiled: bool | None = None,
) -> Ranker:
    """The ranker a version answers with (module doc). ``compiled``: None uses the numba kernel
    where it can serve (numba installed, float32 tables, a one-chunk catalogue); False forces
    torch. Building a compiled ranker compiles (or loads from numba's cache) and measures its scan
    now, so the first call pays for nothing."""
    if index is not None:
        return index
    if compiled is not False:
        kernel = rank_kernel(exact.tables, chunk_size=exact.chunk_size)
        if kernel is not None:
            return CompiledRanker(kernel, exact)
    return exact
