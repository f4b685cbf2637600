"""Routing, versions and forwarding through the real gateway to the real echo upstream."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
import requests

from tests.conftest import _wait_stable, active_key, make_user, wait_for_key

pytestmark = [pytest.mark.e2e, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def key(stack, live):
    """A Free-plan key that every gateway worker knows."""
    issued = active_key(make_user("dev@example.com"), live.free)
    wait_for_key(stack, issued.key)
    return issued.key


def configure(stack, live, build, *, probe: str, headers: dict | None = None) -> None:
    """Run `build(upstream)` (creating APIs and routes) with a config bump, add its APIs to
    the Free plan, then wait until every worker routes `probe`."""
    from django.db import transaction

    from gateway.config import config_bump
    from gateway.models import Api

    with transaction.atomic():
        before = set(Api.objects.values_list("pk", flat=True))
        build(live.upstream)
        live.free.apis.add(*Api.objects.exclude(pk__in=before))
        config_bump(reason="test routes")
    _wait_stable(
        stack,
        lambda: stack.get(probe, headers=headers or {}).status_code != 404,
        timeout=10,
        what=f"the workers to route {probe}",
    )


def echo(resp: requests.Response) -> dict:
    assert resp.status_code == 200, resp.text
    body = resp.json()
    body["headers"] = {k.lower(): v for k, v in body["headers"].items()}
    return body


def test_templated_route_rewrites_the_path_with_its_parameters(stack, live, key):
    from gateway.models import Api, Route

    def build(up):
        api = Api.objects.create(name="Shop", slug="shop", path_prefix="/shop", upstream=up)
        Route.objects.create(
            api=api, name="order", path="/orders/{id}", rewrite="/internal/orders/{id}"
        )
        Route.objects.create(api=api, name="me", path="/orders/me", match="exact")

    configure(stack, live, build, probe="/shop/orders/1")
    got = echo(stack.get("/shop/orders/42/items?x=1", headers={"X-API-Key": key}))
    assert got["path"] == "/internal/orders/42/items"
    assert got["query"] == {"x": "1"}
    # A literal segment beats the {id} template; exact routes strip the API prefix.
    assert echo(stack.get("/shop/orders/me", headers={"X-API-Key": key}))["path"] == "/orders/me"


def test_host_routing_exact_and_wildcard(stack, live, key):
    from gateway.models import Api, Route

    def build(up):
        a = Api.objects.create(
            name="Exact", slug="h-exact", path_prefix="/h", hosts="api.example.test", upstream=up
        )
        Route.objects.create(api=a, name="r", path="/", rewrite="/exact")
        w = Api.objects.create(
            name="Wild", slug="h-wild", path_prefix="/h", hosts="*.example.test", upstream=up
        )
        Route.objects.create(api=w, name="r", path="/", rewrite="/wild")

    configure(stack, live, build, probe="/h/x", headers={"Host": "api.example.test"})

    def path_for(host: str) -> str | int:
        resp = stack.get("/h/x", headers={"X-API-Key": key, "Host": host})
        return resp.json()["path"] if resp.status_code == 200 else resp.status_code

    assert path_for("api.example.test") == "/exact/x"
    assert path_for("API.EXAMPLE.TEST:8080") == "/exact/x"
    assert path_for("shop.example.test") == "/wild/x"
    assert path_for("example.test") == 404
    assert path_for("127.0.0.1") == 404
    # A request target in absolute form names the host itself (RFC 9112 §3.2.2): it wins
    # over the Host header, for routing and for what the upstream is told.
    import json

    status, body = _absolute_form_get(
        stack, "http://api.example.test:8080/h/x", {"Host": "shop.example.test", "X-API-Key": key}
    )
    assert status == 200, body[:300]
    seen = json.loads(body)
    assert seen["path"] == "/exact/x"
    headers = {k.lower(): v for k, v in seen["headers"].items()}
    assert headers["x-forwarded-host"] == "api.example.test:8080"
    # No path at all ("GET http://host HTTP/1.1") asks for "/": nothing is served there.
    status, body = _absolute_form_get(
        stack, "http://api.example.test", {"Host": "shop.example.test"}
    )
    assert status == 404, body[:300]
    assert json.loads(body)["type"] == "urn:apigw:problem:not-found"


def _absolute_form_get(stack, target: str, headers: dict[str, str]) -> tuple[int, bytes]:
    """GET with an absolute-form request target (as to a forward proxy): (status, body)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", stack.gateway_port, timeout=5)
    try:
        conn.putrequest("GET", target, skip_host=True)
        for name, value in headers.items():
            conn.putheader(name, value)
        conn.endheaders()
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


