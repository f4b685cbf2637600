"""JWT bearer-token verification for the data plane (RFC 7519, with RFC 8725's advice).

An API trusts one or more providers (identity servers). A token picks its provider by its
unverified `iss`, then its key by `kid` from that provider's keys: static ones from the config
plus, with a `jwks_url`, the last good fetch of the provider's JWKS. The key's type fixes the
algorithm (RSA: RS256, EC P-256: ES256, OKP Ed25519: EdDSA, oct: HS256), so a token can never
choose how its key is interpreted (no HS256 with an RSA public key as the secret).

Times are checked against the caller's `now` (epoch seconds), never the wall clock, so one
request sees one time and tests control it. Tokens that verified are kept in a small LRU
cache; a hit skips the signature check but re-checks the time claims and that the token's key
is still in the provider's key set (a key removed from the JWKS stops its cached tokens too).

Symmetric (oct) keys come only from `static_jwks`: a JWKS URL is public by nature, and an HMAC
secret published there would let anyone mint tokens.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import json
import logging
import math
import random
import re
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import urlsplit

import aiohttp
import jwt
from jwt import PyJWK

log = logging.getLogger("gateway.jwt")

ALGORITHMS = ("RS256", "ES256", "EdDSA", "HS256")

MAX_TOKEN_LENGTH = 8192
FETCH_TIMEOUT = 2.0  # seconds for one JWKS GET, connect included
MAX_JWKS_BYTES = 512 * 1024  # real JWKS documents are a few KiB
WARN_INTERVAL = 60.0  # a dead JWKS server logs one warning a minute, not one per attempt
MIN_RSA_BITS = 2048  # NIST SP 800-131A
MIN_HMAC_BYTES = 32  # RFC 7518 section 3.2: an HS256 key is at least the hash size

# Every refusal's detail, in one place. None of them names the token or a key.
MALFORMED = "The token is malformed."
TOO_LARGE = "The token is too large."
UNSIGNED = "Unsigned tokens are not accepted."
ALG_NOT_ALLOWED = "The token's algorithm is not allowed."
CRIT_UNSUPPORTED = "The token requires header extensions (crit) that are not supported."
ISSUER_UNTRUSTED = "The token's issuer is not trusted."
TYPE_REFUSED = "The token's type (typ header) is not accepted."
KEY_UNKNOWN = "The token's signing key is not known."
KEY_AMBIGUOUS = "The token names no key (kid) and its issuer has several keys."
KEY_MISMATCH = "The token's key does not fit its algorithm."
BAD_SIGNATURE = "The token's signature is invalid."
WRONG_AUDIENCE = "The token is not meant for this API."
NO_EXPIRY = "The token has no expiry time (exp)."
EXPIRED = "The token has expired."
NOT_YET_VALID = "The token is not valid yet."
ISSUED_IN_FUTURE = "The token's issue time is in the future."
INVALID = "The token is invalid."

# Which algorithm a key type fits: (kty, crv) -> alg.
_ALG_FOR_KEY = {
    ("RSA", None): "RS256",
    ("EC", "P-256"): "ES256",
    ("OKP", "Ed25519"): "EdDSA",
    ("oct", None): "HS256",
}
# A JWK's own `alg`, when present, must agree; RFC 9864 names EdDSA over Ed25519 "Ed25519".
_DECLARED_ALGS = {alg: {alg} for alg in ALGORITHMS} | {"EdDSA": {"EdDSA", "Ed25519"}}
_KEY_KIND = {"RS256": "RSA", "ES256": "EC P-256", "EdDSA": "Ed25519", "HS256": "HMAC (oct)"}
# The members a verification key needs; anything else (private parts included) is dropped.
_PUBLIC_MEMBERS = {"RSA": ("n", "e"), "EC": ("crv", "x", "y"), "OKP": ("crv", "x"), "oct": ("k",)}
_PRIVATE_MEMBERS = ("d", "p", "q", "dp", "dq", "qi", "oth")

# Three base64url segments; trailing "=" padding is tolerated because some issuers (AWS ALB)
# send it. The signature may be empty only so that an unsigned token gets its own refusal.
_COMPACT = re.compile(r"[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]+={0,2}\.[A-Za-z0-9_-]*={0,2}")


class JwtError(Exception):
    """A token that must be refused; `detail` is safe to show the client (never the token)."""

    def __init__(self, detail: str) -> None:
        super().__init__(detail)
        self.detail = detail


class NeedKeys(JwtError):
    """The token's key is not known yet; a refetch of `cache` (its provider's JWKS) may find it."""

    def __init__(self, detail: str, cache: JwksCache) -> None:
        super().__init__(detail)
        self.cache = cache


@dataclass(frozen=True, slots=True)
class ProviderConfig:
    """One trusted token issuer and how its tokens are checked."""

    issuer: str  # exact `iss` value this provider accepts
    algorithms: tuple[str, ...]  # allow-list, subset of ALGORITHMS
    audiences: tuple[str, ...] = ()  # `aud` must contain one of these; empty: not checked
    leeway: float = 30.0  # seconds, for exp / nbf / iat
    typ: str = ""  # required JOSE header `typ` (case-insensitive); empty: not checked
    jwks_url: str = ""  # fetched in the background; empty: static keys only
    static_jwks: dict | None = None  # a JWKS document {"keys": [...]}
    consumer_claim: str = "sub"  # which claim names the consumer
    refresh_seconds: float = 300.0  # JWKS refresh interval
    min_refetch_seconds: float = 10.0  # unknown kid: at most one refetch per this interval


@dataclass(frozen=True, slots=True)
class VerifiedToken:
    """A token that passed every check; shared by cache hits, so treat `claims` as read-only."""

    claims: dict
    subject: str  # str(claims[consumer_claim])
    scopes: frozenset[str]  # from "scope" (space-separated) or "scp" (list or space-separated)
    expires_at: float | None  # exp


# --- keys ------------------------------------------------------------------------------


class _UnusableKey(Exception):
    """Why one JWK cannot verify tokens under a provider's allowed algorithms."""


