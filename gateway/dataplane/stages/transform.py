"""Transform requests and responses: headers, query parameters and JSON bodies.

A policy's JSON configuration is parsed once, when the snapshot is compiled (and by admin's
clean(), so a bad one is refused with the field it names). Operations run in a fixed order,
as Kong's request-transformer does: remove, rename, set (replace or create), add (only when
absent). A value is a literal, or a whole-value reference to the request's context:
`${consumer}`, `${plan}`, `${request_id}`, `${claim.<name>}` (a JWT claim) or
`${path.<name>}` (a captured path parameter); an operation whose reference has no value
(no consumer on an anonymous route, a missing claim) is skipped.

Bodies are touched only when they are JSON (`application/json`, `*+json`) and the policy
has body operations; they are read whole under `max_body_bytes` (413 over it for requests;
a response over it cannot be checked for fields to remove, so it is a 502, never a leak).
Everything else streams through untouched. JSON field paths are dotted (`user.password`).
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from typing import Any
from urllib.parse import parse_qsl, urlencode

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.pipeline import Stage
from gateway.dataplane.problems import problem

DEFAULT_MAX_BODY = 1 << 20  # 1 MiB
_REFERENCE = re.compile(r"^\$\{(consumer|plan|request_id|claim\.[^}]+|path\.[^}]+)\}$")
_HEADER_NAME = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
# Never settable by a policy: framing, and what the gateway itself asserts upstream.
_PROTECTED = frozenset(
    {"content-length", "transfer-encoding", "connection", "host", "x-request-id", "via"}
)
_OPS = ("remove", "rename", "set", "add")


class TransformConfigError(ValueError):
    """A configuration that cannot be used; the message starts with the field's path."""


@dataclass(frozen=True, slots=True)
class Value:
    """A literal, or a reference resolved per request."""

    literal: Any = None
    ref: str = ""  # "consumer" | "plan" | "request_id" | "claim" | "path"
    name: str = ""  # the claim's or path parameter's name

    def resolve(self, ctx: RequestContext) -> Any:
        """The value for this request, or None when the reference has none."""
        ref = self.ref
        if not ref:
            return self.literal
        if ref == "request_id":
            return ctx.request_id
        if ref == "consumer":
            return str(ctx.key.consumer_id) if ctx.key is not None else None
        if ref == "plan":
            return ctx.key.plan_slug if ctx.key is not None else None
        if ref == "claim":
            return ctx.claims.get(self.name) if ctx.claims else None
        return ctx.path_params.get(self.name)

    @property
    def uses_consumer(self) -> bool:
        return self.ref in ("consumer", "plan", "claim")


def _parse_value(raw: Any, field: str, *, text: bool) -> Value:
    if isinstance(raw, str):
        m = _REFERENCE.match(raw)
        if m:
            ref, _, name = m.group(1).partition(".")
            return Value(ref=ref, name=name)
        if "${" in raw:
            raise TransformConfigError(
                f"{field}: a reference is a whole value: ${{consumer}}, ${{plan}}, "
                "${request_id}, ${claim.<name>} or ${path.<name>}."
            )
    if text and not isinstance(raw, str | int | float):
        raise TransformConfigError(f"{field}: a header or query value is a string.")
    return Value(literal=str(raw) if text and not isinstance(raw, str) else raw)


def _mapping(doc: dict, key: str, field: str) -> dict:
    value = doc.get(key, {})
    if not isinstance(value, dict):
        raise TransformConfigError(f"{field}.{key}: expected an object of name: value.")
    return value


def _names(doc: dict, key: str, field: str) -> list:
    value = doc.get(key, [])
    if not isinstance(value, list) or not all(isinstance(v, str) and v for v in value):
        raise TransformConfigError(f"{field}.{key}: expected a list of names.")
    return value


def _check_keys(doc: Any, allowed: tuple[str, ...], field: str) -> dict:
    if not isinstance(doc, dict):
        raise TransformConfigError(f"{field}: expected an object.")
    unknown = sorted(set(doc) - set(allowed))
    if unknown:
        raise TransformConfigError(
            f"{field}: unknown {', '.join(unknown)} (allowed: {', '.join(allowed)})."
        )
    return doc


