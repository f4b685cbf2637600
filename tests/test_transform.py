"""Transformation policies: configuration checks and the operations, without a server."""

from __future__ import annotations

import asyncio
import json

import pytest

from gateway.dataplane.context import RequestContext
from gateway.dataplane.stages.transform import (
    RequestTransformStage,
    TransformConfigError,
    is_json,
    parse_request_transform,
    parse_response_transform,
)


def _ctx(headers=(), query: bytes = b"", body: bytes | None = None) -> RequestContext:
    messages = [{"type": "http.request", "body": body or b"", "more_body": False}]

    async def receive():
        return messages.pop(0) if messages else {"type": "http.disconnect"}

    ctx = RequestContext(
        scope={"headers": list(headers), "query_string": query},
        receive=receive,
        send=None,
        request_id="req-1",
        method="POST",
        path="/orders/7",
        client_ip="127.0.0.1",
    )
    ctx.path_params = {"id": "7"}
    ctx.claims = {"sub": "partner-7", "tier": 3}
    return ctx


@pytest.mark.parametrize(
    ("doc", "field"),
    [
        ([], "config: expected an object"),
        ({"headerz": {}}, "config: unknown headerz"),
        ({"headers": {"add": {"Bad Name": "x"}}}, "headers.add: 'Bad Name' is not a header name"),
        ({"headers": {"set": {"Content-Length": "1"}}}, "headers.set: Content-Length is managed"),
        ({"headers": {"remove": "X-A"}}, "headers.remove: expected a list"),
        ({"headers": {"set": {"X-A": "${nope}"}}}, "headers.set.X-A: a reference is a whole"),
        ({"headers": {"set": {"X-A": {"a": 1}}}}, "headers.set.X-A: a header or query value"),
        ({"query": {"rename": {"a": 5}}}, "query.rename.a: the new name"),
        ({"json": {"remove": ["a..b"]}}, "json.remove: 'a..b' is not a dotted field path"),
        ({"max_body_bytes": 0}, "config.max_body_bytes"),
    ],
)
def test_bad_configurations_are_refused_naming_the_field(doc, field):
    with pytest.raises(TransformConfigError) as err:
        parse_request_transform(doc)
    assert str(err.value).startswith(field), str(err.value)


def test_response_transforms_take_no_query_operations():
    with pytest.raises(TransformConfigError, match="unknown query"):
        parse_response_transform({"query": {}})


def test_header_operations_run_remove_rename_set_add_with_context_values():
    t = parse_request_transform(
        {
            "headers": {
                "remove": ["X-Debug"],
                "rename": {"X-Old": "X-New"},
                "set": {"X-Tenant": "${claim.sub}", "X-Missing": "${claim.nope}"},
                "add": {"X-Path-Id": "${path.id}", "X-New": "not added: present"},
            }
        }
    )
    ctx = _ctx()
    out = t.headers.apply([(b"x-debug", b"1"), (b"x-old", b"v"), (b"x-tenant", b"spoofed")], ctx)
    assert out == [(b"x-new", b"v"), (b"x-tenant", b"partner-7"), (b"x-path-id", b"7")]


def test_a_value_from_the_request_cannot_start_a_header_of_its_own():
    t = parse_request_transform({"headers": {"set": {"X-Tenant": "${claim.sub}"}}})
    ctx = _ctx()
    ctx.claims = {"sub": "a\r\nX-Admin: 1\x00"}
    assert t.headers.apply([], ctx) == [(b"x-tenant", b"a  X-Admin: 1 ")]


def test_query_operations():
    t = parse_request_transform(
        {"query": {"remove": ["debug"], "rename": {"q": "search"}, "add": {"rid": "${request_id}"}}}
    )
    out = t.query.apply(b"q=shoes&debug=1&page=2", _ctx())
    assert out == b"search=shoes&page=2&rid=req-1"


def test_the_request_json_body_is_transformed_and_its_length_fixed():
    t = parse_request_transform(
        {
            "json": {
                "remove": ["password", "card.cvv"],
                "rename": {"name": "customer.name"},
                "set": {"meta.request_id": "${request_id}", "meta.tier": "${claim.tier}"},
                "add": {"source": "gateway", "id": "not added"},
            }
        }
    )
    raw = json.dumps({"id": 1, "name": "Ada", "password": "x", "card": {"cvv": "123"}}).encode()
    ctx = _ctx([(b"content-type", b"application/json"), (b"content-length", b"99")], body=raw)
    assert asyncio.run(RequestTransformStage(t).on_request(ctx)) is None
    msg = asyncio.run(ctx.receive())
    doc = json.loads(msg["body"])
    assert doc == {
        "id": 1,
        "card": {},
        "customer": {"name": "Ada"},
        "meta": {"request_id": "req-1", "tier": 3},  # a claim keeps its JSON type
        "source": "gateway",
    }
    assert dict(ctx.scope["headers"])[b"content-length"] == str(len(msg["body"])).encode()


def test_bodies_that_are_not_json_are_left_alone_and_big_or_broken_ones_refused():
    t = parse_request_transform({"json": {"remove": ["a"]}, "max_body_bytes": 10})
    stage = RequestTransformStage(t)
    plain = _ctx([(b"content-type", b"text/plain")], body=b'{"a": 1}')
    assert asyncio.run(stage.on_request(plain)) is None
    assert asyncio.run(plain.receive())["body"] == b'{"a": 1}'  # untouched, unread
    big = _ctx([(b"content-type", b"application/json")], body=b'{"a": "0123456789"}')
    assert asyncio.run(stage.on_request(big)).status == 413
    broken = _ctx([(b"content-type", b"application/json")], body=b"{nope")
    assert asyncio.run(stage.on_request(broken)).status == 400


def test_json_content_types():
    assert is_json(b"application/json; charset=utf-8")
    assert is_json(b"application/problem+json")
    assert not is_json(b"text/json-ish")
    assert not is_json(None)
