"""Optional two-factor sign-in with an authenticator app (allauth.mfa, TOTP RFC 6238)."""

from __future__ import annotations

import base64
import hashlib
import hmac
import struct
import time

import pytest

from tests.conftest import PASSWORD, make_user

pytestmark = pytest.mark.django_db
EMAIL = "mfa@example.com"


def totp(secret: str, at: float | None = None) -> str:
    """What an authenticator app shows: RFC 6238 with SHA-1, 30 s steps, 6 digits."""
    key = base64.b32decode(secret + "=" * (-len(secret) % 8))
    if at is None:
        # allauth checks the current step only (no tolerance): a code from a step about to
        # end could be stale by the time the server checks it, so wait for the next one.
        left = 30 - time.time() % 30
        if left < 2:
            time.sleep(left + 0.05)
        at = time.time()
    counter = int(at // 30)
    digest = hmac.new(key, struct.pack(">Q", counter), hashlib.sha1).digest()
    offset = digest[-1] & 0x0F
    value = (struct.unpack(">I", digest[offset : offset + 4])[0] & 0x7FFFFFFF) % 10**6
    return f"{value:06d}"


def test_a_developer_turns_on_an_authenticator_app_and_then_needs_it(client):
    from allauth.mfa.models import Authenticator

    user = make_user(EMAIL)
    resp = client.post("/accounts/login/", {"login": EMAIL, "password": PASSWORD})
    assert resp.status_code == 302 and resp["Location"] == "/dashboard/"
    dashboard = client.get("/dashboard/").content.decode()
    assert 'href="/accounts/2fa/"' in dashboard
    # Turning it on asks for the password again (allauth's reauthentication).
    asked = client.get("/accounts/2fa/totp/activate/")
    assert asked.status_code == 302 and asked["Location"].startswith("/accounts/reauthenticate/")
    again = client.post(asked["Location"], {"password": PASSWORD})
    assert again.status_code == 302 and again["Location"] == "/accounts/2fa/totp/activate/"
    page = client.get("/accounts/2fa/totp/activate/")
    assert page.status_code == 200 and b"data:image/svg+xml" in page.content  # the QR, inline
    secret = client.session["mfa.totp.secret"]
    wrong = client.post("/accounts/2fa/totp/activate/", {"code": "000000"})
    assert wrong.status_code == 200 and not Authenticator.objects.filter(user=user).exists()
    done = client.post("/accounts/2fa/totp/activate/", {"code": totp(secret)})
    assert done.status_code == 302
    assert Authenticator.objects.filter(user=user, type="totp").exists()

    client.logout()
    resp = client.post("/accounts/login/", {"login": EMAIL, "password": PASSWORD})
    assert resp.status_code == 302 and resp["Location"].startswith("/accounts/2fa/authenticate/")
    assert client.get("/dashboard/").status_code == 302  # not signed in yet
    bad = client.post("/accounts/2fa/authenticate/", {"code": "123456"})
    assert bad.status_code == 200 and client.get("/dashboard/").status_code == 302
    good = client.post("/accounts/2fa/authenticate/", {"code": totp(secret)})
    assert good.status_code == 302
    assert client.get("/dashboard/").status_code == 200