# --- headers ----------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class HeaderOps:
    remove: frozenset[bytes] = frozenset()
    rename: tuple[tuple[bytes, bytes], ...] = ()
    set: tuple[tuple[bytes, Value], ...] = ()
    add: tuple[tuple[bytes, Value], ...] = ()

    def apply(self, headers: list[tuple[bytes, bytes]], ctx: RequestContext) -> list:
        """The headers (lower-case byte names) after the operations."""
        if self.remove:
            headers = [(k, v) for k, v in headers if k.lower() not in self.remove]
        for old, new in self.rename:
            headers = [(new if k.lower() == old else k, v) for k, v in headers]
        for name, value in self.set:
            resolved = value.resolve(ctx)
            if resolved is None:
                continue
            headers = [(k, v) for k, v in headers if k.lower() != name]
            headers.append((name, _header_value(resolved)))
        for name, value in self.add:
            if any(k.lower() == name for k, _ in headers):
                continue
            resolved = value.resolve(ctx)
            if resolved is not None:
                headers.append((name, _header_value(resolved)))
        return headers


_UNSAFE_IN_VALUES = bytes.maketrans(b"\r\n\0", b"   ")


def _header_value(value) -> bytes:
    """A resolved value as a header value: values come from requests (a claim, a query
    parameter), so CR, LF and NUL, which would start a header of the client's choosing, are
    spaces."""
    return str(value).encode("latin-1", "replace").translate(_UNSAFE_IN_VALUES)


def _header_name(name: str, field: str) -> bytes:
    if not _HEADER_NAME.match(name):
        raise TransformConfigError(f"{field}: {name!r} is not a header name.")
    if name.lower() in _PROTECTED:
        raise TransformConfigError(f"{field}: {name} is managed by the gateway.")
    return name.lower().encode()


def parse_header_ops(doc: Any, field: str) -> HeaderOps:
    doc = _check_keys(doc, _OPS, field)
    rename = _mapping(doc, "rename", field)
    return HeaderOps(
        remove=frozenset(_header_name(n, f"{field}.remove") for n in _names(doc, "remove", field)),
        rename=tuple(
            (_header_name(a, f"{field}.rename"), _header_name(b, f"{field}.rename.{a}"))
            for a, b in rename.items()
            if isinstance(b, str) or _fail(f"{field}.rename.{a}: the new name is a string.")
        ),
        set=tuple(
            (_header_name(n, f"{field}.set"), _parse_value(v, f"{field}.set.{n}", text=True))
            for n, v in _mapping(doc, "set", field).items()
        ),
        add=tuple(
            (_header_name(n, f"{field}.add"), _parse_value(v, f"{field}.add.{n}", text=True))
            for n, v in _mapping(doc, "add", field).items()
        ),
    )


def _fail(message: str) -> bool:
    raise TransformConfigError(message)


# --- query parameters -------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class QueryOps:
    remove: frozenset[str] = frozenset()
    rename: tuple[tuple[str, str], ...] = ()
    set: tuple[tuple[str, Value], ...] = ()
    add: tuple[tuple[str, Value], ...] = ()

    def apply(self, query: bytes, ctx: RequestContext) -> bytes:
        pairs = parse_qsl(query.decode("latin-1"), keep_blank_values=True)
        if self.remove:
            pairs = [(k, v) for k, v in pairs if k not in self.remove]
        for old, new in self.rename:
            pairs = [(new if k == old else k, v) for k, v in pairs]
        for name, value in self.set:
            resolved = value.resolve(ctx)
            if resolved is not None:
                pairs = [(k, v) for k, v in pairs if k != name]
                pairs.append((name, str(resolved)))
        for name, value in self.add:
            if all(k != name for k, _ in pairs):
                resolved = value.resolve(ctx)
                if resolved is not None:
                    pairs.append((name, str(resolved)))
        return urlencode(pairs).encode("latin-1", "replace")


