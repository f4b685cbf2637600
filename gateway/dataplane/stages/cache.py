"""Cache: answer GET and HEAD from stored responses, with single flight on a miss.

The key is the method (HEAD shares GET's entries), host, path, the query with its parameters
sorted, the values of the headers the policy names in `vary`, the consumer (unless the
policy shares entries across consumers, which it may only when no transformation injects
consumer context), and the API's and route's cache generation (bumped by a purge, so that a
purge reaches every node through the config version). The TTL comes from the policy, capped
by the upstream's Cache-Control: `no-store`, `private` or `no-cache` are not stored,
`s-maxage` / `max-age` lower the TTL; answers with Set-Cookie or Vary: * are never stored.
Answers say `X-Cache: HIT | MISS | BYPASS`, hits carry `Age`, and a hit whose ETag the
client already has (If-None-Match) is a 304.

Stores: a bounded LRU by bytes in the worker (the embedded default), or Redis when REDIS_URL
is set (shared by every worker and node). N concurrent misses for one key make one upstream
call: followers in the worker wait for the leader's answer; in Redis, workers take a short
lock and the others poll for the entry the leader stores.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
import logging
import re
import struct
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from urllib.parse import parse_qsl, urlencode

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.resp import RespClient

log = logging.getLogger("gateway.cache")

_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_MAX_AGE = re.compile(rb"(?:^|,)\s*(s-maxage|max-age)\s*=\s*\"?(\d+)", re.I)
# Not stored with an entry: per hop, or per answer (the gateway sets them on every answer).
_NOT_STORED = frozenset(
    {
        b"connection",
        b"keep-alive",
        b"transfer-encoding",
        b"x-request-id",
        b"via",
        b"date",
        b"age",
        b"x-cache",
        b"content-length",
    }
)
X_CACHE_HIT = (b"x-cache", b"HIT")
X_CACHE_MISS = (b"x-cache", b"MISS")
X_CACHE_BYPASS = (b"x-cache", b"BYPASS")
# RFC 9110 section 15.4.5: what a 304 repeats of the answer it stands for.
_KEPT_ON_304 = frozenset({b"etag", b"cache-control", b"expires", b"vary", b"content-location"})
FOLLOW_TIMEOUT = 10.0  # seconds a follower waits for the leader's answer before going itself


class CacheConfigError(ValueError):
    """A cache policy that cannot be used; the message starts with the field."""


@dataclass(frozen=True, slots=True)
class CacheConfig:
    ttl: int
    vary: tuple[bytes, ...] = ()
    shared: bool = False  # one entry for every consumer
    max_body: int = 1 << 20
    statuses: frozenset[int] = frozenset({200})


def parse_cache(doc: object) -> CacheConfig:
    """A `cache` policy's configuration, validated."""
    if not isinstance(doc, dict):
        raise CacheConfigError("config: expected an object.")
    allowed = {"ttl", "vary", "share_across_consumers", "max_body_bytes", "statuses"}
    unknown = sorted(set(doc) - allowed)
    if unknown:
        raise CacheConfigError(f"config: unknown {', '.join(unknown)}.")
    ttl = doc.get("ttl")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not 1 <= ttl <= 86400:
        raise CacheConfigError("ttl: seconds, 1 to 86400.")
    vary = doc.get("vary", [])
    if not isinstance(vary, list):
        raise CacheConfigError("vary: a list of header names.")
    for i, name in enumerate(vary):
        if not isinstance(name, str) or not _HEADER_NAME.match(name):
            raise CacheConfigError(f"vary[{i}]: not a header name.")
    shared = doc.get("share_across_consumers", False)
    if not isinstance(shared, bool):
        raise CacheConfigError("share_across_consumers: true or false.")
    max_body = doc.get("max_body_bytes", 1 << 20)
    if not isinstance(max_body, int) or isinstance(max_body, bool) or not 1 <= max_body <= 64 << 20:
        raise CacheConfigError("max_body_bytes: a number of bytes, 1 to 64 MiB.")
    statuses = doc.get("statuses", [200])
    if not isinstance(statuses, list) or not all(
        isinstance(s, int) and 200 <= s <= 599 for s in statuses
    ):
        raise CacheConfigError("statuses: a list of HTTP statuses, e.g. [200, 404].")
    return CacheConfig(
        ttl=ttl,
        vary=tuple(sorted(n.lower().encode() for n in vary)),
        shared=shared,
        max_body=max_body,
        statuses=frozenset(statuses),
    )


