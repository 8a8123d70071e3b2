"""Bearer tokens: who may call what, checked by one interceptor before any handler runs.

Three kinds of method:

* open: the health service always (load balancers and Kubernetes probes carry no token), and
  server reflection unless ``--reflection-needs-token``;
* admin: ``ReloadModel``, which changes what every caller gets: only a token of
  ``--admin-tokens``. With ``--auth-tokens`` and no admin file, no token may call it;
* everything else: a token of ``--auth-tokens`` or ``--admin-tokens`` (an admin may do all a user
  may). With neither file, every call is open, as before tokens existed.

Tokens are stored as SHA-256 digests and a presented token is compared with every stored one by
``hmac.compare_digest``, without stopping at a match, so neither the comparison nor the number of
comparisons says how much of a token was right. No message ever echoes a token.

A refused call gets its status before its request is even parsed. Refusals are logged at most
once per 10 s, with how many there were, so a scanner cannot flood the log.
"""

from __future__ import annotations

import hashlib
import hmac
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeAlias

import grpc

from mfserve.server.config import ServerConfig
from mfserve.server.throttled_log import ThrottledLog

log = logging.getLogger("mfserve.server")
Handler: TypeAlias = "grpc.RpcMethodHandler[Any, Any]"

ADMIN_METHODS = frozenset({"/mfserve.v1.RecommenderService/ReloadModel"})
HEALTH_PREFIX = "/grpc.health.v1.Health/"
REFLECTION_PREFIXES = (
    "/grpc.reflection.v1alpha.ServerReflection/",
    "/grpc.reflection.v1.ServerReflection/",
)
# RFC 6750's b64token: what a bearer token may be made of (so "#" can start a comment).
TOKEN = re.compile(r"[A-Za-z0-9\-._~+/]+=*")

OPEN, USER, ADMIN = "open", "user", "admin"


class SecurityError(ValueError):
    """A TLS or token setting that cannot be used; the message names the file (and line)."""


def read_tokens(path: Path, flag: str) -> frozenset[bytes]:
    """The SHA-256 digests of the tokens in ``path``: one per line, ``#`` starts a comment.

    Raises ``SecurityError`` naming the file, line and column of anything that is not a token, or
    the file when it cannot be read or holds no token (a server no one can call is a mistake).
    """
    try:
        text = path.read_text(encoding="utf-8")
    except OSError as exc:
        raise SecurityError(f"{path} ({flag}): cannot read the tokens: {exc.strerror}") from None
    except UnicodeDecodeError as exc:
        raise SecurityError(f"{path} ({flag}): not UTF-8 text (byte {exc.start})") from None
    digests = set()
    for number, line in enumerate(text.splitlines(), start=1):
        content = line.split("#", 1)[0]
        token = content.strip()
        if not token:
            continue
        if TOKEN.fullmatch(token) is None:
            column = len(content) - len(content.lstrip()) + 1
            bad = next((i for i, char in enumerate(token) if not TOKEN.fullmatch(char)), 0)
            raise SecurityError(
                f"{path}:{number}:{column + bad} ({flag}): a token is one word of letters, digits "
                f"and -._~+/ (then = padding); this line has {token[bad]!r} in it"
            )
        digests.add(_digest(token))
    if not digests:
        raise SecurityError(f"{path} ({flag}): no token in the file (one per line)")
    return frozenset(digests)


@dataclass(frozen=True)
class Tokens:
    """The digests in force: ``users`` may call the service, ``admins`` ReloadModel as well."""

    users: frozenset[bytes]
    admins: frozenset[bytes]

    def role(self, token: str) -> str | None:
        """ADMIN, USER or None (not a token of this server), in time independent of the token."""
        digest = _digest(token)
        is_admin = is_user = False
        for stored in self.admins:
            is_admin |= hmac.compare_digest(digest, stored)
        for stored in self.users:
            is_user |= hmac.compare_digest(digest, stored)
        return ADMIN if is_admin else USER if is_user else None


