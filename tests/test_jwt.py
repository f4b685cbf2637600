"""JWT verification: the checks of RFC 7519 / RFC 8725, the token cache, and JWKS fetching
against a real JWKS server process."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import json
import logging
import os
import re
import secrets
import sys
import time
import urllib.request
from dataclasses import dataclass, replace
from pathlib import Path

import jwt as pyjwt
import pytest
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa
from jwt.algorithms import ECAlgorithm, HMACAlgorithm, OKPAlgorithm, RSAAlgorithm

from gateway.dataplane import jwt as jwtmod
from gateway.dataplane.jwt import (
    JwksCache,
    JwtError,
    JwtVerifier,
    KeySet,
    NeedKeys,
    ProviderConfig,
    VerifiedToken,
    validate_provider,
)
from tests.procs import Proc, child_env, free_port, port_open, wait_until

NOW = 1_700_000_000.0
ISS = "https://idp.example.com/"


@dataclass(frozen=True)
class Signer:
    """A signing key and its public JWK."""

    alg: str
    private: object
    jwk: dict

    def sign(self, claims: dict, *, kid: str | None = "", **headers: object) -> str:
        """A token over `claims`; kid "" means the JWK's own, None means no kid header."""
        kid = self.jwk.get("kid") if kid == "" else kid
        if kid is not None:
            headers["kid"] = kid
        return pyjwt.encode(claims, self.private, algorithm=self.alg, headers=headers or None)


def rsa_signer(kid: str | None) -> Signer:
    private = rsa.generate_private_key(public_exponent=65537, key_size=2048)
    return Signer("RS256", private, _with_kid(RSAAlgorithm.to_jwk(private.public_key(), True), kid))


def ec_signer(kid: str | None) -> Signer:
    private = ec.generate_private_key(ec.SECP256R1())
    return Signer("ES256", private, _with_kid(ECAlgorithm.to_jwk(private.public_key(), True), kid))


def ed_signer(kid: str | None) -> Signer:
    private = ed25519.Ed25519PrivateKey.generate()
    return Signer("EdDSA", private, _with_kid(OKPAlgorithm.to_jwk(private.public_key(), True), kid))


def hmac_signer(kid: str | None) -> Signer:
    secret = secrets.token_bytes(32)
    return Signer("HS256", secret, _with_kid(HMACAlgorithm.to_jwk(secret, True), kid))


def _with_kid(jwk: dict, kid: str | None) -> dict:
    return {**jwk, "kid": kid} if kid is not None else jwk


@pytest.fixture(scope="module")
def signers() -> dict[str, Signer]:
    """One signer per algorithm, kid "<alg>-1"; RSA key generation is the slow part."""
    return {
        "RS256": rsa_signer("RS256-1"),
        "ES256": ec_signer("ES256-1"),
        "EdDSA": ed_signer("EdDSA-1"),
        "HS256": hmac_signer("HS256-1"),
    }


@pytest.fixture(scope="module")
def impostors() -> dict[str, Signer]:
    """Other keys claiming the same kids: their signatures must not verify."""
    return {
        "RS256": rsa_signer("RS256-1"),
        "ES256": ec_signer("ES256-1"),
        "EdDSA": ed_signer("EdDSA-1"),
        "HS256": hmac_signer("HS256-1"),
    }


def claims(**overrides: object) -> dict:
    """Valid claims at NOW; an override of None removes the claim."""
    out = {"iss": ISS, "sub": "user-1", "iat": NOW, "exp": NOW + 300}
    out.update(overrides)
    return {k: v for k, v in out.items() if v is not None}


def provider(*signers: Signer, **fields: object) -> ProviderConfig:
    fields.setdefault("algorithms", tuple(dict.fromkeys(s.alg for s in signers)))
    return ProviderConfig(issuer=ISS, static_jwks={"keys": [s.jwk for s in signers]}, **fields)


def verifier(*configs: ProviderConfig, cache_size: int = 10_000) -> JwtVerifier:
    return JwtVerifier([(c, JwksCache(c)) for c in configs], cache_size=cache_size)