@dataclass(slots=True)
class Entry:
    status: int
    headers: list[tuple[bytes, bytes]]
    body: bytes
    etag: bytes
    stored_at: float  # epoch seconds
    ttl: float

    def fresh(self, now: float) -> bool:
        return now - self.stored_at < self.ttl

    def size(self) -> int:
        return len(self.body) + sum(len(k) + len(v) for k, v in self.headers) + 64

    def dumps(self) -> bytes:
        meta = json.dumps(
            {
                "s": self.status,
                "h": [[k.decode("latin-1"), v.decode("latin-1")] for k, v in self.headers],
                "e": self.etag.decode("latin-1"),
                "t": self.stored_at,
                "l": self.ttl,
            },
            separators=(",", ":"),
        ).encode()
        return struct.pack(">I", len(meta)) + meta + self.body

    @classmethod
    def loads(cls, raw: bytes) -> Entry:
        (n,) = struct.unpack(">I", raw[:4])
        meta = json.loads(raw[4 : 4 + n])
        return cls(
            status=meta["s"],
            headers=[(k.encode("latin-1"), v.encode("latin-1")) for k, v in meta["h"]],
            body=raw[4 + n :],
            etag=meta["e"].encode("latin-1"),
            stored_at=meta["t"],
            ttl=meta["l"],
        )


class MemoryStore:
    """An LRU bounded by bytes, in the worker."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self.used = 0
        self._entries: OrderedDict[str, Entry] = OrderedDict()

    async def get(self, key: str, now: float) -> Entry | None:
        entry = self._entries.get(key)
        if entry is None:
            return None
        if not entry.fresh(now):
            self._drop(key)
            return None
        self._entries.move_to_end(key)
        return entry

    async def put(self, key: str, entry: Entry) -> None:
        size = entry.size()
        if size > self.capacity:
            return
        if key in self._entries:
            self._drop(key)
        self._entries[key] = entry
        self.used += size
        while self.used > self.capacity:
            self._drop(next(iter(self._entries)))

    def _drop(self, key: str) -> None:
        entry = self._entries.pop(key)
        self.used -= entry.size()

    async def lock(self, key: str, seconds: float) -> bool:
        return True  # one worker: the in-process single flight is the whole of it

    async def unlock(self, key: str) -> None:
        return None


class RedisStore:
    """Entries shared by every worker and node; failures count as misses (never a 500).

    `client` is a resp.RespClient of its own: a large entry on the limiter's connection would
    hold up the limit checks queued behind it."""

    def __init__(self, client: RespClient) -> None:
        self.client = client

    async def get(self, key: str, now: float) -> Entry | None:
        try:
            raw = await self.client.execute("GET", f"apigw:cache:{key}")
        except Exception as exc:
            log.warning("cache store error: %s", exc)
            return None
        if raw is None:
            return None
        entry = Entry.loads(raw)
        return entry if entry.fresh(now) else None

    async def put(self, key: str, entry: Entry) -> None:
        try:
            await self.client.execute(
                "SET", f"apigw:cache:{key}", entry.dumps(), "PX", max(1, int(entry.ttl * 1000))
            )
        except Exception as exc:
            log.warning("cache store error: %s", exc)

    async def lock(self, key: str, seconds: float) -> bool:
        try:
            answer = await self.client.execute(
                "SET", f"apigw:cache-lock:{key}", b"1", "NX", "PX", max(1, int(seconds * 1000))
            )
        except Exception:
            return True  # no lock to be had: go to the upstream
        return answer is not None  # OK, or nil when another holds it

    async def unlock(self, key: str) -> None:
        with contextlib.suppress(Exception):  # it expires on its own
            await self.client.execute("DEL", f"apigw:cache-lock:{key}")


@dataclass(slots=True)
class Capture:
    """A miss being answered: the proxy feeds the upstream's answer here."""

    stage: CacheStage
    key: str
    future: asyncio.Future | None  # followers in this worker wait on it
    locked: bool = False
    status: int = 0
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    chunks: list[bytes] = field(default_factory=list)
    size: int = 0
    ttl: float = 0.0
    storable: bool = False
    done: bool = False

    def begin(self, status: int, headers: list[tuple[bytes, bytes]]) -> None:
        """The upstream's status and headers: decide whether the answer may be stored."""
        self.status = status
        self.ttl = self.stage.storable_ttl(status, headers)
        self.storable = self.ttl > 0
        self.headers = [(k, v) for k, v in headers if k.lower() not in _NOT_STORED]

    def feed(self, chunk: bytes) -> None:
        if not self.storable:
            return
        self.size += len(chunk)
        if self.size > self.stage.config.max_body:
            self.storable = False
            self.chunks = []
            return
        self.chunks.append(chunk)

    def finish(self, ok: bool) -> None:
        """The exchange ended (`ok`: the whole answer went through): store and wake."""
        if self.done:
            return
        self.done = True
        entry = None
        if ok and self.storable:
            body = b"".join(self.chunks)
            etag = next((v for k, v in self.headers if k.lower() == b"etag"), b"")
            if not etag:
                etag = b'"' + hashlib.sha256(body).hexdigest()[:32].encode() + b'"'
                self.headers.append((b"etag", etag))
            entry = Entry(self.status, self.headers, body, etag, time.time(), self.ttl)
        self.stage.finish(self, entry)