class AuthPolicy:
    """Which calls need which token, and the tokens, re-read from their files by :meth:`reload`."""

    def __init__(
        self,
        auth_file: Path | None,
        admin_file: Path | None,
        *,
        reflection_needs_token: bool = False,
    ) -> None:
        self.auth_file, self.admin_file = auth_file, admin_file
        self.reflection_needs_token = reflection_needs_token
        self._signature = self._files_signature()
        self.tokens = self._read()

    @classmethod
    def from_config(cls, config: ServerConfig) -> AuthPolicy | None:
        """The policy ``config`` asks for, its files read; None when no token file is set."""
        if not (config.auth_tokens or config.admin_tokens):
            if config.reflection_needs_token:
                raise SecurityError("--reflection-needs-token needs --auth-tokens")
            return None
        return cls(
            Path(config.auth_tokens) if config.auth_tokens else None,
            Path(config.admin_tokens) if config.admin_tokens else None,
            reflection_needs_token=config.reflection_needs_token,
        )

    def describe(self) -> str:
        users, admins = len(self.tokens.users), len(self.tokens.admins)
        if self.auth_file is None:
            return f"ReloadModel needs one of {admins} admin tokens"
        return f"{users} tokens, {admins} admin"

    def needs(self, method: str) -> str:
        """OPEN, USER or ADMIN: what ``method`` (a full path) requires."""
        if method.startswith(HEALTH_PREFIX):
            return OPEN
        if method.startswith(REFLECTION_PREFIXES):
            return USER if self.reflection_needs_token else OPEN
        if method in ADMIN_METHODS:
            return ADMIN
        # Calls are open without --auth-tokens: admin tokens then guard ReloadModel alone.
        return USER if self.auth_file is not None else OPEN

    def refusal(self, method: str, authorization: str | None) -> tuple[grpc.StatusCode, str] | None:
        """Why a call with this ``authorization`` metadata may not run ``method``; None if it may."""
        needed = self.needs(method)
        if needed == OPEN:
            return None
        name = method.rsplit("/", 1)[-1]
        if authorization is None:
            return grpc.StatusCode.UNAUTHENTICATED, (
                f"{name} needs a bearer token: send the metadata 'authorization: Bearer <token>' "
                "(mfserve --token or MFSERVE_TOKEN; grpcurl -H)"
            )
        scheme, _, token = authorization.strip().partition(" ")
        token = token.strip()
        if scheme.lower() != "bearer" or not token:
            return grpc.StatusCode.UNAUTHENTICATED, (
                "the authorization metadata must be 'Bearer <token>'"
            )
        role = self.tokens.role(token)
        if role is None:
            return (
                grpc.StatusCode.UNAUTHENTICATED,
                "the bearer token is not one this server accepts",
            )
        if needed == ADMIN and role != ADMIN:
            where = (
                "a token of the server's --admin-tokens file"
                if self.admin_file is not None
                else "an admin token, and this server has none (start it with --admin-tokens)"
            )
            return grpc.StatusCode.PERMISSION_DENIED, f"{name} needs {where}"
        return None

    def reload(self) -> bool:
        """Re-read the token files if they changed; True if new tokens are in force. Raises
        ``SecurityError`` (the tokens in force stay) for a changed file that is not valid."""
        signature = self._files_signature()
        if signature == self._signature:
            return False
        self._signature = signature  # a bad file is reported once per change, not every reload
        self.tokens = self._read()  # one reference swap: a call sees the old set or the new one
        return True

    def _read(self) -> Tokens:
        users = read_tokens(self.auth_file, "--auth-tokens") if self.auth_file else frozenset()
        admins = read_tokens(self.admin_file, "--admin-tokens") if self.admin_file else frozenset()
        return Tokens(users, admins)

    def _files_signature(self) -> tuple[tuple[int, int], ...]:
        signature = []
        for path in (self.auth_file, self.admin_file):
            if path is not None:
                try:
                    info = path.stat()
                    signature.append((info.st_size, info.st_mtime_ns))
                except OSError:
                    signature.append((-1, -1))
        return tuple(signature)


class AuthInterceptor(grpc.aio.ServerInterceptor):  # type: ignore[type-arg]
    """Runs :class:`AuthPolicy` before every call; a refused call never reaches its handler."""

    def __init__(self, policy: AuthPolicy) -> None:
        self.policy = policy
        self._needs: dict[str, str] = {}  # method -> what it needs: looked up per call
        self._refusing: dict[tuple[str, str], Handler] = {}
        self._refusals = ThrottledLog(log)

    async def intercept_service(
        self,
        continuation: Callable[[grpc.HandlerCallDetails], Awaitable[Handler]],
        handler_call_details: grpc.HandlerCallDetails,
    ) -> Handler:
        method = handler_call_details.method
        needed = self._needs.get(method)
        if needed is None:
            needed = self._needs[method] = self.policy.needs(method)
        if needed == OPEN:
            return await continuation(handler_call_details)
        refusal = self.policy.refusal(method, _authorization(handler_call_details))
        if refusal is None:
            return await continuation(handler_call_details)
        handler = await continuation(handler_call_details)
        if handler is None:  # an unknown method stays UNIMPLEMENTED
            return handler
        self._note_refusal(method, *refusal)
        key = (method, refusal[1])
        refusing = self._refusing.get(key)
        if refusing is None:
            refusing = self._refusing[key] = _refusing_handler(handler, *refusal)
        return refusing

    def _note_refusal(self, method: str, code: grpc.StatusCode, message: str) -> None:
        self._refusals.note(
            "mfserve: refused %d call(s) without a valid token (latest: %s %s: %s)",
            method,
            code.name,
            message,
            extra={"method": method, "code": code.name},
        )


def _authorization(details: grpc.HandlerCallDetails) -> str | None:
    metadata: Sequence[Any] = details.invocation_metadata or ()
    for key, value in metadata:
        if key == "authorization":
            return value if isinstance(value, str) else None
    return None


def _refusing_handler(handler: Handler, code: grpc.StatusCode, message: str) -> Handler:
    """A handler of ``handler``'s kind that ends the call with ``code``: the request stays bytes,
    so a refused caller cannot make the server parse anything."""

    async def refuse(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)

    async def refuse_stream(request: Any, context: grpc.aio.ServicerContext[Any, Any]) -> Any:
        await context.abort(code, message)
        yield  # never reached: makes this the async generator a streaming handler must be

    if handler.unary_unary is not None:
        return grpc.unary_unary_rpc_method_handler(refuse)
    if handler.unary_stream is not None:
        return grpc.unary_stream_rpc_method_handler(refuse_stream)
    if handler.stream_unary is not None:
        return grpc.stream_unary_rpc_method_handler(refuse)
    return grpc.stream_stream_rpc_method_handler(refuse_stream)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode("utf-8")).digest()