def _short(value: object) -> str:
    """A JWK member for a message: it comes from outside, so keep it short."""
    text = repr(value)
    return text if len(text) <= 40 else text[:37] + "..."


def _load_jwk(jwk: object, algorithms: tuple[str, ...]) -> tuple[str | None, str, PyJWK, str]:
    """(kid, alg, key, canonical public JWK) for one JWKS entry; raises _UnusableKey."""
    if not isinstance(jwk, dict):
        raise _UnusableKey("is not a JSON object")
    kty = jwk.get("kty")
    crv = jwk.get("crv") if kty in ("EC", "OKP") else None
    alg = None
    if isinstance(kty, str) and (crv is None or isinstance(crv, str)):
        alg = _ALG_FOR_KEY.get((kty, crv))
    if alg is None:
        kind = f"{_short(kty)}" + (f" on curve {_short(crv)}" if crv is not None else "")
        raise _UnusableKey(f"has a key type ({kind}) that fits none of {', '.join(ALGORITHMS)}")
    declared = jwk.get("alg")
    if declared is not None and declared not in _DECLARED_ALGS[alg]:
        raise _UnusableKey(f"is declared for algorithm {_short(declared)}, not {alg}")
    if alg not in algorithms:
        raise _UnusableKey(
            f"is an {_KEY_KIND[alg]} key, which fits none of the allowed algorithms "
            f"({', '.join(algorithms)})"
        )
    if jwk.get("use", "sig") != "sig":
        raise _UnusableKey(f"is meant for {_short(jwk['use'])}, not signatures (use)")
    ops = jwk.get("key_ops")
    if ops is not None and (not isinstance(ops, list) or "verify" not in ops):
        raise _UnusableKey("does not allow verification (key_ops)")
    kid = jwk.get("kid")
    if kid is not None and not isinstance(kid, str):
        raise _UnusableKey("has a kid that is not a string")
    public = {"kty": kty, **{m: jwk[m] for m in _PUBLIC_MEMBERS[kty] if m in jwk}}
    try:
        key = PyJWK(public, algorithm=alg)
        # HMAC: refuses a "secret" that is really a PEM/DER public key (algorithm confusion).
        key.Algorithm.prepare_key(key.key)
    except Exception as e:  # a JWKS is outside input: whatever breaks, the key is just unusable
        raise _UnusableKey("does not parse as a key") from e
    if alg == "RS256" and key.key.key_size < MIN_RSA_BITS:
        raise _UnusableKey(f"is an RSA key shorter than {MIN_RSA_BITS} bits")
    if alg == "HS256" and len(key.key) < MIN_HMAC_BYTES:
        raise _UnusableKey(f"is an HMAC secret shorter than {MIN_HMAC_BYTES} bytes")
    return kid, alg, key, alg + json.dumps(public, sort_keys=True)