def parse_query_ops(doc: Any, field: str) -> QueryOps:
    doc = _check_keys(doc, _OPS, field)
    return QueryOps(
        remove=frozenset(_names(doc, "remove", field)),
        rename=tuple(
            (a, b)
            for a, b in _mapping(doc, "rename", field).items()
            if isinstance(b, str) and b or _fail(f"{field}.rename.{a}: the new name is a string.")
        ),
        set=tuple(
            (n, _parse_value(v, f"{field}.set.{n}", text=True))
            for n, v in _mapping(doc, "set", field).items()
        ),
        add=tuple(
            (n, _parse_value(v, f"{field}.add.{n}", text=True))
            for n, v in _mapping(doc, "add", field).items()
        ),
    )


# --- JSON bodies ------------------------------------------------------------------------------
Path = tuple[str, ...]


def _path(text: str, field: str) -> Path:
    parts = tuple(text.split("."))
    if not text or not all(parts):
        raise TransformConfigError(f"{field}: {text!r} is not a dotted field path (a.b.c).")
    return parts


def _parent(doc: Any, path: Path, *, create: bool) -> dict | None:
    for part in path[:-1]:
        if not isinstance(doc, dict):
            return None
        child = doc.get(part)
        if child is None and create:
            child = doc[part] = {}
        doc = child
    return doc if isinstance(doc, dict) else None


@dataclass(frozen=True, slots=True)
class JsonOps:
    remove: tuple[Path, ...] = ()
    rename: tuple[tuple[Path, Path], ...] = ()
    set: tuple[tuple[Path, Value], ...] = ()
    add: tuple[tuple[Path, Value], ...] = ()

    def apply(self, doc: Any, ctx: RequestContext) -> Any:
        """The document after the operations (objects only; other JSON is left as it is)."""
        if not isinstance(doc, dict):
            return doc
        for path in self.remove:
            parent = _parent(doc, path, create=False)
            if parent is not None:
                parent.pop(path[-1], None)
        for old, new in self.rename:
            parent = _parent(doc, old, create=False)
            if parent is not None and old[-1] in parent:
                value = parent.pop(old[-1])
                target = _parent(doc, new, create=True)
                if target is not None:
                    target[new[-1]] = value
        for path, value in self.set:
            resolved = value.resolve(ctx)
            target = _parent(doc, path, create=True) if resolved is not None else None
            if target is not None:
                target[path[-1]] = resolved
        for path, value in self.add:
            target = _parent(doc, path, create=True)
            if target is not None and path[-1] not in target:
                resolved = value.resolve(ctx)
                if resolved is not None:
                    target[path[-1]] = resolved
        return doc


def parse_json_ops(doc: Any, field: str) -> JsonOps:
    doc = _check_keys(doc, _OPS, field)
    return JsonOps(
        remove=tuple(_path(n, f"{field}.remove") for n in _names(doc, "remove", field)),
        rename=tuple(
            (_path(a, f"{field}.rename"), _path(b, f"{field}.rename.{a}"))
            for a, b in _mapping(doc, "rename", field).items()
            if isinstance(b, str) or _fail(f"{field}.rename.{a}: the new path is a string.")
        ),
        set=tuple(
            (_path(n, f"{field}.set"), _parse_value(v, f"{field}.set.{n}", text=False))
            for n, v in _mapping(doc, "set", field).items()
        ),
        add=tuple(
            (_path(n, f"{field}.add"), _parse_value(v, f"{field}.add.{n}", text=False))
            for n, v in _mapping(doc, "add", field).items()
        ),
    )


def _max_body(doc: dict, field: str) -> int:
    value = doc.get("max_body_bytes", DEFAULT_MAX_BODY)
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= 64 << 20:
        raise TransformConfigError(f"{field}.max_body_bytes: a number of bytes, 1 to 64 MiB.")
    return value


def is_json(content_type: bytes | None) -> bool:
    """application/json or a +json type, with any parameters."""
    if not content_type:
        return False
    media = content_type.split(b";", 1)[0].strip().lower()
    return media == b"application/json" or media.endswith(b"+json")


# --- the policies ------------------------------------------------------------------------------
@dataclass(frozen=True, slots=True)
class RequestTransform:
    headers: HeaderOps | None = None
    query: QueryOps | None = None
    json: JsonOps | None = None
    max_body: int = DEFAULT_MAX_BODY


@dataclass(frozen=True, slots=True)
class ResponseTransform:
    headers: HeaderOps | None = None
    json: JsonOps | None = None
    max_body: int = DEFAULT_MAX_BODY


