"""Reading a JWT's claims, so clients know a token's ``exp``.

The daemon never signs or verifies a token (the backend does); it only reads
the claims to know when to ask its token source for a fresh one. Signing and
verifying live with the local backend (:mod:`stella_devbackend.jwt`).
"""

from __future__ import annotations

import base64
import json
from typing import Any

__all__ = ["unverified_claims"]


def _b64url_decode(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


def unverified_claims(token: str) -> dict[str, Any] | None:
    """The claims of a JWT without checking its signature, or None if it is not a JWT."""
    if not isinstance(token, str) or token.count(".") != 2:
        return None
    header_b64, payload_b64, signature_b64 = token.split(".")
    try:
        header = json.loads(_b64url_decode(header_b64))
        claims = json.loads(_b64url_decode(payload_b64))
        _b64url_decode(signature_b64)
    except ValueError:  # not base64url (binascii.Error), not UTF-8 or not JSON: all ValueErrors
        return None
    if not isinstance(header, dict) or not isinstance(claims, dict):
        return None
    return claims
