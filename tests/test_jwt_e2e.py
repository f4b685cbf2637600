"""JWT through the real gateway, with keys from a real JWKS server process."""

from __future__ import annotations

import json
import sys
import time

import jwt
import pytest
import requests
from cryptography.hazmat.primitives.asymmetric import ec, rsa

from tests.conftest import _wait_stable, active_key, make_user, set_rate_limit, wait_for_config
from tests.procs import ROOT, Proc, child_env, free_port, port_open, wait_until

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]

ISSUER = "https://idp.example.test/"


def _public_jwk(private_key, kid: str, alg: str) -> dict:
    jwk = json.loads(jwt.algorithms.get_default_algorithms()[alg].to_jwk(private_key.public_key()))
    return {**jwk, "kid": kid, "alg": alg, "use": "sig"}


@pytest.fixture
def idp(tmp_path):
    """A JWKS server process serving one RSA key; `rotate()` adds an EC key."""
    rsa_key = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    ec_key = ec.generate_private_key(ec.SECP256R1())
    path = tmp_path / "jwks.json"
    path.write_text(json.dumps({"keys": [_public_jwk(rsa_key, "r1", "RS256")]}))
    port = free_port()
    proc = Proc(
        "jwks",
        [
            sys.executable,
            str(ROOT / "tests" / "jwks_server.py"),
            "--port",
            str(port),
            "--file",
            str(path),
        ],
        env=child_env(),
        log_dir=tmp_path,
    )

    class Idp:
        url = f"http://127.0.0.1:{port}/jwks.json"

        def token(self, sub: str = "partner-7", *, key=rsa_key, kid="r1", alg="RS256", **claims):
            now = int(time.time())
            body = {"iss": ISSUER, "sub": sub, "aud": "orders", "iat": now, "exp": now + 300}
            body.update(claims)
            return jwt.encode(body, key, algorithm=alg, headers={"kid": kid})

        def rotate(self) -> None:
            keys = [_public_jwk(rsa_key, "r1", "RS256"), _public_jwk(ec_key, "e2", "ES256")]
            path.write_text(json.dumps({"keys": keys}))

        ec = ec_key

        def hits(self) -> int:
            return int(requests.get(f"http://127.0.0.1:{port}/hits", timeout=5).text)

    try:
        wait_until(lambda: port_open(port), timeout=15, what="the JWKS server")
        yield Idp()
    finally:
        proc.stop()


