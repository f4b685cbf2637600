"""The authenticate stage on its own: where keys are read from, and the verified-key cache
(a key seen before skips the hash, never a revocation, rotation or expiry)."""

from __future__ import annotations

import dataclasses
import time

from gateway.dataplane.context import RequestContext
from gateway.dataplane.snapshot import KeyEntry
from gateway.dataplane.stages.authenticate import AuthenticateStage, VerifiedKeys
from portal.keys import key_digest

SECRET = b"test-secret"
RAW = "gw_0123456789ab_s3cret"
OTHER = "gw_0123456789ab_other"  # the same key id, another secret


def entry(raw: str = RAW, **changes) -> KeyEntry:
    base = KeyEntry(
        pk=1,
        key_id="0123456789ab",
        digest=key_digest(raw, SECRET).encode(),
        expires_at=None,
        consumer_id=7,
        organization_id=None,
        subscription_id=3,
        subscription_status="active",
        plan_slug="free",
        api_ids=frozenset({1}),
        limits=(),
    )
    return dataclasses.replace(base, **changes)


def ctx_with(*headers: tuple[bytes, bytes]) -> RequestContext:
    return RequestContext(
        scope={"headers": list(headers), "query_string": b""},
        receive=None,
        send=None,
        request_id="r1",
        method="GET",
        path="/",
        client_ip="127.0.0.1",
    )


class CountingStage(AuthenticateStage):
    """Counts the full checks (hash + parse), to see what the cache saves."""

    hashed = 0

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        hasher = self.hasher
        outer = self

        class Counting:
            def hexdigest(self, raw: bytes) -> bytes:
                outer.hashed += 1
                return hasher.hexdigest(raw)

        self.hasher = Counting()


def stage(keys: dict, verified: VerifiedKeys | None = None) -> CountingStage:
    return CountingStage(
        key_header=b"x-api-key",
        header_label="X-API-Key",
        keys=keys,
        secret=SECRET,
        verified=verified if verified is not None else VerifiedKeys(),
    )


def status(s: AuthenticateStage, raw: str, header: bytes = b"x-api-key") -> int:
    value = raw.encode() if header == b"x-api-key" else b"Bearer " + raw.encode()
    result = s.on_request(ctx_with((header, value)))
    return 0 if result is None else result.status


def test_a_key_from_the_header_or_as_a_bearer_token_is_admitted_and_a_wrong_one_is_401():
    keys = {"0123456789ab": entry()}
    s = stage(keys)
    assert status(s, RAW) == 0
    assert status(s, RAW, b"authorization") == 0
    assert status(s, OTHER) == 401
    assert status(s, "gw_ffffffffffff_s3cret") == 401
    assert s.on_request(ctx_with()).status == 401  # none at all


def test_a_key_seen_before_skips_the_hash_but_a_wrong_one_never_does():
    keys = {"0123456789ab": entry()}
    s = stage(keys)
    for _ in range(5):
        assert status(s, RAW) == 0
    assert s.hashed == 1
    for _ in range(5):
        assert status(s, OTHER) == 401
    assert s.hashed == 6  # every wrong key is hashed: unknown and wrong keys cost the same
    assert len(s.verified) == 1


def test_a_revoked_or_rotated_key_fails_at_once_although_it_was_verified():
    keys = {"0123456789ab": entry()}
    s = stage(keys)
    assert status(s, RAW) == 0
    # Rotated (the delta puts the new secret's entry under the same key id): the old key
    # string must fail, the new one pass.
    keys["0123456789ab"] = entry(OTHER)
    assert status(s, RAW) == 401
    assert status(s, OTHER) == 0
    # Revoked (the delta removes it).
    del keys["0123456789ab"]
    assert status(s, OTHER) == 401


def test_an_expired_key_fails_even_from_the_cache():
    keys = {"0123456789ab": entry()}
    s = stage(keys)
    assert status(s, RAW) == 0
    keys["0123456789ab"] = live = entry(expires_at=time.time() - 1)
    assert status(s, RAW) == 401
    assert s.verified.get(RAW.encode(), keys) is live  # cached, and still refused
    assert status(s, RAW) == 401


def test_the_cache_is_bounded_and_holds_only_verified_keys():
    verified = VerifiedKeys(capacity=3)
    keys = {}
    raws = [f"gw_{i:012x}_secret" for i in range(10)]
    for i, raw in enumerate(raws):
        keys[f"{i:012x}"] = entry(raw, key_id=f"{i:012x}", pk=i + 1)
    s = stage(keys, verified)
    for raw in raws:
        assert status(s, raw) == 0
        assert len(verified) <= 3
    for raw in raws:
        assert status(s, raw.replace("secret", "wrong")) == 401
    assert all(verified.get(raw.replace("secret", "wrong").encode(), keys) is None for raw in raws)
    off = VerifiedKeys(capacity=0)
    off.add(RAW.encode(), entry())
    assert len(off) == 0