def _jwks_entries(doc: object) -> list:
    if not isinstance(doc, dict) or not isinstance(doc.get("keys"), list):
        raise ValueError('a JWKS must be a JSON object with a "keys" list')
    return doc["keys"]


class KeySet:
    """kid -> verification key, built from a JWKS document; keys of unusable types are skipped."""

    __slots__ = ("_entries", "_by_kid", "_single", "_counts", "_by_canonical", "skipped")

    def __init__(
        self, entries: list[tuple[str | None, str, PyJWK, str]], skipped: list[str] | None = None
    ) -> None:
        self._entries: list[tuple[str | None, str, PyJWK, str]] = []
        self._by_kid: dict[tuple[str, str], PyJWK] = {}
        self._by_canonical: dict[str, PyJWK] = {}
        self._counts: dict[str, int] = {}
        self.skipped = list(skipped or ())  # one reason per skipped JWK, for logs and admin
        for kid, alg, key, canonical in entries:
            if canonical in self._by_canonical or (kid is not None and (kid, alg) in self._by_kid):
                continue  # the first of two keys with one kid wins, as a lookup would find
            self._entries.append((kid, alg, key, canonical))
            self._by_canonical[canonical] = key
            self._counts[alg] = self._counts.get(alg, 0) + 1
            if kid is not None:
                self._by_kid[(kid, alg)] = key
        # No kid in the token: only an alg with exactly one key has an answer.
        self._single = {alg: key for _, alg, key, _ in self._entries if self._counts[alg] == 1}

    @classmethod
    def from_jwks(
        cls, doc: dict, algorithms: tuple[str, ...], *, previous: KeySet | None = None
    ) -> KeySet:
        """Parse `doc` (ValueError if it is no JWKS); with `previous`, unchanged keys keep their
        objects, so tokens cached under them stay cached."""
        entries = []
        skipped = []
        for i, jwk in enumerate(_jwks_entries(doc)):
            try:
                kid, alg, key, canonical = _load_jwk(jwk, algorithms)
            except _UnusableKey as e:
                skipped.append(f"key #{i + 1} {e}")
                continue
            if previous is not None:
                key = previous._by_canonical.get(canonical, key)
            entries.append((kid, alg, key, canonical))
        return cls(entries, skipped)

    def merged(self, other: KeySet) -> KeySet:
        """These keys plus `other`'s; on a kid both hold, this set's key wins."""
        return KeySet(self._entries + other._entries)

    def get(self, kid: str | None, alg: str) -> PyJWK | None:
        """The key named `kid` for `alg`, or with no kid the only key for `alg`; else None."""
        if kid is None:
            return self._single.get(alg)
        return self._by_kid.get((kid, alg))

    def has_kid(self, kid: str) -> bool:
        return any(k == kid for k, _ in self._by_kid)

    def count(self, alg: str) -> int:
        return self._counts.get(alg, 0)

    def __len__(self) -> int:
        return len(self._entries)


_EMPTY = KeySet([])


# --- configuration checks --------------------------------------------------------------