def test_regex_and_header_conditions(stack, live, key):
    from gateway.models import Api, Route

    def build(up):
        api = Api.objects.create(name="Rx", slug="rx", path_prefix="/rx", upstream=up)
        Route.objects.create(
            api=api,
            name="sku",
            match="regex",
            path=r"/items/(?P<sku>[0-9]{3,})",
            rewrite="/sku/{sku}",
        )
        Route.objects.create(api=api, name="beta", path="/", headers="X-Beta: yes", rewrite="/beta")
        Route.objects.create(api=api, name="rest", path="/")

    configure(stack, live, build, probe="/rx/x")
    h = {"X-API-Key": key}
    assert echo(stack.get("/rx/items/1234", headers=h))["path"] == "/sku/1234"
    assert echo(stack.get("/rx/items/12", headers=h))["path"] == "/items/12"
    assert echo(stack.get("/rx/a", headers={**h, "X-Beta": "yes"}))["path"] == "/beta/a"
    assert echo(stack.get("/rx/a", headers={**h, "X-Beta": "no"}))["path"] == "/a"


def test_path_versions_with_a_default_and_deprecation_headers(stack, live, key):
    from gateway.models import Api, ApiVersion, Route

    def build(up):
        api = Api.objects.create(
            name="Orders", slug="orders", path_prefix="/orders", upstream=up, version_scheme="path"
        )
        ApiVersion.objects.create(
            api=api,
            name="v1",
            is_default=True,
            deprecated_at=datetime(2026, 6, 1, tzinfo=UTC),
            sunset_at=datetime(2027, 6, 1, tzinfo=UTC),
            docs_url="https://docs.example.test/orders/v1",
        )
        v2 = ApiVersion.objects.create(api=api, name="v2")
        Route.objects.create(api=api, name="all", path="/")
        Route.objects.create(api=api, name="v2-only", path="/new", version=v2, rewrite="/v2new")

    configure(stack, live, build, probe="/orders/v2/x")
    h = {"X-API-Key": key}
    v1 = stack.get("/orders/v1/items", headers=h)
    assert echo(v1)["path"] == "/items"  # the prefix and the version segment are stripped
    assert v1.headers["deprecation"] == f"@{int(datetime(2026, 6, 1, tzinfo=UTC).timestamp())}"
    assert v1.headers["sunset"] == "Tue, 01 Jun 2027 00:00:00 GMT"
    assert v1.headers["link"] == (
        '<https://docs.example.test/orders/v1>; rel="deprecation"; type="text/html", '
        '<https://docs.example.test/orders/v1>; rel="sunset"; type="text/html"'
    )
    default = stack.get("/orders/items", headers=h)
    assert echo(default)["path"] == "/items" and "deprecation" in default.headers
    v2 = stack.get("/orders/v2/items", headers=h)
    assert echo(v2)["path"] == "/items"
    assert "deprecation" not in v2.headers and "sunset" not in v2.headers
    assert echo(stack.get("/orders/v2/new", headers=h))["path"] == "/v2new"
    assert echo(stack.get("/orders/v1/new", headers=h))["path"] == "/new"  # v2 only
    # An unknown version is a 404, not a path of the default version.
    assert stack.get("/orders/v9/items", headers=h).status_code == 404
    assert stack.get("/orders/2020-01-01/items", headers=h).status_code == 404


def test_header_and_query_versions(stack, live, key):
    from gateway.models import Api, ApiVersion, Route

    def build(up):
        for scheme in ("header", "query"):
            api = Api.objects.create(
                name=scheme,
                slug=f"by-{scheme}",
                path_prefix=f"/by-{scheme}",
                upstream=up,
                version_scheme=scheme,
            )
            one = ApiVersion.objects.create(api=api, name="1", is_default=True)
            two = ApiVersion.objects.create(api=api, name="2")
            Route.objects.create(api=api, name="1", path="/", version=one, rewrite="/one")
            Route.objects.create(api=api, name="2", path="/", version=two, rewrite="/two")

    configure(stack, live, build, probe="/by-query/x")
    h = {"X-API-Key": key}
    assert echo(stack.get("/by-header/x", headers={**h, "API-Version": "2"}))["path"] == "/two/x"
    assert echo(stack.get("/by-header/x", headers=h))["path"] == "/one/x"
    assert stack.get("/by-header/x", headers={**h, "API-Version": "9"}).status_code == 404
    assert echo(stack.get("/by-query/x?version=2", headers=h))["path"] == "/two/x"
    assert echo(stack.get("/by-query/x?a=b", headers=h))["path"] == "/one/x"


