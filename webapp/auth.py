"""Who is calling: API tokens, access tickets, and the one check every request goes through.

``FRAMEPACK_API_TOKENS`` holds ``name:token[:role]`` entries (role ``user``, the default, or
``admin``), comma-separated, or ``@/path/to/file`` with one entry per line (blank lines and
``#`` comments allowed).  Unset, the API is open: every caller is the anonymous admin and
jobs have no owner, as before tokens existed.

A caller presents its token as ``Authorization: Bearer <token>``.  Browsers cannot set
headers on a WebSocket, an EventSource or a ``<video src>``: they ``POST /api/access`` (with
the header) for a short-lived **access ticket** and add it to those URLs as ``?access=``.  A
ticket is ``<name>.<expiry>.<HMAC-SHA256 of both, keyed by that name's token>``: every web
process can check it without shared state, it expires after ``FRAMEPACK_ACCESS_TTL``
seconds, it dies with its token, and it only opens reads (GET, including the WebSocket
handshake).

Tokens are compared in constant time (``hmac.compare_digest`` over SHA-256 digests, against
every configured token, without stopping at the first match).  :func:`init_app` installs
one ``before_request`` check for every route but the page, its static files, ``/healthz``
and ``/readyz``; it answers 401 with ``WWW-Authenticate: Bearer`` (RFC 6750) before any view
runs, the WebSocket and SSE routes included.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import logging
import re
import time
from dataclasses import dataclass
from pathlib import Path

from flask import Flask, current_app, g, request

from .errors import ApiError

log = logging.getLogger("framepack.web")

ROLES = ("user", "admin")
NAME = re.compile(r"^[A-Za-z0-9_.@-]{1,64}$")
#: Endpoints anyone may reach: the page shell and its files carry no data; probes stay open.
OPEN_ENDPOINTS = frozenset({"page", "static", "healthz", "readyz"})
REALM = 'Bearer realm="framepack"'


@dataclass(frozen=True)
class Principal:
    """The caller: a token's name and role (``anonymous`` admin when the API is open)."""

    name: str
    role: str
    authenticated: bool = True

    @property
    def admin(self) -> bool:
        return self.role == "admin"

    @property
    def owner(self) -> str | None:
        """What the jobs it submits record as their owner (None when the API is open)."""
        return self.name if self.authenticated else None

    def may_see(self, owner: str | None) -> bool:
        """Admins see every job; a user only the jobs it submitted."""
        return self.admin or (owner is not None and owner == self.name)


ANONYMOUS = Principal("anonymous", "admin", authenticated=False)


def _digest(token: str) -> bytes:
    return hashlib.sha256(token.encode()).digest()