def injects_consumer(transform: RequestTransform | ResponseTransform | None) -> bool:
    """Whether a transformation puts consumer context (consumer, plan, a claim) anywhere."""
    if transform is None:
        return False
    for ops in (transform.headers, getattr(transform, "query", None), transform.json):
        if ops is None:
            continue
        for _, value in (*ops.set, *ops.add):
            if value.uses_consumer:
                return True
    return False


def parse_request_transform(doc: Any) -> RequestTransform:
    """A request_transform policy's configuration, validated."""
    doc = _check_keys(doc, ("headers", "query", "json", "max_body_bytes"), "config")
    return RequestTransform(
        headers=parse_header_ops(doc["headers"], "headers") if "headers" in doc else None,
        query=parse_query_ops(doc["query"], "query") if "query" in doc else None,
        json=parse_json_ops(doc["json"], "json") if "json" in doc else None,
        max_body=_max_body(doc, "config"),
    )


def parse_response_transform(doc: Any) -> ResponseTransform:
    """A response_transform policy's configuration, validated."""
    doc = _check_keys(doc, ("headers", "json", "max_body_bytes"), "config")
    return ResponseTransform(
        headers=parse_header_ops(doc["headers"], "headers") if "headers" in doc else None,
        json=parse_json_ops(doc["json"], "json") if "json" in doc else None,
        max_body=_max_body(doc, "config"),
    )


class RequestTransformStage(Stage):
    """Query and JSON body operations (header operations run in the proxy, on the headers it
    sends, so that they apply after the gateway's own)."""

    name = "transform_request"

    def __init__(self, transform: RequestTransform) -> None:
        self.query = transform.query
        self.json = transform.json
        self.max_body = transform.max_body

    async def on_request(self, ctx: RequestContext) -> LocalResponse | None:
        scope = ctx.scope
        if self.query is not None:
            scope["query_string"] = self.query.apply(scope.get("query_string", b""), ctx)
        if self.json is not None and is_json(ctx.header(b"content-type")):
            return await self._transform_body(ctx)
        return None

    async def _transform_body(self, ctx: RequestContext) -> LocalResponse | None:
        raw = await read_body(ctx, self.max_body)
        if raw is None or isinstance(raw, LocalResponse):
            return raw
        if raw.strip():
            try:
                doc = json.loads(raw)
            except ValueError:
                return problem(
                    "bad-request", "The body is not valid JSON.", request_id=ctx.request_id
                )
            raw = json.dumps(self.json.apply(doc, ctx), separators=(",", ":")).encode()
        replay_body(ctx, raw)
        return None


async def read_body(ctx: RequestContext, cap: int) -> bytes | LocalResponse | None:
    """The whole request body, read under `cap` bytes (a 413 beyond it); None: the client
    left. Stages that must see a body (transform, validate) read it with this."""
    too_large = problem(
        "body-too-large",
        f"A JSON body the gateway must read may be at most {cap} bytes.",
        request_id=ctx.request_id,
    )
    length = ctx.header(b"content-length")
    if length is not None and length.isdigit() and int(length) > cap:
        ctx.error_kind = "body_too_large"
        return too_large
    chunks: list[bytes] = []
    size = 0
    while True:
        msg = await ctx.receive()
        if msg["type"] == "http.disconnect":
            ctx.client_gone = True
            return None
        data = msg.get("body", b"")
        size += len(data)
        if size > cap:
            ctx.error_kind = "body_too_large"
            return too_large
        chunks.append(data)
        if not msg.get("more_body", False):
            break
    return b"".join(chunks)


def replay_body(ctx: RequestContext, body: bytes) -> None:
    """Let the next reader (another stage, the proxy) receive `body` as the whole request
    body, with a Content-Length that matches it."""
    sent = False
    receive = ctx.receive

    async def replay() -> dict:
        nonlocal sent
        if sent:
            return await receive()  # a disconnect, eventually
        sent = True
        return {"type": "http.request", "body": body, "more_body": False}

    ctx.receive = replay
    headers = [(k, v) for k, v in ctx.scope["headers"] if k != b"content-length"]
    headers.append((b"content-length", str(len(body)).encode()))
    ctx.scope["headers"] = headers
