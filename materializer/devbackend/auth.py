"""Token signing for the local backend: HS256 JWTs with a secret kept in the data folder."""

from __future__ import annotations

import os
import secrets
import time
from pathlib import Path

from materializer.jwt import TokenError, sign_hs256, verify_hs256

__all__ = ["Authority", "TokenError"]

ISSUER = "stella-dev-backend"


def _read_or_create(path: Path, make: bytes) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
        with os.fdopen(fd, "wb") as handle:
            handle.write(make)
        return make


class Authority:
    """Mints and checks user tokens; also holds the admin key for the ``/_dev`` control API."""

    def __init__(self, data_dir: Path) -> None:
        self.secret = _read_or_create(data_dir / "jwt-secret", secrets.token_hex(32).encode())
        self.admin_key = _read_or_create(data_dir / "admin-key", secrets.token_urlsafe(24).encode()).decode()

    def mint(self, subject: str, ttl: float) -> str:
        """A token for ``subject`` that expires ``ttl`` seconds from now (may be negative)."""
        now = time.time()
        claims = {"iss": ISSUER, "sub": subject, "iat": int(now), "exp": now + ttl}
        return sign_hs256(claims, self.secret)

    def subject_of(self, token: str) -> str:
        """The user a token belongs to; raises :class:`TokenError` for a refused token."""
        claims = verify_hs256(token, self.secret)
        if claims.get("iss") != ISSUER:
            raise TokenError("token was not issued by this backend")
        return claims["sub"]

    def expiry_of(self, token: str) -> float:
        return float(verify_hs256(token, self.secret)["exp"])
