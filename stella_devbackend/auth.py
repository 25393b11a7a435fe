"""Tokens and secrets of the local backend, kept in its data folder.

User tokens are HS256 JWTs shaped like the Better Auth ones the real backend
issues (ruuxi/stella-v2 ``backend/convex/auth.ts``, its Convex plugin with
``DEFAULT_JWT_EXPIRATION_SECONDS = 5 * 60``): whole-second ``iat`` and
``exp`` claims, five minutes apart by default.

Three secrets live beside the jobs: ``jwt-secret`` signs tokens;
``admin-key`` opens the ``/_dev`` control API; ``session-secret`` stands in
for the signed-in person's Better Auth session, the cookie the desktop app
sends to ``/api/auth/convex/token`` to get a fresh token.
"""

from __future__ import annotations

import math
import os
import secrets
from pathlib import Path

from stella_devbackend.clock import ServerClock
from stella_devbackend.jwt import TokenError, sign_hs256, verify_hs256

__all__ = ["DEFAULT_TOKEN_TTL", "SESSION_SECRET_FILE", "Authority", "TokenError"]

ISSUER = "stella-dev-backend"
#: ``DEFAULT_JWT_EXPIRATION_SECONDS`` of ``backend/convex/auth.ts``.
DEFAULT_TOKEN_TTL = 5 * 60
SESSION_SECRET_FILE = "session-secret"


def _read_or_create(path: Path, make: bytes) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(make)
        return make


class Authority:
    """Mints and checks user tokens; holds the admin key and the dev session secret."""

    def __init__(self, data_dir: Path, clock: ServerClock | None = None) -> None:
        self.clock = clock or ServerClock()
        self.secret = _read_or_create(data_dir / "jwt-secret", secrets.token_hex(32).encode())
        self.admin_key = _read_or_create(data_dir / "admin-key", secrets.token_urlsafe(24).encode()).decode()
        self.session_secret_path = data_dir / SESSION_SECRET_FILE
        self.session_secret = _read_or_create(self.session_secret_path, secrets.token_urlsafe(32).encode()).decode()

    def mint(self, subject: str, ttl: float) -> str:
        """A token for ``subject`` that expires ``ttl`` seconds (rounded up, may be negative) after its ``iat``."""
        issued = int(self.clock.time())
        claims = {"iss": ISSUER, "sub": subject, "iat": issued, "exp": issued + math.ceil(ttl)}
        return sign_hs256(claims, self.secret)

    def verify(self, token: str) -> tuple[str, float]:
        """The user a token belongs to and when it expires; raises :class:`TokenError` for a refused token."""
        claims = verify_hs256(token, self.secret, now=self.clock.time())
        if claims.get("iss") != ISSUER:
            raise TokenError("token was not issued by this backend")
        return claims["sub"], float(claims["exp"])

    def is_session(self, secret: str | None) -> bool:
        """Whether ``secret`` is the dev session's (compared in constant time)."""
        return secret is not None and secrets.compare_digest(secret.encode(), self.session_secret.encode())