def validate_provider(config: ProviderConfig) -> None:
    """Raise ValueError with a clear message if the config cannot work (unknown algorithm, neither
    jwks_url nor static keys, a static JWKS that does not parse, a static key whose type fits none
    of the allowed algorithms, an HS256 allowed with no oct key...). Used by Django admin clean()
    and the snapshot compiler."""
    if not isinstance(config.issuer, str) or not config.issuer:
        raise ValueError("The issuer (iss) must be set.")
    algorithms = config.algorithms
    if not algorithms:
        raise ValueError(f"Allow at least one algorithm ({', '.join(ALGORITHMS)}).")
    unknown = [a for a in algorithms if a not in ALGORITHMS]
    if unknown:
        raise ValueError(
            f"Unsupported algorithm {', '.join(map(_short, unknown))}: "
            f"allowed are {', '.join(ALGORITHMS)}."
        )
    if not config.jwks_url and not config.static_jwks:
        raise ValueError("Give a JWKS URL or static keys: without keys no token can verify.")
    if config.jwks_url:
        url = urlsplit(config.jwks_url)
        if url.scheme not in ("http", "https") or not url.hostname:
            raise ValueError("The JWKS URL must be an http:// or https:// URL with a host.")
    for name in ("leeway", "refresh_seconds", "min_refetch_seconds"):
        value = getattr(config, name)
        if not isinstance(value, int | float) or not math.isfinite(value) or value < 0:
            raise ValueError(f"{name} must be a number of seconds, zero or more.")
    if config.refresh_seconds < 1:
        raise ValueError("refresh_seconds must be at least 1 second.")
    if not config.consumer_claim:
        raise ValueError("Name the claim that identifies the consumer (e.g. sub).")
    if any(not isinstance(a, str) or not a for a in config.audiences):
        raise ValueError("Audiences must be non-empty strings.")
    static = KeySet([])
    if config.static_jwks is not None:
        try:
            entries = _jwks_entries(config.static_jwks)
        except ValueError:
            raise ValueError('The static JWKS must be a JSON object with a "keys" list.') from None
        parsed = []
        for i, jwk in enumerate(entries):
            # Checked first: a pasted private key would otherwise fail on its key_ops ("sign").
            asymmetric = isinstance(jwk, dict) and jwk.get("kty") != "oct"
            if asymmetric and any(m in jwk for m in _PRIVATE_MEMBERS):
                raise ValueError(
                    f"Static key #{i + 1} holds private key material: give the public key only."
                )
            try:
                parsed.append(_load_jwk(jwk, algorithms))
            except _UnusableKey as e:
                raise ValueError(f"Static key #{i + 1} {e}.") from None
        static = KeySet(parsed)
        if len(static) < len(parsed):
            raise ValueError("Two static keys share a kid (or are the same key).")
    if "HS256" in algorithms and not static.count("HS256"):
        raise ValueError("HS256 is allowed but no static oct key (the shared secret) is given.")
    if not config.jwks_url:
        missing = [a for a in algorithms if not static.count(a)]
        if missing:
            raise ValueError(
                f"{', '.join(missing)} is allowed but no static key fits it and there is no "
                "JWKS URL."
            )


# --- fetching --------------------------------------------------------------------------


class _FetchFailed(Exception):
    pass


