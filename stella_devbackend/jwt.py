"""Just enough JWT (HS256) for the local backend to sign and verify its tokens.

The daemon never signs or verifies a token; it only reads the claims
(:func:`materializer.jwt.unverified_claims`). Tests sign tokens with
:func:`sign_hs256`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import time
from typing import Any

__all__ = ["TokenError", "sign_hs256", "verify_hs256"]


class TokenError(ValueError):
    """A token that is malformed, wrongly signed or expired. The message never contains the token."""


def _b64url_encode(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode("ascii")


def _b64url_decode(text: str) -> bytes:
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise TokenError("token segment is not base64url") from None


def sign_hs256(claims: dict[str, Any], secret: bytes) -> str:
    """Sign ``claims`` into a compact JWT."""
    header = _b64url_encode(json.dumps({"alg": "HS256", "typ": "JWT"}, separators=(",", ":")).encode())
    payload = _b64url_encode(json.dumps(claims, separators=(",", ":")).encode())
    signing_input = f"{header}.{payload}".encode("ascii")
    signature = hmac.new(secret, signing_input, hashlib.sha256).digest()
    return f"{header}.{payload}.{_b64url_encode(signature)}"


def _split(token: str) -> tuple[dict[str, Any], dict[str, Any], bytes, bytes]:
    if not isinstance(token, str) or token.count(".") != 2:
        raise TokenError("token is not a JWT (expected three dot-separated segments)")
    header_b64, payload_b64, signature_b64 = token.split(".")
    try:
        header = json.loads(_b64url_decode(header_b64))
        claims = json.loads(_b64url_decode(payload_b64))
    except (UnicodeDecodeError, json.JSONDecodeError):
        raise TokenError("token header or payload is not JSON") from None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        raise TokenError("token header and payload must be JSON objects")
    signing_input = f"{header_b64}.{payload_b64}".encode("ascii")
    return header, claims, signing_input, _b64url_decode(signature_b64)


def verify_hs256(token: str, secret: bytes, *, now: float | None = None) -> dict[str, Any]:
    """Return the claims of a valid, unexpired token signed with ``secret``."""
    header, claims, signing_input, signature = _split(token)
    if header.get("alg") != "HS256":
        raise TokenError(f"unsupported token algorithm {header.get('alg')!r}")
    expected = hmac.new(secret, signing_input, hashlib.sha256).digest()
    if not hmac.compare_digest(expected, signature):
        raise TokenError("token signature does not verify")
    exp = claims.get("exp")
    if not isinstance(exp, (int, float)) or isinstance(exp, bool):
        raise TokenError("token has no numeric exp claim")
    if (time.time() if now is None else now) >= exp:
        raise TokenError("token has expired")
    if not isinstance(claims.get("sub"), str) or not claims["sub"]:
        raise TokenError("token has no subject")
    return claims

