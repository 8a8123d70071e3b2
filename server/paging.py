"""TopK pages (``page_size`` / ``page_token``), as Google's AIP-158 asks of a list call: the token
is opaque, bound to the request's other fields and to the model version that issued it, and
refused with ``INVALID_ARGUMENT`` when either changed, so a client can never stitch together
pages of two different lists.

A token is ``base64url(version:offset:fingerprint)``, the fingerprint being the first 16 hex
digits of the sha256 of the request serialized without its paging fields. It carries no secret:
tampering with it only ever selects another offset of the same list, or fails the check.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
from dataclasses import dataclass

from mfserve.server.errors import invalid_argument
from mfserve.v1 import recommender_pb2 as pb

START_AGAIN = "start again without a page_token"


@dataclass(frozen=True)
class Page:
    """Where a page starts in the ranked list, and how long it is (0: the whole list)."""

    offset: int
    size: int
    fingerprint: str


def fingerprint(request: pb.TopKRequest) -> str:
    bare = pb.TopKRequest()
    bare.CopyFrom(request)
    bare.ClearField("page_size")
    bare.ClearField("page_token")
    return hashlib.sha256(bare.SerializeToString(deterministic=True)).hexdigest()[:16]


def read_page(request: pb.TopKRequest, k: int, version: int) -> Page:
    """The page a TopK request asks for; checks ``page_size`` against ``k`` and the token."""
    size = request.page_size
    if size < 0 or size > k:
        raise invalid_argument(
            "page_size", size, f"must be between 0 (no paging) and k ({k}), the list's length"
        )
    if not request.page_token:
        return Page(0, size, fingerprint(request) if size else "")
    if not size:
        raise invalid_argument("page_token", request.page_token, "needs page_size to be set")
    mine = fingerprint(request)
    try:
        text = base64.urlsafe_b64decode(request.page_token.encode("ascii")).decode("ascii")
        token_version, offset, token_fingerprint = text.split(":")
        issued, start = int(token_version), int(offset)
    except (ValueError, UnicodeError, binascii.Error):
        raise invalid_argument(
            "page_token", request.page_token, f"is not a token this server issued; {START_AGAIN}"
        ) from None
    if token_fingerprint != mine:
        raise invalid_argument(
            "page_token",
            request.page_token,
            f"belongs to a request with other fields (only page_size may change); {START_AGAIN}",
        )
    if not 0 < start < k:
        raise invalid_argument(
            "page_token", request.page_token, f"points outside the list of k={k}; {START_AGAIN}"
        )
    if issued != version:
        raise invalid_argument(
            "page_token",
            request.page_token,
            f"was issued by model version {issued}, and the server now serves version "
            f"{version}; {START_AGAIN}",
        )
    return Page(start, size, mine)


def next_token(page: Page, returned: int, available: int, k: int, version: int) -> str:
    """The token of the page after one that returned ``returned`` items of the ``available``
    ranked (at most ``k``); empty when this page was the last."""
    end = page.offset + returned
    if not page.size or end >= min(available, k):
        return ""
    text = f"{version}:{end}:{page.fingerprint}"
    return base64.urlsafe_b64encode(text.encode("ascii")).decode("ascii")