class Tokens:
    """The configured tokens.  Empty: the API is open."""

    def __init__(self, entries: list[tuple[str, str, str]]):
        self._by_name = {name: (token, role) for name, token, role in entries}
        self._digests = [(_digest(token), Principal(name, role)) for name, token, role in entries]

    @classmethod
    def parse(cls, spec: str) -> Tokens:
        """``name:token[:role]`` entries; ValueError names the bad entry (never its token)."""
        spec = spec.strip()
        if spec.startswith("@"):
            path = Path(spec[1:]).expanduser()
            try:
                text = path.read_text()
            except OSError as exc:
                raise ValueError(f"FRAMEPACK_API_TOKENS: cannot read {path}: {exc.strerror}") from None
            items = [line.strip() for line in text.splitlines()]
        else:
            items = [item.strip() for item in spec.split(",")]
        entries: list[tuple[str, str, str]] = []
        for n, item in enumerate((i for i in items if i and not i.startswith("#")), start=1):
            parts = item.split(":")
            name, token, role = (parts + ["user"])[:3] if len(parts) in (2, 3) else (parts[0], "", "")
            if not NAME.match(name) or not token or any(c.isspace() for c in token) or role not in ROLES:
                raise ValueError(f"FRAMEPACK_API_TOKENS: entry {n} ({name if NAME.match(name) else '?'}) is not "
                                 "name:token[:user|admin] (name: letters, digits, _ . @ -; token: no spaces or "
                                 "colons)")  # fmt: skip
            if any(e[0] == name for e in entries):
                raise ValueError(f"FRAMEPACK_API_TOKENS: the name {name} appears twice")
            if any(hmac.compare_digest(_digest(e[1]), _digest(token)) for e in entries):
                raise ValueError(f"FRAMEPACK_API_TOKENS: {name} has the same token as another entry")
            if len(token) < 16:
                log.warning("API token %s is only %d characters long; use 32 random ones", name, len(token))
            entries.append((name, token, role))
        return cls(entries)

    @property
    def required(self) -> bool:
        return bool(self._digests)

    def describe(self) -> str:
        if not self.required:
            return "none: the API is open (anyone who reaches the port can use every job)"
        admins = sum(p.admin for _, p in self._digests)
        return f"{len(self._digests)} ({len(self._digests) - admins} user, {admins} admin)"

    def lookup(self, presented: str) -> Principal | None:
        """The token's principal, or None.  Compares with every token (constant time)."""
        given = _digest(presented)
        found = None
        for digest, principal in self._digests:
            if hmac.compare_digest(digest, given):
                found = principal
        return found

    # -- access tickets ----------------------------------------------------------------------
    def _sign(self, name: str, expires: int) -> str:
        token = self._by_name[name][0]
        mac = hmac.new(token.encode(), f"framepack-access:{name}:{expires}".encode(), hashlib.sha256).digest()
        return base64.urlsafe_b64encode(mac).decode().rstrip("=")

    def ticket(self, principal: Principal, ttl: int, now: float | None = None) -> tuple[str, int]:
        """A read-only ticket for ``principal``, valid ``ttl`` seconds: (ticket, expiry)."""
        expires = int((time.time() if now is None else now) + ttl)
        return f"{principal.name}.{expires}.{self._sign(principal.name, expires)}", expires

    def redeem(self, ticket: str, now: float | None = None) -> Principal | None:
        """The ticket's principal if it is genuine and not expired."""
        name, _, rest = ticket.rpartition(".")
        name, _, expires = name.rpartition(".")
        if name not in self._by_name or not expires.isdigit() or int(expires) < (time.time() if now is None else now):
            return None
        if not hmac.compare_digest(self._sign(name, int(expires)), rest):
            return None
        return Principal(name, self._by_name[name][1])


def tokens() -> Tokens:
    return current_app.extensions["framepack.tokens"]


def principal() -> Principal:
    """The caller of the current request (set by the check in :func:`init_app`)."""
    return g.get("principal", ANONYMOUS)


def unauthorized(message: str, invalid: bool, field: str = "authorization") -> ApiError:
    challenge = f'{REALM}, error="invalid_token"' if invalid else REALM
    return ApiError(401, message, field, headers={"WWW-Authenticate": challenge})


def authenticate() -> None:
    """The one check: find the caller's principal or refuse with 401."""
    toks = tokens()
    if not toks.required:
        g.principal = ANONYMOUS
        return
    if request.endpoint in OPEN_ENDPOINTS:
        return
    header = request.headers.get("Authorization", "")
    scheme, _, value = header.partition(" ")
    if header:
        if scheme.lower() != "bearer" or not value.strip():
            raise unauthorized("authorization: use Authorization: Bearer <token>", invalid=True)
        found = toks.lookup(value.strip())
        if found is None:
            raise unauthorized("authorization: unknown API token", invalid=True)
        g.principal = found
        return
    ticket = request.args.get("access")
    if ticket is not None:
        found = toks.redeem(ticket) if request.method in ("GET", "HEAD") else None
        if found is None:
            raise unauthorized("access: the access ticket is invalid or expired (POST /api/access for a new one); "
                               "it opens reads (GET) only", invalid=True, field="access")  # fmt: skip
        g.principal = found
        return
    raise unauthorized("authorization: this server requires an API token (Authorization: Bearer <token>)",
                       invalid=False)  # fmt: skip


def init_app(app: Flask, spec: str) -> Tokens:
    """Parse the tokens (ValueError at start-up, naming the entry) and install the check."""
    toks = Tokens.parse(spec)
    app.extensions["framepack.tokens"] = toks
    app.before_request(authenticate)
    log.warning("framepack web tier: API tokens %s", toks.describe())
    return toks
