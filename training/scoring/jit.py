"""numba, where it is installed: the decorator every compiled fast path shares (the ranking and
rating kernels here, the server's BatchPredict decoder).

The ``server`` extra installs numba. Without it (a platform numba has no wheel for yet) the fast
paths report themselves unavailable and the server answers through protobuf and torch: slower,
never different.
"""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any, TypeVar, overload

try:
    import numba
except ImportError:  # pragma: no cover - the server extra installs numba
    numba = None  # type: ignore[assignment]

F = TypeVar("F", bound=Callable[..., Any])

log = logging.getLogger("mfserve.training")

HAVE_NUMBA = numba is not None


@overload
def compiled(function: F) -> F: ...
@overload
def compiled(function: None = None, **options: Any) -> Callable[[F], F]: ...
def compiled(function: F | None = None, **options: Any) -> Any:
    """``numba.njit`` with the server's settings, as ``@compiled`` or ``@compiled(inline=...)``.

    ``cache=True``: the machine code is kept beside the module (or in numba's user cache), so only
    the first process on a machine pays the ~1 s compile. ``nogil=True``: the event loop's GIL is
    free while the code runs. Without numba the plain Python function is returned (correct, slow,
    and unused: the fast paths check :data:`HAVE_NUMBA`).
    """
    if function is None:
        return functools.partial(compiled, **options)
    if numba is None:
        return function
    try:
        return numba.njit(cache=True, nogil=True, **options)(function)
    except RuntimeError as exc:
        # No writable place for the cache (a read-only install and no writable home, say):
        # compile at every start instead of failing to import.
        log.warning("mfserve: numba cannot cache %s (%s); compiling it at start", function, exc)
        return numba.njit(cache=False, nogil=True, **options)(function)