def test_inbound_request_id_and_traceparent_are_kept_when_well_formed(stack, live, key):
    trace = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01"
    resp = stack.get(
        "/demo/anything",
        headers={
            "X-API-Key": key,
            "X-Request-ID": "client-abc.123",
            "traceparent": trace,
            "tracestate": "vendor=abc,other=1",
        },
    )
    got = echo(resp)
    assert resp.headers["x-request-id"] == "client-abc.123"
    assert got["headers"]["x-request-id"] == "client-abc.123"
    assert got["headers"]["traceparent"] == trace
    assert got["headers"]["tracestate"] == "vendor=abc,other=1"  # belongs to that trace
    bad = stack.get(
        "/demo/anything",
        headers={
            "X-API-Key": key,
            "X-Request-ID": "no spaces allowed",
            "traceparent": "00-zz",
            "tracestate": "vendor=abc",
        },
    )
    got = echo(bad)
    assert "tracestate" not in got["headers"]  # a new trace: the old state is not its own
    assert bad.headers["x-request-id"] != "no spaces allowed"
    assert got["headers"]["x-request-id"] == bad.headers["x-request-id"]
    assert got["headers"]["traceparent"].startswith(f"00-{bad.headers['x-request-id']}-")
    # A problem carries the client's id too.
    missing = stack.get("/demo/anything", headers={"X-Request-ID": "corr-1"})
    assert missing.status_code == 401 and missing.json()["request_id"] == "corr-1"


def test_hop_by_hop_request_fields_stop_at_the_gateway(stack, live, key):
    got = echo(
        stack.get(
            "/demo/anything",
            headers={
                "X-API-Key": key,
                "Connection": "keep-alive, X-Secret-Hop",
                "X-Secret-Hop": "only for the next hop",
                "Keep-Alive": "timeout=5",
                "TE": "trailers",
                "Proxy-Authorization": "Basic c2VjcmV0",
                "X-Kept": "1",
            },
        )
    )
    for name in ("x-secret-hop", "keep-alive", "te", "proxy-authorization"):
        assert name not in got["headers"], name
    assert got["headers"]["x-kept"] == "1"


def test_body_over_the_route_limit_is_413_before_and_while_streaming(stack, live, key):
    from gateway.models import Api, Route

    def build(up):
        api = Api.objects.create(name="Small", slug="small", path_prefix="/small", upstream=up)
        Route.objects.create(api=api, name="r", path="/", max_body_bytes=1000)

    configure(stack, live, build, probe="/small/x")
    url = stack.gateway_url + "/small/upload"
    h = {"X-API-Key": key}
    ok = requests.post(url, data=b"x" * 1000, headers=h, timeout=10)
    assert echo(ok)["body_size"] == 1000
    declared = requests.post(url, data=b"x" * 5000, headers=h, timeout=10)
    assert declared.status_code == 413
    assert declared.json()["type"] == "urn:apigw:problem:body-too-large"

    def chunks():
        for _ in range(10):
            yield b"y" * 600

    streamed = requests.post(url, data=chunks(), headers=h, timeout=10)
    assert streamed.status_code == 413
    assert streamed.headers["content-type"] == "application/problem+json"