class JwksCache:
    """Keys of one provider: static keys plus, with a jwks_url, the last good fetch (never lost
    on a failed fetch).

    `session_factory` returns a shared aiohttp session (the app's), which the cache uses but
    never closes; without one the cache opens its own and closes it in close(). `clock` (a
    monotonic clock) paces refetches and warnings.
    """

    def __init__(
        self,
        config: ProviderConfig,
        *,
        session_factory: Callable[[], aiohttp.ClientSession] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.config = config
        self._session_factory = session_factory
        self._own_session: aiohttp.ClientSession | None = None
        self._clock = clock
        self._static = (
            KeySet.from_jwks(config.static_jwks, config.algorithms)
            if config.static_jwks
            else _EMPTY
        )
        self._fetched = _EMPTY
        self.keyset = self._static  # what key_for reads: static plus fetched
        self.fetches = 0  # fetch attempts, good or bad
        self._failures = 0  # consecutive failed fetches, for the retry backoff
        self._last_fetch_at = -math.inf
        self._warned_at = -math.inf
        self._inflight: asyncio.Task | None = None
        self._task: asyncio.Task | None = None
        self._closed = False

    @property
    def can_fetch(self) -> bool:
        return bool(self.config.jwks_url)

    def key_for(self, kid: str | None, alg: str) -> PyJWK | None:
        """The key for a token's `kid` and `alg`, or None."""
        return self.keyset.get(kid, alg)

    async def start(self) -> None:
        """First fetch (bounded, failure tolerated), then refresh in the background."""
        if not self.can_fetch or self._task is not None:
            return
        # The fetch has its own timeout; this one also bounds DNS and a slow body.
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._fetch_shared(), FETCH_TIMEOUT + 0.5)
        if self._closed:  # dropped by a newer snapshot while the first fetch ran
            return
        self._task = asyncio.create_task(self._refresh_loop(), name="jwks-refresh")

    async def close(self) -> None:
        """Stop refreshing; let a fetch in flight finish (others may be waiting on it)."""
        self._closed = True
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
        if self._inflight is not None:
            await asyncio.gather(asyncio.shield(self._inflight), return_exceptions=True)
        if self._own_session is not None:
            await self._own_session.close()
            self._own_session = None

    async def refetch_for_unknown_kid(self) -> bool:
        """Fetch again, at most once per min_refetch_seconds; callers arriving during a fetch
        wait for that one. Returns whether a fetch happened."""
        if not self.can_fetch:
            return False
        # Paced from any fetch, the periodic one too: a set just fetched holds no news.
        recent = self._clock() - self._last_fetch_at < self.config.min_refetch_seconds
        if self._inflight is None and recent:
            return False
        await self._fetch_shared()
        return True

    async def _refresh_loop(self) -> None:
        cfg = self.config
        while True:
            delay = cfg.refresh_seconds
            if self._failures:
                # A dead JWKS server is retried sooner than the refresh, backing off to it.
                base = max(cfg.min_refetch_seconds, 1.0) * 2 ** (self._failures - 1)
                delay = min(delay, base)
            # Workers start together: jitter keeps them from fetching in lockstep.
            await asyncio.sleep(delay * random.uniform(0.9, 1.1))  # noqa: S311 - jitter
            await self._fetch_shared()

    async def _fetch_shared(self) -> None:
        task = self._inflight
        if task is None:
            task = self._inflight = asyncio.create_task(self._fetch())
        # Shielded: a caller that goes away (client disconnect) does not cancel the others' fetch.
        await asyncio.shield(task)

    async def _fetch(self) -> None:
        self.fetches += 1
        self._last_fetch_at = self._clock()
        try:
            doc = await self._download()
            fetched = KeySet.from_jwks(
                _without_secrets(doc), self.config.algorithms, previous=self._fetched
            )
            if not len(fetched) and fetched.skipped:
                raise _FetchFailed(f"no usable key ({fetched.skipped[0]})")
        except Exception as e:  # any failure keeps the last good keys; the loop must go on
            self._failures += 1
            now = self._clock()
            if now - self._warned_at >= WARN_INTERVAL:
                self._warned_at = now
                reason = str(e) if isinstance(e, _FetchFailed) else type(e).__name__
                if not isinstance(e, _FetchFailed) and str(e):
                    reason += f": {e}"
                log.warning(
                    "JWKS fetch from %s failed (%s); keeping the %d keys we have",
                    self.config.jwks_url,
                    reason,
                    len(self.keyset),
                )
        else:
            if self._failures:
                log.info("JWKS fetch from %s works again", self.config.jwks_url)
            self._failures = 0
            if fetched.skipped:
                log.debug("JWKS from %s: skipped %s", self.config.jwks_url, fetched.skipped)
            self._fetched = fetched
            self.keyset = self._static.merged(fetched)
        finally:
            self._inflight = None

    async def _download(self) -> object:
        session = self._session_factory() if self._session_factory else self._own()
        async with session.get(
            self.config.jwks_url,
            timeout=aiohttp.ClientTimeout(total=FETCH_TIMEOUT),
            # The app's session does not decompress; ask for a plain body.
            headers={
                "Accept": "application/json",
                "Accept-Encoding": "identity",
                "User-Agent": "apigw-jwks",
            },
        ) as resp:
            if resp.status != 200:
                raise _FetchFailed(f"HTTP {resp.status}")
            body = bytearray()
            async for chunk in resp.content.iter_chunked(65536):
                body += chunk
                if len(body) > MAX_JWKS_BYTES:
                    raise _FetchFailed(f"body over {MAX_JWKS_BYTES} bytes")
        try:
            doc = json.loads(body)
            _jwks_entries(doc)
        except (ValueError, RecursionError):
            raise _FetchFailed('not a JSON object with a "keys" list') from None
        return doc

    def _own(self) -> aiohttp.ClientSession:
        if self._own_session is None:
            self._own_session = aiohttp.ClientSession(cookie_jar=aiohttp.DummyCookieJar())
        return self._own_session


def _without_secrets(doc: dict) -> dict:
    """A fetched JWKS minus HMAC keys: a secret at a public URL is no secret."""
    return {"keys": [k for k in doc["keys"] if not (isinstance(k, dict) and k.get("kty") == "oct")]}


# --- verifying -------------------------------------------------------------------------