def refused(v: JwtVerifier, token: str, now: float = NOW) -> str:
    """The refusal's detail, checked never to echo the token or any part of it."""
    with pytest.raises(JwtError) as exc:
        v.verify(token, now)
    detail = exc.value.detail
    assert all(part not in detail for part in token.split(".") if len(part) > 3)
    return detail


def b64(data: bytes | dict) -> str:
    raw = json.dumps(data).encode() if isinstance(data, dict) else data
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


class Clock:
    """A monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        self.now += seconds


# --- signatures and algorithms -----------------------------------------------------------


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "HS256"])
def test_each_algorithm_verifies(signers, alg):
    s = signers[alg]
    result = verifier(provider(s)).verify(s.sign(claims()), NOW)
    assert isinstance(result, VerifiedToken)
    assert result.subject == "user-1"
    assert result.expires_at == NOW + 300
    assert result.claims["iss"] == ISS


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "HS256"])
def test_signature_by_another_key_with_the_same_kid_is_refused(signers, impostors, alg):
    v = verifier(provider(signers[alg]))
    assert refused(v, impostors[alg].sign(claims())) == jwtmod.BAD_SIGNATURE


def test_tampered_payload_is_refused(signers):
    s = signers["ES256"]
    head, _, sig = s.sign(claims()).split(".")
    forged = f"{head}.{b64(claims(sub='admin'))}.{sig}"
    assert refused(verifier(provider(s)), forged) == jwtmod.BAD_SIGNATURE


@pytest.mark.parametrize("alg", ["none", "None", "NONE", "nOnE"])
@pytest.mark.parametrize("signature", ["", "c2ln"])
def test_unsigned_token_is_refused(signers, alg, signature):
    token = f"{b64({'alg': alg, 'typ': 'JWT'})}.{b64(claims())}.{signature}"
    v = verifier(provider(signers["RS256"], signers["HS256"]))
    assert refused(v, token) == jwtmod.UNSIGNED


def test_hs256_token_signed_with_the_rsa_public_key_is_refused(signers):
    """Algorithm confusion: the RSA public key (public!) used as an HMAC secret."""
    rsa_s, hmac_s = signers["RS256"], signers["HS256"]
    pem = rsa_s.private.public_key().public_bytes(
        serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo
    )

    def forge(kid: str | None) -> str:
        header = {"alg": "HS256", "typ": "JWT"} | ({"kid": kid} if kid else {})
        signing_input = f"{b64(header)}.{b64(claims(sub='admin'))}"
        mac = hmac.new(pem, signing_input.encode(), hashlib.sha256).digest()
        return f"{signing_input}.{b64(mac)}"

    both = verifier(provider(rsa_s, hmac_s))
    # Naming the RSA key: that key only ever verifies RS256.
    assert refused(both, forge("RS256-1")) == jwtmod.KEY_MISMATCH
    # No kid: the only HS256 key is the real secret, which this MAC does not match.
    assert refused(both, forge(None)) == jwtmod.BAD_SIGNATURE
    # An RS256-only provider does not even consider it.
    assert refused(verifier(provider(rsa_s)), forge("RS256-1")) == jwtmod.ALG_NOT_ALLOWED
    assert both._providers[ISS].cache.key_for("RS256-1", "HS256") is None


def test_algorithm_outside_the_allow_list_is_refused(signers):
    rsa_s, ec_s = signers["RS256"], signers["ES256"]
    v = verifier(provider(rsa_s, ec_s, algorithms=("RS256",)))
    assert refused(v, ec_s.sign(claims())) == jwtmod.ALG_NOT_ALLOWED
    hs512 = pyjwt.encode(claims(), secrets.token_bytes(64), algorithm="HS512")
    assert refused(v, hs512) == jwtmod.ALG_NOT_ALLOWED
    ps256 = pyjwt.encode(claims(), rsa_s.private, algorithm="PS256", headers={"kid": "RS256-1"})
    assert refused(v, ps256) == jwtmod.ALG_NOT_ALLOWED


def test_keys_of_the_wrong_type_for_the_algorithm_are_never_used(signers):
    """An EC key named by an RS256 token is not tried, whatever the token says."""
    rsa_s, ec_s = signers["RS256"], signers["ES256"]
    v = verifier(provider(rsa_s, ec_s))
    token = rsa_s.sign(claims(), kid="ES256-1")
    assert refused(v, token) == jwtmod.KEY_MISMATCH


# --- time claims ---------------------------------------------------------------------------


def test_expiry_is_checked_against_now_with_the_leeway(signers):
    s = signers["RS256"]
    token = s.sign(claims(exp=NOW + 60))
    v = verifier(provider(s, leeway=30))
    assert v.verify(token, NOW + 89).subject == "user-1"
    assert refused(verifier(provider(s, leeway=30)), token, NOW + 90) == jwtmod.EXPIRED
    assert refused(verifier(provider(s, leeway=0)), token, NOW + 60) == jwtmod.EXPIRED


def test_token_expired_a_moment_ago_passes_within_the_leeway(signers):
    s = signers["ES256"]
    token = s.sign(claims(exp=NOW - 10))
    assert verifier(provider(s, leeway=30)).verify(token, NOW).expires_at == NOW - 10
    assert refused(verifier(provider(s, leeway=5)), token) == jwtmod.EXPIRED


@pytest.mark.parametrize("exp", [None, "tomorrow", True, [NOW + 60]])
def test_missing_or_non_numeric_expiry_is_refused(signers, exp):
    s = signers["HS256"]
    detail = refused(verifier(provider(s)), s.sign(claims(exp=exp)))
    assert detail in (jwtmod.NO_EXPIRY, "The token's exp claim is not a number.")


def hs256_raw(secret: bytes, payload: str, header: dict | None = None) -> str:
    """An HS256 token over a payload PyJWT would refuse to encode."""
    head = b64(header or {"alg": "HS256", "kid": "HS256-1"})
    signing_input = f"{head}.{b64(payload.encode())}"
    mac = hmac.new(secret, signing_input.encode(), hashlib.sha256).digest()
    return f"{signing_input}.{b64(mac)}"


def test_infinite_expiry_is_refused(signers):
    s = signers["HS256"]
    payload = json.dumps(claims()).replace(str(NOW + 300), "Infinity")
    token = hs256_raw(s.private, payload)
    assert refused(verifier(provider(s)), token) == "The token's exp claim is not a number."


def test_not_before_in_the_future_is_refused(signers):
    s = signers["EdDSA"]
    token = s.sign(claims(nbf=NOW + 100))
    assert refused(verifier(provider(s, leeway=30)), token) == jwtmod.NOT_YET_VALID
    assert verifier(provider(s, leeway=30)).verify(token, NOW + 70).subject == "user-1"


def test_issued_in_the_future_is_refused(signers):
    s = signers["EdDSA"]
    assert refused(verifier(provider(s)), s.sign(claims(iat=NOW + 100))) == (
        jwtmod.ISSUED_IN_FUTURE
    )
    assert verifier(provider(s)).verify(s.sign(claims(iat=NOW + 20)), NOW).subject == "user-1"


# --- issuer, audience, type ----------------------------------------------------------------


@pytest.mark.parametrize("iss", ["https://evil.example.com/", "https://idp.example.com", None])
def test_untrusted_or_missing_issuer_is_refused(signers, iss):
    s = signers["RS256"]
    assert refused(verifier(provider(s)), s.sign(claims(iss=iss))) == jwtmod.ISSUER_UNTRUSTED


@pytest.mark.parametrize("iss", [7, [ISS], {"iss": ISS}])
def test_issuer_that_is_not_a_string_is_refused(signers, iss):
    s = signers["HS256"]
    token = hs256_raw(s.private, json.dumps(claims(iss=iss)))
    assert refused(verifier(provider(s)), token) == jwtmod.ISSUER_UNTRUSTED


def test_provider_is_picked_by_issuer(signers, impostors):
    """Two providers whose keys share a kid: each key vouches only for its own issuer."""
    a, b = signers["RS256"], impostors["RS256"]
    other = "https://other.example.com/"
    v = verifier(provider(a), replace(provider(b), issuer=other))
    assert v.verify(b.sign(claims(iss=other, sub="from-b")), NOW).subject == "from-b"
    assert v.verify(a.sign(claims(sub="from-a")), NOW).subject == "from-a"
    assert refused(v, b.sign(claims())) == jwtmod.BAD_SIGNATURE
    assert refused(v, a.sign(claims(iss=other))) == jwtmod.BAD_SIGNATURE


@pytest.mark.parametrize(
    ("aud", "ok"),
    [
        ("api://orders", True),
        (["api://other", "api://orders"], True),
        ("api://other", False),
        (["api://other"], False),
        (None, False),
    ],
)
def test_audience_must_name_this_api(signers, aud, ok):
    s = signers["ES256"]
    v = verifier(provider(s, audiences=("api://orders", "api://billing")))
    token = s.sign(claims(aud=aud))
    if ok:
        assert v.verify(token, NOW).subject == "user-1"
    else:
        assert refused(v, token) == jwtmod.WRONG_AUDIENCE


def test_audience_is_not_checked_when_none_is_configured(signers):
    s = signers["ES256"]
    assert verifier(provider(s)).verify(s.sign(claims(aud="anything")), NOW).subject == "user-1"


@pytest.mark.parametrize(
    ("typ", "ok"),
    [("at+jwt", True), ("AT+JWT", True), ("application/at+jwt", True), ("JWT", False), ("", False)],
)
def test_required_type_header(signers, typ, ok):
    s = signers["RS256"]
    v = verifier(provider(s, typ="at+jwt"))
    token = s.sign(claims(), typ=typ)
    if ok:
        assert v.verify(token, NOW).subject == "user-1"
    else:
        assert refused(v, token) == jwtmod.TYPE_REFUSED


# --- consumer and scopes -------------------------------------------------------------------


@pytest.mark.parametrize("sub", [None, "", True, {"id": 1}, ["user-1"]])
def test_missing_or_odd_consumer_claim_is_refused(signers, sub):
    s = signers["HS256"]
    detail = refused(verifier(provider(s)), s.sign(claims(sub=sub)))
    assert detail == "The token does not name its consumer (claim sub)."


def test_numeric_consumer_claim_and_another_claim_name(signers):
    s = signers["HS256"]
    assert verifier(provider(s)).verify(s.sign(claims(sub=42)), NOW).subject == "42"
    v = verifier(provider(s, consumer_claim="client_id"))
    assert v.verify(s.sign(claims(client_id="app-7")), NOW).subject == "app-7"
    assert "claim client_id" in refused(v, s.sign(claims(sub="x", client_id=None)))


@pytest.mark.parametrize(
    ("extra", "scopes"),
    [
        ({}, set()),
        ({"scope": "orders:read  orders:write"}, {"orders:read", "orders:write"}),
        ({"scp": ["a", "b"]}, {"a", "b"}),
        ({"scp": "a b"}, {"a", "b"}),
        ({"scope": "a", "scp": ["b"]}, {"a", "b"}),
    ],
)
def test_scopes_from_scope_or_scp(signers, extra, scopes):
    s = signers["EdDSA"]
    result = verifier(provider(s)).verify(s.sign(claims(**extra)), NOW)
    assert result.scopes == frozenset(scopes)


@pytest.mark.parametrize("extra", [{"scope": ["a"]}, {"scp": [1, 2]}, {"scp": {"a": 1}}])
def test_malformed_scopes_are_refused(signers, extra):
    s = signers["EdDSA"]
    assert "is not a list of scopes" in refused(verifier(provider(s)), s.sign(claims(**extra)))


# --- key selection -------------------------------------------------------------------------


def test_token_without_kid_uses_the_only_key(signers):
    s = signers["RS256"]
    assert verifier(provider(s)).verify(s.sign(claims(), kid=None), NOW).subject == "user-1"


def test_token_without_kid_uses_the_only_key_of_its_algorithm(signers):
    rsa_s, ec_s = signers["RS256"], signers["ES256"]
    v = verifier(provider(rsa_s, ec_s))
    assert v.verify(ec_s.sign(claims(), kid=None), NOW).subject == "user-1"


def test_token_without_kid_is_refused_when_several_keys_fit(signers, impostors):
    second = replace(impostors["RS256"], jwk={**impostors["RS256"].jwk, "kid": "RS256-2"})
    v = verifier(provider(signers["RS256"], second))
    assert refused(v, second.sign(claims(), kid=None)) == jwtmod.KEY_AMBIGUOUS
    assert v.verify(second.sign(claims()), NOW).subject == "user-1"


def test_unknown_kid_with_static_keys_only_is_refused(signers):
    s = signers["ES256"]
    v = verifier(provider(s))
    with pytest.raises(JwtError) as exc:
        v.verify(s.sign(claims(), kid="nope"), NOW)
    assert exc.value.detail == jwtmod.KEY_UNKNOWN
    assert not isinstance(exc.value, NeedKeys)  # no JWKS URL: a refetch cannot help


def test_key_set_skips_unusable_keys(signers):
    good = signers["RS256"].jwk
    p384 = ECAlgorithm.to_jwk(ec.generate_private_key(ec.SECP384R1()).public_key(), True)
    doc = {
        "keys": [
            {**signers["ES256"].jwk, "use": "enc"},
            {**good, "kid": "declared-ps256", "alg": "PS256"},
            {**p384, "kid": "p384"},
            {"kty": "RSA", "kid": "broken", "n": "AQAB"},
            {"kty": "oct", "kid": "short", "k": b64(b"too short")},
            "not a key",
            good,
        ]
    }
    keys = KeySet.from_jwks(doc, ("RS256", "ES256", "HS256"))
    assert len(keys) == 1
    assert keys.get("RS256-1", "RS256") is not None
    assert len(keys.skipped) == 6


def test_private_members_of_a_jwk_are_not_used(signers):
    """A JWKS that leaks a private key still yields a public key, which verifies."""
    s = signers["RS256"]
    private_jwk = {**RSAAlgorithm.to_jwk(s.private, True), "kid": "RS256-1"}
    del private_jwk["key_ops"]  # ["sign"]: with it the key would be skipped outright
    keys = KeySet.from_jwks({"keys": [private_jwk]}, ("RS256",))
    key = keys.get("RS256-1", "RS256")
    assert isinstance(key.key, rsa.RSAPublicKey)


# --- malformed input -----------------------------------------------------------------------

_HEAD = b64({"alg": "RS256", "kid": "RS256-1"})
_BODY = b64(claims())


@pytest.mark.parametrize(
    "token",
    [
        "",
        "garbage",
        f"{_HEAD}.{_BODY}",
        f"{_HEAD}.{_BODY}.c2ln.c2ln",
        "!!!.@@@.###",
        f"{_HEAD} .{_BODY}.c2ln",
        f"{b64(b'not json')}.{_BODY}.c2ln",
        f"{b64(b'[1, 2]')}.{_BODY}.c2ln",
        f"{_HEAD}.{b64(b'[1]')}.c2ln",
        f"{b64({'typ': 'JWT'})}.{_BODY}.c2ln",
        f"{b64({'alg': 'RS256', 'kid': 7})}.{_BODY}.c2ln",
        f"{b64({'alg': 5})}.{_BODY}.c2ln",
        f"{_HEAD}x.{_BODY}.c2ln",
    ],
)
def test_malformed_token_is_refused(signers, token):
    assert refused(verifier(provider(signers["RS256"])), token) == jwtmod.MALFORMED


def test_oversized_token_is_refused(signers):
    s = signers["RS256"]
    token = s.sign(claims(padding="x" * 9000))
    assert refused(verifier(provider(s)), token) == jwtmod.TOO_LARGE


def test_critical_header_extensions_are_refused(signers):
    s = signers["HS256"]
    token = s.sign(claims(), crit=["exp"], exp=1)
    assert refused(verifier(provider(s)), token) == jwtmod.CRIT_UNSUPPORTED


# --- the cache -----------------------------------------------------------------------------


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """Every signature check PyJWT makes, recorded."""
    calls: list[str] = []
    real = pyjwt.decode

    def counting(token, *args, **kwargs):
        calls.append(token)
        return real(token, *args, **kwargs)

    monkeypatch.setattr(jwtmod.jwt, "decode", counting)
    return calls


def test_repeated_token_skips_the_signature_check(signers, decodes):
    s = signers["RS256"]
    v = verifier(provider(s))
    token = s.sign(claims())
    first = v.verify(token, NOW)
    assert v.verify(token, NOW + 1) is first
    assert len(decodes) == 1


def test_cache_hit_still_checks_expiry_and_evicts(signers, decodes):
    s = signers["RS256"]
    v = verifier(provider(s, leeway=30))
    token = s.sign(claims(exp=NOW + 60))
    v.verify(token, NOW)
    assert refused(v, token, NOW + 90) == jwtmod.EXPIRED
    v.verify(token, NOW)  # evicted: checked afresh
    assert len(decodes) == 2


def test_cache_is_bounded(signers, decodes):
    s = signers["HS256"]
    v = verifier(provider(s), cache_size=2)
    t1, t2, t3 = (s.sign(claims(sub=f"user-{i}")) for i in range(3))
    for token in (t1, t2, t3, t3, t1):
        v.verify(token, NOW)
    assert decodes == [t1, t2, t3, t1]  # t1 had been evicted by t3


def test_no_cache_checks_every_time(signers, decodes):
    s = signers["HS256"]
    v = verifier(provider(s), cache_size=0)
    token = s.sign(claims())
    v.verify(token, NOW)
    v.verify(token, NOW)
    assert len(decodes) == 2


def test_refused_tokens_are_not_cached(signers, impostors, decodes):
    v = verifier(provider(signers["ES256"]))
    token = impostors["ES256"].sign(claims())
    refused(v, token)
    refused(v, token)
    assert len(decodes) == 2


# --- provider validation -------------------------------------------------------------------


def _rsa_jwk(signers, **members) -> dict:
    return {**signers["RS256"].jwk, **members}


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"algorithms": ("HS512",)}, "Unsupported algorithm 'HS512'"),
        ({"algorithms": ("none",)}, "Unsupported algorithm 'none'"),
        ({"algorithms": ()}, "at least one algorithm"),
        ({"issuer": ""}, "issuer"),
        ({"static_jwks": None}, "JWKS URL or static keys"),
        ({"static_jwks": {"nokeys": []}}, 'JSON object with a "keys" list'),
        ({"static_jwks": {"keys": "RSA"}}, 'JSON object with a "keys" list'),
        ({"static_jwks": {"keys": [{"kty": "RSA", "n": "AQAB"}]}}, "does not parse"),
        ({"static_jwks": {"keys": [{"kty": "XYZ"}]}}, "fits none of RS256"),
        ({"algorithms": ("ES256",)}, "is an RSA key, which fits none of the allowed"),
        ({"static_jwks": "private"}, "private key material"),
        ({"static_jwks": "duplicate"}, "share a kid"),
        ({"algorithms": ("RS256", "HS256"), "jwks_url": "https://idp/jwks"}, "no static oct"),
        ({"algorithms": ("RS256", "ES256")}, "ES256 is allowed but no static key fits"),
        (
            {
                "static_jwks": {"keys": [{"kty": "oct", "k": b64(b"short")}]},
                "algorithms": ("HS256",),
            },
            "shorter than 32 bytes",
        ),
        ({"jwks_url": "ftp://idp/jwks"}, "http:// or https://"),
        ({"jwks_url": "https:///jwks"}, "with a host"),
        ({"leeway": -1}, "leeway"),
        ({"refresh_seconds": 0.1}, "at least 1 second"),
        ({"consumer_claim": ""}, "consumer"),
        ({"audiences": ("",)}, "Audiences"),
    ],
)
def test_validate_provider_explains_what_cannot_work(signers, impostors, fields, message):
    base = provider(signers["RS256"])
    if fields.get("static_jwks") == "private":
        fields["static_jwks"] = {"keys": [RSAAlgorithm.to_jwk(signers["RS256"].private, True)]}
    elif fields.get("static_jwks") == "duplicate":
        fields["static_jwks"] = {"keys": [signers["RS256"].jwk, impostors["RS256"].jwk]}
    with pytest.raises(ValueError, match=re.escape(message)):
        validate_provider(replace(base, **fields))


@pytest.mark.parametrize("alg", ["RS256", "ES256", "EdDSA", "HS256"])
def test_validate_provider_accepts_working_configs(signers, alg):
    validate_provider(provider(signers[alg], audiences=("api",), typ="at+jwt"))


def test_validate_provider_accepts_a_jwks_url_alone():
    validate_provider(
        ProviderConfig(issuer=ISS, algorithms=("RS256", "ES256"), jwks_url="https://x/")
    )


# --- fetching from a real JWKS server ------------------------------------------------------


class JwksServer:
    """tests/jwks_server.py as a child process, serving `file`."""

    def __init__(self, tmp_path: Path) -> None:
        self.port = free_port()
        self.file = tmp_path / "jwks.json"
        self.url = f"http://127.0.0.1:{self.port}/jwks.json"
        self.publish()
        args = [
            sys.executable,
            "tests/jwks_server.py",
            "--port",
            str(self.port),
            "--file",
            str(self.file),
        ]
        self.proc = Proc("jwks", args, env=child_env(), log_dir=tmp_path)
        wait_until(lambda: port_open(self.port), timeout=10, what="the JWKS server")

    def publish(self, *signers: Signer, raw: str | None = None) -> None:
        """Serve these keys (or `raw`) from now on; written whole, so no read sees half."""
        text = raw if raw is not None else json.dumps({"keys": [s.jwk for s in signers]})
        tmp = self.file.with_suffix(".tmp")
        tmp.write_text(text)
        os.replace(tmp, self.file)

    def hits(self) -> int:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.port}/hits", timeout=5) as resp:
            return int(resp.read())


@pytest.fixture
def jwks_server(tmp_path):
    server = JwksServer(tmp_path)
    yield server
    server.proc.stop()


def fetching(url: str, **fields: object) -> ProviderConfig:
    fields.setdefault("algorithms", ("RS256", "ES256"))
    return ProviderConfig(issuer=ISS, jwks_url=url, **fields)


def test_cache_fetches_keys_from_the_server(signers, jwks_server):
    s = signers["RS256"]
    jwks_server.publish(s)
    config = fetching(jwks_server.url)

    async def scenario() -> None:
        cache = JwksCache(config, clock=Clock())
        await cache.start()
        try:
            assert cache.fetches == 1
            assert cache.key_for("RS256-1", "RS256") is not None
            assert JwtVerifier([(config, cache)]).verify(s.sign(claims()), NOW).subject
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert jwks_server.hits() == 1


def test_rotated_key_verifies_after_one_refetch(signers, jwks_server):
    old, new = signers["RS256"], ec_signer("ES256-rotated")
    jwks_server.publish(old)
    config = fetching(jwks_server.url, min_refetch_seconds=10)
    clock = Clock()

    async def scenario() -> None:
        cache = JwksCache(config, clock=clock)
        await cache.start()
        try:
            v = JwtVerifier([(config, cache)])
            old_token, new_token = old.sign(claims()), new.sign(claims())
            v.verify(old_token, NOW)  # cached
            jwks_server.publish(new)  # the old key retires with the rotation

            with pytest.raises(NeedKeys):
                v.verify(new_token, NOW)
            # Just fetched at start: no refetch yet, so no news.
            with pytest.raises(JwtError) as exc:
                await v.verify_async(new_token, NOW)
            assert exc.value.detail == jwtmod.KEY_UNKNOWN
            assert cache.fetches == 1

            clock.advance(10)
            assert (await v.verify_async(new_token, NOW)).subject == "user-1"
            assert cache.fetches == 2
            # The cached token's key left the set: it is checked afresh and refused.
            with pytest.raises(JwtError) as exc:
                v.verify(old_token, NOW)
            assert exc.value.detail == jwtmod.KEY_UNKNOWN
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert jwks_server.hits() == 2


def test_unchanged_keys_keep_cached_tokens_across_refetches(signers, jwks_server, decodes):
    s = signers["RS256"]
    jwks_server.publish(s)
    config = fetching(jwks_server.url, min_refetch_seconds=0)

    async def scenario() -> None:
        cache = JwksCache(config, clock=Clock())
        await cache.start()
        try:
            v = JwtVerifier([(config, cache)])
            token = s.sign(claims())
            v.verify(token, NOW)
            assert await cache.refetch_for_unknown_kid()
            v.verify(token, NOW)
            assert cache.fetches == 2
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert len(decodes) == 1


def test_flood_of_unknown_kids_causes_at_most_one_fetch(signers, jwks_server):
    s = signers["RS256"]
    jwks_server.publish(s)
    config = fetching(jwks_server.url, min_refetch_seconds=10)
    clock = Clock()

    async def scenario() -> None:
        cache = JwksCache(config, clock=clock)
        await cache.start()
        try:
            v = JwtVerifier([(config, cache)])
            clock.advance(11)  # a refetch is allowed now, once
            for _ in range(2):
                tokens = [s.sign(claims(), kid=secrets.token_hex(8)) for _ in range(50)]
                results = await asyncio.gather(
                    *(v.verify_async(t, NOW) for t in tokens), return_exceptions=True
                )
                assert all(isinstance(r, JwtError) for r in results)
                assert all(r.detail == jwtmod.KEY_UNKNOWN for r in results)
                assert cache.fetches == 2  # the start's, then one shared by all 100
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert jwks_server.hits() == 2


def test_old_keys_are_kept_when_the_server_stops(signers, jwks_server, caplog):
    s = signers["RS256"]
    jwks_server.publish(s)
    # The refresh loop's real sleeps are what this test waits for; make them short.
    config = fetching(jwks_server.url, refresh_seconds=0.05, min_refetch_seconds=0)

    async def scenario() -> None:
        cache = JwksCache(config, clock=Clock())
        await cache.start()
        try:
            v = JwtVerifier([(config, cache)], cache_size=0)
            token = s.sign(claims())
            v.verify(token, NOW)
            jwks_server.proc.stop()
            started = cache.fetches
            deadline = time.monotonic() + 5
            while cache.fetches < started + 3 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            assert cache.fetches >= started + 3
            assert await cache.refetch_for_unknown_kid()  # fails too
            assert v.verify(token, NOW).subject == "user-1"
        finally:
            await cache.close()

    with caplog.at_level(logging.WARNING, logger="gateway.jwt"):
        asyncio.run(scenario())
    warnings = [r for r in caplog.records if r.name == "gateway.jwt"]
    assert len(warnings) == 1  # a minute has not passed on the cache's clock
    assert "keeping the 1 keys" in warnings[0].getMessage()


@pytest.mark.parametrize(
    "raw",
    [
        "not json",
        '{"keys": "RSA"}',
        '["keys"]',
        '{"keys": [{"kty": "RSA", "n": "AQAB"}]}',
        None,  # the file is gone: 404
    ],
)
def test_old_keys_are_kept_on_a_bad_document(signers, jwks_server, raw):
    s = signers["RS256"]
    jwks_server.publish(s)
    config = fetching(jwks_server.url, min_refetch_seconds=0)

    async def scenario() -> None:
        cache = JwksCache(config, clock=Clock())
        await cache.start()
        try:
            if raw is None:
                jwks_server.file.unlink()
            else:
                jwks_server.publish(raw=raw)
            assert await cache.refetch_for_unknown_kid()
            assert cache.fetches == 2
            assert JwtVerifier([(config, cache)]).verify(s.sign(claims()), NOW).subject
        finally:
            await cache.close()

    asyncio.run(scenario())
    assert jwks_server.hits() == 2


def test_hmac_keys_from_a_jwks_url_are_ignored(signers, jwks_server):
    h = signers["HS256"]
    jwks_server.publish(h, signers["RS256"])
    config = fetching(jwks_server.url, algorithms=("RS256", "HS256"))

    async def scenario() -> None:
        cache = JwksCache(config, clock=Clock())
        await cache.start()
        try:
            assert cache.key_for("RS256-1", "RS256") is not None
            assert cache.key_for("HS256-1", "HS256") is None
        finally:
            await cache.close()

    asyncio.run(scenario())


def test_start_tolerates_an_unreachable_server(signers):
    s = signers["RS256"]
    config = fetching(f"http://127.0.0.1:{free_port()}/jwks.json", min_refetch_seconds=10)

    async def scenario() -> None:
        cache = JwksCache(config, clock=Clock())
        started = time.monotonic()
        await cache.start()
        try:
            assert time.monotonic() - started < 3
            assert cache.fetches == 1
            assert len(cache.keyset) == 0
            v = JwtVerifier([(config, cache)])
            with pytest.raises(JwtError) as exc:
                await v.verify_async(s.sign(claims()), NOW)
            assert exc.value.detail == jwtmod.KEY_UNKNOWN
        finally:
            await cache.close()

    asyncio.run(scenario())