@pytest.fixture
def jwt_api(stack, live, idp):
    """/demo takes API keys or JWTs from the IdP; /demo/admin needs the orders:write scope;
    consumer partner-7 has an active Free subscription."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import JwtIssuer, Route
    from portal.consumers import consumer_for_user
    from portal.subscriptions import subscription_create

    with transaction.atomic():
        api = live.api
        api.auth_methods = "any"
        api.save()
        JwtIssuer.objects.create(
            api=api,
            issuer=ISSUER,
            algorithms="RS256,ES256",
            jwks_url=idp.url,
            audiences="orders",
            leeway=5,
        )
        Route.objects.create(api=api, name="admin", path="/admin", required_scopes="orders:write")
        consumer = consumer_for_user(make_user("partner@example.com"))
        consumer.external_id = "partner-7"
        consumer.save()
        subscription_create(consumer, plan=live.free)
        config_bump(reason="JWT issuer")
    wait_for_config(stack)
    return api


def _get(stack, path: str, token: str | None = None, **headers) -> requests.Response:
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    return stack.get(path, headers=headers)


def _until(stack, path: str, token: str, status: int, *, timeout: float = 10) -> requests.Response:
    """Every gateway worker converges on the config independently: poll until it holds on
    consecutive requests, not just on the first worker to converge."""
    _wait_stable(
        stack,
        lambda: _get(stack, path, token).status_code == status,
        timeout=timeout,
        what=f"{path} to answer {status}",
    )
    return _get(stack, path, token)


def test_a_valid_token_reaches_the_upstream_without_its_credential(stack, jwt_api, idp):
    resp = _until(stack, "/demo/orders", idp.token(), 200)
    echoed = resp.json()["headers"]
    assert "authorization" not in echoed  # removed before proxying (forward_credential off)


def test_bad_tokens_are_401_and_unknown_subjects_403(stack, jwt_api, idp):
    _until(stack, "/demo/orders", idp.token(), 200)
    expired = idp.token(exp=int(time.time()) - 60)
    resp = _get(stack, "/demo/orders", expired)
    assert resp.status_code == 401
    assert resp.headers["content-type"] == "application/problem+json"
    assert 'error="invalid_token"' in resp.headers["www-authenticate"]
    assert expired not in resp.text  # the token is never echoed
    assert _get(stack, "/demo/orders", idp.token(aud="billing")).status_code == 401
    assert _get(stack, "/demo/orders", idp.token(iss="https://evil.test/")).status_code == 401
    none = jwt.encode({"iss": ISSUER, "sub": "partner-7"}, None, algorithm="none")
    assert _get(stack, "/demo/orders", none).status_code == 401
    stranger = _get(stack, "/demo/orders", idp.token(sub="nobody"))
    assert stranger.status_code == 403
    assert stranger.json()["type"] == "urn:apigw:problem:forbidden"
    missing = _get(stack, "/demo/orders")
    assert missing.status_code == 401
    assert missing.json()["type"] == "urn:apigw:problem:missing-credential"


def test_api_keys_still_work_on_an_api_that_takes_either(stack, jwt_api, idp, live):
    issued = active_key(make_user("dev@example.com"), live.free)
    _wait_stable(
        stack,
        lambda: stack.get("/demo/x", headers={"X-API-Key": issued.key}).status_code == 200,
        timeout=10,
        what="the key",
    )
    bearer = stack.get("/demo/x", headers={"Authorization": f"Bearer {issued.key}"})
    assert bearer.status_code == 200


def test_routes_requiring_a_scope_refuse_tokens_without_it(stack, jwt_api, idp):
    _until(stack, "/demo/admin", idp.token(scope="orders:write orders:read"), 200)
    resp = _get(stack, "/demo/admin", idp.token(scope="orders:read"))
    assert resp.status_code == 403
    body = resp.json()
    assert body["type"] == "urn:apigw:problem:insufficient-scope"
    assert body["required_scopes"] == ["orders:write"]
    assert 'error="insufficient_scope"' in resp.headers["www-authenticate"]
    assert _get(stack, "/demo/admin", idp.token(scp=["orders:write"])).status_code == 200


def test_a_rotated_signing_key_is_fetched_on_first_sight_of_its_kid(stack, jwt_api, idp):
    _until(stack, "/demo/orders", idp.token(), 200)
    new_token = idp.token(key=idp.ec, kid="e2", alg="ES256")
    assert _get(stack, "/demo/orders", new_token).status_code == 401  # not published yet
    idp.rotate()
    # An unknown kid refetches the set, at most once per 10 s per worker (a fetch just made
    # counts): within 10 s every worker knows the new key; 5 s of margin.
    _until(stack, "/demo/orders", new_token, 200, timeout=15)
    before = idp.hits()
    for i in range(20):  # unknown kids do not hammer the JWKS server
        _get(stack, "/demo/orders", idp.token(kid=f"bogus{i}"))
    assert idp.hits() - before <= 2  # at most one paced refetch per worker


def test_jwt_consumers_are_rate_limited_per_subject(stack, jwt_api, idp, live):
    # An hour's window, not a minute's: the gateway process outlives each test's database,
    # whose flush reuses consumer and plan ids, so this consumer's minute counter still holds
    # the earlier tests' requests (up to a second ahead under the Free plan's 1000/minute).
    # Its first admission under the new rule then leaves a refusal window of only that
    # residue, and the last request could land after it. No earlier JWT request used an
    # hour counter; once two are admitted, the next 1,800 s are refused.
    set_rate_limit(plan=live.free, limit=2, window="hour", burst=1)
    # Every worker must have the rule (refusals carry the headers too): by then the polling
    # has used up the subject's two admissions.
    _wait_stable(
        stack,
        lambda: _get(stack, "/demo/x", idp.token()).headers.get("x-ratelimit-limit") == "2",
        timeout=10,
        what="the new limit",
    )
    statuses = [_get(stack, "/demo/x", idp.token(jti=str(i))).status_code for i in range(3)]
    assert 429 in statuses  # a new token of the same subject shares its counter
    limited = _get(stack, "/demo/x", idp.token())
    assert limited.status_code == 429
    assert limited.json()["type"] == "urn:apigw:problem:rate-limited"