def test_a_body_over_the_limit_after_the_upstream_answered_cuts_the_connection(stack, live, key):
    import socket

    from analytics.models import RequestEvent
    from gateway.models import Api, Route
    from tests.procs import wait_until

    def build(up):
        api = Api.objects.create(name="Early", slug="early", path_prefix="/early", upstream=up)
        Route.objects.create(api=api, name="r", path="/", max_body_bytes=1000)

    configure(stack, live, build, probe="/early/x", headers={"X-API-Key": key})
    with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=10) as sock:
        sock.sendall(
            b"POST /early/hold HTTP/1.1\r\nHost: gw\r\n"
            b"X-API-Key: " + key.encode() + b"\r\nTransfer-Encoding: chunked\r\n\r\n"
            b"1f4\r\n" + b"a" * 500 + b"\r\n"
        )
        answer = b""
        for _ in range(50):  # the demo's /hold answers at once: head and a first chunk
            answer += sock.recv(65536)
            if b"first" in answer:
                break
        assert answer.startswith(b"HTTP/1.1 200 "), answer[:200]
        sock.sendall(b"320\r\n" + b"b" * 800 + b"\r\n")  # 1,300 bytes: over the limit
        for _ in range(50):  # until the gateway cuts the connection
            try:
                chunk = sock.recv(65536)
            except ConnectionResetError:
                break
            if not chunk:
                break
            answer += chunk
    # One response only: no 413 written after the 200 (the head's random x-request-id may
    # contain "413", so look at status lines and the problem type, not at any "413").
    assert b"rest" not in answer
    assert answer.count(b"HTTP/1.1 ") == 1, answer
    assert b"HTTP/1.1 413" not in answer and b"body-too-large" not in answer, answer
    events = RequestEvent.objects.filter(api_id=Api.objects.get(slug="early").pk, method="POST")
    wait_until(events.exists, timeout=30, what="the cut request's log event")
    assert [(e.status, e.error_kind) for e in events] == [(200, "body_too_large")]
    assert "Traceback" not in stack.procs["gateway"].output()


def test_preserve_host_and_route_timeout(stack, live, key):
    from gateway.models import Api, Route

    def build(up):
        api = Api.objects.create(name="Keep", slug="keep", path_prefix="/keep", upstream=up)
        Route.objects.create(api=api, name="slow", path="/delay", read_timeout=0.3)
        Route.objects.create(api=api, name="r", path="/", preserve_host=True)

    configure(stack, live, build, probe="/keep/x")
    h = {"X-API-Key": key, "Host": "shop.example.test"}
    assert echo(stack.get("/keep/x", headers=h))["headers"]["host"] == "shop.example.test"
    slow = stack.get("/keep/delay/2", headers={"X-API-Key": key})
    assert slow.status_code == 504, slow.text
    assert slow.json()["type"] == "urn:apigw:problem:gateway-timeout"


def test_conflicting_content_length_and_transfer_encoding_is_400(stack, live):
    import socket

    with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=5) as sock:
        sock.sendall(
            b"POST /demo/x HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\n"
            b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n"
        )
        head = sock.recv(65536)
    assert head.startswith(b"HTTP/1.1 400 "), head[:200]
    assert b"application/problem+json" in head


@pytest.mark.parametrize("coding", [b"gzip, chunked", b"deflate,chunked", b"identity"])
def test_a_transfer_coding_other_than_chunked_is_501(stack, live, coding):
    import socket

    with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=5) as sock:
        sock.sendall(
            b"POST /demo/x HTTP/1.1\r\nHost: x\r\nX-Request-ID: te-probe-1\r\n"
            b"Transfer-Encoding: " + coding + b"\r\n\r\n0\r\n\r\n"
        )
        answer = sock.recv(65536)
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 501 "), answer[:200]
    assert b"application/problem+json" in head
    assert b"x-request-id: te-probe-1" in head  # the client's id, on the HTTP layer's errors too
    assert b"urn:apigw:problem:not-implemented" in body
    assert b'"request_id":"te-probe-1"' in body.replace(b" ", b"")


def test_encoded_paths_reach_only_the_route_the_plain_path_would(stack, live, key):
    from gateway.models import Api, Route

    def build(up):
        api = Api.objects.create(name="Adm", slug="adm", path_prefix="/adm", upstream=up)
        Route.objects.create(api=api, name="pub", path="/public", rewrite="/pub")

    configure(stack, live, build, probe="/adm/public")
    h = {"X-API-Key": key}
    # %2e%2e is "..": normalised before matching, so it cannot climb out of /adm/public.
    assert stack.get("/adm/public/%2e%2e/secret", headers=h).status_code == 404
    assert echo(stack.get("/adm/%70ublic/x", headers=h))["path"] == "/pub/x"
    # %2F decodes to a separator before matching, as the plain path would.
    assert echo(stack.get("/adm%2Fpublic/y", headers=h))["path"] == "/pub/y"


