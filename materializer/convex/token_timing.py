"""When a session token must be refreshed, and when it may no longer be used: plain arithmetic.

Real Stella tokens live five minutes (ruuxi/stella-v2 ``backend/convex/auth.ts``,
``DEFAULT_JWT_EXPIRATION_SECONDS = 5 * 60``) and the desktop asks for a new
one about a minute before expiry. The JS client schedules its refetch from
the token's own ``exp - iat`` for a fresh token, and from ``exp`` against the
server's clock when it knows the skew (get-convex/convex-js
``src/browser/sync/authentication_manager.ts`` ``scheduleTokenRefetch``; the
server reports ``clientClockSkew = clientTs - serverReceiveTs`` in ms on each
``Transition``). We take the earlier of the two, so neither a token that sat
in a file nor a clock that runs fast makes us late.
"""

from __future__ import annotations

from dataclasses import dataclass

from materializer.finite import finite_number
from materializer.jwt import unverified_claims

__all__ = ["MAX_REFRESH_LEEWAY_SECONDS", "TokenTiming", "token_timing"]

#: Refresh this long before expiry at most (the desktop's own lead, packages/desktop ``auth-service.ts``).
MAX_REFRESH_LEEWAY_SECONDS = 60.0
#: The share of its lifetime a token is refreshed ahead of expiry, when that is under the cap
#: (a token that lives 10 s is refreshed 2 s before it dies, not 60 s before it was made).
REFRESH_LEEWAY_SHARE = 0.2
#: Stop using a token this long before its expiry at most: the server may check it at any time.
MAX_EXPIRY_MARGIN_SECONDS = 2.0


@dataclass(frozen=True, slots=True)
class TokenTiming:
    """Moments on the local clock (``time.time()`` seconds) that matter for one token."""

    refresh_at: float  # ask the token source for a newer token from here on
    stop_at: float  # no socket may run on this token from here on
    expires_at: float  # the token's ``exp``, as our clock reads it

    def expired(self, now: float) -> bool:
        return now >= self.stop_at


def token_timing(token: str, *, received_at: float, clock_skew_ms: float | None = None) -> TokenTiming | None:
    """The timing of ``token``, first seen at ``received_at``; None for a token without a usable ``exp``.

    ``clock_skew_ms`` is the server's latest ``clientClockSkew`` (how far our clock runs ahead of
    the server's), when a socket has reported one.
    """
    claims = unverified_claims(token) or {}
    exp = finite_number(claims.get("exp"))
    if exp is None:
        return None
    skew = (clock_skew_ms or 0.0) / 1000
    expires_at = exp + skew
    iat = finite_number(claims.get("iat"))
    if iat is not None and exp > iat:
        lifetime = exp - iat
        expires_at = min(expires_at, received_at + lifetime)
    else:
        lifetime = max(0.0, expires_at - received_at)
    leeway = min(MAX_REFRESH_LEEWAY_SECONDS, lifetime * REFRESH_LEEWAY_SHARE)
    margin = min(MAX_EXPIRY_MARGIN_SECONDS, lifetime * REFRESH_LEEWAY_SHARE / 2)
    return TokenTiming(refresh_at=expires_at - leeway, stop_at=expires_at - margin, expires_at=expires_at)
