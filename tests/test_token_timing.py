"""When tokens are refreshed and retired: plain arithmetic on ``iat``, ``exp`` and the server's clock skew.

Mirrors the JS client's schedule (get-convex/convex-js src/browser/sync/authentication_manager.ts,
``scheduleTokenRefetch``) with the desktop's one-minute lead for 5-minute Stella tokens
(ruuxi/stella-v2 backend/convex/auth.ts, DEFAULT_JWT_EXPIRATION_SECONDS = 5 * 60).
"""

from __future__ import annotations

import pytest

from materializer.convex.token_timing import token_timing
from stella_devbackend.jwt import sign_hs256

NOW = 1_800_000_000.0


def token(**claims: float) -> str:
    return sign_hs256({"sub": "u", **claims}, b"secret")


def test_a_fresh_five_minute_token_is_refreshed_a_minute_before_it_expires() -> None:
    timing = token_timing(token(iat=NOW, exp=NOW + 300), received_at=NOW)
    assert timing is not None
    assert timing.refresh_at == NOW + 240
    assert timing.stop_at == NOW + 298
    assert not timing.expired(NOW + 297.9) and timing.expired(NOW + 298)


def test_a_short_token_is_refreshed_at_a_share_of_its_lifetime() -> None:
    timing = token_timing(token(iat=NOW, exp=NOW + 10), received_at=NOW)
    assert timing is not None and timing.refresh_at == pytest.approx(NOW + 8) and timing.stop_at == NOW + 9


def test_a_token_that_sat_in_a_file_counts_from_its_exp_not_from_when_it_was_read() -> None:
    timing = token_timing(token(iat=NOW - 200, exp=NOW + 100), received_at=NOW)
    assert timing is not None and timing.expires_at == NOW + 100 and timing.refresh_at == NOW + 40


def test_a_clock_behind_the_server_retires_the_token_earlier_by_the_skew() -> None:
    # clientClockSkew = clientTs - serverTs: -30 s means our clock is 30 s behind the server's.
    timing = token_timing(token(iat=NOW, exp=NOW + 300), received_at=NOW, clock_skew_ms=-30_000)
    assert timing is not None and timing.expires_at == NOW + 270


def test_a_clock_ahead_never_extends_a_fresh_token_past_its_lifetime() -> None:
    timing = token_timing(token(iat=NOW - 3600, exp=NOW - 3300), received_at=NOW, clock_skew_ms=3_600_000)
    assert timing is not None and timing.expires_at == NOW + 300


@pytest.mark.parametrize("claims", [{}, {"exp": float("nan")}, {"exp": True}], ids=["no-exp", "nan", "bool"])
def test_a_token_without_a_usable_exp_has_no_timing(claims: dict[str, float]) -> None:
    assert token_timing(token(**claims), received_at=NOW) is None
    assert token_timing("not-a-jwt", received_at=NOW) is None