def test_an_anonymous_route_needs_no_key_and_its_siblings_still_do(stack, live):
    from gateway.models import Api, Route

    def build(up):
        api = Api.objects.create(name="Pub", slug="pub", path_prefix="/pub", upstream=up)
        Route.objects.create(api=api, name="open", path="/status", anonymous=True)
        Route.objects.create(api=api, name="rest", path="/")

    configure(stack, live, build, probe="/pub/status")
    resp = stack.get("/pub/status", headers={"X-API-Key": "gw_000000000000_ignored"})
    got = echo(resp)
    assert got["path"] == "/status"
    assert "x-api-key" not in got["headers"]  # a credential sent anyway is not passed on
    assert "x-consumer-id" not in got["headers"]
    assert "x-ratelimit-limit" not in resp.headers
    assert stack.get("/pub/private").status_code == 401


@pytest.mark.parametrize(
    "host_lines",
    [
        b"Host: a.example.test\r\nHost: internal\r\n",
        b'Host: x", for=6.6.6.6;host="y\r\n',
        b"Host: a b\r\n",
    ],
)
def test_two_hosts_or_a_malformed_host_is_400(stack, live, host_lines):
    import socket

    with socket.create_connection(("127.0.0.1", stack.gateway_port), timeout=5) as sock:
        sock.sendall(b"GET /demo/x HTTP/1.1\r\n" + host_lines + b"\r\n")
        answer = b""
        for _ in range(10):  # the head and the body may come in separate reads
            answer += sock.recv(65536)
            if b"request_id" in answer:
                break
    assert answer.startswith(b"HTTP/1.1 400 "), answer[:200]
    assert b"urn:apigw:problem:bad-request" in answer


def test_methods_priority_and_405_with_allow(stack, live, key):
    from gateway.models import Api, Route

    def build(up):
        api = Api.objects.create(name="Meth", slug="meth", path_prefix="/meth", upstream=up)
        Route.objects.create(api=api, name="read", path="/items", methods="GET", rewrite="/r")
        Route.objects.create(api=api, name="write", path="/items", methods="POST", rewrite="/w")
        # Same path and methods as "read": the higher priority wins.
        Route.objects.create(
            api=api, name="read2", path="/items", methods="GET", priority=5, rewrite="/r2"
        )

    configure(stack, live, build, probe="/meth/items", headers={"X-API-Key": key})
    h = {"X-API-Key": key}
    assert echo(stack.get("/meth/items", headers=h))["path"] == "/r2"
    assert (
        echo(requests.post(stack.gateway_url + "/meth/items", headers=h, timeout=5))["path"] == "/w"
    )
    # GET brings HEAD: the same route, without a body.
    head = requests.head(stack.gateway_url + "/meth/items", headers=h, timeout=5)
    assert head.status_code == 200 and head.content == b""
    refused = requests.delete(stack.gateway_url + "/meth/items", headers=h, timeout=5)
    assert refused.status_code == 405, refused.text
    assert refused.headers["content-type"] == "application/problem+json"
    assert refused.json()["type"] == "urn:apigw:problem:method-not-allowed"
    assert refused.headers["allow"] == "GET, HEAD, POST"


def test_a_change_made_behind_the_apps_back_is_served_after_gatewayconfig_bump(stack, live, key):
    import io
    import time

    from django.core.management import call_command

    from gateway.models import Api, Route
    from tests.procs import wait_until

    def build(up):
        api = Api.objects.create(name="Raw", slug="raw", path_prefix="/raw", upstream=up)
        Route.objects.create(api=api, name="all", path="/", rewrite="/before")

    h = {"X-API-Key": key}
    configure(stack, live, build, probe="/raw/x", headers=h)
    assert echo(stack.get("/raw/x", headers=h))["path"] == "/before/x"
    # An UPDATE no signal sees (a script, a data migration): no config version, so the
    # gateways keep their snapshot...
    Route.objects.filter(api__slug="raw").update(rewrite="/after")
    time.sleep(1.5)  # three poll intervals
    assert echo(stack.get("/raw/x", headers=h))["path"] == "/before/x"
    # ...until someone bumps it.
    out = io.StringIO()
    call_command("gatewayconfig", "bump", "--reason", "raw SQL fix", stdout=out)
    assert "config version" in out.getvalue()
    wait_until(
        lambda: all(echo(stack.get("/raw/x", headers=h))["path"] == "/after/x" for _ in range(4)),
        timeout=5,
        what="the bumped configuration",
    )
    from gateway.models import ConfigVersion

    assert ConfigVersion.objects.order_by("-version").first().reason == "raw SQL fix"
