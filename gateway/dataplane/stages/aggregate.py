"""Aggregate: one route answers by calling several upstream endpoints in parallel.

Configured on a route (policy kind `aggregate`):

    {"calls": {"user":   {"upstream": "users",  "path": "/users/{id}", "timeout": 2},
               "orders": {"upstream": "orders", "path": "/orders?customer={id}"}},
     "on_error": "fail"}

Each call is a GET to a target of the named upstream (balanced, with its circuit breaker)
with the route's captured `{params}` and `{consumer}` substituted (percent-encoded), the
request id, the consumer headers and `Accept: application/json`. The answer is one JSON
object keyed by call name. A call fails when it times out, cannot connect, answers >= 400
or not JSON; then `on_error` decides: "fail" answers 502 (the problem names the failed
calls), "partial" answers 200 with what succeeded plus an `errors` member (502 when every
call failed).
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from dataclasses import dataclass
from urllib.parse import quote

import aiohttp
from yarl import URL

from gateway.dataplane.context import LocalResponse, RequestContext
from gateway.dataplane.problems import problem

_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_-]{0,63}$")
_PLACEHOLDER = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")
MAX_ANSWER_BYTES = 8 << 20  # each call's JSON answer is read whole, up to this


class AggregateConfigError(ValueError):
    """A configuration that cannot be used; the message starts with the field."""


@dataclass(frozen=True, slots=True)
class CallSpec:
    name: str
    upstream: str  # an upstream's name; resolved to its entry when the snapshot compiles
    path: str
    timeout: float
    placeholders: tuple[str, ...]


@dataclass(frozen=True, slots=True)
class AggregateConfig:
    calls: tuple[CallSpec, ...]
    partial: bool


def parse_aggregate(doc: object) -> AggregateConfig:
    """An `aggregate` policy's configuration, validated."""
    if not isinstance(doc, dict):
        raise AggregateConfigError("config: expected an object.")
    unknown = sorted(set(doc) - {"calls", "on_error"})
    if unknown:
        raise AggregateConfigError(f"config: unknown {', '.join(unknown)}.")
    calls = doc.get("calls")
    if not isinstance(calls, dict) or not calls:
        raise AggregateConfigError("calls: an object of name: {upstream, path, timeout}.")
    if len(calls) > 20:
        raise AggregateConfigError("calls: at most 20.")
    specs = []
    for name, call in calls.items():
        field = f"calls.{name}"
        if not _NAME.match(name) or name == "errors":
            raise AggregateConfigError(
                f"{field}: a name of letters, digits, _ and - (not 'errors')."
            )
        if not isinstance(call, dict) or set(call) - {"upstream", "path", "timeout"}:
            raise AggregateConfigError(f"{field}: expected upstream, path and timeout.")
        upstream, path = call.get("upstream"), call.get("path")
        if not isinstance(upstream, str) or not upstream:
            raise AggregateConfigError(f"{field}.upstream: an upstream's name.")
        if not isinstance(path, str) or not path.startswith("/"):
            raise AggregateConfigError(f"{field}.path: a path starting with '/'.")
        timeout = call.get("timeout", 5)
        if (
            not isinstance(timeout, int | float)
            or isinstance(timeout, bool)
            or not 0.01 <= timeout <= 300
        ):
            raise AggregateConfigError(f"{field}.timeout: seconds, 0.01 to 300.")
        specs.append(
            CallSpec(name, upstream, path, float(timeout), tuple(_PLACEHOLDER.findall(path)))
        )
    on_error = doc.get("on_error", "fail")
    if on_error not in ("fail", "partial"):
        raise AggregateConfigError("on_error: 'fail' or 'partial'.")
    return AggregateConfig(tuple(specs), on_error == "partial")


@dataclass(frozen=True, slots=True)
class Call:
    spec: CallSpec
    upstream: object  # snapshot.UpstreamEntry