class CacheStage(Stage):
    name = "cache"

    def __init__(
        self,
        config: CacheConfig,
        *,
        store,
        api_id: int,
        route_id: int,
        generation: str,
        purged: dict[str, float] | None = None,
    ) -> None:
        self.config = config
        self.store = store
        self.purged = purged or {}  # cache key -> epoch time of its purge (CachePurge)
        self.prefix = f"{api_id}:{route_id}:{generation}:"
        self.flights: dict[str, asyncio.Future] = {}
        self._writes: set[asyncio.Task] = set()  # store writes in flight (kept referenced)

    def cache_key(self, ctx: RequestContext) -> str:
        scope = ctx.scope
        query = scope.get("query_string", b"")
        if query:
            pairs = sorted(parse_qsl(query.decode("latin-1"), keep_blank_values=True))
            query = urlencode(pairs).encode("latin-1", "replace")
        h = hashlib.sha256()  # GET and HEAD alike: the method is not in the key
        h.update(ctx.header(b"host") or b"")
        h.update(b"\0" + ctx.path.encode("utf-8", "surrogateescape") + b"\0" + query)
        for name in self.config.vary:
            values = [v for k, v in scope["headers"] if k == name]
            h.update(b"\0" + name + b"=" + b",".join(values))
        if not self.config.shared:
            h.update(b"\0c%d" % (ctx.key.consumer_id if ctx.key is not None else 0))
        return self.prefix + h.hexdigest()

    def storable_ttl(self, status: int, headers: list[tuple[bytes, bytes]]) -> float:
        """How long an answer may be kept (0: not at all)."""
        if status not in self.config.statuses:
            return 0.0
        ttl = float(self.config.ttl)
        for k, v in headers:
            name = k.lower()
            if name == b"set-cookie":
                return 0.0
            if name == b"vary" and v.strip() == b"*":
                return 0.0
            if name == b"cache-control":
                directives = v.lower()
                if any(d in directives for d in (b"no-store", b"private", b"no-cache")):
                    return 0.0
                ages = dict((m.group(1), int(m.group(2))) for m in _MAX_AGE.finditer(directives))
                age = ages.get(b"s-maxage", ages.get(b"max-age"))
                if age is not None:
                    ttl = min(ttl, float(age))
        return ttl

    async def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        if ctx.method not in ("GET", "HEAD"):
            ctx.response_headers.append(X_CACHE_BYPASS)
            return None
        key = self.cache_key(ctx)
        now = time.time()
        entry = await self.store.get(key, now)
        if entry is not None and self.purged and entry.stored_at <= self.purged.get(key, 0.0):
            entry = None  # purged by its key after it was stored
        ctx.response_headers.append((b"x-cache-key", key.encode()))
        if entry is not None:
            return self.hit(ctx, entry, now)
        if ctx.method == "HEAD":  # its answer has no body to store for GET
            ctx.response_headers.append(X_CACHE_MISS)
            return None
        flight = self.flights.get(key)
        if flight is not None:  # a miss for this key is being answered: wait for it
            try:
                entry = await asyncio.wait_for(asyncio.shield(flight), FOLLOW_TIMEOUT)
            except TimeoutError:
                entry = None
            if entry is not None:
                return self.hit(ctx, entry, time.time())
            ctx.response_headers.append(X_CACHE_MISS)
            return None  # the leader's answer was not storable: ask the upstream too
        future = asyncio.get_running_loop().create_future()
        self.flights[key] = future
        capture = Capture(self, key, future)
        ctx.cache_capture = capture
        ctx.observers = (*ctx.observers, capture)
        if not await self.store.lock(key, FOLLOW_TIMEOUT):
            # Another worker is fetching it: poll for what it stores.
            deadline = time.monotonic() + FOLLOW_TIMEOUT
            while time.monotonic() < deadline:
                await asyncio.sleep(0.02)
                entry = await self.store.get(key, time.time())
                if entry is not None:
                    capture.done = True
                    self.finish(capture, entry)
                    ctx.cache_capture = None
                    ctx.observers = tuple(o for o in ctx.observers if o is not capture)
                    return self.hit(ctx, entry, time.time())
        else:
            capture.locked = True
        ctx.response_headers.append(X_CACHE_MISS)
        return None

    def hit(self, ctx: RequestContext, entry: Entry, now: float) -> LocalResponse:
        """The stored answer (for HEAD too: the server sends no body, the length holds)."""
        age = (b"age", str(max(0, int(now - entry.stored_at))).encode())
        inm = ctx.header(b"if-none-match")
        if inm is not None and _etag_matches(inm, entry.etag):
            kept = [(k, v) for k, v in entry.headers if k.lower() in _KEPT_ON_304]
            return LocalResponse(304, [*kept, age, X_CACHE_HIT], b"")
        return LocalResponse(entry.status, [*entry.headers, age, X_CACHE_HIT], entry.body)

    def finish(self, capture: Capture, entry: Entry | None) -> None:
        """The leader's answer is known: store it, wake the followers, release the lock."""
        future = self.flights.pop(capture.key, None)
        if future is not None and not future.done():
            future.set_result(entry)
        if entry is not None or capture.locked:
            task = asyncio.get_running_loop().create_task(self._store(capture, entry))
            self._writes.add(task)
            task.add_done_callback(self._writes.discard)

    async def _store(self, capture: Capture, entry: Entry | None) -> None:
        if entry is not None:
            await self.store.put(capture.key, entry)
        if capture.locked:
            await self.store.unlock(capture.key)

    def on_complete(self, ctx: RequestContext) -> None:
        capture = ctx.cache_capture
        if capture is not None and not capture.done:
            capture.finish(ok=False)  # an error or a disconnect: followers must not hang


def _etag_matches(header: bytes, etag: bytes) -> bool:
    """If-None-Match (weak comparison, RFC 9110 section 13.1.2)."""
    if header.strip() == b"*":
        return True
    bare = etag.removeprefix(b"W/")
    return any(t.strip().removeprefix(b"W/") == bare for t in header.split(b","))