class _Provider:
    """A ProviderConfig prepared once for the per-token path."""

    __slots__ = ("config", "cache", "algorithms", "typ", "audience", "options")

    def __init__(self, config: ProviderConfig, cache: JwksCache) -> None:
        self.config = config
        self.cache = cache
        self.algorithms = frozenset(config.algorithms)
        self.typ = _media_type(config.typ)
        self.audience = list(config.audiences) or None
        # PyJWT checks the signature, iss and aud; the time claims are checked here against
        # the caller's `now` (PyJWT would read the wall clock), and the consumer claim may be
        # a number (PyJWT's sub check wants a string).
        self.options = {
            "verify_signature": True,
            "verify_exp": False,
            "verify_nbf": False,
            "verify_iat": False,
            "verify_iss": True,
            "verify_aud": self.audience is not None,
            "verify_sub": False,
            "verify_jti": True,
            "require": ["iss", "exp"],
            "enforce_minimum_key_length": True,
        }


@dataclass(slots=True)
class _Entry:
    """A verified token in the cache, with what a hit must re-check."""

    verified: VerifiedToken
    cache: JwksCache
    kid: str | None
    alg: str
    key: PyJWK
    exp: float
    nbf: float | None
    iat: float | None
    leeway: float


class JwtVerifier:
    """Verifies tokens for one API: several providers, picked by the token's (unverified) `iss`."""

    def __init__(
        self, providers: list[tuple[ProviderConfig, JwksCache]], *, cache_size: int = 10_000
    ) -> None:
        self._providers: dict[str, _Provider] = {}
        for config, cache in providers:
            if cache.config != config:
                raise ValueError(f"The key cache given for {config.issuer!r} is another's.")
            if config.issuer in self._providers:
                raise ValueError(f"Two providers have the issuer {config.issuer!r}.")
            self._providers[config.issuer] = _Provider(config, cache)
        self._cache: OrderedDict[str, _Entry] = OrderedDict()
        self._cache_size = cache_size  # 0: no cache

    def verify(self, token: str, now: float) -> VerifiedToken:
        """The verified token, or JwtError (NeedKeys when a JWKS refetch might find its key).

        `now` is epoch seconds (time.time()). Example:
        `verifier.verify(bearer, time.time()).subject` -> "user-42".
        """
        if len(token) > MAX_TOKEN_LENGTH:
            raise JwtError(TOO_LARGE)
        entry = self._cache.get(token)
        if entry is not None:
            if entry.cache.key_for(entry.kid, entry.alg) is entry.key:
                try:
                    _check_times(entry.exp, entry.nbf, entry.iat, entry.leeway, now)
                except JwtError:
                    if now >= entry.exp + entry.leeway:
                        del self._cache[token]
                    raise
                self._cache.move_to_end(token)
                return entry.verified
            del self._cache[token]  # its key left the key set: verify afresh
        entry = self._verify_signed(token, now)
        if self._cache_size > 0:
            if len(self._cache) >= self._cache_size:
                self._cache.popitem(last=False)
            self._cache[token] = entry
        return entry.verified

    async def verify_async(self, token: str, now: float) -> VerifiedToken:
        """verify(); on an unknown key, one rate-limited JWKS refetch, then verify again."""
        try:
            return self.verify(token, now)
        except NeedKeys as e:
            if not await e.cache.refetch_for_unknown_kid():
                raise JwtError(e.detail) from None
        try:
            return self.verify(token, now)
        except NeedKeys as e:
            raise JwtError(e.detail) from None

    def _verify_signed(self, token: str, now: float) -> _Entry:
        if not isinstance(token, str) or not _COMPACT.fullmatch(token):
            raise JwtError(MALFORMED)
        head, body, _ = token.split(".")
        header = _json_segment(head)
        payload = _json_segment(body)
        alg = header.get("alg")
        if not isinstance(alg, str):
            raise JwtError(MALFORMED)
        if alg.lower() == "none":
            raise JwtError(UNSIGNED)
        if "crit" in header:
            raise JwtError(CRIT_UNSUPPORTED)
        iss = payload.get("iss")
        provider = self._providers.get(iss) if isinstance(iss, str) else None
        if provider is None:
            raise JwtError(ISSUER_UNTRUSTED)
        if alg not in provider.algorithms:
            raise JwtError(ALG_NOT_ALLOWED)
        if provider.typ and _media_type(header.get("typ")) != provider.typ:
            raise JwtError(TYPE_REFUSED)
        kid = header.get("kid")
        if kid is not None and not isinstance(kid, str):
            raise JwtError(MALFORMED)
        cache = provider.cache
        key = cache.key_for(kid, alg)
        if key is None:
            raise _missing_key(cache, kid, alg)
        config = provider.config
        try:
            # One algorithm, the token's, already checked against the allow-list and bound to
            # the key's type: PyJWT enforces it again.
            claims = jwt.decode(
                token,
                key,
                algorithms=[alg],
                options=provider.options,
                audience=provider.audience,
                issuer=config.issuer,
            )
        except jwt.PyJWTError as e:
            raise JwtError(_refusal(e)) from None
        exp = _numeric_date(claims, "exp")
        if exp is None:
            raise JwtError(NO_EXPIRY)
        nbf = _numeric_date(claims, "nbf")
        iat = _numeric_date(claims, "iat")
        _check_times(exp, nbf, iat, config.leeway, now)
        verified = VerifiedToken(
            claims=claims,
            subject=_subject(claims, config.consumer_claim),
            scopes=_scopes(claims),
            expires_at=exp,
        )
        return _Entry(verified, cache, kid, alg, key, exp, nbf, iat, config.leeway)