class CallFailed(Exception):
    def __init__(self, detail: str, status: int | None = None) -> None:
        super().__init__(detail)
        self.detail = detail
        self.status = status


class AggregateHandler:
    """The terminal step of an aggregate route (instead of the proxy)."""

    def __init__(
        self, *, calls: list[Call], partial: bool, session_getter, params: tuple[str, ...]
    ) -> None:
        self.calls = calls
        self.partial = partial
        self._session = session_getter
        missing = {p for c in calls for p in c.spec.placeholders} - {*params, "consumer"}
        if missing:
            raise AggregateConfigError(
                f"calls: {{{sorted(missing)[0]}}} is neither a parameter the route captures "
                "nor {consumer}."
            )

    async def handle(self, ctx: RequestContext) -> LocalResponse | None:
        started = time.perf_counter()
        results = await asyncio.gather(
            *(self._call(ctx, c) for c in self.calls), return_exceptions=True
        )
        ctx.upstream_latency = time.perf_counter() - started
        body: dict = {}
        errors: dict = {}
        for call, result in zip(self.calls, results, strict=True):
            if isinstance(result, CallFailed):
                errors[call.spec.name] = {"detail": result.detail, "status": result.status}
            elif isinstance(result, BaseException):
                raise result
            else:
                body[call.spec.name] = result
        if errors and (not self.partial or not body):
            ctx.error_kind = "upstream_error"
            names = ", ".join(sorted(errors))
            return problem(
                "bad-gateway",
                f"Calls that failed: {names}.",
                request_id=ctx.request_id,
                errors=errors,
            )
        if errors:
            body["errors"] = errors
        payload = json.dumps(body, separators=(",", ":")).encode()
        return LocalResponse(200, [(b"content-type", b"application/json")], payload)

    async def _call(self, ctx: RequestContext, call: Call):
        spec = call.spec
        upstream = call.upstream
        balancer = upstream.balancer
        target = balancer.pick(ctx, [])
        if target is None:
            raise CallFailed(f"upstream '{upstream.name}' has no healthy target")
        path = _PLACEHOLDER.sub(lambda m: quote(_value(ctx, m.group(1)), safe=""), spec.path)
        headers = {
            "Accept": "application/json",
            "X-Request-ID": ctx.request_id,
        }
        if ctx.key is not None:
            headers["X-Consumer-ID"] = str(ctx.key.consumer_id)
            headers["X-Consumer-Plan"] = ctx.key.plan_slug
        target.active += 1
        failed = True
        try:
            async with asyncio.timeout(spec.timeout):
                async with self._session().get(
                    URL(target.base_url + path, encoded=True),
                    headers=headers,
                    allow_redirects=False,
                    ssl=upstream.ssl,
                    server_hostname=upstream.server_hostname,
                ) as resp:
                    raw = await resp.content.read(MAX_ANSWER_BYTES + 1)
                    if resp.status >= 500:
                        raise CallFailed(f"answered {resp.status}", resp.status)
                    failed = False  # the target works; what it said may still be unusable
                    if resp.status >= 400:
                        raise CallFailed(f"answered {resp.status}", resp.status)
                    if len(raw) > MAX_ANSWER_BYTES:
                        raise CallFailed("answer too large", resp.status)
                    try:
                        return json.loads(raw)
                    except ValueError:
                        raise CallFailed("answer is not JSON", resp.status) from None
        except TimeoutError:
            raise CallFailed(f"no answer within {spec.timeout:g} s") from None
        except aiohttp.ClientError as exc:
            raise CallFailed(f"unreachable ({type(exc).__name__})") from None
        finally:
            target.active -= 1
            if failed:
                balancer.failed(target)
            else:
                balancer.succeeded(target)


def _value(ctx: RequestContext, name: str) -> str:
    if name == "consumer":
        return str(ctx.key.consumer_id) if ctx.key is not None else ""
    return ctx.path_params.get(name, "")