def _json_segment(segment: str) -> dict:
    """A base64url JSON object segment, unverified; JwtError if it is not one."""
    raw = segment.rstrip("=")
    try:
        value = json.loads(base64.urlsafe_b64decode(raw + "=" * (-len(raw) % 4)))
    except (ValueError, RecursionError, binascii.Error):
        raise JwtError(MALFORMED) from None
    if not isinstance(value, dict):
        raise JwtError(MALFORMED)
    return value


def _media_type(value: object) -> str:
    """A `typ` compared the RFC 7515 way: case-insensitive, "application/" optional."""
    if not isinstance(value, str):
        return ""
    value = value.lower()
    return value.removeprefix("application/")


def _missing_key(cache: JwksCache, kid: str | None, alg: str) -> JwtError:
    """The refusal for a token whose key is not in the set; NeedKeys if a fetch could help."""
    current = cache.keyset
    if kid is None and current.count(alg) > 1:
        return JwtError(KEY_AMBIGUOUS)
    if kid is not None and current.has_kid(kid):
        return JwtError(KEY_MISMATCH)
    if cache.can_fetch:
        return NeedKeys(KEY_UNKNOWN, cache)
    return JwtError(KEY_UNKNOWN)


def _refusal(error: jwt.PyJWTError) -> str:
    """Our detail for a PyJWT error (whose own messages may quote the token)."""
    if isinstance(error, jwt.InvalidSignatureError):
        return BAD_SIGNATURE
    if isinstance(error, jwt.InvalidAudienceError):
        return WRONG_AUDIENCE
    if isinstance(error, jwt.MissingRequiredClaimError):
        if error.claim == "aud":
            return WRONG_AUDIENCE
        if error.claim == "exp":
            return NO_EXPIRY
    if isinstance(error, jwt.InvalidIssuerError):
        return ISSUER_UNTRUSTED
    if isinstance(error, jwt.InvalidAlgorithmError):
        return ALG_NOT_ALLOWED
    if isinstance(error, jwt.DecodeError):
        return MALFORMED
    return INVALID


def _numeric_date(claims: dict, name: str) -> float | None:
    value = claims.get(name)
    if value is None:
        return None
    # bool is an int in Python but not a NumericDate; NaN and Infinity parse from JSON.
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise JwtError(f"The token's {name} claim is not a number.")
    try:
        number = float(value)
    except OverflowError:
        number = math.inf
    if not math.isfinite(number):
        raise JwtError(f"The token's {name} claim is not a number.")
    return number


def _check_times(
    exp: float, nbf: float | None, iat: float | None, leeway: float, now: float
) -> None:
    if now >= exp + leeway:
        raise JwtError(EXPIRED)
    if nbf is not None and now + leeway < nbf:
        raise JwtError(NOT_YET_VALID)
    if iat is not None and iat > now + leeway:
        raise JwtError(ISSUED_IN_FUTURE)


def _subject(claims: dict, name: str) -> str:
    value = claims.get(name)
    if isinstance(value, str) and value:
        return value
    if isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value):
        return str(value)
    raise JwtError(f"The token does not name its consumer (claim {name}).")


def _scopes(claims: dict) -> frozenset[str]:
    scopes: set[str] = set()
    for name in ("scope", "scp"):
        value = claims.get(name)
        if value is None:
            continue
        if isinstance(value, str):
            scopes.update(value.split())
        elif name == "scp" and isinstance(value, list) and all(isinstance(s, str) for s in value):
            scopes.update(value)
        else:
            raise JwtError(f"The token's {name} claim is not a list of scopes.")
    return frozenset(scopes)
